"""The compatibility matrix (hf_softmask/core/compatibility.py): the generated page is current, every cell is filled
and shown by tests that exist (tests/compat_evidence.py), and every refused cell refuses at train begin with its
message.

This file is also the worker of the refusal test (``python tests/test_compatibility.py OUT``): it runs in its own
process because a Trainer with ``--fsdp`` sets up torch.distributed (world size 1), which must not leak into the
other tests.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from hf_softmask.core.compatibility import (  # noqa: E402  (after the sys.path set-up above)
    COLUMNS,
    MATRIX,
    ROWS,
    UnsupportedSettingError,
    check_supported,
    detect_features,
)
from tests.compat_evidence import DDP_TEST, EVIDENCE, REFUSAL_TEST, evidence  # noqa: E402
from tests.testing_utils import free_port, lm_dataset, task_dataset, tiny_llama, train_args  # noqa: E402

PAGE_SCRIPT = ROOT / "scripts" / "make_compatibility_page.py"
#: refused cells checked here (one process); DDP cells are checked by DDP_TEST inside its 2-process launch
REFUSED = [(row, col) for row in ROWS for col in COLUMNS if MATRIX[row][col].status == "refused" and col != "ddp"]
#: TrainingArguments that turn each column on (a CPU Trainer: fp16 trains without autocast, FSDP is not applied);
#: "peft" is a LoRA-wrapped model instead, "fsdp1" a model wrapped by torch's FSDP1 (see _trainers)
COLUMN_ARGS = {
    "bf16": {"bf16": True},
    "fp16": {"fp16": True},
    "accumulation": {"gradient_accumulation_steps": 2},
    "checkpointing": {"gradient_checkpointing": True},
    "compile": {"torch_compile": True},
    # the model arrives wrapped (see fsdp1_wrapped): the Trainer cannot read the columns from FSDP1's forward(*args)
    "fsdp1": {"remove_unused_columns": False},
    "fsdp2": {"fsdp": "full_shard", "fsdp_config": {"version": 2}},
}


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_page_is_current():
    assert _module(PAGE_SCRIPT, "make_compatibility_page").main(["--check"]) == 0, (
        "run: python scripts/make_compatibility_page.py"
    )


# -- evidence ----------------------------------------------------------------------------------------------------
def _param_ids(func) -> set[str] | None:
    """The ids pytest gives the cases of a parametrized test.

    Plain values, ``pytest.param(id=...)`` and ``ids=[...]`` are all read."""
    marks = [m for m in getattr(func, "pytestmark", []) if m.name == "parametrize"]
    if not marks:
        return None
    per_mark = []
    for m in marks:  # innermost decorator first, as pytest joins them
        names, values, ids = m.args[0], m.args[1], m.kwargs.get("ids")
        many = len(names.split(",") if isinstance(names, str) else names) > 1
        out = []
        for i, v in enumerate(values):
            if getattr(v, "id", None) is not None:
                out.append(v.id)
            elif ids is not None and not callable(ids):
                out.append(str(ids[i]))
            else:
                v = getattr(v, "values", v if many else (v,))
                out.append("-".join(str(x) for x in v))
        per_mark.append(out)
    return {"-".join(combo) for combo in itertools.product(*per_mark)}


def _check_node(node: str) -> None:
    path, _, test = node.partition("::")
    name, _, case = test.partition("[")
    file = ROOT / path
    assert file.is_file(), f"{node}: no file {path}"
    functions = {n.name for n in ast.walk(ast.parse(file.read_text())) if isinstance(n, ast.FunctionDef)}
    assert name in functions and name.startswith("test_"), f"{node}: no test function {name} in {path}"
    if case:
        func = getattr(importlib.import_module(".".join(Path(path).with_suffix("").parts)), name)
        ids = _param_ids(func)
        assert ids is not None and case[:-1] in ids, f"{node}: no case [{case[:-1]} in {sorted(ids or ())}"


def test_every_cell_is_filled_with_evidence_that_exists():
    gpu_cells = set(_module(ROOT / "benchmarks" / "gpu_check.py", "gpu_check").CELLS)
    assert list(MATRIX) == list(ROWS) == list(EVIDENCE)
    for row in ROWS:
        assert list(MATRIX[row]) == list(COLUMNS), row
        assert set(EVIDENCE[row]) <= set(COLUMNS), f"{row}: evidence for unknown columns"
        for col, cell in MATRIX[row].items():
            where = f"{row} / {COLUMNS[col]}"
            if cell.status in ("gpu",) or cell.gpu:
                assert cell.gpu in gpu_cells, f"{where}: no gpu_check cell {cell.gpu!r}"
            tests = evidence(row, col)
            if cell.status == "tested":
                assert tests, f"{where}: ✓ without a test"
            if cell.status == "refused":
                assert cell.message and len(tests) == 1, where
                want = DDP_TEST if col == "ddp" else f"{REFUSAL_TEST}[{row}-{col}]"
                assert tests[0] == want, f"{where}: its refusal is checked by {want}"
            for node in tests:
                _check_node(node)


def test_a_cell_without_listed_tests_is_refused_by_the_table(monkeypatch):
    """A tested cell missing from tests/compat_evidence.py is an error, not an empty list on the page."""
    monkeypatch.delitem(EVIDENCE["HAT"], "bf16")
    with pytest.raises(KeyError, match="HAT / bf16: a tested cell with no tests"):
        evidence("HAT", "bf16")
    assert evidence("HAT", "fp16") == (f"{REFUSAL_TEST}[HAT-fp16]",)  # a refused cell: its refusal case


def test_a_missing_test_or_case_is_caught():
    with pytest.raises(AssertionError, match="no test function"):
        _check_node("tests/test_compat_matrix.py::test_nothing_of_the_kind")
    with pytest.raises(AssertionError, match="no case"):
        _check_node("tests/test_compat_matrix.py::test_cell[HAT-fp16]")  # refused: not trained there
    _check_node("tests/test_compat_matrix.py::test_cell[HAT-bf16]")


# -- refusals ----------------------------------------------------------------------------------------------------
def fsdp1_wrapped(model):
    """``model`` wrapped by torch's FSDP1 (flat parameters), as accelerate's FSDP1 plugin wraps it in ``train()``.

    accelerate refuses an FSDP1 plugin on a CPU (``sync_module_states`` needs a device) before the Trainer exists,
    so the CPU test wraps the model itself, in a one-process gloo group (the worker's environment names it).
    ``use_orig_params`` as FSDP1 needs it for a model with frozen parameters (TSS/WSN), else flat parameters only."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    mixed = len({p.requires_grad for p in model.parameters()}) > 1
    return FullyShardedDataParallel(model, use_orig_params=mixed, device_id=torch.device("cpu"))


def _trainers(row: str, args, col: str):
    """The row's real Trainer(s) on a tiny Llama (LoRA-wrapped for the peft column, FSDP1-wrapped after the
    strategy prepared it for the fsdp1 column), ready to train()."""
    from torch.utils.data import DataLoader
    from transformers import Trainer

    from hf_softmask import (
        MultiTaskClassifier,
        SoftMaskCallback,
        SoftMaskTrainer,
        SoftMaskTrainingArguments,
        UnitImportance,
        UnitLayout,
    )
    from hf_softmask.continual.finetuning import build_optimizer
    from hf_softmask.strategies import StrategyTrainer, get_strategy
    from hf_softmask.strategies.cbp import CBPStrategy
    from hf_softmask.strategies.das import DASStrategy
    from hf_softmask.strategies.ewc import EWCStrategy
    from hf_softmask.strategies.hat import HATStrategy
    from hf_softmask.strategies.kd import KDStrategy
    from hf_softmask.strategies.talos import TaLoSStrategy

    def tiny(backbone=False):  # the causal LM, or its base model (the finetuning runner's backbone)
        model = tiny_llama().model if backbone else tiny_llama()
        if col != "peft":
            return model
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))

    def placed(model):  # what the Trainer trains: for fsdp1 the model as accelerate's FSDP1 plugin wraps it
        return fsdp1_wrapped(model) if col == "fsdp1" else model

    if row == "TSS/WSN runner":  # the finetuning runner's model and optimizer

        def finetune(name):
            strategy = get_strategy(name)
            model = strategy.prepare_model(MultiTaskClassifier(tiny(backbone=True), [2]))
            model.train_only_head(0)
            strategy.before_task(model, 0)
            model = placed(model)
            opt = build_optimizer(model, args.learning_rate, 1e-2, args.weight_decay)
            return StrategyTrainer(
                model=model, args=args, train_dataset=task_dataset(0), strategy=strategy, optimizers=(opt, None)
            )

        for name in ("tss", "wsn"):
            yield lambda name=name: finetune(name)
        return
    model, data = tiny(), lm_dataset(n_batches=2, seq_len=12)
    importance = UnitImportance.zeros_like_layout(UnitLayout.from_model(model))
    if row == "SoftMaskCallback":
        yield lambda: Trainer(
            model=placed(model), args=args, train_dataset=data, callbacks=[SoftMaskCallback(importance)]
        )
        return
    if row == "SoftMaskTrainer":
        cls_args = SoftMaskTrainingArguments(**{k: v for k, v in args.to_dict().items() if k in args.__dict__})
        yield lambda: SoftMaskTrainer(model=placed(model), args=cls_args, train_dataset=data, importance=importance)
        return
    strategies = {
        "DAS runner": [DASStrategy],
        "HAT": [HATStrategy],
        "CBP": [CBPStrategy],
        "TaLoS": [TaLoSStrategy],
        "EWC/KD": [EWCStrategy, KDStrategy],
    }[row]

    def build(cls):
        strategy = cls()
        prepared = strategy.prepare_model(tiny())
        strategy.before_task(prepared, 0, DataLoader(data, batch_size=4))  # ready to train, as the runners do
        return StrategyTrainer(model=placed(prepared), args=args, train_dataset=data, strategy=strategy)

    for cls in strategies:
        yield lambda cls=cls: build(cls)


