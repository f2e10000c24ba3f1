"""The compatibility matrix: which training setting works with which component.

One table, :data:`MATRIX`, is the single place of every fact: ``docs/compatibility.md`` is generated from it
(``python scripts/make_compatibility_page.py``) together with the tests that show each cell (listed beside the
tests, in ``tests/compat_evidence.py``: the package holds no test ids), ``tests/test_compatibility.py`` checks that
every cell is shown by tests that exist and that every refused cell refuses, and :func:`check_supported` enforces
the refusals at train begin.

A cell is one of:

- ``tested``: works, shown by CPU tests (and ``gpu``: a ``benchmarks/gpu_check.py`` cell that also checks it on a
  GPU);
- ``gpu``: works on a GPU only, checked by the ``benchmarks/gpu_check.py`` cell in ``gpu``;
- ``refused``: unsupported; training is refused at start with ``message``.

``note``: a condition the evidence relies on (shown on the page).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = [
    "COLUMNS",
    "MATRIX",
    "ROWS",
    "STRATEGY_ROWS",
    "Cell",
    "UnsupportedSettingError",
    "check_strategy_supported",
    "check_supported",
    "detect_features",
    "fsdp1_parameter",
    "fsdp_version",
    "live_accelerator_state",
    "refuse_fsdp1",
    "training_precision",
]

ROWS = ("SoftMaskCallback", "SoftMaskTrainer", "DAS runner", "TSS/WSN runner", "HAT", "CBP", "TaLoS", "EWC/KD")

#: column key -> title on the page (and in refusal messages)
COLUMNS = {
    "fp32": "fp32",
    "bf16": "bf16 autocast",
    "fp16": "fp16 + GradScaler",
    "checkpointing": "gradient checkpointing",
    "accumulation": "gradient accumulation",
    "ddp": "DDP",
    "fsdp1": "FSDP1 (flat parameters)",
    "fsdp2": "FSDP2",
    "peft": "PEFT-wrapped model",
    "compile": "torch.compile",
}

#: strategy name (``ContinualStrategy.name``) -> its row; strategies without a row (ft, ncl, lora, ...) refuse nothing
STRATEGY_ROWS = {
    "das": "DAS runner",
    "tss": "TSS/WSN runner",
    "wsn": "TSS/WSN runner",
    "hat": "HAT",
    "adahat": "HAT",
    "cbp": "CBP",
    "talos": "TaLoS",
    "ewc": "EWC/KD",
    "kd": "EWC/KD",
}

STATUSES = ("tested", "gpu", "refused")


class UnsupportedSettingError(ValueError):
    """A training setting this component does not support (a refused cell of the compatibility matrix)."""


@dataclass(frozen=True)
class Cell:
    status: str
    gpu: str | None = None
    message: str = ""
    note: str = ""  # a condition the evidence relies on, shown on the page

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"unknown cell status {self.status!r}; one of {STATUSES}")


def _tested(gpu: str | None = None, note: str = "") -> Cell:
    return Cell("tested", gpu, note=note)


def _gpu(cell: str) -> Cell:
    return Cell("gpu", cell)


def _refused(message: str) -> Cell:
    return Cell("refused", message=message)


_FSDP2_STATE = (
    "keeps full-shape per-parameter state outside the model ({what}) that does not follow FSDP2's "
    "sharded DTensor parameters; train it without --fsdp"
)
#: what FSDP1 does that no row follows; each row's refusal adds its own state and what to use instead
FSDP1_WHAT = (
    "torch's FullyShardedDataParallel (FSDP1: accelerate's fsdp_version 1, transformers' fsdp_config "
    "version 1) replaces the model's weights by flat 1-D FlatParameters (sharded across processes)"
)
USE_FSDP2 = (
    "use FSDP2: --fsdp full_shard with fsdp_config version 2 (transformers' default), or fsdp_version: 2 "
    "in the accelerate config (the shipped configs/accelerate/fsdp.yaml: "
    "hf_softmask.utils.package_data.config_file('accelerate/fsdp'))"
)
_NO_FSDP2 = "this row refuses FSDP2 too: train it with DDP"
_NO_FSDP2_DDP = "this row refuses FSDP2 and DDP too: train it in one process"


def _fsdp1(state: str, instead: str) -> Cell:
    return _refused(f"{FSDP1_WHAT}, which {state} cannot follow; {instead}")


_DDP_LOCAL = (
    "updates {what} from this rank's batches only (nothing is all-reduced), so the DDP replicas "
    "diverge; train it in one process"
)
_COMPILE_NOTE = (
    "a model object that one Trainer has compiled stays marked as prepared by accelerate, so the next Trainer "
    "on it (the next task) trains it uncompiled; `del model._is_accelerate_prepared` before building "
    "that Trainer compiles it again (accelerate 1.15). The CPU tests trace with dynamo's aot_eager backend "
    "(the graph capture hooks can break); inductor's code generation is not exercised on the CPU"
)


MATRIX: dict[str, dict[str, Cell]] = {
    "SoftMaskCallback": {
        "fp32": _tested(),
        "bf16": _tested(gpu="fused_adamw_bf16"),
        "fp16": _tested(
            gpu="fp16_gradscaler",
        ),
        "checkpointing": _tested(),
        "accumulation": _tested(),
        "ddp": _tested(),
        "fsdp1": _fsdp1("the masks of the units' weight slices", USE_FSDP2),
        "fsdp2": _gpu(
            "fsdp2",
        ),
        "peft": _tested(),
        "compile": _tested(note=_COMPILE_NOTE),
    },
    "SoftMaskTrainer": {
        "fp32": _tested(),
        "bf16": _tested(),
        "fp16": _tested(),
        "checkpointing": _tested(),
        "accumulation": _tested(),
        "ddp": _tested(),
        # SoftMaskTrainer masks through the SoftMaskCallback the fsdp2 GPU cell runs.
        "fsdp1": _fsdp1("the masks of the units' weight slices", USE_FSDP2),
        "fsdp2": _gpu("fsdp2"),
        "peft": _tested(),
        "compile": _tested(note=_COMPILE_NOTE),
    },
    "DAS runner": {
        "fp32": _tested(),
        "bf16": _tested(
            gpu="das_smollm2",
        ),
        "fp16": _tested(),
        "checkpointing": _tested(
            gpu="das_smollm2",
        ),
        "accumulation": _tested(),
        "ddp": _tested(),
        "fsdp1": _fsdp1("the importance and masks of the units' weight slices", USE_FSDP2),
        "fsdp2": _tested(
            note="the runner test shows a DAS domain training, evaluating, saving and resuming under "
            "fully_shard on 2 gloo processes (identical importance on both ranks); that protected "
            "slices stay unchanged under sharded parameters is shown for the masking DAS uses (the "
            "second test; on a GPU: the SoftMaskCallback's fsdp2 cell)",
        ),
        "peft": _tested(),
        "compile": _tested(note=_COMPILE_NOTE),
    },
    "TSS/WSN runner": {
        "fp32": _tested(),
        "bf16": _tested(),
        "fp16": _tested(),
        "checkpointing": _tested(),
        "accumulation": _tested(),
        "ddp": _tested(),
        "fsdp1": _fsdp1("the per-weight subnetwork scores and masks", _NO_FSDP2),
        "fsdp2": _refused(
            "TSS/WSN read and write whole weight-shaped tensors outside the forward pass (a finished "
            "task's mask is bit-packed from the full score tensor; the update masks on scores and "
            "weights are full-shape), which FSDP2 shards into DTensors; train TSS/WSN without --fsdp "
            "(DDP is supported)"
        ),
        "peft": _refused(
            "TSS and WSN put their own subnetwork layers (a PEFT tuner of their own) on the backbone's "
            "nn.Linear/Conv1D modules and cannot wrap a PEFT-wrapped backbone's adapter layers; give "
            "them the plain backbone: the per-task subnetwork is already the parameter-efficient part"
        ),
        "compile": _tested(note=_COMPILE_NOTE),
    },
    "HAT": {
        "fp32": _tested(),
        "bf16": _tested(),
        "fp16": _refused(
            "HAT steps its task embeddings outside the optimizer, with gradients a GradScaler has "
            "scaled and without skipping overflow steps; train HAT in bf16 or fp32, not --fp16"
        ),
        "checkpointing": _tested(),
        "accumulation": _tested(),
        "ddp": _refused("HAT " + _DDP_LOCAL.format(what="its task embeddings")),
        "fsdp1": _fsdp1("the unit gates and the masks of the units' weight slices", _NO_FSDP2_DDP),
        "fsdp2": _refused("HAT " + _FSDP2_STATE.format(what="task embeddings, unit masks")),
        "peft": _tested(),
        "compile": _tested(note=_COMPILE_NOTE),
    },
    "CBP": {
        "fp32": _tested(),
        "bf16": _tested(),
        "fp16": _tested(),
        "checkpointing": _tested(),
        "accumulation": _tested(),
        "ddp": _refused("CBP " + _DDP_LOCAL.format(what="unit utilities and replaces units")),
        "fsdp1": _fsdp1("the unit utilities and row-wise weight resets", _NO_FSDP2_DDP),
        "fsdp2": _refused("CBP " + _FSDP2_STATE.format(what="per-unit utilities, ages, row-wise weight resets")),
        "peft": _tested(),
        "compile": _tested(note=_COMPILE_NOTE),
    },
    "TaLoS": {
        "fp32": _tested(),
        "bf16": _tested(),
        "fp16": _tested(),
        "checkpointing": _tested(),
        "accumulation": _tested(),
        "ddp": _tested(
            note="every rank must pass before_task the same selection data (the Fisher "
            "scores are not all-reduced); the test does",
        ),
        "fsdp1": _fsdp1("the per-entry masks of named weights", _NO_FSDP2),
        "fsdp2": _refused("TaLoS " + _FSDP2_STATE.format(what="full-shape trainable masks and base values")),
        "peft": _tested(),
        "compile": _tested(note=_COMPILE_NOTE),
    },
    "EWC/KD": {
        "fp32": _tested(),
        "bf16": _tested(),
        "fp16": _tested(),
        "checkpointing": _tested(),
        "accumulation": _tested(),
        "ddp": _tested(),
        "fsdp1": _fsdp1("EWC's Fisher and anchor of named weights (KD: its teacher copy)", _NO_FSDP2),
        "fsdp2": _refused(
            "EWC/KD " + _FSDP2_STATE.format(what="EWC: full-shape Fisher and anchor; KD: a teacher copy")
        ),
        "peft": _tested(),
        "compile": _tested(note=_COMPILE_NOTE),
    },
}


# -- detection and enforcement ---------------------------------------------------------------------------------------
def _is_peft(model) -> bool:
    from .peft_support import is_peft_model

    return is_peft_model(model)


def _has_dtensor(model) -> bool:
    from .dtensor import is_dtensor

    return any(is_dtensor(p) for p in model.parameters())


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def live_accelerator_state():
    """The ``AcceleratorState`` all Accelerators of this process share, or None when no Accelerator was made.

    Inside ``Trainer.train`` (a callback's ``on_train_begin``) it is the running Trainer's accelerator state."""
    try:
        from accelerate.state import AcceleratorState, is_initialized
    except ImportError:
        return None
    if not is_initialized():
        return None
    try:
        return AcceleratorState()
    except ValueError:  # the shared state was reset (only a PartialState is left)
        return None


def training_precision(args=None, accelerator=None) -> str | None:
    """The mixed precision (``"no"``, ``"fp16"``, ``"bf16"``, ...) the Trainer's accelerator uses; None if unknown.

    ``accelerator`` (an ``Accelerator`` or ``AcceleratorState``) decides when given. Else the ``TrainingArguments``:
    ``fp16`` / ``bf16``, then ``mixed_precision``, which transformers reads from ``ACCELERATE_MIXED_PRECISION``
    (set by ``accelerate launch --mixed_precision`` or an accelerate config) and hands the accelerator; without
    that field (older transformers) the variable itself, which the Accelerator then reads.
    """
    if accelerator is not None and getattr(accelerator, "mixed_precision", None):
        return str(accelerator.mixed_precision).lower()
    if args is None:
        return None
    if getattr(args, "fp16", False):
        return "fp16"
    if getattr(args, "bf16", False):
        return "bf16"
    if getattr(args, "mixed_precision", None):
        return str(args.mixed_precision).lower()
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()


def fsdp1_parameter(model) -> str | None:
    """The name of a parameter FSDP1 has flattened (or wrapped) in ``model``, else None.

    By name, so that it can be asked before anything indexes the model's weights: FSDP1 registers its flat
    parameters as ``..._flat_param`` under ``_fsdp_wrapped_module`` (``use_orig_params=True`` keeps the original
    names under that prefix, as views into the flat shard); FSDP2's ``fully_shard`` renames nothing."""
    for name, _ in model.named_parameters():
        if "_flat_param" in name or "_fsdp_wrapped_module" in name:
            return name
    return None


def refuse_fsdp1(model, what: str) -> None:
    """Raise :class:`UnsupportedSettingError` if FSDP1 wraps ``model`` (``what`` names the component refusing)."""
    name = fsdp1_parameter(model)
    if name is not None:
        raise UnsupportedSettingError(
            f"{what} cannot work on a model wrapped by FSDP1 (it holds the parameter {name!r}): {FSDP1_WHAT}, in "
            f"which the weight slices of heads and neurons do not exist; {USE_FSDP2}, or DDP (docs/compatibility.md)"
        )


def fsdp_version(args=None, model=None, accelerator=None) -> int | None:
    """The FSDP version a run uses (1: flat parameters, 2: ``fully_shard``'s DTensors), or None without FSDP.

    The model decides when it is already wrapped (FSDP1 names, DTensor parameters); else the accelerator's FSDP
    plugin; else the ``TrainingArguments`` (``--fsdp`` with the version transformers gives accelerate's plugin);
    else ``ACCELERATE_USE_FSDP`` / ``FSDP_VERSION`` (``accelerate launch --use_fsdp``, version 1 unless given),
    which the Trainer's accelerator reads when ``--fsdp`` is not set. The run's sources (accelerator, arguments,
    environment) are read only when ``args`` or ``accelerator`` is given.
    """
    if model is not None:
        if fsdp1_parameter(model) is not None:
            return 1
        if _has_dtensor(model):
            return 2
    if args is None and accelerator is None:
        return None
    state = getattr(accelerator, "state", accelerator)
    plugin = getattr(state, "fsdp_plugin", None) if state is not None else None
    if plugin is not None and getattr(plugin, "fsdp_version", None):
        return int(plugin.fsdp_version)
    if args is not None and getattr(args, "fsdp", None):
        plugin_args = getattr(args, "fsdp_plugin_args", None) or {}
        config = getattr(args, "fsdp_config", None) or {}
        version = plugin_args.get("fsdp_version") or config.get("version") or config.get("fsdp_version")
        return int(version or 1)  # transformers without a version in its plugin arguments: accelerate's default
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes"):
        return int(os.environ.get("FSDP_VERSION", "1") or 1)
    return None


def detect_features(args=None, model=None, accelerator=None) -> set[str]:
    """The matrix columns a run uses, read from its ``TrainingArguments``, its model and its accelerator (an
    ``Accelerator`` or ``AcceleratorState``; fp32 is implied). Precision: :func:`training_precision`; FSDP:
    :func:`fsdp_version`."""
    found = {"fp32"}
    precision = training_precision(args, accelerator)
    if precision in ("fp16", "bf16"):
        found.add(precision)
    version = fsdp_version(args, model, accelerator)
    if version is not None:
        found.add("fsdp1" if version == 1 else "fsdp2")
    if args is not None:
        flags = {
            "compile": args.torch_compile,
            "checkpointing": getattr(args, "activation_checkpointing", False)
            or getattr(args, "gradient_checkpointing", False),
            "accumulation": args.gradient_accumulation_steps > 1,
        }
        found |= {col for col, on in flags.items() if on}
    if model is not None and _is_peft(model):
        found.add("peft")
    if _world_size() > 1 and not found & {"fsdp1", "fsdp2"}:
        found.add("ddp")
    return found


def check_supported(row: str, args=None, model=None, accelerator=None) -> None:
    """Raise :class:`UnsupportedSettingError` naming every refused cell of ``row`` this run would use.

    Pass the Trainer's ``accelerator`` where there is one (callbacks: :func:`live_accelerator_state`), so that the
    precision and FSDP version are those it really uses."""
    cells, used = MATRIX[row], detect_features(args, model, accelerator)
    refused = [
        f"{COLUMNS[col]}: {cells[col].message}" for col in COLUMNS if col in used and cells[col].status == "refused"
    ]
    if refused:
        raise UnsupportedSettingError(
            f"{row} does not support this run (see docs/compatibility.md):\n- " + "\n- ".join(refused)
        )


def check_strategy_supported(strategy, args=None, model=None, accelerator=None) -> None:
    """:func:`check_supported` for a strategy's row; strategies without a row refuse nothing."""
    row = STRATEGY_ROWS.get(getattr(strategy, "name", None))
    if row is not None:
        check_supported(row, args, model, accelerator)
