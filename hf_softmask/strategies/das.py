"""DAS: continual domain-adaptive pre-training with soft-masking and contrastive integration (Ke et al., 2023).

Before the first domain: general-knowledge importance (``kl_dropout`` proxy). While training domain t: the
optimizer's updates of every head / FFN neuron are scaled by ``1 - I_acc`` (SoftMasker, update mode by
default) and the loss gets ``λ · InfoNCE(z1, z2, z3)`` (see :mod:`hf_softmask.contrastive`). After domain t:
the domain's LM-loss importance, accumulated into ``I_acc`` by elementwise max.
"""

from __future__ import annotations

import torch
from torch import nn

from ..contrastive import das_contrastive_loss, masked_mean_pool, unmasked_input_ids
from ..estimators import compute_importance, has_dropout
from ..importance import DEFAULT_NORMALIZATION, NORMALIZATIONS, UnitImportance
from ..importance_estimators import DEFAULT_ESTIMATOR, get_estimator
from ..layout import UnitLayout
from ..masking import SoftMaskConfig, SoftMasker
from .base import ContinualStrategy

__all__ = ["DASStrategy"]


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / accelerate wrappers: the extra forwards run on the inner module so DDP's reducer sees one forward
    # per backward (the gradients still reach the same parameters and are all-reduced with the LM loss's).
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    return model


