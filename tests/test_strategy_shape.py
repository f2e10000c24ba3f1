"""One strategy shape: every registered strategy is configured by a ``<Name>Config`` dataclass its base class reads."""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing

import pytest
import torch

from hf_softmask.strategies import ContinualStrategy, available_strategies, get_strategy, strategy_class

SHAPED = available_strategies()

#: Fields that take one of a fixed set of values, per strategy (each must carry ``"choices"`` metadata).
CHOICE_FIELDS = {
    "das": {"general_objective", "domain_objective", "normalization"},
    "hat": {"mode", "unowned_policy"},
    "adahat": {"mode", "unowned_policy"},
    "talos": {"scope"},
    "lora": {"lora_targets"},
    "tss": {"mode", "score_init"},
    "wsn": {"score_init"},
}


def _config_class(name: str):
    cls = strategy_class(name)
    config_cls = getattr(cls, "config_class", None)
    assert config_cls is not None and dataclasses.is_dataclass(config_cls), f"{name}: no config_class dataclass"
    return cls, config_cls


def _fields(config_cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_cls) if f.init]


def _numeric_fields(config_cls) -> list[str]:
    """Fields annotated int or float (possibly ``| None``), bool excluded."""
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in _fields(config_cls):
        hint = hints[f.name]
        types = {hint, *typing.get_args(hint)}
        if types & {int, float}:
            out.append(f.name)
    return out


@pytest.mark.parametrize("name", SHAPED)
def test_a_misspelled_setting_is_refused_listing_the_valid_ones(name):
    _, config_cls = _config_class(name)
    with pytest.raises(TypeError) as err:
        get_strategy(name, lerning_rate_scale=1.0)
    message = str(err.value)
    assert "lerning_rate_scale" in message and "valid" in message
    for f in _fields(config_cls):
        assert f.name in message, f"{name}: {f.name} not listed in {message!r}"


@pytest.mark.parametrize("name", SHAPED)
def test_the_signature_lists_exactly_the_config_fields(name):
    cls, config_cls = _config_class(name)
    params = dict(inspect.signature(cls.__init__).parameters)
    assert list(params)[:2] == ["self", "config"]
    settings = {n: p for n, p in params.items() if n not in ("self", "config")}
    assert list(settings) == [f.name for f in _fields(config_cls)]
    for f in _fields(config_cls):
        assert settings[f.name].kind is inspect.Parameter.KEYWORD_ONLY
        if f.default is not dataclasses.MISSING:
            assert settings[f.name].default == f.default


@pytest.mark.parametrize("name", SHAPED)
def test_config_and_keywords_are_exclusive(name):
    cls, config_cls = _config_class(name)
    config = config_cls()
    strategy = cls(config=config)
    assert strategy.cfg == config
    assert cls(config).cfg == config  # positional too
    keyword = _fields(config_cls)[0].name if _fields(config_cls) else "anything"
    with pytest.raises(TypeError, match="either config= or keyword"):
        cls(config=config, **{keyword: getattr(config, keyword, 1)})
    with pytest.raises(TypeError, match=config_cls.__name__):
        cls(config=object())


@pytest.mark.parametrize("name", SHAPED)
def test_every_field_carries_help(name):
    _, config_cls = _config_class(name)
    for f in _fields(config_cls):
        assert f.metadata.get("help"), f"{config_cls.__name__}.{f.name} has no help"


@pytest.mark.parametrize("name", SHAPED)
def test_choice_fields_declare_and_enforce_their_choices(name):
    _, config_cls = _config_class(name)
    declared = {f.name for f in _fields(config_cls) if "choices" in f.metadata}
    assert CHOICE_FIELDS.get(name, set()) <= declared, f"{name}: fields without choices metadata"
    for f in _fields(config_cls):
        choices = f.metadata.get("choices")
        if choices is None:
            continue
        assert f.default in choices
        for value in choices:
            assert getattr(config_cls(**{f.name: value}), f.name) == value
        with pytest.raises(ValueError, match=f.name) as err:
            config_cls(**{f.name: "not-a-choice"})
        assert all(str(c) in str(err.value) for c in choices)


@pytest.mark.parametrize("name", SHAPED)
def test_non_finite_numbers_are_refused_naming_the_field(name):
    _, config_cls = _config_class(name)
    for field_name in _numeric_fields(config_cls):
        for bad in (math.nan, math.inf):
            with pytest.raises(ValueError, match=field_name):
                config_cls(**{field_name: bad})


