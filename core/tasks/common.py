"""Helpers the tasks share: batching, moving to a device, images, classification metrics."""

from __future__ import annotations

import numpy as np


def batches(n: int, batch_size: int, lengths: list[int] | None = None):
    """Index lists of at most batch_size; sorted by length when given (less padding). A
    progress bar shows on a terminal."""
    from .. import progress

    order = sorted(range(n), key=lambda i: -lengths[i]) if lengths else list(range(n))
    for start in progress.bar(range(0, n, batch_size), desc="evaluating", unit="batch"):
        yield order[start:start + batch_size]


def to_device(batch: dict, device: str) -> dict:
    """Move every tensor in a batch to `device`."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def model_device(model) -> str:
    """The device of a model's first parameter."""
    return str(next(model.parameters()).device)


def as_rgb(item):
    """A PIL RGB image from a path, a PIL image or an HxWx3 uint8 array."""
    from PIL import Image

    if isinstance(item, str):
        with Image.open(item) as img:
            return img.convert("RGB")
    if isinstance(item, np.ndarray):
        return Image.fromarray(item).convert("RGB")
    return item.convert("RGB")


def classification_metrics(y_true: list[int], y_pred: list[int]) -> dict:
    """Accuracy and macro-F1 (over the classes seen in truth or prediction)."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    f1s = []
    for c in np.union1d(t, p):
        tp = np.sum((p == c) & (t == c))
        denom = np.sum(p == c) + np.sum(t == c)
        f1s.append(2 * tp / denom if denom else 0.0)
    return {"accuracy": float(np.mean(t == p)) if len(t) else 0.0,
            "macro_f1": float(np.mean(f1s)) if f1s else 0.0, "examples": int(len(t))}
