"""Weight averaging across a domain: WiSE-FT interpolation with the weights from before it, and an EMA during it.

Both act parameter by parameter on the tensor this process holds: for a DTensor (FSDP2 ``fully_shard``, tensor
parallel) that is its local shard (``to_local()``), so nothing is gathered; snapshots are local shards too. The
arithmetic is in fp32 whatever the parameter dtype (bf16 weights would lose the small ``(1 - A)`` share), and
the result is cast back once.

- :func:`snapshot_weights` before a domain, :func:`interpolate_weights_` after it:
  ``theta <- A * theta_new + (1 - A) * theta_before`` (computed exactly so, in fp32). A parameter the domain did not
  change (frozen) is left bit-identical rather than recomputed.
- :class:`WeightEMA`, a TrainerCallback: ``e_0 = theta_0`` (the weights when training starts),
  ``e_t = d * e_{t-1} + (1 - d) * theta_t`` after every optimizer step ``t``; at the end of training the EMA is
  copied into the model (so whatever runs after ``trainer.train()`` -- a strategy's ``after_task``, evaluation,
  WiSE-FT -- sees the EMA weights). Covers the parameters that require grad when training starts. Its state
  is written beside every Trainer checkpoint (``ema_weights[-rank<r>].safetensors``) and read back on resume.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from ..core.dtensor import local_tensor

__all__ = ["EMA_STATE_FILE", "WeightEMA", "interpolate_weights_", "snapshot_weights"]

EMA_STATE_FILE = "ema_weights.safetensors"


def _float_params(model: nn.Module, trainable_only: bool = False):
    for name, p in model.named_parameters():
        if p.is_floating_point() and (p.requires_grad or not trainable_only):
            yield name, p


@torch.no_grad()
def snapshot_weights(
    model: nn.Module, device: str | torch.device | None = None, trainable_only: bool = False
) -> dict[str, torch.Tensor]:
    """Detached copies of the floating-point parameters' local shards, in their own dtype, keyed by parameter name.

    ``device``: where to keep the copies (``"cpu"`` saves accelerator memory; default: beside each parameter).
    """
    return {
        name: local_tensor(p).detach().to(device, copy=True)
        if device is not None
        else local_tensor(p).detach().clone()
        for name, p in _float_params(model, trainable_only)
    }


@torch.no_grad()
def interpolate_weights_(model: nn.Module, before: dict[str, torch.Tensor], alpha: float) -> int:
    """In place: every parameter in ``before`` becomes ``alpha * theta + (1 - alpha) * before`` (fp32, cast back).

    ``alpha = 1`` keeps the new weights, ``alpha = 0`` restores ``before``. Parameters equal to their snapshot are
    skipped (left bit-identical). Returns how many parameters changed. The snapshot must name exactly the model's
    floating-point parameters (take it with :func:`snapshot_weights` after any re-wrapping is undone).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"merge_alpha must lie in [0, 1], got {alpha}")
    params = dict(_float_params(model))
    missing, extra = sorted(set(params) - set(before)), sorted(set(before) - set(params))
    if missing or extra:
        raise ValueError(
            f"weight snapshot does not match the model: model-only {missing[:5]}, "
            f"snapshot-only {extra[:5]} (take the snapshot when the model has the same modules, "
            "e.g. after an adapter is merged)"
        )
    changed = 0
    for name, p in params.items():
        local = local_tensor(p)
        old = before[name].to(local.device)
        if old.shape != local.shape:
            raise ValueError(f"{name}: snapshot shape {tuple(old.shape)} != local shape {tuple(local.shape)}")
        if torch.equal(local, old.to(local.dtype)):
            continue
        merged = alpha * local.float() + (1.0 - alpha) * old.float()
        local.copy_(merged.to(local.dtype))
        changed += 1
    return changed


class WeightEMA(TrainerCallback):
    """Exponential moving average of the trainable weights over one ``trainer.train()``, swapped in at the end.

    Add one per domain: ``trainer.add_callback(WeightEMA(decay))`` (see the module docstring for the recursion).
    """

    def __init__(self, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}
        self.updates = 0

    @staticmethod
    def _state_file(directory) -> Path:
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        name = EMA_STATE_FILE if rank == 0 else EMA_STATE_FILE.replace(".safetensors", f"-rank{rank}.safetensors")
        return Path(directory) / name

    @torch.no_grad()
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.shadow = {
            n: local_tensor(p).detach().float().clone() for n, p in _float_params(model, trainable_only=True)
        }
        self.updates = 0
        if state.global_step > 0:  # resumed from a Trainer checkpoint: the EMA so far was saved beside it
            from safetensors.torch import load_file

            path = self._state_file(Path(args.output_dir) / f"checkpoint-{state.global_step}")
            if not path.is_file():
                raise FileNotFoundError(
                    f"resuming at step {state.global_step} with ema_decay set, but {path} is "
                    "missing (the checkpoint was written without the EMA callback)"
                )
            saved = load_file(str(path))
            if set(saved) != set(self.shadow):
                raise ValueError(f"{path} holds other parameters than the model's trainable ones")
            self.shadow = {n: t.to(self.shadow[n].device) for n, t in saved.items()}
            self.updates = state.global_step

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        params = dict(_float_params(model, trainable_only=True))
        for name, e in self.shadow.items():
            e.mul_(self.decay).add_(local_tensor(params[name]).detach().float(), alpha=1.0 - self.decay)
        self.updates += 1

    def on_save(self, args, state, control, **kwargs):
        from ..utils.io import atomic_save_safetensors

        directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if directory.is_dir():
            atomic_save_safetensors({n: e.contiguous() for n, e in self.shadow.items()}, self._state_file(directory))

    @torch.no_grad()
    def on_train_end(self, args, state, control, model=None, **kwargs):
        params = dict(_float_params(model, trainable_only=True))
        for name, e in self.shadow.items():
            local = local_tensor(params[name])
            local.copy_(e.to(local.device, local.dtype))
