"""TSS task-specific subnetworks as a PEFT tuner: config, scored layer, tuner model."""

from .config import SubnetworkConfig
from .layer import SubnetworkLayer, SubnetworkLinear
from .model import SubnetworkModel, get_subnetwork_model
from .selection import StraightThroughMask, straight_through_mask, topk_mask

__all__ = [
    "StraightThroughMask",
    "SubnetworkConfig",
    "SubnetworkLayer",
    "SubnetworkLinear",
    "SubnetworkModel",
    "get_subnetwork_model",
    "straight_through_mask",
    "topk_mask",
]
