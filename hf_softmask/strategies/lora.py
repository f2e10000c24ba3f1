"""LoRA per domain: a fresh low-rank adapter trained on each domain, then merged into the base weights.

``before_task`` injects a PEFT LoRA adapter IN PLACE into the model the runner holds
(:func:`peft.inject_adapter_in_model`, no ``PeftModel`` wrapper, so the runner's ``model`` object stays the one it
trains, evaluates and saves) on the attention and FFN projections named by the architecture registry
(:meth:`hf_softmask.core.architectures.ArchitectureSpec.projections`: query/key/value/attn_out and ffn_in/ffn_out
of every layer), and leaves only the adapter's parameters trainable, so the Trainer's optimizer (built from the
parameters that require grad) holds nothing else: the base weights stay bit-identical during the domain.
``after_task`` merges each adapter into its base layer (``W <- W + (alpha / rank) * B A``, PEFT's ``merge``), puts
the base layer back in place of the LoRA wrapper (``merge_and_unload`` semantics), and restores every parameter's
``requires_grad``: the model again has exactly its original modules and parameter names.

A run resumed inside a domain calls ``before_task`` again (same adapter names), so the Trainer checkpoint's
adapter weights load into the same structure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..core.architectures import get_architecture
from ..utils.deprecation import renamed_attributes
from .base import ContinualStrategy
from .units import StrategyConfig, unit_model

__all__ = ["LoRABaselineConfig", "LoRAStrategy", "lora_target_modules", "merge_and_unload_"]

# The old name ``LoRAConfig`` read like PEFT's ``LoraConfig``; it still works, with a FutureWarning.
__getattr__ = renamed_attributes(__name__, {"LoRAConfig": "LoRABaselineConfig"})

TARGETS = ("all", "attention", "ffn")


@dataclass
class LoRABaselineConfig(StrategyConfig):
    """Settings of :class:`LoRAStrategy` (each may be passed as a keyword)."""

    lora_rank: int = field(default=8, metadata={"help": "Rank r of each adapter."})
    lora_alpha: float = field(default=16.0, metadata={"help": "Scaling numerator: the update is (alpha / r) * B A."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input during training."})
    lora_targets: str = field(
        default="all",
        metadata={
            "help": "Projections that get adapters: 'attention' (query, key, value, attention output), 'ffn' "
            "(FFN input(s) and output) or 'all' (both), as the architecture registry names them.",
            "choices": list(TARGETS),
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")


def lora_target_modules(model: nn.Module, targets: str = "all") -> list[str]:
    """Full names (as in ``model.named_modules()``) of the projections ``targets`` selects, every layer."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {list(TARGETS)}, got {targets!r}")
    inner = unit_model(model)
    spec = get_architecture(inner.config.model_type)
    paths = spec.projections(targets)
    names = {id(m): n for n, m in model.named_modules()}
    layers = getattr(inner, "base_model", inner).get_submodule(spec.layers)
    return [names[id(block.get_submodule(p))] for block in layers for p in paths]


class LoRAStrategy(ContinualStrategy):
    """A LoRA adapter per domain, merged into the base weights after it (see the module docstring)."""

    name = "lora"
    runners = ("pretrain",)
    #: only a low-rank update reaches the weights: compare it on its own learning-rate grid against the ncl frontier
    changes_effective_lr = True
    config_class = LoRABaselineConfig

    def __init__(self, config: LoRABaselineConfig | None = None, **settings):
        super().__init__(config, **settings)
        self.task_id = -1
        self.adapter: str | None = None
        self.domains_merged = 0
        self._requires_grad: dict[int, bool] = {}
        self._had_peft_config = False

    def before_task(self, model: nn.Module, task_id: int, dataloader=None) -> None:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise ValueError(
                "lora: the model already holds LoRA/PEFT layers; pass the plain transformers model "
                "(a PeftModel-wrapped or adapter-carrying model would be merged into by mistake)"
            )
        self.task_id = task_id
        self.adapter = f"domain{task_id}"
        self._requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        self._had_peft_config = hasattr(model, "peft_config")
        spec = get_architecture(unit_model(model).config.model_type)
        config = LoraConfig(
            r=self.cfg.lora_rank,
            lora_alpha=self.cfg.lora_alpha,
            lora_dropout=self.cfg.lora_dropout,
            target_modules=lora_target_modules(model, self.cfg.lora_targets),
            fan_in_fan_out=spec.conv1d,
            bias="none",
        )
        base_ids = set(self._requires_grad)
        inject_adapter_in_model(config, model, adapter_name=self.adapter)
        # Only the new adapter trains, whatever PEFT's defaults: the Trainer's optimizer then holds nothing else.
        for p in model.parameters():
            p.requires_grad_(id(p) not in base_ids)

    def after_task(self, model: nn.Module, task_id: int, dataloader=None) -> None:
        merge_and_unload_(model, self.adapter)
        for p in model.parameters():
            p.requires_grad_(self._requires_grad.get(id(p), True))
        if not self._had_peft_config and hasattr(model, "peft_config"):
            del model.peft_config
        self.adapter = None
        self.domains_merged += 1

    def config(self) -> dict:
        return {**super().config(), "domains_merged": self.domains_merged}

    def load_pretrained(self, directory) -> None:
        super().load_pretrained(directory)
        self.domains_merged = int((self.saved_config(directory) or {}).get("domains_merged", 0))


def merge_and_unload_(model: nn.Module, adapter: str | None) -> int:
    """Merge ``adapter`` of every PEFT layer into its base layer and put the base layer back; returns the count."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if adapter is None or not wrapped:
        raise RuntimeError("lora: after_task without an injected adapter (before_task was not called for this domain)")
    for name, module in wrapped:
        module.merge(safe_merge=True, adapter_names=[adapter])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    return len(wrapped)
