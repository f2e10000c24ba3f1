"""Fault injection for the pre-training runner: each fault either continues exactly or stops naming the file.

Kills are simulated in-process by a test hook (``events`` / a Trainer callback) that raises ``Killed`` (a
BaseException, so nothing in the runner catches it) at a stage boundary: the files are left exactly as a kill
there would leave them. The table of faults is docs/faults.md.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
from transformers import TrainerCallback

from hf_softmask.continual import ContinualPretrainer, parse_config
from hf_softmask.continual.checkpointing import DamagedRunError, RunMismatchError
from hf_softmask.continual.pretraining.hub_push import HubPusher
from tests.testing_utils import tiny_runner_flags


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler in the runner sees it."""


def _args(model_dir, out, **kw):
    return parse_config(tiny_runner_flags(model_dir, out, **{"max_train_blocks": 12, "strategy": "das", **kw}))


def _kill_at(event: str, stage: str):
    def events(kind, **info):
        if kind == event and info.get("name") == stage:
            raise Killed(f"{event} {stage}")

    return events


class _KillAfterSave(TrainerCallback):
    def __init__(self, domain: str, step: int):
        self.domain, self.step = domain, step

    def on_save(self, args, state, control, **kw):
        if args.output_dir.endswith(self.domain) and state.global_step >= self.step:
            raise Killed("mid-domain")


def _rows(out: Path):
    state = json.loads((out / "state.json").read_text())
    return [state["base"]["eval_loss"]] + [d["eval_loss"] for d in state["domains"]]


