"""The soft-masking engine: units of a transformers model (layout, gates), their importance, the masks that protect
them in the optimizer step, and the Trainer pieces that apply them (callback, trainer, clipping, compatibility)."""
