"""benchmarks/gpu_check.py: skipped cells without CUDA, its CPU dry run, and its protection check itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.testing_utils import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
CELLS = ["fp16_gradscaler", "fused_adamw_bf16", "fsdp2", "das_smollm2", "compiled_step_plan"]


def _run(*args, timeout=900):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=timeout,
        cwd=ROOT,
    )


def test_without_cuda_every_cell_is_skipped_and_the_exit_status_is_0():
    proc = _run()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"SKIP {c}: no CUDA" for c in CELLS]


def test_cpu_needs_the_dry_run_flag():
    proc = _run("--device", "cpu")
    assert proc.returncode == 2 and "--dry-run" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "cell, expected",
    [
        ("fused_adamw_bf16", "PASS"),
        ("fsdp2", "SKIP"),  # accelerate does not shard on a CPU: the Trainer runs, the cell says so
        ("fp16_gradscaler", "PASS"),
        ("das_smollm2", "PASS"),
        ("compiled_step_plan", "PASS"),
    ],
)
def test_cpu_dry_run_of_each_cell(cell, expected):
    proc = _run("--device", "cpu", "--dry-run", "--cells", cell)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{expected} {cell}: "), (proc.stdout, proc.stderr[-3000:])
    assert proc.returncode == (1 if expected == "FAIL" else 0)


def test_the_protection_check_catches_a_moved_protected_slice():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from hf_softmask import UnitLayout

    model = tiny_llama()
    layout = UnitLayout.from_model(model)
    imp = gpu_check.half_importance(layout)
    before = gpu_check.snapshot(layout)
    with pytest.raises(AssertionError, match="proves nothing"):  # nothing moved: no evidence either way
        gpu_check.check_protection(layout, imp, before, model)
    with torch.no_grad():
        for s in layout.owned:  # move exactly the unprotected positions
            free = (layout.unit_values(s.kind, s.layer, imp.heads, imp.ffn) < 1)[s.index]
            s.param.movedim(s.axis, 0)[free] += 1e-3
    assert gpu_check.check_protection(layout, imp, before, model).startswith("0/")
    with torch.no_grad():  # one entry of head 0 (importance 1) of layer 1's o_proj
        model.model.layers[1].self_attn.o_proj.weight[3, 0] += 1e-6
    with pytest.raises(
        AssertionError, match=r"1/\d+ protected positions moved; first: model.layers.1.self_attn.o_proj"
    ):
        gpu_check.check_protection(layout, imp, before, model)
