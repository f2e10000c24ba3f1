"""The soft-mask settings are declared once (SoftMaskConfig) and are the same flags in the Trainer and the runner."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import HfArgumentParser

from hf_softmask import SoftMaskConfig, SoftMaskTrainingArguments
from hf_softmask.continual import ContinualPretrainingArguments, parse_config
from hf_softmask.continual.cli import build_parser
from hf_softmask.continual.pretraining.config import PROG
from hf_softmask.core.softmask_arguments import flag_name

ARGUMENT_CLASSES = (SoftMaskTrainingArguments, ContinualPretrainingArguments)


def _parser(cls):
    return build_parser((cls,), PROG) if cls is ContinualPretrainingArguments else HfArgumentParser(cls)


def _parse(cls, argv: list[str]):
    """``cls`` from a command line as it is parsed: the runner by parse_config, the Trainer by HfArgumentParser."""
    return (
        parse_config(argv)
        if cls is ContinualPretrainingArguments
        else _parser(cls).parse_args_into_dataclasses(argv)[0]
    )


@pytest.mark.parametrize("cls", ARGUMENT_CLASSES, ids=lambda c: c.__name__)
def test_one_flag_per_softmask_config_field_with_its_default_help_and_choices(cls):
    settings = dataclasses.fields(SoftMaskConfig)
    flags = {f.name: f for f in dataclasses.fields(cls) if f.name.startswith("softmask_")}
    assert sorted(flags) == sorted(flag_name(s.name) for s in settings)
    actions = {a.dest: a for a in _parser(cls)._actions}
    for s in settings:
        flag = flags[flag_name(s.name)]
        assert flag.default == s.default and flag.metadata["help"] == s.metadata["help"]
        assert flag.metadata.get("choices") == s.metadata.get("choices")
        action = actions[flag.name]  # as the command line sees it
        assert action.default == s.default
        assert (tuple(action.choices) if action.choices else None) == s.metadata.get("choices")


@pytest.mark.parametrize("cls", ARGUMENT_CLASSES, ids=lambda c: c.__name__)
def test_every_flag_reaches_the_softmask_config(cls, tmp_path):
    argv = ["--output_dir", str(tmp_path), "--softmask_mode", "grad", "--softmask_norms", "mean"]
    argv += ["--softmask_mask_power", "0.5", "--softmask_compile_update", "False"]
    args = _parse(cls, argv)
    assert args.softmask_config() == SoftMaskConfig(mode="grad", norms="mean", mask_power=0.5, compile_update=False)
    assert _parse(cls, [*argv[:-1], "True"]).softmask_config().compile_update is True
    args = _parse(cls, ["--output_dir", str(tmp_path)])
    assert args.softmask_config() == SoftMaskConfig()
    assert args.softmask_config().compile_update == "auto"


@pytest.mark.parametrize("cls", ARGUMENT_CLASSES, ids=lambda c: c.__name__)
def test_a_bad_value_is_refused_at_parse_with_the_valid_choices(cls, tmp_path, capsys):
    # transformers' parser prints the usage and exits; the runner's raises the one-line error hf-softmask prints
    with pytest.raises((SystemExit, ValueError)) as info:
        _parse(cls, ["--output_dir", str(tmp_path), "--softmask_mode", "bogus"])
    err = capsys.readouterr().err if info.type is SystemExit else str(info.value)
    assert "--softmask_mode" in err and "bogus" in err and "'update', 'grad'" in err
    # values that argparse does not see (Python, YAML) are refused when the arguments are made
    with pytest.raises(ValueError, match=r"norms policy must be one of \('train', 'freeze', 'mean'\)"):
        cls(output_dir=str(tmp_path), softmask_norms="ignore")


def test_a_bad_yaml_value_is_refused_by_the_runner(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("softmask_compile_update: sometimes\n")
    with pytest.raises(ValueError, match="compile_update must be True, False or 'auto'"):
        parse_config(["--config", str(cfg)])


def test_the_runners_old_mask_power_still_works_with_a_warning(tmp_path):
    with pytest.warns(FutureWarning, match="--softmask_mask_power"):
        args = parse_config(["--mask_power", "0.5"])
    assert args.softmask_mask_power == 0.5 and args.softmask_config().mask_power == 0.5 and args.mask_power is None
    cfg = tmp_path / "old.yaml"
    cfg.write_text("mask_power: 2.0\n")
    with pytest.warns(FutureWarning, match="softmask_mask_power"):
        assert parse_config(["--config", str(cfg)]).softmask_config().mask_power == 2.0
    with pytest.warns(FutureWarning):  # a flag overrides the YAML, whichever name the YAML uses
        assert parse_config(["--config", str(cfg), "--softmask_mask_power", "3"]).softmask_mask_power == 3.0
    with pytest.warns(FutureWarning):
        assert ContinualPretrainingArguments(mask_power=4.0).softmask_mask_power == 4.0


def test_fingerprint_keeps_the_key_of_runs_saved_before_the_rename():
    fingerprint = parse_config(["--softmask_mask_power", "2"]).fingerprint()
    assert fingerprint["mask_power"] == 2.0
    assert "softmask_mask_power" not in fingerprint and "softmask_compile_update" not in fingerprint
