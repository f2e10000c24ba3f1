"""The declared strategy interface: every member a runner reads is declared on ContinualStrategy, strategies of
one's own are added with ``register_strategy``, and ``settings`` (the old name of ``runners``) still works, warning."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest

import hf_softmask
from hf_softmask.continual import ContinualPretrainer, parse_config
from hf_softmask.strategies import ContinualStrategy, get_strategy, register_strategy, strategy_class
from hf_softmask.strategies.naive import NaiveStrategy
from hf_softmask.strategies.registry import STRATEGIES
from tests.testing_utils import tiny_runner_flags

ROOT = Path(__file__).resolve().parents[1]
#: the modules that drive a strategy: the two runners, the comparison, and the Trainer / callback
RUNNER_MODULES = [
    "continual/pretraining/pretrainer.py",
    "continual/finetuning/runner.py",
    "continual/comparison.py",
    "strategies/base.py",
]


@pytest.fixture
def registry():
    """Registrations made by a test are undone after it."""
    saved = dict(STRATEGIES)
    yield
    STRATEGIES.clear()
    STRATEGIES.update(saved)


class ProbeStrategy(NaiveStrategy):
    """Plain training that uses the runner-read members DAS and HAT use, recording what the runner asks of it."""

    name = "probe"
    runners = ("pretrain",)

    def __init__(self, config=None, **settings):
        super().__init__(config, **settings)
        self.calls = []

    def compute_general_importance(self, model, dataloader):
        self.calls.append(("general", sum(1 for _ in dataloader)))

    def set_task(self, task_id):
        self.calls.append(("set_task", task_id))

    def after_task(self, model, task_id, dataloader=None):
        self.contrastive_losses = [0.5, 1.5 + task_id]  # what the runner averages into state.json


def test_every_member_the_runners_read_is_declared_on_the_base_class():
    used = set()
    for module in RUNNER_MODULES:
        text = (ROOT / "hf_softmask" / module).read_text()
        used |= set(re.findall(r"\b(?:self\.)?strategy\.([A-Za-z_]\w*)", text))
        # a strategy class: strategy_class(...), and a runner's cls (in base.py, cls is the class being created)
        own = "" if module.startswith("strategies/") else "|cls"
        classes = r"strategy_class\([^()]*\)|self\.strategy_class" + own
        used |= set(re.findall(rf"\b(?:{classes})\.([A-Za-z_]\w*)", text))
        probes = re.findall(r"(?:getattr|hasattr)\((?:self\.)?(?:strategy|cls)\b.*", text)
        assert not probes, f"{module} probes a strategy instead of calling its declared members: {probes}"
    assert {"set_task", "importance", "storage_bytes", "save_model", "runners"} <= used  # the grep finds them
    missing = sorted(name for name in used if not hasattr(ContinualStrategy, name))
    assert not missing, f"read by the runners but not declared on ContinualStrategy: {missing}"


def test_the_declared_defaults_are_neutral(tmp_path):
    from transformers import BertConfig, BertModel

    base = ContinualStrategy()
    assert base.set_task(0) is None and base.compute_general_importance(None, []) is None
    assert not base.uses_general_importance and base.importance is None
    assert list(base.domain_importances) == [] and list(base.contrastive_losses) == []
    assert base.storage_bytes.get(0) is None and base.runners == ("pretrain", "finetune")
    assert ProbeStrategy.uses_general_importance  # defines compute_general_importance: the runner calls it
    model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
    NaiveStrategy().save_model(model, tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "strategy_config.json").is_file()


def test_a_registered_strategy_runs_through_the_pretraining_runner(registry, tiny_mlm_dir, tmp_path, monkeypatch):
    # its own cache: the evaluation before training, cached by an earlier run, would skip the calls counted here
    monkeypatch.setenv("HF_SOFTMASK_CACHE", str(tmp_path / "cache"))
    assert register_strategy("probe", ProbeStrategy) is ProbeStrategy
    assert "probe" in hf_softmask.available_strategies() and hf_softmask.register_strategy is register_strategy
    out = tmp_path / "run"
    runner = ContinualPretrainer(parse_config(tiny_runner_flags(tiny_mlm_dir, out, strategy="probe")))
    runner.run()
    strategy = runner.strategy
    assert isinstance(strategy, ProbeStrategy)
    assert strategy.calls[0][0] == "general" and strategy.calls[0][1] > 0  # before the first domain
    evaluations = [c[1] for c in strategy.calls[1:]]
    assert evaluations == [0, 1, None] * 3  # 0_base and two domains: each domain evaluated under its task
    state = json.loads((out / "state.json").read_text())
    assert [d["mean_contrastive_loss"] for d in state["domains"]] == [1.0, 1.5]
    assert json.loads((out / "2_sports" / "strategy_config.json").read_text())["name"] == "probe"


def test_register_strategy_as_a_decorator_and_get_strategy(registry):
    @register_strategy("probe2")
    class Probe2(NaiveStrategy):
        name = "probe2"

    assert strategy_class("probe2") is Probe2 and isinstance(get_strategy("probe2"), Probe2)


def test_a_taken_name_is_refused_unless_replace(registry):
    class Mine(NaiveStrategy):
        name = "ncl"

    with pytest.raises(ValueError, match=r"'ncl'.*taken by hf_softmask\.strategies\.naive\.NaiveStrategy.*replace"):
        register_strategy("ncl", Mine)
    assert strategy_class("ncl") is NaiveStrategy
    register_strategy("ncl", Mine, replace=True)
    assert strategy_class("ncl") is Mine


def test_register_strategy_refuses_what_cannot_run(registry):
    class NotAStrategy:
        name = "x"
        runners = ("pretrain",)

    class NoRunners(NaiveStrategy):
        name = "x"
        runners = ()

    class UnknownRunner(NaiveStrategy):
        name = "x"
        runners = ("pretraining",)

    class WrongName(NaiveStrategy):
        pass  # name "ncl", inherited

    with pytest.raises(TypeError, match="not a subclass of ContinualStrategy"):
        register_strategy("x", NotAStrategy)
    with pytest.raises(ValueError, match=r"NoRunners\.runners must name the runners"):
        register_strategy("x", NoRunners)
    with pytest.raises(ValueError, match=r"UnknownRunner\.runners .*'pretraining'"):
        register_strategy("x", UnknownRunner)
    with pytest.raises(ValueError, match=r"WrongName\.name is 'ncl'; set name = 'x'"):
        register_strategy("x", WrongName)
    assert "x" not in STRATEGIES


def test_a_strategy_declaring_settings_warns_and_works(registry, tiny_mlm_dir, tmp_path):
    with pytest.warns(FutureWarning, match=r"OldStyle\.settings is deprecated.*runners"):

        class OldStyle(NaiveStrategy):
            name = "old_style"
            settings = ("pretrain",)

    assert OldStyle.runners == ("pretrain",)
    with pytest.warns(FutureWarning, match=r"OldStyle\.settings is deprecated.*read \.runners"):
        assert OldStyle.settings == ("pretrain",)
    with pytest.warns(FutureWarning):
        assert OldStyle().settings == ("pretrain",)
    register_strategy("old_style", OldStyle)
    runner = ContinualPretrainer(parse_config(tiny_runner_flags(tiny_mlm_dir, tmp_path, strategy="old_style")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the runner reads runners, not the deprecated name
        assert isinstance(runner.make_strategy(), OldStyle)

    with pytest.warns(FutureWarning):

        class FinetuneOnly(NaiveStrategy):
            name = "finetune_only"
            settings = ("finetune",)

    register_strategy("finetune_only", FinetuneOnly)
    runner = ContinualPretrainer(parse_config(tiny_runner_flags(tiny_mlm_dir, tmp_path, strategy="finetune_only")))
    with pytest.raises(ValueError, match=r"does not declare 'pretrain' in its runners \('finetune',\)"):
        runner.make_strategy()


def test_runners_and_settings_together_are_refused():
    with pytest.raises(TypeError, match="declares both runners and settings"):

        class Both(NaiveStrategy):
            runners = ("pretrain",)
            settings = ("pretrain",)
