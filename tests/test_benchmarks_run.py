"""Every benchmark of benchmarks/run_all.py runs to its rows, on a tiny Llama shape.

No timing is asserted (timings are the benchmarks' own business, printed side by side); what this catches is a
benchmark broken by a change to the library it measures, which run_all.py would only report as a FAILED row.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_das_step  # noqa: E402
import bench_importance  # noqa: E402
import bench_optimizer  # noqa: E402
import bench_softmask_step  # noqa: E402
import bench_tss_layer  # noqa: E402
import common  # noqa: E402

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96)
TINY["vocab_size"] = 256


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setitem(common.SHAPES, "tiny", TINY)
    return common.make_env("cpu", quick=True, threads=1)


RUNS = {
    "optimizer": lambda env: bench_optimizer.run(env, "tiny"),
    "step": lambda env: bench_softmask_step.run(env, "tiny", 2, 16),
    "das": lambda env: bench_das_step.run(env, "tiny", 2, 16),
    "importance": lambda env: bench_importance.run(env, "tiny", 2, 16),
    "tss": lambda env: bench_tss_layer.run(env, 32, 48, 16),
}


@pytest.mark.parametrize("name, run", list(RUNS.items()), ids=list(RUNS))
def test_benchmark_runs_to_its_rows(env, name, run):
    rows = run(env)
    assert rows, name
    for row in rows:
        assert math.isfinite(row.value) and row.value > 0, (name, row)
        assert math.isfinite(row.base_value) and row.base_value > 0, (name, row)
