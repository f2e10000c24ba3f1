"""hf_softmask: continual pre-training and finetuning without forgetting for Hugging Face Transformers.

Every public name loads its module on first use, so ``import hf_softmask`` (and ``hf-softmask <command> --help``)
imports neither torch nor transformers.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:
    __version__ = version("hf_softmask")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from .architectures import ArchitectureSpec, UnsupportedModelError, register_architecture, supported_model_types
    from .bitpack import pack_bits, unpack_bits
    from .callback import SoftMaskCallback
    from .comparison import CompareArguments, run_comparison
    from .continual import ContinualPretrainingArguments, run_continual_pretraining
    from .continual.finetuning import ContinualFinetuningArguments, run_continual_finetuning
    from .contrastive import das_contrastive_loss
    from .estimators import EmptyDataError, available_estimators, compute_importance, register_estimator
    from .fisher import fisher_diagonal
    from .gates import UnitGates, gated
    from .importance import NORMALIZATIONS, ImportanceShapeError, UnitImportance
    from .importance_estimators import ImportanceEstimator
    from .layout import UnitLayout
    from .masking import SoftMaskConfig, SoftMasker, build_param_masks
    from .optim import MaskedAdamW, MaskedSGD, install_update_masks
    from .softmask_arguments import SoftMaskArguments
    from .strategies import (
        ContinualStrategy,
        StrategyTrainer,
        available_strategies,
        get_strategy,
        register_strategy,
    )
    from .strategies.cbp import CBPCallback, CBPConfig, CBPStrategy
    from .strategies.das import DASConfig, DASStrategy
    from .strategies.ewc import EWCConfig, EWCStrategy
    from .strategies.freeze_bottom import FreezeBottomConfig, FreezeBottomStrategy
    from .strategies.hat import AdaHATConfig, AdaHATStrategy, HATConfig, HATStrategy
    from .strategies.kd import KDConfig, KDStrategy
    from .strategies.lora import LoRABaselineConfig, LoRAStrategy
    from .strategies.naive import NaiveConfig, NaiveStrategy
    from .strategies.talos import TaLoSConfig, TaLoSStrategy
    from .strategies.tss import TSSConfig, TSSStrategy
    from .strategies.wsn import WSNConfig, WSNStrategy
    from .task_heads import MultiTaskClassifier
    from .task_vectors import SparseTaskVector, apply_task_vectors
    from .trainer import SoftMaskTrainer, SoftMaskTrainingArguments
    from .tss import SubnetworkConfig, SubnetworkModel, get_subnetwork_model

# name -> module that defines it, loaded on first use.
_LAZY = {
    "ArchitectureSpec": "architectures",
    "UnsupportedModelError": "architectures",
    "register_architecture": "architectures",
    "supported_model_types": "architectures",
    "SoftMaskCallback": "callback",
    "EmptyDataError": "estimators",
    "available_estimators": "estimators",
    "compute_importance": "estimators",
    "register_estimator": "estimators",
    "UnitGates": "gates",
    "gated": "gates",
    "NORMALIZATIONS": "importance",
    "ImportanceShapeError": "importance",
    "UnitImportance": "importance",
    "ImportanceEstimator": "importance_estimators",
    "UnitLayout": "layout",
    "SoftMaskConfig": "masking",
    "SoftMasker": "masking",
    "build_param_masks": "masking",
    "MaskedAdamW": "optim",
    "MaskedSGD": "optim",
    "install_update_masks": "optim",
    "SoftMaskArguments": "softmask_arguments",
    "ContinualStrategy": "strategies",
    "StrategyTrainer": "strategies",
    "available_strategies": "strategies",
    "get_strategy": "strategies",
    "register_strategy": "strategies",
    "SoftMaskTrainer": "trainer",
    "SoftMaskTrainingArguments": "trainer",
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
    "NaiveConfig": "strategies.naive",
    "DASConfig": "strategies.das",
    "TSSConfig": "strategies.tss",
    "WSNConfig": "strategies.wsn",
    "LoRAStrategy": "strategies.lora",
    "LoRABaselineConfig": "strategies.lora",
    "FreezeBottomStrategy": "strategies.freeze_bottom",
    "FreezeBottomConfig": "strategies.freeze_bottom",
    "SparseTaskVector": "task_vectors",
    "apply_task_vectors": "task_vectors",
    "fisher_diagonal": "fisher",
    "das_contrastive_loss": "contrastive",
    "ContinualPretrainingArguments": "continual",
    "run_continual_pretraining": "continual",
    "ContinualFinetuningArguments": "continual.finetuning",
    "run_continual_finetuning": "continual.finetuning",
    # deprecated (one release): the finetuning runner's two argument classes are one now
    "ContinualFinetuneArguments": "continual.finetune",
    "ContinualFinetuneTrainingArguments": "continual.finetune",
    "run_continual_finetune": "continual.finetune",
    "CompareArguments": "comparison",
    "run_comparison": "comparison",
}


# Old names -> new: still served, with a FutureWarning the first time (kept out of __all__).
_RENAMED = {"LoRAConfig": "LoRABaselineConfig"}


def __getattr__(name):
    if name in _RENAMED:
        from .deprecation import warn_renamed

        warn_renamed(f"{__name__}.{name}", f"{__name__}.{_RENAMED[name]}")
        return __getattr__(_RENAMED[name])
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_softmask' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = list(_LAZY)
