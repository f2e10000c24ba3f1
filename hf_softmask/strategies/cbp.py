"""Continual backpropagation (CBP): keep plasticity by re-initialising the least useful FFN neurons.

After every optimizer step, for every FFN neuron ``j`` of every layer::

    age_j += 1
    u_j    = eta * u_j + (1 - eta) * |h_j| * sum_i |W_out[i, j]|      (|h_j|: mean |activation| over the batch)
    u_hat  = u_j / (1 - eta ** age_j)                                   (bias correction)

Among the neurons older than ``maturity_threshold`` the lowest-``u_hat`` ones are replaced at rate
``replacement_rate`` per step (fractional counts accumulate, so small rates still replace). A
replaced neuron gets incoming weights re-drawn from the model's init distribution
(``N(0, initializer_range)``), incoming bias 0 and outgoing weights 0; the down projection's bias
absorbs the neuron's mean contribution ``W_out[:, j] * mean(h_j)``, so at the moment of replacement
the network's function changes only by the neuron's deviation from its mean; the optimizer state
(``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``) of its rows/columns is reset.

Adam keeps one ``step`` count per tensor, so zeroed moments alone would be bias-corrected as if they were
mature (a replaced neuron's first steps would move ~1/sqrt(1 - beta2) * (1 - beta1) ~ 3x the learning rate).
After every optimizer step, the entries reset at Adam step ``t0`` are moved to where Adam with their own
count ``n = t - t0`` would have put them: ``p += lr * (u(t) - u(n))``, ``u(k) = (m / (1 - b1^k)) /
(sqrt(v / (1 - b2^k)) + eps)`` (exact for torch's Adam/AdamW and ``MaskedAdamW``, weight decay untouched;
a step skipped by a GradScaler does not count). Other adaptive optimizers are refused at train begin.

Activations are read by a forward pre-hook on the FFN down projection (``layout.ffn_out_modules``),
over every position of the batch. Models whose down projection has no bias (Llama family) cannot
absorb the mean contribution: there the replacement removes it (a warning says so once).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.layout import UnitLayout
from ..core.optim import MaskedAdamW, unwrap_optimizer
from .base import ContinualStrategy, StrategyCallback
from .units import StrategyConfig, unit_model

__all__ = ["CBPConfig", "CBPStrategy", "CBPCallback"]


@dataclass
class CBPConfig(StrategyConfig):
    """Settings of :class:`CBPStrategy` (each may be passed as a keyword)."""

    replacement_rate: float = field(
        default=1e-4,
        metadata={"help": "Fraction of eligible FFN neurons per layer replaced per optimizer step (rho)."},
    )
    decay_rate: float = field(
        default=0.99, metadata={"help": "Running-average decay eta of the utility and of the mean activation."}
    )
    maturity_threshold: int = field(
        default=100, metadata={"help": "A neuron may be replaced only when older than this many steps."}
    )
    init_std: float | None = field(
        default=None,
        metadata={"help": "Std of re-drawn incoming weights; default: the model's config.initializer_range."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the re-initialisation draws."})

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.replacement_rate <= 1:
            raise ValueError(f"replacement_rate must lie in [0, 1], got {self.replacement_rate}")
        if not 0 <= self.decay_rate < 1:
            raise ValueError(f"decay_rate must lie in [0, 1), got {self.decay_rate}")
        if self.maturity_threshold < 0:
            raise ValueError(f"maturity_threshold must be >= 0, got {self.maturity_threshold}")


class CBPStrategy(ContinualStrategy):
    """Continual backpropagation on the FFN neurons of a transformers model (see the module docstring)."""

    name = "cbp"
    runners = ("pretrain", "finetune")
    changes_effective_lr = False
    config_class = CBPConfig

    def __init__(self, config: CBPConfig | None = None, **settings):
        super().__init__(config, **settings)
        self.layout: UnitLayout | None = None
        self.utility: torch.Tensor | None = None  # [L, I]
        self.mean_act: torch.Tensor | None = None  # [L, I], running mean of the signed activation
        self.age: torch.Tensor | None = None  # [L, I]
        self.pending: torch.Tensor | None = None  # [L], fractional replacement counts
        self.num_replaced: torch.Tensor | None = None  # [L]
        self.last_replaced: dict[int, list[int]] = {}
        self._sums: list | None = None
        self._handles: list = []
        self._generator: torch.Generator | None = None
        self._warned_no_bias = False
        self.steps = 0
        # id(param) -> (param, axis, reset step per index along axis (NaN: not fresh), last corrected step)
        self._fresh: dict[int, list] = {}
        # parameter name -> (axis, reset steps, last corrected step): loaded from a checkpoint, until training begins
        self._fresh_saved: dict[str, tuple] = {}

    # -- setup ------------------------------------------------------------------------------------
    def _ensure(self, model: nn.Module) -> None:
        model = unit_model(model)
        if self.layout is not None and self.layout.model is model:
            return
        self._remove_hooks()
        self.layout = UnitLayout.from_model(model)
        L, I = self.layout.num_layers, self.layout.ffn_size
        if self.utility is None:
            self.utility, self.mean_act, self.age = torch.zeros(L, I), torch.zeros(L, I), torch.zeros(L, I)
            self.pending, self.num_replaced = torch.zeros(L), torch.zeros(L)
        elif tuple(self.utility.shape) != (L, I):
            raise ValueError(f"CBP state is for {tuple(self.utility.shape)} FFN neurons but the model has {(L, I)}")
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.cfg.seed + self.steps)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        self._ensure(model)
        return model

    def _install_hooks(self) -> None:
        self._remove_hooks()
        self._sums = [None] * self.layout.num_layers
        for l, module in enumerate(self.layout.ffn_out_modules):
            self._handles.append(module.register_forward_pre_hook(self._make_hook(l)))

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make_hook(self, l: int):
        def hook(module, args):
            if not module.training:
                return None
            x = args[0].detach()
            flat = x.reshape(-1, x.shape[-1]).float()
            stats = torch.stack([flat.abs().mean(0), flat.mean(0)]).cpu()
            prev = self._sums[l]
            self._sums[l] = (stats, 1) if prev is None else (prev[0] + stats, prev[1] + 1)
            return None

        return hook

    # -- hooks ------------------------------------------------------------------------------------
    def before_task(self, model: nn.Module, task_id: int, dataloader=None) -> None:
        self.task_id = task_id
        self._ensure(model)

    def on_train_begin(self, model: nn.Module, optimizer) -> None:
        self._ensure(model)
        if optimizer is not None:
            _check_optimizer(optimizer)
        # Entries reset before a checkpoint this run resumes from keep their own bias correction; a new
        # optimizer (a new task) starts with none.
        params = dict(self.layout.model.named_parameters())
        self._fresh = {
            id(params[name]): [params[name], axis, reset_at, last]
            for name, (axis, reset_at, last) in self._fresh_saved.items()
            if name in params
        }
        self._fresh_saved = {}
        self._install_hooks()

    def on_train_end(self, model: nn.Module, optimizer) -> None:
        self._remove_hooks()
        self._fresh = {}  # they belong to this run's optimizer: a finished task's saved state carries none

    def after_optimizer_step(self, model: nn.Module, optimizer) -> None:
        if not self._handles:  # used outside a Trainer run: start listening now, count from the next batch
            self._ensure(model)
            self._install_hooks()
            return
        eta = self.cfg.decay_rate
        self.steps += 1
        if optimizer is not None:
            self._fresh_bias_correction(optimizer)
        for l in range(self.layout.num_layers):
            got = self._sums[l]
            self._sums[l] = None
            if got is None:
                continue
            abs_h, mean_h = got[0][0] / got[1], got[0][1] / got[1]
            out_w = self._outgoing_magnitude(l)
            self.age[l] += 1
            self.utility[l].mul_(eta).add_((1 - eta) * abs_h * out_w)
            self.mean_act[l].mul_(eta).add_((1 - eta) * mean_h)
            self._replace_in_layer(l, optimizer)

    # -- replacement ------------------------------------------------------------------------------
    def _ffn_slices(self, l: int):
        """(incoming slices, outgoing weight slice) of layer ``l``'s FFN neurons."""
        out_module = self.layout.ffn_out_modules[l]
        incoming, outgoing = [], None
        for s in self.layout.owned:
            if s.kind != "ffn" or s.layer != l:
                continue
            if s.param is out_module.weight:
                outgoing = s
            else:
                incoming.append(s)
        return incoming, outgoing

    def _outgoing_magnitude(self, l: int) -> torch.Tensor:
        _, out = self._ffn_slices(l)
        w = out.param.detach()
        other = 1 - out.axis
        return w.abs().sum(other).float().cpu()

    def bias_corrected_utility(self) -> torch.Tensor:
        """u_hat = u / (1 - eta**age); 0 for neurons that have not been seen yet."""
        corr = 1 - self.cfg.decay_rate**self.age
        return torch.where(self.age > 0, self.utility / corr.clamp_min(1e-12), torch.zeros_like(self.utility))

    def _replace_in_layer(self, l: int, optimizer) -> None:
        eligible = (self.age[l] > self.cfg.maturity_threshold).nonzero().flatten()
        self.last_replaced.pop(l, None)
        if eligible.numel() == 0 or self.cfg.replacement_rate == 0:
            return
        self.pending[l] += self.cfg.replacement_rate * eligible.numel()
        k = min(int(self.pending[l]), eligible.numel())
        if k == 0:
            return
        self.pending[l] -= k
        u_hat = self.bias_corrected_utility()[l, eligible]
        chosen = eligible[torch.topk(u_hat, k, largest=False).indices]
        self.replace_units(l, chosen, optimizer)

    @torch.no_grad()
    def replace_units(self, layer: int, units: torch.Tensor, optimizer=None) -> None:
        """Re-initialise FFN neurons ``units`` of ``layer``.

        Function-preserving up to their deviation from the mean.
        """
        units = torch.as_tensor(units, dtype=torch.long).flatten()
        incoming, out = self._ffn_slices(layer)
        corr = 1 - self.cfg.decay_rate ** self.age[layer, units]
        mean_h = torch.where(
            self.age[layer, units] > 0, self.mean_act[layer, units] / corr.clamp_min(1e-12), torch.zeros_like(corr)
        )
        out_module = self.layout.ffn_out_modules[layer]
        W = out.param
        dev = W.device
        cols = W.index_select(out.axis, units.to(dev)).float()  # [out, k] (Linear) or [k, out] (Conv1D)
        contribution = cols @ mean_h.to(dev) if out.axis == 1 else mean_h.to(dev) @ cols
        bias = getattr(out_module, "bias", None)
        if bias is not None:
            bias.add_(contribution.to(bias.dtype))
        elif not self._warned_no_bias:
            warnings.warn(
                f"{type(out_module).__name__} of layer {layer} has no bias: "
                "CBP cannot absorb the mean contribution of "
                "replaced neurons, so each replacement shifts the output by it",
                RuntimeWarning,
                stacklevel=2,
            )
            self._warned_no_bias = True
        W.index_fill_(out.axis, units.to(dev), 0.0)
        std = (
            self.cfg.init_std
            if self.cfg.init_std is not None
            else getattr(self.layout.model.config, "initializer_range", 0.02)
        )
        for s in incoming:
            p = s.param
            if p.dim() == 1:
                p.index_fill_(0, units.to(p.device), 0.0)
                continue
            shape = list(p.shape)
            shape[s.axis] = units.numel()
            fresh = torch.randn(shape, generator=self._generator) * std
            p.index_copy_(s.axis, units.to(p.device), fresh.to(device=p.device, dtype=p.dtype))
        if optimizer is not None:
            self._reset_optimizer_state(optimizer, [(s.param, s.axis) for s in incoming] + [(W, out.axis)], units)
        self.utility[layer, units] = 0
        self.mean_act[layer, units] = 0
        self.age[layer, units] = 0
        self.num_replaced[layer] += units.numel()
        self.last_replaced[layer] = units.tolist()

    def _reset_optimizer_state(self, optimizer, params_axes, units: torch.Tensor) -> None:
        opt = unwrap_optimizer(optimizer)
        for p, axis in params_axes:
            state = opt.state.get(p)
            if not state:
                continue
            for value in state.values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    value.index_fill_(axis, units.to(value.device), 0.0)
            if "exp_avg_sq" in state:  # Adam: these entries restart their own bias correction
                t0 = float(state["step"])
                entry = self._fresh.get(id(p))
                if entry is None:
                    entry = self._fresh[id(p)] = [p, axis, torch.full((p.shape[axis],), float("nan")), t0]
                entry[2][units.cpu()] = t0

    @torch.no_grad()
    def _fresh_bias_correction(self, optimizer) -> None:
        """Move Adam-reset entries to the step Adam with their own step count would have taken (module docstring)."""
        if not self._fresh:
            return
        opt = unwrap_optimizer(optimizer)
        groups = {id(p): g for g in opt.param_groups for p in g["params"]}
        for key, entry in list(self._fresh.items()):
            p, axis, reset_at, last = entry
            state, group = opt.state.get(p), groups.get(key)
            if not state or group is None or "exp_avg_sq" not in state:
                continue
            t = float(state["step"])
            if t == last:  # no step happened (e.g. skipped by a GradScaler on inf)
                continue
            entry[3] = t
            idx = (~torch.isnan(reset_at)).nonzero().flatten()
            b1, b2 = group["betas"]
            n = (t - reset_at[idx]).double()
            # entries whose own correction has converged to the shared one need no more work
            done = (b2**n) < 1e-9
            reset_at[idx[done]] = float("nan")
            keep = ~done & (n >= 1)  # n = 0: reset after this step's update, nothing to correct yet
            idx, n = idx[keep], n[keep]
            if idx.numel() == 0:
                continue
            shape = [1] * p.dim()
            shape[axis] = -1
            dev = p.device
            bc1_n = (1 - b1**n).float().to(dev).view(shape)
            bc2_n = (1 - b2**n).float().to(dev).view(shape)
            i = idx.to(dev)
            m = state["exp_avg"].index_select(axis, i).float()
            v = state["exp_avg_sq"].index_select(axis, i).float()
            eps, lr = group["eps"], float(group["lr"])
            shared = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
            own = (m / bc1_n) / ((v / bc2_n).sqrt() + eps)
            p.index_add_(axis, i, (lr * (shared - own)).to(p.dtype))

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.utility is None:
            return {}
        state = {
            "utility": self.utility,
            "mean_act": self.mean_act,
            "age": self.age,
            "pending": self.pending,
            "num_replaced": self.num_replaced,
        }
        if self._generator is not None:  # so that a resumed run draws the fresh weights the uninterrupted one did
            state["generator_state"] = self._generator.get_state()
        # Adam-reset entries of the running optimizer: reset steps, and (axis, last corrected step), by parameter name
        names = {id(p): n for n, p in self.layout.model.named_parameters()} if self.layout is not None else {}
        for key, (_, axis, reset_at, last) in self._fresh.items():
            if key in names:
                state[f"fresh.{names[key]}"] = reset_at
                state[f"fresh_at.{names[key]}"] = torch.tensor([float(axis), float(last)], dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        self.utility, self.mean_act, self.age = (
            state["utility"].clone(),
            state["mean_act"].clone(),
            state["age"].clone(),
        )
        self.pending, self.num_replaced = state["pending"].clone(), state["num_replaced"].clone()
        if "generator_state" in state:  # absent in checkpoints written before it was saved
            self._generator = torch.Generator()
            self._generator.set_state(state["generator_state"].clone())
        self._fresh_saved = {}
        for key, reset_at in state.items():
            if key.startswith("fresh."):
                name = key[len("fresh.") :]
                axis, last = state[f"fresh_at.{name}"].tolist()
                self._fresh_saved[name] = (int(axis), reset_at.clone(), last)

    def config(self) -> dict:
        return {**super().config(), "steps": self.steps}

    def load_pretrained(self, directory) -> None:
        self._generator = None
        super().load_pretrained(directory)
        self.steps = int((self.saved_config(directory) or {}).get("steps", 0))
        if self._generator is None:  # a checkpoint without its state (older): seeded by the step count
            self._generator = torch.Generator().manual_seed(self.cfg.seed + self.steps)


_ADAM = (torch.optim.Adam, torch.optim.AdamW, MaskedAdamW)


def _check_optimizer(optimizer) -> None:
    """Refuse optimizers whose reset entries CBP cannot give a fresh bias correction."""
    opt = unwrap_optimizer(optimizer)
    if isinstance(opt, _ADAM):
        bad = [k for k in ("amsgrad", "maximize") if any(g.get(k) for g in opt.param_groups)]
        if bad:
            raise ValueError(
                f"CBP cannot bias-correct replaced units under {type(opt).__name__} with {bad}=True; "
                "use plain Adam/AdamW or SGD"
            )
        return
    if "betas" in opt.defaults:
        raise ValueError(
            f"CBP resets replaced units' optimizer state, but {type(opt).__name__} keeps a "
            "bias-corrected moment CBP does not know how to restart; use torch Adam/AdamW, MaskedAdamW "
            "or SGD"
        )


class CBPCallback(StrategyCallback):
    """CBP for a plain ``transformers.Trainer``: ``Trainer(..., callbacks=[CBPCallback(replacement_rate=1e-4)])``."""

    def __init__(self, strategy: CBPStrategy | None = None, **settings):
        if strategy is not None and settings:
            raise TypeError(f"pass either strategy= or CBP settings, not both (got {sorted(settings)})")
        super().__init__(strategy or CBPStrategy(**settings))
