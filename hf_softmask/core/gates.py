"""Differentiable gates on attention-head and FFN-neuron outputs, installed with forward pre-hooks.

transformers 5 has no ``head_mask``; a pre-hook on the attention output projection sees the
concatenated head outputs ``(..., H*D)`` under every attention implementation (eager, sdpa, flash).

Gradient checkpointing re-runs a layer's forward during backward, when the gates that shaped it may be gone
(DAS's views) or changed. Every layer that transformers checkpoints therefore gets its checkpoint function
wrapped while gates are installed: the wrapper records the gates in force at the layer's forward and the
recomputation runs with exactly those (the checkpoint itself restores the random state, so gate dropout
draws the same numbers). Only transformers' own checkpointing (``gradient_checkpointing_enable``,
``TrainingArguments(gradient_checkpointing=True)``) is covered; a checkpoint wrapper applied from outside
the model does not go through ``_gradient_checkpointing_func``.
"""

from __future__ import annotations

import dataclasses
import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .layout import UnitLayout

__all__ = ["UnitGates", "gated", "FFN_GATE_SITES", "ffn_gate_modules"]

#: Where an FFN neuron's gate multiplies (docs/algorithms.md §1): its activation's output (the input of the FFN
#: output projection, the default), or its pre-activation (the input of the activation, as the published DAS code).
FFN_GATE_SITES = ("after_activation", "before_activation")

