"""hf_softmask: continual pre-training and finetuning without forgetting for Hugging Face Transformers."""

from .callback import SoftMaskCallback
from .estimators import EmptyDataError, compute_importance
from .gates import UnitGates, gated
from .importance import ImportanceShapeError, UnitImportance
from .layout import UnitLayout
from .masking import SoftMaskConfig, SoftMasker, build_param_masks
from .optim import MaskedAdamW, MaskedSGD, install_update_masks
from .registry import ArchitectureSpec, UnsupportedModelError, register_architecture, supported_model_types
from .strategies import ContinualStrategy, StrategyTrainer
from .trainer import SoftMaskTrainer, SoftMaskTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "ArchitectureSpec",
    "ContinualStrategy",
    "EmptyDataError",
    "ImportanceShapeError",
    "MaskedAdamW",
    "MaskedSGD",
    "SoftMaskCallback",
    "SoftMaskConfig",
    "SoftMaskTrainer",
    "SoftMaskTrainingArguments",
    "SoftMasker",
    "StrategyTrainer",
    "UnitGates",
    "UnitImportance",
    "UnitLayout",
    "UnsupportedModelError",
    "build_param_masks",
    "compute_importance",
    "gated",
    "install_update_masks",
    "register_architecture",
    "supported_model_types",
]