class DASStrategy(ContinualStrategy):
    """Soft-masking by accumulated unit importance plus the DAS contrastive loss.

    Args:
        softmask: :class:`SoftMaskConfig` (or its fields as a dict): mode, policies for unowned parameters,
            mask_power.
        contrastive_weight: λ in ``loss = LM + λ · contrast``; 0 turns the contrastive term off.
        temperature: InfoNCE temperature (cosine similarity).
        perturbation_dropout: dropout on gated unit outputs for the two views of a model without dropout of its
            own (Llama family); models with dropout use their own.
        general_objective: importance objective before the first domain (``kl_dropout``).
        domain_objective: importance objective after each domain (``lm_loss``).
        importance_batches: cap on the batches used for each importance estimate (None: the whole loader).
        estimator: importance estimator name (``hf_softmask.available_estimators()``; ``random`` is the control).
        normalization: map of raw importance into [0, 1] (``hf_softmask.NORMALIZATIONS``; ``abs_tanh`` = paper).
    """

    name = "das"
    settings = ("pretrain",)
    changes_effective_lr = True

    def __init__(
        self,
        softmask: SoftMaskConfig | dict | None = None,
        contrastive_weight: float = 1.0,
        temperature: float = 0.05,
        perturbation_dropout: float = 0.1,
        general_objective: str = "kl_dropout",
        domain_objective: str = "lm_loss",
        importance_batches: int | None = None,
        estimator: str = DEFAULT_ESTIMATOR,
        normalization: str = DEFAULT_NORMALIZATION,
        show_progress: bool = True,
        **_,
    ):
        self.softmask = softmask if isinstance(softmask, SoftMaskConfig) else SoftMaskConfig(**(softmask or {}))
        if contrastive_weight < 0:
            raise ValueError(f"contrastive_weight must be >= 0, got {contrastive_weight}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.contrastive_weight = float(contrastive_weight)
        self.temperature = float(temperature)
        self.perturbation_dropout = float(perturbation_dropout)
        self.general_objective = general_objective
        self.domain_objective = domain_objective
        self.importance_batches = importance_batches
        get_estimator(estimator)  # unknown names fail at construction, not after a domain of training
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; choose one of {sorted(NORMALIZATIONS)}")
        self.estimator = estimator
        self.normalization = normalization
        self.show_progress = show_progress
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
        if self._layout is None or self._layout._model_ref is not model:
            self._layout = UnitLayout.from_model(model)
            self._view_dropout = 0.0 if has_dropout(model) else self.perturbation_dropout
        return self._layout

    def _estimate(self, model: nn.Module, dataloader, objective: str) -> UnitImportance:
        if dataloader is None:
            raise ValueError(f"DAS needs a dataloader to compute {objective!r} importance; pass one to before_task/after_task")
        model = _unwrap(model)
        return compute_importance(
            model, dataloader, objective, layout=self.layout(model), max_batches=self.importance_batches,
            perturbation_dropout=self.perturbation_dropout, show_progress=self.show_progress,
            estimator=self.estimator, normalization=self.normalization,
        )

    def compute_general_importance(self, model: nn.Module, dataloader) -> UnitImportance:
        """General-knowledge proxy importance; starts the accumulation."""
        self.general_importance = self._estimate(model, dataloader, self.general_objective)
        self.importance = self.general_importance
        return self.general_importance

    def before_task(self, model: nn.Module, task_id: int, dataloader=None) -> None:
        self.task_id = task_id
        self.contrastive_losses = []
        if self.importance is None:
            self.compute_general_importance(model, dataloader)

    def after_task(self, model: nn.Module, task_id: int, dataloader=None) -> None:
        domain = self._estimate(model, dataloader, self.domain_objective)
        self.domain_importances.append(domain)
        self.importance = domain if self.importance is None else self.importance.maximum(domain)

    # -- training hooks --------------------------------------------------------------------------
    def on_train_begin(self, model: nn.Module, optimizer) -> None:
        if self.importance is None:
            raise RuntimeError("DASStrategy has no importance yet: call before_task(model, 0, dataloader) before training")
        self.on_train_end(model, optimizer)
        self._masker = SoftMasker(_unwrap(model), self.importance, self.softmask, layout=self.layout(model)).attach(optimizer)

    def on_train_end(self, model: nn.Module, optimizer) -> None:
        if self._masker is not None:
            self._masker.detach()
            self._masker = None

    def forward_kwargs(self, model: nn.Module, inputs: dict) -> dict:
        # The LM forward's last hidden states serve as z1 when its input is unmasked (causal LM).
        return {"output_hidden_states": True} if self.contrastive_weight > 0 and model.training else {}

    def extra_loss(self, model: nn.Module, inputs: dict, outputs) -> torch.Tensor | None:
        if self.contrastive_weight == 0:
            return None
        inner = _unwrap(model)
        z1 = None
        hidden = getattr(outputs, "hidden_states", None)
        if hidden is not None and torch.equal(unmasked_input_ids(inputs), inputs["input_ids"]):
            z1 = masked_mean_pool(hidden[-1], inputs.get("attention_mask"))
        loss = das_contrastive_loss(inner, inputs, self.importance, self.layout(inner), self.temperature, self._view_dropout, z1=z1)
        self.contrastive_losses.append(float(loss.detach()))
        return self.contrastive_weight * loss

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for key, imp in (("accumulated", self.importance), ("general", self.general_importance)):
            if imp is not None:
                state[f"{key}.heads"], state[f"{key}.ffn"] = imp.heads, imp.ffn
        for k, imp in enumerate(self.domain_importances):
            state[f"domain_{k}.heads"], state[f"domain_{k}.ffn"] = imp.heads, imp.ffn
        # The accumulated importance may be the very tensor of another entry; safetensors refuses shared storage.
        return {k: v.clone() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        def get(key):
            return UnitImportance(state[f"{key}.heads"], state[f"{key}.ffn"]) if f"{key}.heads" in state else None

        self.importance = get("accumulated")
        self.general_importance = get("general")
        self.domain_importances = []
        while f"domain_{len(self.domain_importances)}.heads" in state:
            self.domain_importances.append(get(f"domain_{len(self.domain_importances)}"))

    def config(self) -> dict:
        return {
            "name": self.name,
            "softmask": dict(self.softmask.__dict__),
            "contrastive_weight": self.contrastive_weight,
            "temperature": self.temperature,
            "perturbation_dropout": self.perturbation_dropout,
            "general_objective": self.general_objective,
            "domain_objective": self.domain_objective,
            "importance_batches": self.importance_batches,
            "estimator": self.estimator,
            "normalization": self.normalization,
            "domains_done": len(self.domain_importances),
        }
