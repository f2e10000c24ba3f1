"""scripts/check_protection.py reads a finished run's checkpoints and confirms what domain 2 protected."""

import importlib.util
from pathlib import Path

from hf_softmask.continual import run_continual_pretraining
from hf_softmask.continual.pretraining.config import parse_config
from tests.testing_utils import tiny_runner_flags

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_protection.py"


def _script():
    spec = importlib.util.spec_from_file_location("check_protection", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_frozen_embeddings_and_fully_important_units_did_not_move(tiny_mlm_dir, tmp_path, capsys):
    out = tmp_path / "das"
    run_continual_pretraining(
        parse_config(tiny_runner_flags(tiny_mlm_dir, out, strategy="das", softmask_embeddings="freeze"))
    )
    assert _script().main([str(out), "--domain", "2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    total, moved = (int(x.split(":")[-1]) for x in last.split(","))
    assert total > 0 and moved == 0, last  # the frozen embeddings at least are counted
