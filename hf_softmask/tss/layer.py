"""The scored linear layer: a PEFT tuner layer whose forward uses ``W ⊙ mask_t`` for the selected task ``t``.

State per adapter (PEFT convention: dicts keyed by adapter name):

- ``subnet_scores[adapter]``: the live real-valued scores, weight-shaped, trained with a straight-through mask.
- ``subnet_masks[adapter][str(t)]``: finished task ``t``'s binary mask, bit-packed (uint8, 1 bit per weight).
- ``subnet_importance[adapter]``: the accumulated (EMax) importance of the scores, in [0, 1]; allocated by the
  first accumulation (TSS), never for strategies that do not use it (WSN).

Nothing float and weight-sized is kept per finished task: a finished task's mask is unpacked (as bool) only
while that task is selected, and dropped when another task is selected.

``task`` selects the subnetwork: a finished task uses its stored mask (no gradient reaches the scores), any other
task uses the live scores (the task being trained, or a task not trained yet).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.bitpack import pack_bits, unpack_bits
from ..core.importance import tanh_zscore
from .selection import straight_through_mask, threshold_mask, topk_mask

__all__ = ["SubnetworkLayer", "SubnetworkLinear", "SUPPORTED_LAYER_TYPES"]

SUPPORTED_LAYER_TYPES = (nn.Linear, Conv1D)


class SubnetworkLayer(BaseTunerLayer):
    """Per-task binary masks over one layer's weight, selected by :attr:`task`."""

    adapter_layer_names = ("subnet_scores",)
    other_param_names = ("subnet_masks", "subnet_importance")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        if not isinstance(base_layer, SUPPORTED_LAYER_TYPES):
            raise TypeError(
                f"subnetworks support nn.Linear and transformers' Conv1D layers, got {type(base_layer).__name__}; "
                "remove this module from target_modules"
            )
        self.base_layer = base_layer
        self.subnet_scores = nn.ParameterDict()
        self.subnet_masks = nn.ModuleDict()
        self.subnet_importance = BufferDict(persistent=True)
        self.subnet_selection: dict[str, tuple[str, float]] = {}
        self.is_conv1d = isinstance(base_layer, Conv1D)
        self._mask_cache: tuple | None = None  # (adapter, task, device) -> bool mask of the selected finished task
        self._task: int | None = None
        self._alpha: torch.Tensor | None = None
        self._alpha_sum: torch.Tensor | None = None
        self._alpha_used: torch.Tensor | None = None
        self.kwargs = kwargs

    # -- construction ------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config) -> None:
        weight = self.get_base_layer().weight
        if config.score_init == "constant":
            scores = torch.full_like(weight, config.init_score, dtype=torch.float32)
        else:
            mag = weight.detach().float().abs()
            scores = mag * (config.init_score / mag.mean().clamp_min(torch.finfo(torch.float32).tiny))
        self.subnet_scores[adapter_name] = nn.Parameter(scores)
        self.subnet_masks[adapter_name] = BufferDict(persistent=True)
        self.subnet_selection[adapter_name] = (
            config.selection,
            config.keep_ratio if config.selection == "topk" else config.threshold,
        )
        self._mask_cache = None
        self.set_adapter(self.active_adapters)

    @property
    def task(self) -> int | None:
        """The selected task; selecting another one drops the unpacked mask of the previous one."""
        return self._task

    @task.setter
    def task(self, value: int | None) -> None:
        if value != self._task:
            self._mask_cache = None
        self._task = value

    @property
    def out_dim(self) -> int:
        """Axis of the weight indexing output features (1 for Conv1D, whose weight is [in, out])."""
        return 1 if self.is_conv1d else 0

    # -- masks -------------------------------------------------------------------------------------
    def binary_mask(self, adapter_name: str) -> torch.Tensor:
        """Bool mask of the live scores (what the current task uses now)."""
        selection, value = self.subnet_selection[adapter_name]
        scores = self.subnet_scores[adapter_name]
        return topk_mask(scores, value) if selection == "topk" else threshold_mask(scores, value)

    def finished_tasks(self, adapter_name: str) -> list[int]:
        return sorted(int(k) for k in self.subnet_masks[adapter_name].keys())

    def task_mask(self, adapter_name: str, task: int) -> torch.Tensor:
        """Bool mask stored for finished ``task``."""
        try:
            packed = self.subnet_masks[adapter_name][str(task)]
        except KeyError:
            raise KeyError(
                f"task {task} has no stored subnetwork; finished tasks: {self.finished_tasks(adapter_name)}"
            ) from None
        return unpack_bits(packed, self.get_base_layer().weight.shape)

    def store_task_mask(self, adapter_name: str, task: int) -> int:
        """Freeze the live mask as finished ``task``'s subnetwork; returns its size in bytes."""
        packed = pack_bits(self.binary_mask(adapter_name))
        self.subnet_masks[adapter_name][str(task)] = packed
        self._mask_cache = None
        return packed.numel()

    def storage_bytes(self, adapter_name: str, task: int) -> int:
        return self.subnet_masks[adapter_name][str(task)].numel()

    def used_mask(self, adapter_name: str) -> torch.Tensor:
        """Bool union of every finished task's mask (the weights some earlier task uses)."""
        used = torch.zeros_like(self.get_base_layer().weight, dtype=torch.bool)
        for t in self.finished_tasks(adapter_name):
            used |= self.task_mask(adapter_name, t)
        return used

    def _forward_mask(self, adapter_name: str) -> torch.Tensor:
        weight = self.get_base_layer().weight
        t = self.task
        if t is not None and str(t) in self.subnet_masks[adapter_name]:
            key = (adapter_name, t, weight.device)
            if self._mask_cache is None or self._mask_cache[0] != key:
                self._mask_cache = (key, self.task_mask(adapter_name, t).to(weight.device))  # bool: 1 byte per weight
            return self._mask_cache[1]
        selection, value = self.subnet_selection[adapter_name]
        return straight_through_mask(self.subnet_scores[adapter_name], selection, value).to(weight.dtype)

    # -- importance of the scores (virtual alpha) --------------------------------------------------
    def start_importance(self) -> torch.Tensor:
        """Install the virtual ``alpha`` (ones, weight-shaped) and return it; remembers which weights are in use."""
        weight = self.get_base_layer().weight
        adapter = self._active_adapter_with_scores()
        self._alpha_used = self._forward_mask(adapter).detach().bool() if adapter is not None else None
        self._alpha = torch.ones_like(weight, requires_grad=True)
        self._alpha_sum = torch.zeros_like(weight, dtype=torch.float32)
        return self._alpha

    def accumulate_importance(self, grad: torch.Tensor | None) -> None:
        """Add ``|d loss / d alpha|`` of one batch (``grad``: alpha's gradient, None if the batch did not reach it)."""
        if self._alpha_sum is None:
            raise RuntimeError("start_importance() was not called")
        if grad is not None:
            self._alpha_sum += grad.detach().abs().float()

    def finish_importance(self, name: str = "scores", zero_unused: bool = True) -> torch.Tensor:
        """Per-output-row ``|tanh(z)|`` of the accumulated |grad alpha|; removes alpha.

        ``zero_unused`` (default): weights outside the subnetwork (mask 0, so their alpha-gradient is exactly 0)
        get importance 0 and the z-score is taken over the used weights of each row only. Otherwise every weight
        of the row enters the z-score, and the unused ones, far below the row's mean, get a high ``|tanh z|``.
        """
        total, used = self._alpha_sum, self._alpha_used
        self._alpha, self._alpha_sum, self._alpha_used = None, None, None
        if total is None:
            raise RuntimeError("start_importance() was not called")
        dim = 1 - self.out_dim
        if zero_unused and used is not None:
            return _masked_row_tanh_zscore(total, used, dim)
        with warnings.catch_warnings():
            # Output rows whose mask is empty get no gradient at all; importance 0 is the right answer for them.
            warnings.simplefilter("ignore", RuntimeWarning)
            return tanh_zscore(total, dim=dim, name=f"{name} importance")

    # -- forward -----------------------------------------------------------------------------------
    def _active_adapter_with_scores(self) -> str | None:
        if self.disable_adapters:
            return None
        for name in self.active_adapters:
            if name in self.subnet_scores:
                return name
        return None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._active_adapter_with_scores()
        base = self.get_base_layer()
        if adapter is None:
            return base(x, *args, **kwargs)
        w = base.weight * self._forward_mask(adapter)
        if self._alpha is not None:
            w = w * self._alpha
        if self.is_conv1d:
            w = w.t()
        return F.linear(x.to(w.dtype), w, base.bias)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError(
            "a subnetwork depends on the task; export one task's binary masks with SubnetworkModel.task_masks(task)"
        )

    def unmerge(self) -> None:
        raise NotImplementedError("subnetworks are never merged")


def _masked_row_tanh_zscore(x: torch.Tensor, used: torch.Tensor, dim: int) -> torch.Tensor:
    """``|tanh((x - mean) / std)|`` along ``dim`` over the entries where ``used``; 0 elsewhere and in rows whose
    used entries are fewer than two or all equal."""
    u = used.to(x.dtype)
    n = u.sum(dim, keepdim=True)
    mean = (x * u).sum(dim, keepdim=True) / n.clamp_min(1)
    std = (((x - mean) ** 2) * u).sum(dim, keepdim=True).div(n.clamp_min(1)).sqrt()
    ok = (n > 1) & (std > 0)
    z = (x - mean) / torch.where(ok, std, torch.ones_like(std))
    return torch.tanh(z).abs() * u * ok.to(x.dtype)


class SubnetworkLinear(nn.Module, SubnetworkLayer):
    """An ``nn.Linear`` (or GPT-2 ``Conv1D``) whose weight is multiplied by a per-task binary mask."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        super().__init__()
        SubnetworkLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # nn.Module's placeholder forward comes first in the MRO; route to the layer's.
        return SubnetworkLayer.forward(self, x, *args, **kwargs)

    def __repr__(self) -> str:
        return "subnet." + super().__repr__()