def _digest(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tiny_mlm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    ContinualPretrainer(_args(tiny_mlm_dir, out)).run()
    return out


KILLS = [
    ("after importance (0_base)", dict(events=_kill_at("importance", "0_base"))),
    ("after importance (domain)", dict(events=_kill_at("importance", "1_business"))),
    ("mid-domain, after a Trainer checkpoint", dict(callbacks=[_KillAfterSave("2_sports", 2)])),
    ("while saving (staged, not published)", dict(events=_kill_at("staged", "1_business"))),
    ("after saving, before the state update", dict(events=_kill_at("published", "1_business"))),
    ("after the state update", dict(events=_kill_at("state_saved", "1_business"))),
]


@pytest.mark.slow
@pytest.mark.parametrize("where, hook", KILLS, ids=[k[0] for k in KILLS])
def test_kill_at_each_stage_boundary_then_rerun_continues_exactly(tiny_mlm_dir, tmp_path, reference, where, hook):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        ContinualPretrainer(_args(tiny_mlm_dir, out), **hook).run()
    finished = {
        d: _digest(out / d)
        for d in ("0_base", "1_business")
        if (out / d).is_dir() and d in json.dumps(json.loads((out / "state.json").read_text()))
    }
    ContinualPretrainer(_args(tiny_mlm_dir, out)).run()
    assert _rows(out) == _rows(reference), where  # bit-identical to the uninterrupted run
    for d in ("0_base", "1_business", "2_sports"):  # and the importance's provenance (layout, estimator, ...)
        saved = [json.loads((run / d / "importance_config.json").read_text()) for run in (out, reference)]
        assert saved[0] == saved[1] and saved[1]["layout"], (where, d)
    for d, digest in finished.items():
        assert _digest(out / d) == digest  # nothing finished was lost or redone
    assert not list(out.glob(".staging_*")) and not list(out.glob("*.old"))
    assert json.loads((out / "results.json").read_text())["complete"]


@pytest.fixture
def half_run(tiny_mlm_dir, tmp_path):
    """A run killed after domain 1 was saved, plus the Trainer checkpoint of domain 2 at step 2."""
    out = tmp_path / "run"
    with pytest.raises(Killed):
        ContinualPretrainer(_args(tiny_mlm_dir, out), callbacks=[_KillAfterSave("2_sports", 2)]).run()
    return out


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: max(1, len(data) // 2)])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = [
    ("state.json", "truncate", "state.json is damaged"),
    ("1_business/model.safetensors", "truncate", "1_business/model.safetensors is damaged"),
    ("1_business/model.safetensors", "flip", "1_business/model.safetensors is damaged"),
    ("1_business/importance.safetensors", "truncate", "1_business/importance.safetensors is damaged"),
    ("1_business/strategy_config.json", "truncate", "1_business/strategy_config.json is damaged"),
    ("1_business/config.json", "delete", "1_business/config.json is missing"),
    (".trainer/2_sports/checkpoint-2/trainer_state.json", "truncate", "trainer_state.json is damaged"),
    (".trainer/2_sports/checkpoint-2/optimizer.pt", "truncate", "optimizer.pt is damaged"),
    (".trainer/2_sports/checkpoint-2/model.safetensors", "truncate", "checkpoint-2/model.safetensors is damaged"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, how, message", CORRUPTIONS, ids=[f"{c[1]} {c[0]}" for c in CORRUPTIONS])
def test_corrupted_file_stops_the_rerun_naming_it(tiny_mlm_dir, half_run, name, how, message):
    path = half_run / name
    {"truncate": _truncate, "flip": _flip, "delete": Path.unlink}[how](path)
    kept = _digest(half_run / "0_base")
    with pytest.raises((DamagedRunError, RuntimeError), match=message) as info:
        ContinualPretrainer(_args(tiny_mlm_dir, half_run)).run()
    assert str(half_run) in str(info.value)
    assert ("--overwrite_output_dir" in str(info.value)) or ("delete" in str(info.value))  # the fix is named
    assert _digest(half_run / "0_base") == kept  # nothing finished is touched


def test_disk_full_while_saving_keeps_finished_stages_and_rerun_completes(tiny_mlm_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    import hf_softmask.continual.pretraining.pretrainer as pretrain

    real = pretrain.atomic_write_text

    def full(path, text):
        if "1_business" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text)

    monkeypatch.setattr(pretrain, "atomic_write_text", full)
    with pytest.raises(OSError, match="writing stage 1_business.*No space left on device.*rerun") as info:
        ContinualPretrainer(_args(tiny_mlm_dir, out, max_steps=2)).run()
    assert info.value.errno == errno.ENOSPC
    state = json.loads((out / "state.json").read_text())
    assert state["base"] is not None and state["domains"] == []  # 0_base kept, domain 1 not marked done
    monkeypatch.setattr(pretrain, "atomic_write_text", real)
    ContinualPretrainer(_args(tiny_mlm_dir, out, max_steps=2)).run()
    assert json.loads((out / "results.json").read_text())["complete"] and not list(out.glob(".staging_*"))


def test_read_only_output_dir_is_refused_before_any_work(tiny_mlm_dir, tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() != 0:
        out.chmod(0o555)
    else:  # root ignores permissions: the directory's refusal to create files is simulated
        import tempfile

        def refuse(*a, **k):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    try:
        with pytest.raises(PermissionError, match=f"cannot write to --output_dir {out}"):
            ContinualPretrainer(_args(tiny_mlm_dir, out)).run()
    finally:
        out.chmod(0o755)
    assert list(out.iterdir()) == []


def test_directory_of_another_run_is_refused_unless_overwrite(tiny_mlm_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")  # results but no state.json: someone else's files
    with pytest.raises(RunMismatchError, match="no state.json"):
        ContinualPretrainer(_args(tiny_mlm_dir, out, max_steps=1)).run()
    assert (out / "results.json").read_text() == "{}"
    ContinualPretrainer(_args(tiny_mlm_dir, out, max_steps=1, overwrite_output_dir="true")).run()
    assert json.loads((out / "state.json").read_text())["fingerprint"]["runner"] == "continual_pretrain"
    # the finetuning runner refuses this pre-training directory
    from hf_softmask.continual.finetuning import parse_finetuning_config, run_continual_finetuning

    args = parse_finetuning_config(
        [
            "--model_name_or_path",
            str(tiny_mlm_dir),
            "--output_dir",
            str(out),
            "--tasks",
            "business,sport",
            "--strategy",
            "ft",
        ]
    )
    with pytest.raises(RunMismatchError, match="holds a continual_pretrain run"):
        run_continual_finetuning(args)


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"domains": "business,nowhere=/does/not/exist"}, "--domains.*no text files found at '/does/not/exist'"),
        ({"model_name_or_path": "/no/such/model"}, "--model_name_or_path /no/such/model: no such directory"),
        ({"model_name_or_path": "someone/model"}, "HF_HUB_OFFLINE=1 forbids downloading it; unset HF_HUB_OFFLINE"),
        ({"strategy": "nope"}, "nope"),
        ({"strategy_kwargs": "{not json"}, "--strategy_kwargs must be a JSON object"),
        ({"register_architecture": "no_such_module:register"}, "--register_architecture"),
    ],
)
def test_bad_settings_stop_before_anything_is_written(tiny_mlm_dir, tmp_path, flags, message):
    out = tmp_path / "run"
    with pytest.raises((ValueError, FileNotFoundError, KeyError), match=message):
        ContinualPretrainer(_args(tiny_mlm_dir, out, **flags)).run()
    assert not out.exists()


def test_empty_domain_file_names_domain_and_path(tiny_mlm_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    out = tmp_path / "run"
    with pytest.raises(
        ValueError, match=f"domain 'mine' \\(path={tmp_path / 'empty'}\\), training text: got 0 tokens"
    ):
        ContinualPretrainer(_args(tiny_mlm_dir, out, domains=f"business,mine={tmp_path / 'empty'}")).run()
    assert not out.exists()


def test_register_architecture_flag_calls_the_function(tiny_mlm_dir, tmp_path, monkeypatch):
    (tmp_path / "my_arch.py").write_text("CALLED = []\ndef register():\n    CALLED.append(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ContinualPretrainer(
        _args(tiny_mlm_dir, tmp_path / "run", max_steps=1, strategy="ncl", register_architecture="my_arch:register")
    ).run()
    import my_arch

    assert my_arch.CALLED == [1]


def test_push_failures_are_recorded_and_retried(tiny_mlm_dir, tmp_path, monkeypatch, capsys):
    """Offline, --push_to_hub used to fail after the first domain; a rerun then exited 0 without pushing it. Later it
    retried every earlier stage after each domain (one line per stage and domain), then raised: now each stage is
    tried once (one line each) and an offline run ends with one line, no exception."""
    out = tmp_path / "run"
    kw = dict(max_steps=1, strategy="ncl", push_to_hub="true", hub_model_id="me/tiny")
    ContinualPretrainer(_args(tiny_mlm_dir, out, **kw)).run()  # HF_HUB_OFFLINE=1 in the tests: every push fails
    console = capsys.readouterr().out
    assert console.count("push of 1_business failed (offline") == 1 and console.count("push of 2_sports failed") == 1
    assert console.count("not pushed: 1_business, 2_sports (offline)") == 1
    state = json.loads((out / "state.json").read_text())
    assert [d["pushed"] for d in state["domains"]] == [False, False] and all(d["push_error"] for d in state["domains"])
    assert json.loads((out / "results.json").read_text())["complete"]  # training and saving went on

    pushed = []
    monkeypatch.setattr(HubPusher, "push", lambda self, directory, name: pushed.append(name))
    ContinualPretrainer(_args(tiny_mlm_dir, out, **kw)).run()  # the rerun pushes what is missing
    assert pushed == ["1_business", "2_sports"]
    ContinualPretrainer(_args(tiny_mlm_dir, out, **kw)).run()
    assert pushed == ["1_business", "2_sports"]  # nothing pushed twice


def test_push_failure_other_than_offline_ends_the_run_with_an_error(tiny_mlm_dir, tmp_path, monkeypatch, capsys):
    """Only an offline push ends quietly (a rerun online fixes it); a refused upload is an error once all is saved,
    and each stage is still tried once."""
    tried = []

    def refuse(self, directory, name):
        tried.append(name)
        raise PermissionError("401: invalid token")

    monkeypatch.setattr(HubPusher, "push", refuse)
    out = tmp_path / "run"
    kw = dict(max_steps=1, strategy="ncl", push_to_hub="true", hub_model_id="me/tiny")
    with pytest.raises(RuntimeError, match="not pushed to the Hub: 1_business, 2_sports"):
        ContinualPretrainer(_args(tiny_mlm_dir, out, **kw)).run()
    assert tried == ["1_business", "2_sports"]
    assert json.loads((out / "results.json").read_text())["complete"]


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    """mkstemp made every atomically written file 0600 (unreadable to the rest of a team)."""
    from hf_softmask.utils.io import atomic_write_json

    umask = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(umask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644
