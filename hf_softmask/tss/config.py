"""SubnetworkConfig: a PEFT config for task-specific subnetworks over frozen (or WSN-trained) weights."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from peft.config import PeftConfig

__all__ = ["SubnetworkConfig", "SUBNETWORK_PEFT_TYPE", "SELECTIONS", "SCORE_INITS"]

#: Written to ``adapter_config.json``. Not a member of peft's ``PeftType`` enum (peft 0.21 cannot register new
#: names), so ``peft.PeftModel.from_pretrained`` does not know it: load with ``SubnetworkModel.from_pretrained``.
SUBNETWORK_PEFT_TYPE = "SUBNETWORK"
SELECTIONS = ("threshold", "topk")
SCORE_INITS = ("constant", "magnitude")


@dataclass
class SubnetworkConfig(PeftConfig):
    """Which layers get per-task scores, and how a score tensor becomes a binary weight mask."""

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Names (suffix match) or a regex (full match) of the nn.Linear / Conv1D layers to score; "
            "'all-linear' takes every linear layer but the output head. None: the per-architecture default "
            "(every attention and FFN projection)."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or regex of modules not to score."}
    )
    selection: str = field(
        default="threshold",
        metadata={
            "help": "'threshold': keep weight w_ij where s_ij >= threshold (TSS). 'topk': keep the keep_ratio "
            "highest scores of each layer (WSN).",
            "choices": list(SELECTIONS),
        },
    )
    threshold: float = field(default=0.0, metadata={"help": "Score threshold tau for selection='threshold'."})
    keep_ratio: float = field(
        default=0.5, metadata={"help": "Fraction of each layer's weights kept for selection='topk' (WSN's c)."}
    )
    score_init: str = field(
        default="constant",
        metadata={
            "help": "'constant': every score = init_score (with threshold selection and init_score >= threshold the "
            "first mask keeps the whole pretrained layer). 'magnitude': score = |w| * init_score / mean|w| "
            "(top-k then starts from magnitude pruning).",
            "choices": list(SCORE_INITS),
        },
    )
    init_score: float = field(
        default=0.01, metadata={"help": "Initial score value (constant) or mean score (magnitude)."}
    )
    train_base_weights: bool = field(
        default=False,
        metadata={
            "help": "Train the scored layers' weights too (WSN). False keeps them frozen (TSS), so only scores train."
        },
    )
    save_training_state: bool = field(
        default=True,
        metadata={
            "help": "Also save the live scores and accumulated importance (needed to continue training after "
            "loading); finished tasks need only their bit-packed masks."
        },
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only score layers with these indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list (e.g. 'layer', 'h') for layers_to_transform."}
    )
    target_parameters: list[str] | None = field(default=None, metadata={"help": "Unused (peft compatibility)."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Unused (peft compatibility)."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SUBNETWORK_PEFT_TYPE
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.score_init not in SCORE_INITS:
            raise ValueError(f"score_init must be one of {SCORE_INITS}, got {self.score_init!r}")
        for name in ("threshold", "init_score"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.selection == "threshold" and self.score_init == "constant" and self.init_score < self.threshold:
            raise ValueError(
                f"init_score={self.init_score} < threshold={self.threshold} "
                "would mask out every pretrained weight at the "
                "start of task 1; use init_score >= threshold"
            )
        if self.selection == "threshold" and self.score_init == "magnitude" and self.threshold > 0:
            raise ValueError(
                "score_init='magnitude' starts the smallest weights' scores near 0, "
                f"below threshold={self.threshold}; "
                "use threshold <= 0 so the first mask keeps the whole pretrained layer"
            )
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)

    def to_dict(self) -> dict:
        d = super().to_dict()
        return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}

    @classmethod
    def from_peft_type(cls, **kwargs):
        # peft's version looks peft_type up in its own enum mapping, which cannot hold this method.
        peft_type = kwargs.pop("peft_type", SUBNETWORK_PEFT_TYPE)
        if peft_type != SUBNETWORK_PEFT_TYPE:
            raise ValueError(
                f"this adapter config is for peft_type={peft_type!r}, not {SUBNETWORK_PEFT_TYPE!r}; load it with peft"
            )
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in kwargs.items() if k in known})

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs):
        with open(path_json_file) as f:
            return json.load(f)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write ``adapter_config.json`` atomically."""
        from ..utils.io import atomic_write_json

        atomic_write_json(os.path.join(save_directory, "adapter_config.json"), self.to_dict())
