"""Every bool-valued flag reads true/false/yes/no/1/0 in any case, as HfArgumentParser's bool flags do."""

from __future__ import annotations

import pytest
from transformers import HfArgumentParser

from hf_softmask import SoftMaskConfig, SoftMaskTrainingArguments
from hf_softmask.continual import parse_config
from hf_softmask.continual.cli import build_parser, runner_parsers

SPELLINGS = {"true": True, "True": True, "TRUE": True, "yes": True, "1": True, "t": True}
SPELLINGS |= {"false": False, "False": False, "no": False, "0": False, "N": False}


def _parsers() -> dict:
    out = {name: build_parser(types, prog) for name, (types, prog) in runner_parsers().items()}
    out["SoftMaskTrainingArguments"] = HfArgumentParser(SoftMaskTrainingArguments)
    return out


def _bool_valued(action) -> bool:
    return isinstance(action.default, bool) or any(isinstance(c, bool) for c in action.choices or ())


@pytest.mark.parametrize("text", SPELLINGS)
def test_softmask_compile_update_reads_every_bool_spelling(text, tmp_path):
    argv = ["--output_dir", str(tmp_path), "--softmask_compile_update", text]
    runner = parse_config(argv)
    trainer = HfArgumentParser(SoftMaskTrainingArguments).parse_args_into_dataclasses(argv)[0]
    for args in (runner, trainer):
        assert args.softmask_compile_update is SPELLINGS[text]
        assert args.softmask_config().compile_update is SPELLINGS[text]


def test_softmask_compile_update_keeps_auto_and_refuses_other_words(tmp_path, capsys):
    assert parse_config(["--output_dir", str(tmp_path)]).softmask_config() == SoftMaskConfig()
    assert parse_config(
        ["--output_dir", str(tmp_path), "--softmask_compile_update", "auto"]
    ).softmask_compile_update == ("auto")
    with pytest.raises(ValueError) as info:  # the runner's parser raises the line hf-softmask prints
        parse_config(["--output_dir", str(tmp_path), "--softmask_compile_update", "sometimes"])
    err = str(info.value)
    assert "--softmask_compile_update" in err and "'sometimes'" in err and "auto" in err


@pytest.mark.parametrize("parser_name", ["continual_pretrain", "continual_finetune", "SoftMaskTrainingArguments"])
def test_every_bool_flag_of_every_parser_reads_every_spelling(parser_name):
    parser = _parsers()[parser_name]
    actions = [a for a in parser._actions if a.option_strings and a.nargs != 0 and _bool_valued(a)]
    assert actions
    for action in actions:
        for text, value in SPELLINGS.items():
            # what argparse does with a value: the type reads it, then it must be one of the choices
            got = action.type(text)
            assert got is value, (action.dest, text, got)
            assert action.choices is None or got in action.choices, (action.dest, text)