@pytest.mark.parametrize("name", SHAPED)
def test_saved_config_rebuilds_the_same_settings(name, tmp_path):
    cls, config_cls = _config_class(name)
    strategy = get_strategy(name)
    strategy.save_pretrained(tmp_path)
    saved = ContinualStrategy.saved_config(tmp_path)
    assert saved["name"] == name
    rebuilt = cls(**{f.name: saved[f.name] for f in _fields(config_cls)})
    assert rebuilt.cfg == strategy.cfg


def test_no_strategy_module_patches_its_signature_at_the_end():
    from pathlib import Path

    import hf_softmask.strategies as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "__signature__ =" not in text.replace("cls.__init__.__signature__ =", ""), path.name
        assert "**_)" not in text and "**_," not in text, path.name


def test_tss_flat_keywords_and_adapter_config_agree():
    from hf_softmask.tss import SubnetworkConfig

    flat = get_strategy("tss", threshold=-0.1, init_score=0.05, score_init="constant", target_modules=["query"])
    assert flat.adapter_config.threshold == -0.1 and flat.adapter_config.init_score == 0.05
    assert flat.adapter_config.selection == "threshold"
    full = get_strategy("tss", adapter_config=flat.adapter_config.to_dict())
    assert full.adapter_config == flat.adapter_config and full.cfg.threshold == -0.1
    with pytest.raises(ValueError, match="threshold"):
        get_strategy("tss", threshold=-0.3, adapter_config=SubnetworkConfig(threshold=-0.1))
    with pytest.raises(ValueError, match="selection"):
        get_strategy("tss", adapter_config=SubnetworkConfig(selection="topk"))


def test_a_strategy_without_config_class_keeps_its_own_init():
    class Plain(ContinualStrategy):
        name = "plain"

        def __init__(self, alpha: float = 1.0):
            self.alpha = alpha

    assert list(inspect.signature(Plain.__init__).parameters) == ["self", "alpha"]
    assert Plain(alpha=2.0).alpha == 2.0
    with pytest.raises(TypeError):
        ContinualStrategy(alpha=1.0)


def test_a_config_class_needs_the_config_and_settings_init():
    from hf_softmask.strategies.naive import NaiveConfig

    with pytest.raises(TypeError, match=r"\(self, config=None, \*\*settings\)"):

        class Wrong(ContinualStrategy):
            config_class = NaiveConfig

            def __init__(self, alpha=1.0):
                pass


def test_a_nested_config_field_given_as_an_object_or_a_dict(tmp_path):
    """As DAS has it: a nested SoftMaskConfig field (default_factory), given as an object or a dict."""
    from hf_softmask.core.masking import SoftMaskConfig
    from hf_softmask.strategies.units import StrategyConfig

    @dataclasses.dataclass
    class NestedConfig(StrategyConfig):
        softmask: SoftMaskConfig = dataclasses.field(default_factory=SoftMaskConfig, metadata={"help": "Masking."})
        temperature: float = dataclasses.field(default=0.05, metadata={"help": "InfoNCE temperature."})

        def __post_init__(self):
            super().__post_init__()
            if isinstance(self.softmask, dict):
                self.softmask = SoftMaskConfig(**self.softmask)

    class Nested(ContinualStrategy):
        name = "nested"
        config_class = NestedConfig

    params = inspect.signature(Nested.__init__).parameters
    assert params["softmask"].default == SoftMaskConfig() and params["temperature"].default == 0.05
    strategy = Nested(softmask=SoftMaskConfig(mode="grad"), temperature=0.1)
    strategy.save_pretrained(tmp_path)
    saved = ContinualStrategy.saved_config(tmp_path)
    assert saved["softmask"]["mode"] == "grad"
    assert Nested(softmask=saved["softmask"], temperature=saved["temperature"]).cfg == strategy.cfg


def test_get_strategy_takes_a_config():
    from hf_softmask.strategies.hat import HATConfig

    config = HATConfig(c=0.5)
    assert get_strategy("hat", config).cfg is config
    assert get_strategy("hat", config=config).cfg is config
    with pytest.raises(TypeError, match="either config= or keyword"):
        get_strategy("hat", config, c=0.1)
    das_config = strategy_class("das").config_class(temperature=0.1)
    assert get_strategy("das", das_config).cfg is das_config


