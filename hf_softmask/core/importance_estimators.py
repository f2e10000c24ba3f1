"""Importance estimators: how batches become raw per-unit scores of heads and FFN neurons. A registry, as data.

Every estimator sees the model only through :class:`~hf_softmask.core.layout.UnitLayout` (where units live, which
parameter slices they own) and :class:`~hf_softmask.core.gates.UnitGates` (gates on unit outputs), so a layout that
finds units through a wrapper (PEFT) serves every estimator. An estimator keeps float64 running sums
(:meth:`ImportanceEstimator.state`) that :func:`hf_softmask.compute_importance` all-reduces across processes
before :meth:`ImportanceEstimator.result` turns them into raw ``heads[L, H]`` and ``ffn[L, I]``; every rank
therefore ends with identical importance.

Add one with :func:`register_estimator` (a name and an :class:`ImportanceEstimator` subclass); nothing
elsewhere branches on the name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .gates import UnitGates
from .layout import UnitLayout

__all__ = [
    "ImportanceEstimator",
    "GateGradient",
    "GateFisher",
    "Activation",
    "Wanda",
    "RandomControl",
    "register_estimator",
    "available_estimators",
    "get_estimator",
    "DEFAULT_ESTIMATOR",
    "GRADIENT_ABS",
    "token_mask",
]

LossFn = Callable[[nn.Module, dict], "tuple[torch.Tensor, int]"]


def token_mask(batch: dict, x: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` bool mask of the batch's real tokens (all tokens without an attention mask)."""
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return mask.bool()


def _batch_size(batch: dict) -> int:
    for v in batch.values():
        if torch.is_tensor(v) and v.dim() >= 1:
            return int(v.shape[0])
    raise ValueError("the batch holds no tensor; expected model inputs such as input_ids")


