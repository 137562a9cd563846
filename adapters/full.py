"""Full fine-tuning: every parameter trains. The reference the PEFT methods are judged by."""

from __future__ import annotations

from ..core.sparsity import zero_masks
from ..core.train import TrainingConfig, clip_classifier, train


class FullConfig(TrainingConfig):
    """Training settings only; every weight is updated."""


def full_finetune(loaded, cfg: FullConfig, ctx):
    """Train all parameters of the model; the artifact is a full model."""
    for p in loaded.model.parameters():
        p.requires_grad_(True)
    trained = loaded.model
    if loaded.task == "zero-shot-image-classification":
        trained = clip_classifier(loaded.model, loaded.tokenizer, ctx.dataset.label_names)
    masks = zero_masks(loaded.model) if cfg.keep_sparsity else None
    ctx.report.update(train(loaded, trained, cfg, ctx, 5e-5, masks))
    loaded.model.eval()
    return loaded