def test_cbp_callback_refuses_settings_beside_a_strategy():
    from hf_softmask.strategies.cbp import CBPCallback, CBPStrategy

    with pytest.raises(TypeError, match="replacement_rate"):
        CBPCallback(CBPStrategy(), replacement_rate=0.5)  # was silently ignored
    assert CBPCallback(replacement_rate=0.5).strategy.cfg.replacement_rate == 0.5


def test_the_writing_a_strategy_guide_snippet_runs(monkeypatch):
    """docs/strategies.md's example strategy has the shape this file checks."""
    import re
    import sys
    import types
    from pathlib import Path

    from hf_softmask.strategies import registry

    page = (Path(__file__).resolve().parents[1] / "docs" / "strategies.md").read_text()
    code = re.search(r"## Writing a strategy.*?```python\n(.*?)```", page, re.S).group(1)
    module = types.ModuleType("guide_snippet")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
    monkeypatch.setattr(registry, "STRATEGIES", dict(registry.STRATEGIES))  # the snippet's registration is undone
    exec(compile(code, "strategies.md", "exec"), module.__dict__)
    strategy_cls, config_cls = module.MyStrategy, module.MyConfig
    assert strategy_class("mine") is strategy_cls and strategy_cls.runners == ("pretrain", "finetune")
    assert list(inspect.signature(strategy_cls.__init__).parameters) == ["self", "config", "strength", "mode"]
    assert strategy_cls(strength=2.0).cfg == config_cls(strength=2.0)
    with pytest.raises(TypeError, match=r"valid: \['strength', 'mode'\]"):
        strategy_cls(strenght=2.0)


def test_the_comparison_defaults_are_valid_settings():
    """STRATEGY_DEFAULTS feeds keywords to every strategy: a misspelled one would now stop the sweep at start."""
    from hf_softmask.continual.comparison import STRATEGY_DEFAULTS

    for defaults in STRATEGY_DEFAULTS.values():
        for name, settings in defaults.items():
            strategy = get_strategy(name, **settings)
            assert all(getattr(strategy.cfg, k) == v for k, v in settings.items()), name


def test_resume_refuses_a_checkpoint_without_this_strategys_state(tmp_path):
    """``StrategyTrainer.train(resume_from_checkpoint=...)`` restores the strategy's state from the checkpoint; one
    that has none (a plain Trainer's) or another strategy's is refused, naming the file, before any step."""
    from transformers import Trainer

    from hf_softmask.strategies import StrategyTrainer
    from tests.testing_utils import lm_dataset, tiny_gpt2, train_args

    data = lm_dataset(n_batches=2)
    plain_args = train_args(tmp_path / "plain", save_strategy="steps", save_steps=1)
    Trainer(model=tiny_gpt2(), args=plain_args, train_dataset=data).train()
    hat = StrategyTrainer(
        model=tiny_gpt2(),
        args=train_args(tmp_path / "hat", save_strategy="steps", save_steps=1),
        train_dataset=data,
        strategy=get_strategy("hat", batches_per_epoch=2),
    )
    hat.strategy.before_task(hat.model, 0)
    hat.train()

    def resume(checkpoint, strategy):
        model = tiny_gpt2()
        strategy.before_task(model, 0)  # as the runners do, before the Trainer resumes
        StrategyTrainer(model=model, args=train_args(tmp_path / "again"), train_dataset=data, strategy=strategy).train(
            resume_from_checkpoint=str(checkpoint)
        )
        return model

    with pytest.raises(FileNotFoundError, match=r"plain/checkpoint-1/strategy_config\.json is missing"):
        resume(tmp_path / "plain" / "checkpoint-1", get_strategy("hat", batches_per_epoch=2))
    with pytest.raises(ValueError, match=r"strategy 'hat', not 'cbp'"):
        resume(tmp_path / "hat" / "checkpoint-1", get_strategy("cbp"))
    again = get_strategy("hat", batches_per_epoch=2)
    model = resume(tmp_path / "hat" / "checkpoint-1", again)  # its own: embeddings and annealing position restored
    assert torch.equal(again.e_heads, hat.strategy.e_heads) and torch.equal(again.e_ffn, hat.strategy.e_ffn)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), hat.model.parameters()))