def _refusal_worker(out: Path) -> None:
    """For each refused cell: build the row's Trainer with the column's flags and train; record what happened."""
    port = free_port()
    # --fsdp needs torch.distributed: one process, world size 1 (as benchmarks/gpu_check.py's fsdp2 cell)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1"
    )
    results = {}
    for row, col in REFUSED:
        args = train_args(out / "trainer", max_steps=1, **COLUMN_ARGS.get(col, {}))
        got = []
        for make in _trainers(row, args, col):
            try:
                make().train()
                got.append("trained without refusing")
            except UnsupportedSettingError as e:
                got.append(str(e))
            except Exception as e:  # noqa: BLE001 - reported per cell, not as a crash of the worker
                got.append(f"failed otherwise: {type(e).__name__}: {e}")
        results[f"{row}-{col}"] = got
    (out / "refusals.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    out = tmp_path_factory.mktemp("refusals")
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "refusals.json").read_text())


@pytest.mark.parametrize(("row", "col"), [pytest.param(r, c, id=f"{r}-{c}") for r, c in REFUSED])
def test_refused_cell_refuses_at_train_begin(refusals, row, col):
    got = refusals[f"{row}-{col}"]
    assert got, f"{row}: no trainer was built"
    for message in got:
        assert MATRIX[row][col].message in message and COLUMNS[col] in message, message


def test_features_are_read_from_the_trainer_flags_and_the_model():
    from peft import LoraConfig, get_peft_model

    assert detect_features(train_args("unused")) == {"fp32"}
    for col, flags in COLUMN_ARGS.items():
        if col != "fsdp1":  # a model column here (the --fsdp route: below)
            assert col in detect_features(train_args("unused", **flags)), col
    fsdp1 = train_args("unused", fsdp="full_shard", fsdp_config={"version": 1})
    assert {"fsdp1", "fsdp2"} & detect_features(fsdp1) == {"fsdp1"}
    lora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert detect_features(model=lora) == {"fp32", "peft"}
    check_supported("HAT", train_args("unused", bf16=True), lora)  # supported: no error
    with pytest.raises(UnsupportedSettingError, match="HAT does not support"):
        check_supported("HAT", train_args("unused", fp16=True))


if __name__ == "__main__":
    _refusal_worker(Path(sys.argv[1]))
    from hf_softmask.continual import end_processes

    end_processes()