class ImportanceEstimator:
    """Base class: one estimate, batch by batch.

    Subclasses set ``uses_loss`` (True: the objective's loss is backpropagated to gates, model in train mode;
    False: forward statistics only, model in eval mode under ``torch.no_grad``, the objective is not used) and
    implement :meth:`observe`, :meth:`state` and :meth:`result`.
    """

    uses_loss: bool = True
    #: Whether it reads gradients of :class:`UnitGates` (and takes the option ``ffn_gate_site``).
    uses_gates: bool = False

    def __init__(self, model: nn.Module, layout: UnitLayout, device, dropout: float = 0.0, **options):
        if options:
            raise TypeError(f"{type(self).__name__} takes no option(s) {sorted(options)}")
        self.model = model
        self.layout = layout
        self.device = device
        self.dropout = dropout
        L = layout.num_layers
        self.heads = torch.zeros(L, layout.num_heads, device=device, dtype=torch.float64)
        self.ffn = torch.zeros(L, layout.ffn_size, device=device, dtype=torch.float64)

    def observe(self, batch: dict, loss_fn: LossFn) -> int:
        """Add one batch to the running sums; return the number of tokens it counts."""
        raise NotImplementedError

    def state(self) -> list[torch.Tensor]:
        """The running sums (summed across processes before :meth:`result`)."""
        return [self.heads, self.ffn]

    def result(self, state: list[torch.Tensor], tokens: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw ``(heads[L, H], ffn[L, I])`` from the (all-reduced) sums and token count."""
        return state[0] / tokens, state[1] / tokens

    def close(self) -> None:
        """Remove hooks; the model is as before."""


# -- gradients to unit gates ---------------------------------------------------------------------------------
#: Where ``gate_gradient`` takes ``|.|`` of the gate gradient (docs/algorithms.md §2): of each batch's gradient
#: (the default), of each sequence's (the DAS paper's equation), or nowhere (the published code: signed sums).
GRADIENT_ABS = ("batch", "example", "none")


class _GateEstimator(ImportanceEstimator):
    """Gradients of the objective to unit gates. Option ``ffn_gate_site``
    (:data:`~hf_softmask.core.gates.FFN_GATE_SITES`): where the FFN gates multiply, after the activation (default)
    or before it."""

    per_example = False
    uses_gates = True

    def __init__(
        self, model, layout, device, dropout: float = 0.0, ffn_gate_site: str = "after_activation", **options
    ):
        super().__init__(model, layout, device, dropout, **options)
        self.gates = UnitGates(layout, dropout=dropout, per_example=self.per_example, ffn_site=ffn_gate_site)

    def _fresh_gates(self, batch: dict) -> None:
        lead = (_batch_size(batch),) if self.per_example else ()
        L = self.layout.num_layers
        self.gates.head_gate = torch.ones(*lead, L, self.layout.num_heads, device=self.device, requires_grad=True)
        self.gates.ffn_gate = torch.ones(*lead, L, self.layout.ffn_size, device=self.device, requires_grad=True)

    def observe(self, batch: dict, loss_fn: LossFn) -> int:
        self._fresh_gates(batch)  # new leaves: no gradient carries over from the previous batch
        loss, n = loss_fn(self.model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"importance loss is {loss.item()}; the model or data produce NaN/Inf "
                "(check for empty sequences, fp16 overflow, or a diverged checkpoint)"
            )
        loss.backward()
        self.heads += self._score(self.gates.head_gate.grad.double())
        self.ffn += self._score(self.gates.ffn_gate.grad.double())
        return n

    def _score(self, grad: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        self.gates.remove()


class GateGradient(_GateEstimator):
    """``sum over batches |dL/dg| / tokens``: the DAS estimator (L = the batch's summed objective).

    Option ``gradient_abs`` (:data:`GRADIENT_ABS`): ``"batch"`` (default) as above; ``"example"``: ``sum over
    sequences |dL_i/dg| / tokens``, from per-example gates (one backward a batch); ``"none"``: ``sum over batches
    dL/dg / tokens``, signed.
    """

    def __init__(self, model, layout, device, dropout: float = 0.0, gradient_abs: str = "batch", **options):
        if gradient_abs not in GRADIENT_ABS:
            raise ValueError(f"gate_gradient: gradient_abs must be one of {list(GRADIENT_ABS)}, got {gradient_abs!r}")
        self.gradient_abs = gradient_abs
        self.per_example = gradient_abs == "example"
        super().__init__(model, layout, device, dropout, **options)

    def _score(self, grad):
        if self.gradient_abs == "none":
            return grad
        return grad.abs().sum(0) if self.per_example else grad.abs()


class GateFisher(_GateEstimator):
    """``sum over sequences (dL_i/dg)^2 / tokens``: the empirical Fisher of the gates, per sequence.

    Per-example gates ``[B, L, ...]`` give every sequence's gradient from the batch's one backward (they sum
    to the batch gradient), so the Fisher costs what :class:`GateGradient` costs.
    """

    per_example = True

    def _score(self, grad):
        return grad.pow(2).sum(0)


# -- forward statistics --------------------------------------------------------------------------------------
class _ForwardEstimator(ImportanceEstimator):
    uses_loss = False

    def __init__(self, model, layout, device, dropout: float = 0.0, **options):
        super().__init__(model, layout, device, dropout, **options)
        self._mask: torch.Tensor | None = None
        self._handles: list = []

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of ``x[B, S, F]`` at the batch's real tokens, ``[T, F]``."""
        mask = self._mask
        if x.dim() != 3 or tuple(x.shape[:2]) != tuple(mask.shape):
            raise ValueError(
                f"{type(self).__name__} expects unit inputs of shape [batch, seq, features] matching the attention "
                f"mask {tuple(mask.shape)}, got {tuple(x.shape)}; use a gradient estimator (gate_gradient) for "
                "this model"
            )
        return x[mask.to(x.device)].double()

    def observe(self, batch: dict, loss_fn: LossFn) -> int:
        ids = batch.get("input_ids", batch.get("inputs_embeds"))
        if ids is None:
            raise ValueError("the batch has neither input_ids nor inputs_embeds")
        self._mask = token_mask(batch, ids)
        self.model(**{k: v for k, v in batch.items() if k != "labels"})
        self._mask = None
        return int(token_mask(batch, ids).sum())

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class Activation(_ForwardEstimator):
    """Mean ``|unit output|`` over real tokens: a head's output is its ``head_dim`` slice of the attention output
    projection's input (mean of the absolute values over that slice), an FFN neuron's is its activation (the
    input of the FFN output projection). Read where :class:`UnitGates` gates."""

    def __init__(self, model, layout, device, dropout: float = 0.0, **options):
        super().__init__(model, layout, device, dropout, **options)
        H = layout.num_heads
        for l, module in enumerate(layout.attn_out_modules):
            self._handles.append(module.register_forward_pre_hook(self._hook(self.heads, l, H)))
        for l, module in enumerate(layout.ffn_out_modules):
            self._handles.append(module.register_forward_pre_hook(self._hook(self.ffn, l, None)))

    def _hook(self, sums: torch.Tensor, l: int, heads: int | None):
        def hook(module, args):
            x = self._tokens(args[0]).abs()
            if heads is not None:
                x = x.view(x.shape[0], heads, -1).mean(-1)
            sums[l] += x.sum(0).to(sums.device)

        return hook


class Wanda(_ForwardEstimator):
    """``sum |W_ij| * ||x_j||`` over the weight entries a unit owns (Wanda's score, summed per unit).

    ``||x_j||`` is the root mean square of input feature ``j`` of the weight's module over all real tokens. Every
    2-D owned slice counts (query/key/value rows and output-projection columns of a head; FFN input-projection
    rows and output-projection column of a neuron); biases have no inputs and do not count. A key/value head
    shared by a GQA group gives each of the group's query heads an equal share.
    """

    def __init__(self, model, layout, device, dropout: float = 0.0, **options):
        super().__init__(model, layout, device, dropout, **options)
        module_of = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
        self.slices = [s for s in layout.owned if s.param.dim() == 2]
        for s in self.slices:
            if type(s.param).__name__ == "DTensor":
                raise NotImplementedError(
                    "wanda reads whole weights; it does not support FSDP2-sharded models, use gate_gradient"
                )
        self.in_axis = 0 if layout.spec.conv1d else 1
        self.modules: list[nn.Module] = []
        self.slice_module: list[int] = []
        for s in self.slices:
            m = module_of[id(s.param)]
            if m not in self.modules:
                self.modules.append(m)
            self.slice_module.append(self.modules.index(m))
        self.sumsq = [
            torch.zeros(m.weight.shape[self.in_axis], device=device, dtype=torch.float64) for m in self.modules
        ]
        for k, m in enumerate(self.modules):
            self._handles.append(m.register_forward_pre_hook(self._hook(k)))

    def _hook(self, k: int):
        def hook(module, args):
            self.sumsq[k] += self._tokens(args[0]).pow(2).sum(0).to(self.device)

        return hook

    def state(self):
        return self.sumsq

    def result(self, state, tokens):
        L, G = self.layout.num_layers, self.layout.group_size
        heads = torch.zeros(L, self.layout.num_heads, dtype=torch.float64)
        kv = torch.zeros(L, self.layout.num_kv_heads, dtype=torch.float64)
        ffn = torch.zeros(L, self.layout.ffn_size, dtype=torch.float64)
        target = {"head": heads, "kv_head": kv, "ffn": ffn}
        for s, k in zip(self.slices, self.slice_module):
            rms = (state[k].cpu() / tokens).sqrt()
            shape = [1, 1]
            shape[self.in_axis] = -1
            score = s.param.detach().abs().double().cpu() * rms.view(shape)
            per_position = score.sum(1 - s.axis)  # one value per position along the unit axis
            target[s.kind][s.layer].index_add_(0, s.index, per_position)
        heads += kv.repeat_interleave(G, dim=1) / G
        return heads, ffn


# -- the control ---------------------------------------------------------------------------------------------
class RandomControl(ImportanceEstimator):
    """A control: a real estimate (``base``, default ``gate_gradient``) with its values shuffled within every
    layer, heads and FFN neurons separately, by a random permutation drawn from ``seed``.

    Every layer keeps exactly the multiset of values of the real estimate (hence the same protection per layer
    after any per-layer normalization, and the same effective learning-rate cut), but which unit gets which value
    is independent of the data. The same seed gives the same permutation on every process and every call.
    """

    def __init__(self, model, layout, device, dropout: float = 0.0, seed: int = 0, base: str = "gate_gradient"):
        super().__init__(model, layout, device, dropout)
        if base == "random":
            raise ValueError("random needs a real estimator as its base, not 'random'")
        self.seed = int(seed)
        self.base = get_estimator(base)(model, layout, device, dropout)
        self.uses_loss = self.base.uses_loss

    def observe(self, batch, loss_fn):
        return self.base.observe(batch, loss_fn)

    def state(self):
        return self.base.state()

    def result(self, state, tokens):
        heads, ffn = self.base.result(state, tokens)
        g = torch.Generator().manual_seed(self.seed)

        def shuffle(x: torch.Tensor) -> torch.Tensor:
            order = torch.stack([torch.randperm(x.shape[1], generator=g) for _ in range(x.shape[0])])
            return torch.gather(x.cpu(), 1, order)

        return shuffle(heads), shuffle(ffn)

    def close(self):
        self.base.close()


# -- registry ------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[ImportanceEstimator]] = {}
DEFAULT_ESTIMATOR = "gate_gradient"


def register_estimator(name: str, estimator: type[ImportanceEstimator], *, overwrite: bool = False) -> None:
    """Make ``estimator`` (an :class:`ImportanceEstimator` subclass) available as ``compute_importance(...,
    estimator=name)``."""
    if not (isinstance(estimator, type) and issubclass(estimator, ImportanceEstimator)):
        raise TypeError(f"register_estimator needs an ImportanceEstimator subclass, got {estimator!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"estimator {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = estimator


def available_estimators() -> list[str]:
    """Names accepted by ``compute_importance(..., estimator=NAME)``."""
    return sorted(_REGISTRY)


def get_estimator(name: str) -> type[ImportanceEstimator]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown importance estimator {name!r}; available: {', '.join(available_estimators())}. "
            "Add one with hf_softmask.register_estimator(name, ImportanceEstimatorSubclass)."
        ) from None


register_estimator("gate_gradient", GateGradient)
register_estimator("gate_fisher", GateFisher)
register_estimator("activation", Activation)
register_estimator("wanda", Wanda)
register_estimator("random", RandomControl)
