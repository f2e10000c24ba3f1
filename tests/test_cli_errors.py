"""A user's mistake on the command line (a flag, a value, a YAML file, an output_dir holding another run) is one
line ``hf-softmask <command>: error: ...`` (and at most a one-line hint) and exit status 2, without a traceback;
an error while training keeps its traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hf_softmask import command_line
from hf_softmask.continual.cli import SettingError, user_errors
from tests.testing_utils import REPO_ROOT, tiny_runner_flags


def _run(command: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m hf_softmask <command> <args>`` in a new process: the exit status and stderr a shell sees."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "hf_softmask", command, *args], capture_output=True, text=True, env=env, timeout=300
    )


def _main(capsys, command: str, *args: str) -> subprocess.CompletedProcess:
    """The same program in this process (``command_line.main``, what the console script and ``-m`` call): seconds
    faster than a new interpreter; one case per runner also runs as a real process (:func:`_run`)."""
    capsys.readouterr()
    code = command_line.main([command, *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([command, *args], code, out, err)


def _assert_one_line(proc: subprocess.CompletedProcess, command: str, message: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and 1 <= len(lines) <= 2, proc.stderr[-2000:]
    assert lines[0].startswith(f"hf-softmask {command}: error: ") and message in lines[0], lines
    assert len(lines) == 1 or lines[1].startswith("hint: ")


def _another_run(directory, runner: str = "continual_finetune") -> None:
    directory.mkdir(parents=True)
    state = {"fingerprint": {"runner": runner}, "base": None, "domains": []}
    (directory / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize(
    "case, message",
    [
        ("bad_value", "argument --learning_rate: invalid float value: 'abc'"),
        ("unknown_flag", "unrecognized arguments: --no_such_flag"),
        ("unknown_yaml_key", "unknown field(s) ['no_such_key']"),
        ("another_run", "holds a continual_finetune run, not a continual_pretrain run"),
    ],
)
def test_pretrain_user_mistake_is_one_line_and_exit_2(tiny_mlm_dir, tmp_path, capsys, case, message):
    flags = tiny_runner_flags(tiny_mlm_dir, tmp_path / "run")
    if case == "bad_value":
        flags += ["--learning_rate", "abc"]
    elif case == "unknown_flag":
        flags += ["--no_such_flag", "1"]
    elif case == "unknown_yaml_key":
        (tmp_path / "c.yaml").write_text("max_steps: 2\nno_such_key: 1\n")
        flags = ["--config", str(tmp_path / "c.yaml"), *flags]
    else:
        _another_run(tmp_path / "run")
    proc = _run("pretrain", *flags) if case == "bad_value" else _main(capsys, "pretrain", *flags)
    _assert_one_line(proc, "pretrain", message)
    if case == "bad_value":  # the 100-line usage is not printed first
        assert "usage:" not in proc.stderr and len(proc.stderr) < 300
    if case == "unknown_flag":
        assert proc.stderr.splitlines()[1] == "hint: hf-softmask pretrain --help lists the flags"


def test_finetune_output_dir_of_another_run_is_one_line_and_exit_2(tmp_path):
    _another_run(tmp_path / "run", runner="continual_pretrain")
    proc = _run("finetune", "--output_dir", str(tmp_path / "run"), "--no_plots")
    _assert_one_line(proc, "finetune", "holds a continual_pretrain run, not a continual_finetune run")


def test_compare_bad_setting_is_one_line_and_exit_2(tmp_path, capsys):
    proc = _main(capsys, "compare", "--output_dir", str(tmp_path / "c"), "--settings", "pretrain,bogus")
    _assert_one_line(proc, "compare", "unknown setting(s) ['bogus']; use pretrain and/or finetune")


def test_errors_outside_the_checked_phases_keep_their_type_and_traceback(monkeypatch):
    """Only what parsing, validation and start-up raise is a user error; a ValueError while training propagates."""

    def trains_then_fails(argv):
        raise ValueError("a failure while training")

    monkeypatch.setitem(command_line.COMMANDS, "pretrain", (trains_then_fails, "continual_pretrain", ""))
    with pytest.raises(ValueError, match="a failure while training") as info:
        command_line.main(["pretrain"])
    assert type(info.value) is ValueError
    # inside a checked phase the same error is a user error, still a ValueError for Python callers
    with pytest.raises(SettingError, match="bad setting") as info:
        with user_errors():
            raise ValueError("bad setting")
    assert isinstance(info.value, ValueError)
