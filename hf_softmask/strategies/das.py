"""DAS: continual domain-adaptive pre-training with soft-masking and contrastive integration (Ke et al., 2023).

Before the first domain: general-knowledge importance (``kl_dropout`` proxy). While training domain t: the
optimizer's updates of every head / FFN neuron are scaled by ``1 - I_acc`` (SoftMasker, update mode by
default) and the loss gets ``λ · InfoNCE(z1, z2, z3)`` (see :mod:`hf_softmask.core.contrastive`). After domain t:
the domain's LM-loss importance, accumulated into ``I_acc`` by elementwise max.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.contrastive import (
    ForwardAutocast,
    das_contrastive_loss,
    masked_mean_pool,
    unmasked_input_ids,
)
from ..core.gates import FFN_GATE_SITES, ffn_gate_modules
from ..core.importance import DEFAULT_NORMALIZATION, NORMALIZATIONS, UnitImportance
from ..core.importance_compute import OBJECTIVES, compute_importance, has_dropout
from ..core.importance_estimators import DEFAULT_ESTIMATOR, GRADIENT_ABS, get_estimator
from ..core.layout import UnitLayout
from ..core.masking import SoftMaskConfig, SoftMasker
from .base import ContinualStrategy
from .units import StrategyConfig

__all__ = ["DASConfig", "DASStrategy"]

#: The key of ``strategy_state.safetensors``'s header that holds the meta of each saved importance.
IMPORTANCE_META_KEY = "importance_meta"

# Measured choice, see docs/das.md ("Do z2 and z3 need gradients?").
VIEW_GRADIENTS_DEFAULT = False


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / accelerate wrappers: the extra forwards run on the inner module so DDP's reducer sees one forward
    # per backward (the gradients still reach the same parameters and are all-reduced with the LM loss's).
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


@dataclass
class DASConfig(StrategyConfig):
    """Settings of :class:`DASStrategy` (docs/algorithms.md §2-4)."""

    softmask: SoftMaskConfig = field(
        default_factory=SoftMaskConfig,
        metadata={
            "help": "Soft-masking of the accumulated importance (a SoftMaskConfig or its fields as a dict): mode, "
            "policies for unowned parameters, mask_power."
        },
    )
    contrastive_weight: float = field(
        default=1.0, metadata={"help": "λ in loss = LM + λ·contrast; 0 turns the contrastive term off."}
    )
    temperature: float = field(default=0.05, metadata={"help": "InfoNCE temperature (cosine similarity)."})
    perturbation_dropout: float = field(
        default=0.1,
        metadata={
            "help": "Dropout on gated unit outputs for the importance and contrastive views of a model without "
            "dropout of its own (Llama family)."
        },
    )
    general_objective: str = field(
        default="kl_dropout",
        metadata={"help": "Importance objective before the first domain.", "choices": sorted(OBJECTIVES)},
    )
    domain_objective: str = field(
        default="lm_loss", metadata={"help": "Importance objective after each domain.", "choices": sorted(OBJECTIVES)}
    )
    importance_batches: int | None = field(
        default=None, metadata={"help": "Cap on the batches of each importance estimate (None: the whole loader)."}
    )
    estimator: str = field(
        default=DEFAULT_ESTIMATOR,
        metadata={"help": "Importance estimator (hf_softmask.available_estimators(); 'random' is the control)."},
    )
    gradient_abs: str = field(
        default="batch",
        metadata={
            "help": "Where gate_gradient takes |.| of the gate gradient: 'batch' (each batch's gradient), 'example' "
            "(each sequence's: the paper's equation) or 'none' (signed sums: the published code). Only with "
            "estimator='gate_gradient' (docs/algorithms.md §2).",
            "choices": list(GRADIENT_ABS),
        },
    )
    ffn_gate_site: str = field(
        default="after_activation",
        metadata={
            "help": "Where FFN gates multiply, for importance and the z3 view: 'after_activation' (the neuron's "
            "output) or 'before_activation' (its pre-activation: the published code; BERT, DistilBERT and GPT-2 "
            "families). Only with a gate estimator (gate_gradient, gate_fisher) (docs/algorithms.md §1).",
            "choices": list(FFN_GATE_SITES),
        },
    )
    normalization: str = field(
        default=DEFAULT_NORMALIZATION,
        metadata={
            "help": "Map of raw importance into [0, 1] ('abs_tanh' = the paper's |tanh z|).",
            "choices": sorted(NORMALIZATIONS),
        },
    )
    view_gradients: bool = field(
        default=VIEW_GRADIENTS_DEFAULT,
        metadata={
            "help": "Whether the views z2 and z3 carry gradients (the paper's SimCSE-style loss) or are stop-gradient "
            "targets computed without autograd (the measured default, docs/das.md)."
        },
    )
    show_progress: bool = field(default=True, metadata={"help": "Progress bars while importance is computed."})

    def __post_init__(self):
        if isinstance(self.softmask, dict):
            self.softmask = SoftMaskConfig(**self.softmask)
        elif self.softmask is None:
            self.softmask = SoftMaskConfig()
        super().__post_init__()
        if self.contrastive_weight < 0:
            raise ValueError(f"contrastive_weight must be >= 0, got {self.contrastive_weight}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.perturbation_dropout < 1:
            raise ValueError(f"perturbation_dropout must lie in [0, 1), got {self.perturbation_dropout}")
        if self.importance_batches is not None and self.importance_batches < 1:
            raise ValueError(f"importance_batches must be >= 1, got {self.importance_batches}")
        get_estimator(self.estimator)  # unknown names fail at construction, not after a domain of training
        if self.gradient_abs != "batch" and self.estimator != "gate_gradient":
            raise ValueError(
                f"gradient_abs={self.gradient_abs!r} applies to estimator='gate_gradient' only, not {self.estimator!r}"
            )
        if self.ffn_gate_site != "after_activation" and not get_estimator(self.estimator).uses_gates:
            raise ValueError(
                f"ffn_gate_site={self.ffn_gate_site!r} applies to the gate estimators (gate_gradient, gate_fisher) "
                f"only, not {self.estimator!r}"
            )

    def estimator_options(self) -> dict:
        """The options this config gives its estimator."""
        options = {"gradient_abs": self.gradient_abs} if self.estimator == "gate_gradient" else {}
        if get_estimator(self.estimator).uses_gates:
            options["ffn_gate_site"] = self.ffn_gate_site
        return options


class DASStrategy(ContinualStrategy):
    """Soft-masking by accumulated unit importance plus the DAS contrastive loss (settings: :class:`DASConfig`).

    The views run in one batched forward, under the autocast of the LM forward (accelerate's bf16/fp16) and,
    with gradient checkpointing, with their gates and dropout replayed in the recomputation.
    """

    name = "das"
    runners = ("pretrain",)
    changes_effective_lr = True
    uses_general_importance = True
    config_class = DASConfig

    def __init__(self, config=None, **settings):
        super().__init__(config, **settings)
        self._autocast = ForwardAutocast()
        self.general_importance: UnitImportance | None = None
        self.domain_importances: list[UnitImportance] = []
        self.importance: UnitImportance | None = None  # accumulated (EMax), what the next domain is protected by
        self.contrastive_losses: list[float] = []  # per optimizer-step mean of the current domain, for reporting
        self._layout: UnitLayout | None = None
        self._masker: SoftMasker | None = None
        self._view_dropout = 0.0
        self.task_id = 0

    # -- importance ------------------------------------------------------------------------------
    def layout(self, model: nn.Module) -> UnitLayout:
        model = _unwrap(model)
        if self._layout is None or self._layout.model is not model:
            self._layout = UnitLayout.from_model(model)
            self._view_dropout = 0.0 if has_dropout(model) else self.cfg.perturbation_dropout
            ffn_gate_modules(self._layout, self.cfg.ffn_gate_site)  # a site this family lacks: refused before a step
        return self._layout

    def _estimate(self, model: nn.Module, dataloader, objective: str) -> UnitImportance:
        if dataloader is None:
            raise ValueError(
                f"DAS needs a dataloader to compute {objective!r} importance; pass one to before_task/after_task"
            )
        model = _unwrap(model)
        return compute_importance(
            model,
            dataloader,
            objective,
            layout=self.layout(model),
            max_batches=self.cfg.importance_batches,
            perturbation_dropout=self.cfg.perturbation_dropout,
            show_progress=self.cfg.show_progress,
            estimator=self.cfg.estimator,
            estimator_options=self.cfg.estimator_options(),
            normalization=self.cfg.normalization,
        )

    def compute_general_importance(self, model: nn.Module, dataloader) -> UnitImportance:
        """General-knowledge proxy importance; starts the accumulation."""
        self.general_importance = self._estimate(model, dataloader, self.cfg.general_objective)
        self.importance = self.general_importance
        return self.general_importance

    def before_task(self, model: nn.Module, task_id: int, dataloader=None) -> None:
        self.task_id = task_id
        self.contrastive_losses = []
        if self.importance is None:
            self.compute_general_importance(model, dataloader)

    def after_task(self, model: nn.Module, task_id: int, dataloader=None) -> None:
        domain = self._estimate(model, dataloader, self.cfg.domain_objective)
        self.domain_importances.append(domain)
        self.importance = domain if self.importance is None else self.importance.maximum(domain)

    # -- training hooks --------------------------------------------------------------------------
    def on_train_begin(self, model: nn.Module, optimizer) -> None:
        if self.importance is None:
            raise RuntimeError(
                "DASStrategy has no importance yet: call before_task(model, 0, dataloader) before training"
            )
        self.on_train_end(model, optimizer)
        self._masker = SoftMasker(
            _unwrap(model), self.importance, self.cfg.softmask, layout=self.layout(model)
        ).attach(optimizer)

    def on_train_end(self, model: nn.Module, optimizer) -> None:
        if self._masker is not None:
            self._masker.detach()
            self._masker = None
        self._autocast.close()

    def forward_kwargs(self, model: nn.Module, inputs: dict) -> dict:
        # The LM forward's last hidden states serve as z1 when its input is unmasked (causal LM).
        if self.cfg.contrastive_weight == 0 or not model.training:
            return {}
        self._autocast.watch(_unwrap(model))  # the views re-enter the autocast this forward runs under
        return {"output_hidden_states": True}

    def extra_loss(self, model: nn.Module, inputs: dict, outputs) -> torch.Tensor | None:
        if self.cfg.contrastive_weight == 0:
            return None
        inner = _unwrap(model)
        z1 = None
        hidden = getattr(outputs, "hidden_states", None)
        if hidden is not None and torch.equal(unmasked_input_ids(inputs), inputs["input_ids"]):
            z1 = masked_mean_pool(hidden[-1], inputs.get("attention_mask"))
        with self._autocast.context():
            loss = das_contrastive_loss(
                inner,
                inputs,
                self.importance,
                self.layout(inner),
                self.cfg.temperature,
                self._view_dropout,
                z1=z1,
                view_gradients=self.cfg.view_gradients,
                ffn_gate_site=self.cfg.ffn_gate_site,
            )
        self.contrastive_losses.append(float(loss.detach()))
        return self.cfg.contrastive_weight * loss

    # -- state -----------------------------------------------------------------------------------
    def _importances(self) -> dict[str, UnitImportance]:
        """The importances of the state by key: the accumulated one, the general one, one per finished domain."""
        named = {"accumulated": self.importance, "general": self.general_importance}
        named.update({f"domain_{k}": imp for k, imp in enumerate(self.domain_importances)})
        return {key: imp for key, imp in named.items() if imp is not None}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for key, imp in self._importances().items():
            state[f"{key}.heads"], state[f"{key}.ffn"] = imp.heads, imp.ffn
        # The accumulated importance may be the very tensor of another entry; safetensors refuses shared storage.
        return {k: v.clone() for k, v in state.items()}

    def state_metadata(self) -> dict[str, str]:
        # Each importance's meta (layout signature, estimator, normalization): a resumed run writes the same
        # importance_config.json into its later stages as an uninterrupted one.
        metas = {key: imp.meta for key, imp in self._importances().items()}
        return {IMPORTANCE_META_KEY: json.dumps(metas, sort_keys=True, default=str)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        def get(key):
            return UnitImportance(state[f"{key}.heads"], state[f"{key}.ffn"]) if f"{key}.heads" in state else None

        self.importance = get("accumulated")
        self.general_importance = get("general")
        self.domain_importances = []
        while f"domain_{len(self.domain_importances)}.heads" in state:
            self.domain_importances.append(get(f"domain_{len(self.domain_importances)}"))

    def load_state_metadata(self, metadata: dict[str, str]) -> None:
        metas = json.loads(metadata.get(IMPORTANCE_META_KEY, "{}"))  # {} in a state saved before metas travelled
        for key, imp in self._importances().items():
            imp.meta = dict(metas.get(key, {}))

    def config(self) -> dict:
        return {**super().config(), "domains_done": len(self.domain_importances)}