# Installed gates, in hook-registration order (the order their hooks run on a shared module).
_INSTALLED: list[UnitGates] = []
# Gate records being replayed, innermost last: while a checkpointed layer is recomputed, live hooks step aside.
_REPLAYING: list[list] = []
# Checkpointable module -> [number of installed gates inside it, its pre-hook handle, the gated modules inside it].
_CKPT_USERS: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class _GateState:
    """What one :class:`UnitGates` does to a unit output, frozen at the time of a forward."""

    head_gate: torch.Tensor | None
    ffn_gate: torch.Tensor | None
    dropout: float
    per_example: bool
    num_heads: int

    def _row(self, gate: torch.Tensor, l: int, x: torch.Tensor) -> torch.Tensor:
        g = gate[:, l] if self.per_example else gate[l]
        return g.to(device=x.device, dtype=x.dtype)

    def _perturb(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, training=True) if self.dropout > 0 else x

    def head(self, l: int, x: torch.Tensor) -> torch.Tensor:
        H = self.num_heads
        if self.head_gate is not None:
            g = self._row(self.head_gate, l, x)
            g = g.view(g.shape[0], *([1] * (x.dim() - 2)), H, 1) if self.per_example else g.view(H, 1)
            x = (x.view(x.shape[:-1] + (H, x.shape[-1] // H)) * g).view(x.shape)
        return self._perturb(x)

    def ffn(self, l: int, x: torch.Tensor) -> torch.Tensor:
        if self.ffn_gate is not None:
            g = self._row(self.ffn_gate, l, x)
            if self.per_example:
                g = g.view(g.shape[0], *([1] * (x.dim() - 2)), -1)
            x = x * g
        return self._perturb(x)

    def with_tensors(self, replace: dict[int, torch.Tensor]) -> _GateState:
        """This state with its gate tensors swapped for ``replace[id(tensor)]`` where given."""

        def pick(t):
            return replace.get(id(t), t) if t is not None else None

        return dataclasses.replace(self, head_gate=pick(self.head_gate), ffn_gate=pick(self.ffn_gate))

    def acts(self, kind: str) -> bool:
        return self.dropout > 0 or (self.head_gate if kind == "head" else self.ffn_gate) is not None


class UnitGates:
    """Multiplies head outputs by ``head_gate[l, h]`` and FFN activations by ``ffn_gate[l, j]``.

    Gates may be plain tensors, trainable leaves (importance), or any tensor computed per step
    (HAT's ``sigmoid(s*e)``, DAS's importance view). A gate of shape ``[B, L, ...]`` (set
    through ``per_example=True``) scales each example separately. ``dropout`` adds a stochastic
    perturbation to the gated outputs (for models that have no dropout of their own).

    ``ffn_site`` (:data:`FFN_GATE_SITES`): ``"before_activation"`` gates the FFN pre-activations instead, with a
    pre-hook on each layer's activation module (``ArchitectureSpec.ffn_act``); a family without one is refused.

    Use as a context manager or call :meth:`remove`; after removal the model is exactly as before.
    Under gradient checkpointing the recomputation of a layer applies the gates as they were at its
    forward, even after :meth:`remove` or a change of ``head_gate``/``ffn_gate``/``enabled``.
    """

    def __init__(
        self,
        layout: UnitLayout,
        head_gate: torch.Tensor | None = None,
        ffn_gate: torch.Tensor | None = None,
        dropout: float = 0.0,
        per_example: bool = False,
        ffn_site: str = "after_activation",
    ):
        self.layout = layout
        self.head_gate = head_gate
        self.ffn_gate = ffn_gate
        self.dropout = dropout
        self.per_example = per_example
        self.enabled = True
        self._sites = [(m, "head", l) for l, m in enumerate(layout.attn_out_modules)]
        self._sites += [(m, "ffn", l) for l, m in enumerate(ffn_gate_modules(layout, ffn_site))]
        self._handles = [m.register_forward_pre_hook(self._make_hook(kind, l)) for m, kind, l in self._sites]
        self._ckpt_modules = _checkpointable_modules(layout, {id(m) for m, _, _ in self._sites})
        for module, inside in self._ckpt_modules:
            _ckpt_acquire(module, inside)
        _INSTALLED.append(self)

    @classmethod
    def trainable(
        cls, layout: UnitLayout, device=None, heads: bool = True, ffn: bool = True, dropout: float = 0.0
    ) -> UnitGates:
        """Gates initialised at 1 with ``requires_grad`` (for importance by gradient)."""
        h = torch.ones(layout.num_layers, layout.num_heads, device=device, requires_grad=True) if heads else None
        f = torch.ones(layout.num_layers, layout.ffn_size, device=device, requires_grad=True) if ffn else None
        return cls(layout, h, f, dropout=dropout)

    def _state(self) -> _GateState:
        return _GateState(self.head_gate, self.ffn_gate, self.dropout, self.per_example, self.layout.num_heads)

    def _make_hook(self, kind: str, l: int):
        def hook(module, args):
            if _REPLAYING or not self.enabled:
                return None
            state = self._state()
            if not state.acts(kind):
                return None
            return (getattr(state, kind)(l, args[0]),) + tuple(args[1:])

        return hook

    def parameters(self) -> list[torch.Tensor]:
        return [g for g in (self.head_gate, self.ffn_gate) if g is not None]

    def zero_grad(self) -> None:
        for g in self.parameters():
            g.grad = None

    def remove(self) -> None:
        if not self._handles:
            return
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module, _ in self._ckpt_modules:
            _ckpt_release(module)
        self._ckpt_modules = []
        if self in _INSTALLED:
            _INSTALLED.remove(self)

    def __enter__(self) -> UnitGates:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def ffn_gate_modules(layout: UnitLayout, ffn_site: str) -> list[nn.Module]:
    """The modules whose input the FFN gates at ``ffn_site`` scale, one per layer; a site the family lacks is
    refused (ValueError)."""
    if ffn_site not in FFN_GATE_SITES:
        raise ValueError(f"ffn_gate_site must be one of {list(FFN_GATE_SITES)}, got {ffn_site!r}")
    if ffn_site == "after_activation":
        return layout.ffn_out_modules
    acts = layout.ffn_act_modules
    if acts is None:
        raise ValueError(
            f"ffn_gate_site='before_activation' needs the FFN activation module, which the {layout.model_type!r} "
            "architecture does not name (ArchitectureSpec.ffn_act; a gated MLP has none to gate); use "
            "'after_activation'"
        )
    if len({id(m) for m in acts}) != len(acts):
        # A pre-hook on a module that several layers share would gate every layer with each layer's gates.
        raise ValueError(
            "ffn_gate_site='before_activation' needs one FFN activation module per layer; layers share one"
        )
    return acts


@contextmanager
def gated(model: nn.Module, head_gate=None, ffn_gate=None, dropout: float = 0.0, layout: UnitLayout | None = None):
    """``with gated(model, head_gate, ffn_gate): model(...)`` runs the model with fixed unit gates."""
    layout = layout or UnitLayout.from_model(model)
    gates = UnitGates(layout, head_gate, ffn_gate, dropout=dropout)
    try:
        yield gates
    finally:
        gates.remove()


# -- gradient checkpointing ------------------------------------------------------------------------------------
def _checkpointable_modules(layout: UnitLayout, site_ids: set[int]) -> list[tuple[nn.Module, frozenset[int]]]:
    """Modules transformers may checkpoint (they carry ``gradient_checkpointing``) that contain gated modules."""
    found = []
    for module in layout.base_model.modules():
        if hasattr(module, "gradient_checkpointing"):
            inside = frozenset(id(m) for m in module.modules() if id(m) in site_ids)
            if inside:
                found.append((module, inside))
    return found


def _ckpt_acquire(module: nn.Module, inside: frozenset[int]) -> None:
    entry = _CKPT_USERS.get(module)
    if entry is None:
        # A pre-hook, because gradient checkpointing may be enabled (a new checkpoint function set) after the gates.
        entry = _CKPT_USERS[module] = [0, module.register_forward_pre_hook(_ensure_replaying), inside]
        _ensure_replaying(module, ())
    entry[0] += 1


def _ckpt_release(module: nn.Module) -> None:
    entry = _CKPT_USERS.get(module)
    if entry is None:
        return
    entry[0] -= 1
    if entry[0] == 0:
        entry[1].remove()
        del _CKPT_USERS[module]
        # Forwards already run hold their own recorded gates; new ones need no wrapper.
        func = module.__dict__.get("_gradient_checkpointing_func")
        if isinstance(func, _ReplayGates):
            module._gradient_checkpointing_func = func.inner


def _ensure_replaying(module: nn.Module, args) -> None:
    func = module.__dict__.get("_gradient_checkpointing_func")
    if func is not None and not isinstance(func, _ReplayGates):
        module._gradient_checkpointing_func = _ReplayGates(module, func)


def _gates_in_force(module: nn.Module) -> list[tuple[int, str, int, _GateState]]:
    """(gated module id, kind, layer, state) of every gate acting inside ``module`` now, in hook order."""
    entry = _CKPT_USERS.get(module)
    if entry is None:
        return []
    inside = entry[2]
    if _REPLAYING:  # a checkpointed layer nested in one being recomputed: the recorded gates are in force
        return [r for r in _REPLAYING[-1] if r[0] in inside]
    records = []
    for g in _INSTALLED:
        if g.enabled:
            state = g._state()
            records += [(id(m), kind, l, state) for m, kind, l in g._sites if id(m) in inside and state.acts(kind)]
    return records


class _ReplayGates:
    """A layer's checkpoint function whose recomputation runs with the gates recorded at the forward."""

    def __init__(self, module: nn.Module, inner):
        self.module_ref = weakref.ref(module)
        self.inner = inner

    def __call__(self, function, *args, **kwargs):
        module = self.module_ref()
        records = _gates_in_force(module) if module is not None else []
        # Gates with autograd history enter the checkpoint as inputs: a reentrant checkpoint runs one backward of
        # its own per layer and would otherwise traverse the gates' shared graph (HAT's sigmoid(s*e)) once per
        # layer, which fails the second time; as inputs, their gradients flow back through the outer backward.
        tensors = list(
            {
                id(t): t for r in records for t in (r[3].head_gate, r[3].ffn_gate) if t is not None and t.requires_grad
            }.values()
        )
        n = len(args)
        calls = 0

        def run(*a, **k):
            nonlocal calls
            calls += 1
            if calls == 1:  # the forward itself: the live hooks act
                return function(*a[:n], **k)
            inside = {id(t): t_in for t, t_in in zip(tensors, a[n:])}
            replayed = [(site, kind, l, state.with_tensors(inside)) for site, kind, l, state in records]
            with _replaying(replayed, module):
                return function(*a[:n], **k)

        return self.inner(run, *args, *tensors, **kwargs)


@contextmanager
def _replaying(records: list, module: nn.Module | None):
    by_site: dict[int, list] = {}
    for r in records:
        by_site.setdefault(r[0], []).append(r)
    handles = []
    if module is not None:
        for m in module.modules():
            if id(m) in by_site:
                handles.append(m.register_forward_pre_hook(_replay_hook(records, by_site[id(m)])))
    _REPLAYING.append(records)
    try:
        yield
    finally:
        _REPLAYING.pop()
        for h in handles:
            h.remove()


def _replay_hook(records: list, site_records: list):
    def hook(module, args):
        if not _REPLAYING or _REPLAYING[-1] is not records:
            return None
        x = args[0]
        for _, kind, l, state in site_records:
            x = getattr(state, kind)(l, x)
        return (x,) + tuple(args[1:])

    return hook
