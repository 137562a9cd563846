"""The path every fine-tuning method shares after it has made its trainable model: CLIP
wrapped as a classifier of the data's labels, training, and an optional merge that keeps a
pruned base's zeros."""

from __future__ import annotations

from ..core.sparsity import reapply_
from ..core.train import clip_classifier, train


def train_adapted(loaded, model, cfg, ctx, default_lr: float, masks, merge=None,
                  loss=None) -> bool:
    """Train `model` (the loaded model, or it with an adapter) on ctx.dataset and add the
    training report to ctx.report; the model ends in eval mode. A CLIP model trains as a
    classifier of the data's labels (image vs. prompt similarity).

    With `cfg.merge` and a `merge` function (which folds the adapter into the weights), merge
    and zero again the base's own zeros (`masks`, taken before the adapter existed): a pruned
    model stays pruned. Returns True when it merged.
    """
    trained = model
    if loaded.task == "zero-shot-image-classification":
        trained = clip_classifier(model, loaded.tokenizer, ctx.dataset.label_names)
    ctx.report.update(train(loaded, trained, cfg, ctx, default_lr, masks, loss))
    model.eval()
    if not (cfg.merge and merge is not None):
        return False
    merge()
    reapply_(masks)
    ctx.report.update({"merged": True, "sparse_layers_kept": len(masks)})
    return True
