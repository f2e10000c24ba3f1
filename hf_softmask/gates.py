"""Differentiable gates on attention-head and FFN-neuron outputs, installed with forward pre-hooks.

transformers 5 has no ``head_mask``; a pre-hook on the attention output projection sees the
concatenated head outputs ``(..., H*D)`` under every attention implementation (eager, sdpa, flash).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .layout import UnitLayout

__all__ = ["UnitGates", "gated"]


class UnitGates:
    """Multiplies head outputs by ``head_gate[l, h]`` and FFN activations by ``ffn_gate[l, j]``.

    Gates may be plain tensors, trainable leaves (importance), or any tensor computed per step
    (HAT's ``sigmoid(s*e)``, DAS's ``1 - importance`` view). A gate of shape ``[B, L, ...]`` (set
    through ``per_example=True``) scales each example separately. ``dropout`` adds a stochastic
    perturbation to the gated outputs (for models that have no dropout of their own).

    Use as a context manager or call :meth:`remove`; after removal the model is exactly as before.
    """

    def __init__(
        self,
        layout: UnitLayout,
        head_gate: torch.Tensor | None = None,
        ffn_gate: torch.Tensor | None = None,
        dropout: float = 0.0,
        per_example: bool = False,
    ):
        self.layout = layout
        self.head_gate = head_gate
        self.ffn_gate = ffn_gate
        self.dropout = dropout
        self.per_example = per_example
        self.enabled = True
        self._handles: list = []
        for l, module in enumerate(layout.attn_out_modules):
            self._handles.append(module.register_forward_pre_hook(self._make_head_hook(l)))
        for l, module in enumerate(layout.ffn_out_modules):
            self._handles.append(module.register_forward_pre_hook(self._make_ffn_hook(l)))

    @classmethod
    def trainable(cls, layout: UnitLayout, device=None, heads: bool = True, ffn: bool = True, dropout: float = 0.0) -> "UnitGates":
        """Gates initialised at 1 with ``requires_grad`` (for importance by gradient)."""
        h = torch.ones(layout.num_layers, layout.num_heads, device=device, requires_grad=True) if heads else None
        f = torch.ones(layout.num_layers, layout.ffn_size, device=device, requires_grad=True) if ffn else None
        return cls(layout, h, f, dropout=dropout)

    def _gate_row(self, gate: torch.Tensor, l: int, x: torch.Tensor) -> torch.Tensor:
        g = gate[:, l] if self.per_example else gate[l]
        return g.to(device=x.device, dtype=x.dtype)

    def _perturb(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, training=True) if self.dropout > 0 else x

    def _make_head_hook(self, l: int):
        H = self.layout.num_heads

        def hook(module, args):
            if not self.enabled or (self.head_gate is None and self.dropout == 0):
                return None
            x = args[0]
            if self.head_gate is not None:
                g = self._gate_row(self.head_gate, l, x)
                shape = x.shape[:-1] + (H, x.shape[-1] // H)
                if self.per_example:
                    g = g.view(g.shape[0], *([1] * (x.dim() - 2)), H, 1)
                else:
                    g = g.view(H, 1)
                x = (x.view(shape) * g).view(x.shape)
            return (self._perturb(x),) + tuple(args[1:])

        return hook

    def _make_ffn_hook(self, l: int):
        def hook(module, args):
            if not self.enabled or (self.ffn_gate is None and self.dropout == 0):
                return None
            x = args[0]
            if self.ffn_gate is not None:
                g = self._gate_row(self.ffn_gate, l, x)
                if self.per_example:
                    g = g.view(g.shape[0], *([1] * (x.dim() - 2)), -1)
                x = x * g
            return (self._perturb(x),) + tuple(args[1:])

        return hook

    def parameters(self) -> list[torch.Tensor]:
        return [g for g in (self.head_gate, self.ffn_gate) if g is not None]

    def zero_grad(self) -> None:
        for g in self.parameters():
            g.grad = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> "UnitGates":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@contextmanager
def gated(model: nn.Module, head_gate=None, ffn_gate=None, dropout: float = 0.0, layout: UnitLayout | None = None):
    """``with gated(model, head_gate, ffn_gate): model(...)`` runs the model with fixed unit gates."""
    layout = layout or UnitLayout.from_model(model)
    gates = UnitGates(layout, head_gate, ffn_gate, dropout=dropout)
    try:
        yield gates
    finally:
        gates.remove()
