"""DAS's runner flags are generated from DASConfig: one declaration of type, default, help and validation."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from hf_softmask.continual import ContinualPretrainer, ContinualPretrainingArguments, parse_config
from hf_softmask.continual.pretraining.das_arguments import DAS_FLAGS
from hf_softmask.strategies.das import DASConfig, DASStrategy
from tests.testing_utils import tiny_runner_flags

RUNNER_FIELDS = {f.name: f for f in dataclasses.fields(ContinualPretrainingArguments)}
DAS_FIELDS = {f.name: f for f in dataclasses.fields(DASConfig)}


@pytest.mark.parametrize("flag", list(DAS_FLAGS))
def test_each_das_flag_carries_dasconfigs_default_and_help(flag):
    runner, das = RUNNER_FIELDS[flag], DAS_FIELDS[DAS_FLAGS[flag]]
    assert runner.default == das.default
    runner_type = typing.get_type_hints(ContinualPretrainingArguments)[flag]
    assert runner_type == typing.get_type_hints(DASConfig)[DAS_FLAGS[flag]]
    assert das.metadata["help"] in runner.metadata["help"]


def test_the_flags_reach_the_strategy_under_dasconfigs_names(tmp_path):
    flags = {"contrastive_weight": 0.25, "contrastive_temperature": 0.2, "perturbation_dropout": 0.3}
    args = parse_config(tiny_runner_flags("unused", tmp_path, strategy="das", **flags))
    strategy = ContinualPretrainer(args).make_strategy()
    assert isinstance(strategy, DASStrategy)
    assert (strategy.cfg.contrastive_weight, strategy.cfg.temperature, strategy.cfg.perturbation_dropout) == (
        0.25,
        0.2,
        0.3,
    )


@pytest.mark.parametrize(
    "flag, value, reason",
    [
        ("contrastive_weight", -1.0, "contrastive_weight must be >= 0"),
        ("contrastive_weight", math.inf, "contrastive_weight"),
        ("contrastive_temperature", 0.0, "temperature must be > 0"),
        ("perturbation_dropout", 1.0, r"perturbation_dropout must lie in \[0, 1\)"),
        ("perturbation_dropout", math.nan, "perturbation_dropout"),
    ],
)
def test_a_bad_value_is_refused_at_parse_naming_the_flag(tmp_path, flag, value, reason):
    with pytest.raises(ValueError, match=rf"--{flag}: .*{reason}"):
        parse_config(tiny_runner_flags("unused", tmp_path, **{flag: value}))
