"""Tasks: how to feed a model a batch, and how to score it. One module per task; `batches`
turns a split into training / calibration examples and pads them."""

from __future__ import annotations

from types import ModuleType


def get_task(name: str) -> ModuleType:
    """The module that implements a task (validated by core.loading.check_task first)."""
    from . import causal_lm, image_classification, text_classification, zero_shot

    return {
        "text-classification": text_classification,
        "image-classification": image_classification,
        "zero-shot-image-classification": zero_shot,
        "causal-lm": causal_lm,
    }[name]
