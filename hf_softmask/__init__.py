"""hf_softmask: continual pre-training and finetuning without forgetting for Hugging Face Transformers.

Every public name loads its module on first use, so ``import hf_softmask`` (and ``hf-softmask <command> --help``)
imports neither torch nor transformers.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from .utils import deprecation as _deprecation

try:
    __version__ = version("hf_softmask")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from .baselines.fisher import fisher_diagonal
    from .baselines.task_vectors import SparseTaskVector, apply_task_vectors
    from .continual import ContinualPretrainingArguments, run_continual_pretraining
    from .continual.comparison import CompareArguments, run_comparison
    from .continual.finetuning import ContinualFinetuningArguments, run_continual_finetuning
    from .core.architectures import (
        ArchitectureSpec,
        UnsupportedModelError,
        register_architecture,
        supported_model_types,
    )
    from .core.bitpack import pack_bits, unpack_bits
    from .core.callback import SoftMaskCallback
    from .core.contrastive import das_contrastive_loss
    from .core.gates import UnitGates, gated
    from .core.importance import NORMALIZATIONS, ImportanceShapeError, UnitImportance
    from .core.importance_compute import EmptyDataError, available_estimators, compute_importance, register_estimator
    from .core.importance_estimators import ImportanceEstimator
    from .core.layout import UnitLayout
    from .core.masking import SoftMaskConfig, SoftMasker, build_param_masks
    from .core.optim import MaskedAdamW, MaskedSGD, install_update_masks
    from .core.softmask_arguments import SoftMaskArguments
    from .core.trainer import SoftMaskTrainer, SoftMaskTrainingArguments
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
    from .tss import SubnetworkConfig, SubnetworkModel, get_subnetwork_model
    from .utils.assets import load_smollm2, minilm_path

# name -> module that defines it, loaded on first use.
_LAZY = {
    "ArchitectureSpec": "core.architectures",
    "UnsupportedModelError": "core.architectures",
    "register_architecture": "core.architectures",
    "supported_model_types": "core.architectures",
    "SoftMaskCallback": "core.callback",
    "EmptyDataError": "core.importance_compute",
    "available_estimators": "core.importance_compute",
    "compute_importance": "core.importance_compute",
    "register_estimator": "core.importance_compute",
    "UnitGates": "core.gates",
    "gated": "core.gates",
    "NORMALIZATIONS": "core.importance",
    "ImportanceShapeError": "core.importance",
    "UnitImportance": "core.importance",
    "ImportanceEstimator": "core.importance_estimators",
    "UnitLayout": "core.layout",
    "SoftMaskConfig": "core.masking",
    "SoftMasker": "core.masking",
    "build_param_masks": "core.masking",
    "MaskedAdamW": "core.optim",
    "MaskedSGD": "core.optim",
    "install_update_masks": "core.optim",
    "SoftMaskArguments": "core.softmask_arguments",
    "ContinualStrategy": "strategies",
    "StrategyTrainer": "strategies",
    "available_strategies": "strategies",
    "get_strategy": "strategies",
    "register_strategy": "strategies",
    "SoftMaskTrainer": "core.trainer",
    "SoftMaskTrainingArguments": "core.trainer",
    "SubnetworkConfig": "tss",
    "SubnetworkModel": "tss",
    "get_subnetwork_model": "tss",
    "MultiTaskClassifier": "task_heads",
    "pack_bits": "core.bitpack",
    "unpack_bits": "core.bitpack",
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
    "SparseTaskVector": "baselines.task_vectors",
    "apply_task_vectors": "baselines.task_vectors",
    "fisher_diagonal": "baselines.fisher",
    "das_contrastive_loss": "core.contrastive",
    "ContinualPretrainingArguments": "continual",
    "run_continual_pretraining": "continual",
    "ContinualFinetuningArguments": "continual.finetuning",
    "run_continual_finetuning": "continual.finetuning",
    # deprecated (one release): the finetuning runner's two argument classes are one now
    "ContinualFinetuneArguments": "continual.finetune",
    "ContinualFinetuneTrainingArguments": "continual.finetune",
    "run_continual_finetune": "continual.finetune",
    "load_smollm2": "utils.assets",
    "minilm_path": "utils.assets",
    "CompareArguments": "continual.comparison",
    "run_comparison": "continual.comparison",
}


# Old names -> new: still served, with a FutureWarning the first time (kept out of __all__).
_RENAMED = {"LoRAConfig": "LoRABaselineConfig"}


#: Modules moved into the layer packages (core, baselines, evaluation, utils, continual/, continual/pretraining/):
#: the old path still imports,
#: warning once, for one release.
_MOVED_MODULES = {
    "architectures": "core.architectures",
    "layout": "core.layout",
    "gates": "core.gates",
    "importance": "core.importance",
    "importance_estimators": "core.importance_estimators",
    "masking": "core.masking",
    "optim": "core.optim",
    "clipping": "core.clipping",
    "dtensor": "core.dtensor",
    "bitpack": "core.bitpack",
    "callback": "core.callback",
    "trainer": "core.trainer",
    "softmask_arguments": "core.softmask_arguments",
    "softmask_resume": "core.softmask_resume",
    "loss_scaling": "core.loss_scaling",
    "compatibility": "core.compatibility",
    "peft_support": "core.peft_support",
    "contrastive": "core.contrastive",
    "estimators": "core.importance_compute",
    "replay": "baselines.replay",
    "merging": "baselines.merging",
    "task_vectors": "baselines.task_vectors",
    "domain_training": "baselines.domain_training",
    "fisher": "baselines.fisher",
    "bootstrap": "evaluation.bootstrap",
    "continual_metrics": "evaluation.continual_metrics",
    "plotting": "evaluation.plotting",
    "io": "utils.io",
    "extras": "utils.extras",
    "deprecation": "utils.deprecation",
    "memory": "utils.memory",
    "package_data": "utils.package_data",
    "assets": "utils.assets",
    "comparison": "continual.comparison",
    # continual/'s pre-training modules, now in continual/pretraining/
    "continual.config": "continual.pretraining.config",
    "continual.das_arguments": "continual.pretraining.das_arguments",
    "continual.pretrain": "continual.pretraining.runner",
    "continual.pretrainer": "continual.pretraining.pretrainer",
    "continual.pretraining_results": "continual.pretraining.results",
    "continual.domain_data": "continual.pretraining.data",
    "continual.evaluation": "continual.pretraining.evaluation",
    "continual.lm_head_warmup": "continual.pretraining.lm_head_warmup",
    "continual.sweep": "continual.pretraining.sweep",
    "continual.frontier": "continual.pretraining.frontier",
    "continual.result_cache": "continual.pretraining.result_cache",
    "continual.hub_push": "continual.pretraining.hub_push",
    "continual.model_card": "continual.pretraining.model_card",
}
_deprecation.alias_moved_modules({f"{__name__}.{old}": f"{__name__}.{new}" for old, new in _MOVED_MODULES.items()})


def __getattr__(name):
    if name in _RENAMED:
        _deprecation.warn_renamed(f"{__name__}.{name}", f"{__name__}.{_RENAMED[name]}")
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
