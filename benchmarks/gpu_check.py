"""The GPU-only cells of the compatibility matrix, checked in one command: one PASS / FAIL / SKIP line per cell.

    python benchmarks/gpu_check.py                          # on a CUDA machine: every cell, <= 10 min on one H100
    python benchmarks/gpu_check.py --device cpu --dry-run   # the same code on the CPU with tiny models

Cells (each in its own subprocess, so that accelerate's process-wide state and a crash or hang stay in one cell):

- ``fp16_gradscaler``: a real ``Trainer(fp16=True)`` (CUDA GradScaler through accelerate's AcceleratedOptimizer)
  with ``SoftMaskCallback`` in update mode;
- ``fused_adamw_bf16``: ``Trainer(optim="adamw_torch_fused", bf16=True)`` with ``SoftMaskCallback``;
- ``fsdp2``: accelerate's FSDP2 (``fsdp=True, fsdp_config={"version": 2}``) in one process on one GPU;
- ``das_smollm2``: a SmolLM2-135M DAS domain (``StrategyTrainer`` + ``DASStrategy``) in bf16 with gradient
  checkpointing;
- ``compiled_step_plan``: the compiled masked AdamW step on a fused AdamW (the default for big models), whose plan
  keeps the step counts on the host: equal, bit for bit, to the same step gathered afresh every step, through an
  lr change and a ``load_state_dict``; close to the eager masked step; protected slices unchanged.

Every cell trains with importance 1 on half of the heads and FFN neurons of every layer (DAS: on top of the
computed general importance) and checks that every slice owned by a unit of importance 1 is bit-for-bit unchanged,
that most other units moved (else the check would prove nothing), and that every logged loss is finite.

Without CUDA (and without ``--dry-run``) every cell is reported as skipped and the exit status is 0. ``--dry-run``
runs each cell's code on the CPU with tiny models: ``torch.amp.GradScaler("cpu")`` stands in for CUDA's scaler,
bf16 autocast runs on the CPU; FSDP2 runs the Trainer but reports SKIP, as accelerate does not shard on a CPU.
Exit status: 1 if any cell FAILs, else 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

# Seconds each cell may take on one H100-class GPU (their sum is the 10-minute budget), and on the CPU dry run.
CELLS = {"fp16_gradscaler": 80, "fused_adamw_bf16": 80, "fsdp2": 120, "das_smollm2": 200, "compiled_step_plan": 120}
DRY_RUN_TIMEOUT = 600
RESULT = "@@gpu_check "


class Skip(Exception):
    """The cell cannot run here (the reason is printed)."""


# -- shared pieces ---------------------------------------------------------------------------------------------
def _env_defaults() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("WANDB_DISABLED", "true")


def _tiny_or_sized_llama(small: bool, seed: int = 0):
    """A randomly initialised fp32 Llama (GQA): tiny for the CPU dry run, ~40M parameters on a GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if small:
        shape = {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 64,
            "vocab_size": 128,
        }
    else:
        shape = {
            "hidden_size": 512,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "intermediate_size": 1408,
            "vocab_size": 8000,
        }
    cfg = LlamaConfig(max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=0, **shape)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences (causal LM: labels = input ids); no ``datasets`` needed."""

    def __init__(self, vocab: int, n: int, seq_len: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, seq_len), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def half_importance(layout):
    """Importance 1 on the first half of the heads and FFN neurons of every layer, 0 on the rest."""
    from hf_softmask import UnitImportance

    heads = torch.zeros(layout.num_layers, layout.num_heads)
    ffn = torch.zeros(layout.num_layers, layout.ffn_size)
    heads[:, : layout.num_heads // 2] = 1
    ffn[:, : layout.ffn_size // 2] = 1
    return UnitImportance(heads, ffn, meta={"layout": layout.signature()})


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered when it is an FSDP2 DTensor), detached, in fp32 on the CPU."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().float().cpu()


def snapshot(layout) -> dict[str, torch.Tensor]:
    return {s.name: _full(s.param).clone() for s in layout.owned}


def check_protection(layout, importance, before: dict[str, torch.Tensor], model) -> str:
    """Raise AssertionError unless every slice owned by a unit of importance 1 is unchanged and most other units
    moved; parameters are looked up by name in ``model`` (FSDP2 replaces the parameter objects)."""
    # Wrappers that rename parameters (DDP's leading "module", FSDP1, checkpoint wrappers, torch.compile) are looked
    # through by name.
    wrappers = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}
    params = {}
    for name, p in model.named_parameters():
        parts = [x for x in name.split(".") if x not in wrappers]
        params[".".join(parts[1:] if parts[0] == "module" else parts)] = p
    prot_moved = prot_total = free_moved = free_total = 0
    worst = None
    for s in layout.owned:
        if not s.param.requires_grad:
            continue
        after = _full(params[s.name])
        if not torch.isfinite(after).all():
            raise AssertionError(f"{s.name} has non-finite values after training")
        prot = (layout.unit_values(s.kind, s.layer, importance.heads, importance.ffn) == 1)[s.index]
        moved = (after != before[s.name]).movedim(s.axis, 0).reshape(len(s.index), -1).any(1)
        if moved[prot].any() and worst is None:
            delta = (after - before[s.name]).abs().movedim(s.axis, 0).reshape(len(s.index), -1)[prot].max().item()
            worst = f"{s.name}: {int(moved[prot].sum())} protected positions moved (max |change| {delta:.3g})"
        prot_moved += int(moved[prot].sum())
        prot_total += int(prot.sum())
        free_moved += int(moved[~prot].sum())
        free_total += int((~prot).sum())
    if prot_total == 0 or free_total == 0:
        raise AssertionError("the importance protects no trained slice, or all of them: nothing to check")
    if prot_moved:
        raise AssertionError(f"{prot_moved}/{prot_total} protected positions moved; first: {worst}")
    if free_moved < 0.5 * free_total:
        raise AssertionError(
            f"only {free_moved}/{free_total} unprotected positions moved: training did not update "
            "the model, so the protection check proves nothing"
        )
    return f"0/{prot_total} protected positions moved, {free_moved}/{free_total} unprotected moved"


def finite_losses(trainer) -> str:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if not losses:
        raise AssertionError("no training loss was logged")
    bad = [x for x in losses if not math.isfinite(x)]
    if bad:
        raise AssertionError(f"{len(bad)}/{len(losses)} logged losses are not finite: {bad[:3]}")
    return f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def train_args(out: str, cpu: bool, **kw):
    from transformers import TrainingArguments

    base = {
        "output_dir": out,
        "per_device_train_batch_size": 4,
        "max_steps": 8,
        "learning_rate": 1e-3,
        "weight_decay": 0.01,
        "warmup_steps": 0,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
        "use_cpu": cpu,
        **kw,
    }
    return TrainingArguments(**base)


def _softmask_trainer_cell(opts, out: str, **args) -> tuple:
    """A plain Trainer with SoftMaskCallback (update mode) on a Llama.

    Returns (trainer, layout, importance, before).
    """
    from transformers import Trainer

    from hf_softmask import SoftMaskCallback, UnitLayout

    model = _tiny_or_sized_llama(small=opts.dry_run)
    layout = UnitLayout.from_model(model)
    importance = half_importance(layout)
    before = snapshot(layout)
    seq = 16 if opts.dry_run else 256
    data = TokenDataset(model.config.vocab_size, 64, seq)
    trainer = Trainer(
        model=model,
        args=train_args(out, opts.device == "cpu", **args),
        train_dataset=data,
        callbacks=[SoftMaskCallback(importance, mode="update")],
    )
    return trainer, layout, importance, before


# -- the cells -------------------------------------------------------------------------------------------------
def cell_fp16_gradscaler(opts, out: str) -> str:
    # 12 steps: CUDA's scaler starts at 2**16 and may skip the first step or two on overflow.
    trainer, layout, importance, before = _softmask_trainer_cell(
        opts, out, fp16=True, optim="adamw_torch", max_steps=12
    )
    if opts.device == "cpu":
        # accelerate makes no scaler on the CPU: CPU GradScaler stands in for CUDA's, through the same code paths
        # (AcceleratedOptimizer.step, accelerator.backward, clip_grad_norm_ unscaling).
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    if trainer.accelerator.scaler is None:
        raise AssertionError("the Trainer runs without a GradScaler (fp16=True should create one)")
    trainer.train()
    scaler = trainer.optimizer.scaler if hasattr(trainer.optimizer, "scaler") else None
    if scaler is None:
        raise AssertionError("the optimizer was not driven by the GradScaler")
    return (
        f"{check_protection(layout, importance, before, trainer.model)}, {finite_losses(trainer)}, "
        f"scale {scaler.get_scale():.0f}"
    )


def cell_fused_adamw_bf16(opts, out: str) -> str:
    trainer, layout, importance, before = _softmask_trainer_cell(opts, out, bf16=True, optim="adamw_torch_fused")
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    if not all(g.get("fused") for g in inner.param_groups):
        raise AssertionError(f"{type(inner).__name__} is not fused: {[g.get('fused') for g in inner.param_groups]}")
    return f"{check_protection(layout, importance, before, trainer.model)}, {finite_losses(trainer)}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cell_fsdp2(opts, out: str) -> str:
    # One process, world size 1: accelerate reads these to set up torch.distributed and FSDP2.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
    )
    trainer, layout, importance, before = _softmask_trainer_cell(
        opts,
        out,
        bf16=True,
        fsdp=True,
        fsdp_config={
            "version": 2,
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "reshard_after_forward": True,
        },
    )
    trainer.train()
    sharded = any(hasattr(p, "full_tensor") for p in trainer.model.parameters())
    result = f"{check_protection(layout, importance, before, trainer.model)}, {finite_losses(trainer)}"
    if not sharded:
        how = f"distributed_type={trainer.accelerator.distributed_type}, is_fsdp_enabled={trainer.is_fsdp_enabled}"
        if opts.device == "cpu":
            raise Skip(f"accelerate does not apply FSDP on a CPU ({how}; the Trainer ran unsharded: {result})")
        raise AssertionError(f"the model's parameters are not DTensors after train(): FSDP2 was not applied ({how})")
    return result


def _smollm2(opts):
    """(model, where it came from): the shipped SmolLM2-135M, or its shape from a config where the asset is absent;
    a tiny Llama on the CPU dry run unless --full-models."""
    if opts.dry_run and not opts.full_models:
        return _tiny_or_sized_llama(small=True), "tiny Llama (dry run)"
    try:
        from hf_softmask.utils.assets import load_smollm2

        model, _ = load_smollm2(dtype=torch.float32)
        return model, "SmolLM2-135M (shipped GGUF)"
    except (FileNotFoundError, ImportError) as err:
        from common import SHAPES
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(
            max_position_embeddings=2048, bos_token_id=0, eos_token_id=0, pad_token_id=0, **SHAPES["smollm2-135m"]
        )
        return LlamaForCausalLM(cfg), f"SmolLM2-135M shape, random weights ({type(err).__name__}: asset not installed)"


def cell_das_smollm2(opts, out: str) -> str:
    from torch.utils.data import DataLoader

    from hf_softmask import StrategyTrainer
    from hf_softmask.strategies.das import DASStrategy

    model, origin = _smollm2(opts)
    if opts.device == "cuda":
        model = model.to("cuda")
    model.config.use_cache = False
    seq = 16 if (opts.dry_run and not opts.full_models) else 128
    data = TokenDataset(model.config.vocab_size, 32, seq)
    loader = DataLoader(data, batch_size=4)
    strategy = DASStrategy(softmask={"mode": "update"}, importance_batches=2, show_progress=False)
    strategy.before_task(model, 0, loader)  # general-knowledge importance (kl_dropout) on 2 batches
    layout = strategy.layout(model)
    importance = strategy.importance.maximum(half_importance(layout))
    strategy.importance = importance
    before = snapshot(layout)
    args = train_args(
        out,
        opts.device == "cpu",
        bf16=True,
        activation_checkpointing=True,  # transformers' name for gradient checkpointing since 5.x
        activation_checkpointing_kwargs={"use_reentrant": False},
        max_steps=4,
        learning_rate=1e-4,
    )
    trainer = StrategyTrainer(model=model, args=args, train_dataset=data, strategy=strategy)
    trainer.train()
    contrast = strategy.contrastive_losses
    if not contrast or not all(math.isfinite(x) for x in contrast):
        raise AssertionError(f"DAS contrastive losses missing or not finite: {contrast[:4]}")
    result = f"{origin}: {check_protection(layout, importance, before, trainer.model)}, {finite_losses(trainer)}"
    strategy.after_task(trainer.model, 0, loader)  # the domain's importance, accumulated
    imp = strategy.importance
    if not (torch.isfinite(imp.heads).all() and torch.isfinite(imp.ffn).all()):
        raise AssertionError("the domain importance after training is not finite")
    return result


def cell_compiled_step_plan(opts, out: str) -> str:
    import copy

    from hf_softmask import UnitLayout
    from hf_softmask.core import optim
    from hf_softmask.core.masking import SoftMaskConfig, build_param_masks
    from hf_softmask.core.step_plan import PLAN_ATTR

    device = torch.device(opts.device)
    runs = {}
    for name in ("plan", "fresh", "eager"):  # the plan kept; dropped before every step; the eager masked step
        # the tiny model on the GPU too: what is checked is the device path (pinned hyper-parameter copies, step
        # counts on the device, the plan), and compiling for fewer tensors keeps the cell short
        model = _tiny_or_sized_llama(small=True).to(device)
        layout = UnitLayout.from_model(model)
        importance = half_importance(layout)
        before = snapshot(layout)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
        masks = build_param_masks(layout, importance, SoftMaskConfig())
        handle = optim.install_update_masks(opt, masks, compiled=name != "eager")
        g = torch.Generator(device=device).manual_seed(1)
        saved = None
        for i in range(8):
            if name == "fresh":
                opt.__dict__.pop(PLAN_ATTR, None)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, device=device, dtype=p.dtype) * 1e-2
            if i == 3:
                opt.param_groups[0]["lr"] = 5e-4
                saved = copy.deepcopy(opt.state_dict())
            if i == 5:
                opt.load_state_dict(saved)  # new state tensors, step counts back by two
            opt.step()
        if (name != "eager" and not handle.compiled) or "_hf_softmask_compile_error" in opt.__dict__:
            raise AssertionError(f"the masked step did not compile: {opt.__dict__.get('_hf_softmask_compile_error')}")
        steps = {opt.state[p]["step"].item() for p in params}
        if steps != {6.0}:
            raise AssertionError(f"step counts {sorted(steps)} after 8 steps and a load_state_dict 2 back, not 6")
        protection = check_protection(layout, importance, before, model)
        runs[name] = ([p.detach().float().cpu() for p in params], protection)
    (plan, protection), (fresh, _), (eager, _) = runs["plan"], runs["fresh"], runs["eager"]
    for i, (a, b, c) in enumerate(zip(plan, fresh, eager)):
        if not torch.equal(a, b):
            raise AssertionError(f"parameter {i}: the planned step is {(a - b).abs().max()} from a fresh gather")
        if not torch.allclose(a, c, rtol=0, atol=1e-4):
            raise AssertionError(f"parameter {i}: the compiled step is {(a - c).abs().max()} from the eager one")
    return f"plan == fresh gather bit for bit, compiled ~ eager (atol 1e-4), {protection}"


CELL_FUNCS = {
    "fp16_gradscaler": cell_fp16_gradscaler,
    "fused_adamw_bf16": cell_fused_adamw_bf16,
    "fsdp2": cell_fsdp2,
    "das_smollm2": cell_das_smollm2,
    "compiled_step_plan": cell_compiled_step_plan,
}


# -- driver ----------------------------------------------------------------------------------------------------
def run_cell(opts) -> int:
    """Child process: run one cell, print its result line behind RESULT."""
    _env_defaults()
    if opts.device == "cpu":
        torch.set_num_threads(opts.threads)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{opts.cell}_") as out:
        try:
            detail = CELL_FUNCS[opts.cell](opts, out)
            status = "PASS"
        except Skip as why:
            status, detail = "SKIP", str(why)
        except Exception as err:  # noqa: BLE001 -- every failure becomes one FAIL line; the traceback goes to stderr
            traceback.print_exc()
            status, detail = "FAIL", f"{type(err).__name__}: {err}".replace("\n", " ")[:600]
    print(
        RESULT + json.dumps({"status": status, "detail": detail, "seconds": round(time.time() - start, 1)}), flush=True
    )
    return 0


def _child(opts, cell: str, timeout: float) -> tuple[str, str]:
    cmd = [sys.executable, __file__, "--cell", cell, "--device", opts.device, "--threads", str(opts.threads)]
    cmd += ["--dry-run"] * opts.dry_run + ["--full-models"] * opts.full_models
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the child's own process group (start_new_session): nothing else is touched
        proc.communicate()
        return "FAIL", f"timed out after {timeout:.0f} s (hang or too slow)"
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT):
            res = json.loads(line[len(RESULT) :])
            if res["status"] == "FAIL" and opts.verbose:
                sys.stderr.write(stderr)
            return res["status"], f"{res['detail']} ({res['seconds']} s)"
    tail = " | ".join(stderr.strip().splitlines()[-3:])
    return "FAIL", f"the cell's process exited with status {proc.returncode} without a result: {tail[-600:]}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cuda (default) or cpu (with --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="run the cells' code on the CPU with tiny models")
    p.add_argument("--full-models", action="store_true", help="dry run with the real SmolLM2-135M in the DAS cell")
    p.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated subset of {','.join(CELLS)}")
    p.add_argument("--threads", type=int, default=1, help="torch threads per cell on the CPU")
    p.add_argument("--verbose", action="store_true", help="print a failing cell's traceback")
    p.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell in this process
    opts = p.parse_args(argv)
    if opts.cell:
        return run_cell(opts)
    cells = [c.strip() for c in opts.cells.split(",") if c.strip()]
    unknown = sorted(set(cells) - set(CELLS))
    if unknown:
        p.error(f"unknown cell(s) {unknown}; choose from {list(CELLS)}")
    if opts.device == "cpu" and not opts.dry_run:
        p.error("--device cpu runs only as a dry run: add --dry-run")
    if opts.dry_run and opts.device == "cuda":
        p.error("--dry-run runs on the CPU: add --device cpu")
    if opts.device == "cuda" and not torch.cuda.is_available():
        for cell in cells:
            print(f"SKIP {cell}: no CUDA", flush=True)
        return 0
    failed = False
    for cell in cells:
        status, detail = _child(opts, cell, DRY_RUN_TIMEOUT if opts.dry_run else CELLS[cell])
        failed |= status == "FAIL"
        print(f"{status} {cell}: {detail}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
