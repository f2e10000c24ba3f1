"""hf_softmask: continual pre-training and finetuning without forgetting for Hugging Face Transformers."""

import importlib

from .callback import SoftMaskCallback
from .estimators import EmptyDataError, available_estimators, compute_importance, register_estimator
from .gates import UnitGates, gated
from .importance import NORMALIZATIONS, ImportanceShapeError, UnitImportance
from .importance_estimators import ImportanceEstimator
from .layout import UnitLayout
from .masking import SoftMaskConfig, SoftMasker, build_param_masks
from .optim import MaskedAdamW, MaskedSGD, install_update_masks
from .architectures import ArchitectureSpec, UnsupportedModelError, register_architecture, supported_model_types
from .strategies import ContinualStrategy, StrategyTrainer, available_strategies, get_strategy
from .trainer import SoftMaskTrainer, SoftMaskTrainingArguments

__version__ = "0.1.0"

# Heavier pieces (PEFT tuners, strategies, runners) load on first use: name -> module.
_LAZY = {
    "SubnetworkConfig": "tss",
    "SubnetworkModel": "tss",
    "get_subnetwork_model": "tss",
    "MultiTaskClassifier": "task_heads",
    "pack_bits": "bitpack",
    "unpack_bits": "bitpack",
    "DASStrategy": "strategies.das",
    "TSSStrategy": "strategies.tss",
    "WSNStrategy": "strategies.wsn",
    "HATStrategy": "strategies.hat",
    "HATConfig": "strategies.hat",
    "AdaHATStrategy": "strategies.hat",
    "AdaHATConfig": "strategies.hat",
    "CBPStrategy": "strategies.cbp",
    "CBPConfig": "strategies.cbp",
    "CBPCallback": "strategies.cbp",
    "TaLoSStrategy": "strategies.talos",
    "TaLoSConfig": "strategies.talos",
    "EWCStrategy": "strategies.ewc",
    "EWCConfig": "strategies.ewc",
    "KDStrategy": "strategies.kd",
    "KDConfig": "strategies.kd",
    "NaiveStrategy": "strategies.naive",
    "SparseTaskVector": "task_vectors",
    "apply_task_vectors": "task_vectors",
    "fisher_diagonal": "fisher",
    "das_contrastive_loss": "contrastive",
    "ContinualPretrainingArguments": "continual",
    "run_continual_pretraining": "continual",
    "ContinualFinetuneArguments": "continual.finetune",
    "ContinualFinetuneTrainingArguments": "continual.finetune",
    "run_continual_finetune": "continual.finetune",
    "CompareArguments": "comparison",
    "run_comparison": "comparison",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_softmask' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ArchitectureSpec",
    "ContinualStrategy",
    "EmptyDataError",
    "ImportanceEstimator",
    "ImportanceShapeError",
    "MaskedAdamW",
    "MaskedSGD",
    "NORMALIZATIONS",
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
    "available_estimators",
    "available_strategies",
    "build_param_masks",
    "compute_importance",
    "gated",
    "get_strategy",
    "install_update_masks",
    "register_architecture",
    "register_estimator",
    "supported_model_types",
    *_LAZY,
]
