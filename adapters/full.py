"""Full fine-tuning: every parameter trains. The reference the PEFT methods are judged by."""

from __future__ import annotations

from ..core.sparsity import zero_masks
from ..core.train import TrainingConfig
from .training import train_adapted


class FullConfig(TrainingConfig):
    """Training settings only; every weight is updated."""


def full_finetune(loaded, cfg: FullConfig, ctx):
    """Train all parameters of the model; the artifact is a full model."""
    for p in loaded.model.parameters():
        p.requires_grad_(True)
    masks = zero_masks(loaded.model) if cfg.keep_sparsity else None
    train_adapted(loaded, loaded.model, cfg, ctx, 5e-5, masks)  # nothing to merge
    return loaded
