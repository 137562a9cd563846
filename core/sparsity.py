"""Keeping a pruned model's zeros through later steps (LoRA / SVFit merges, fine-tuning)."""

from __future__ import annotations

from .layers import is_linear

MIN_ZERO_FRACTION = 0.01  # dense trained weights are essentially never exactly zero


def zero_masks(model, min_fraction: float = MIN_ZERO_FRACTION) -> list:
    """(layer, keep-mask) for every Linear / Conv1D whose weight is at least `min_fraction`
    exact zeros: the layers a pruning step sparsified."""
    import torch

    found, seen = [], set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not is_linear(module) or weight is None or weight.data_ptr() in seen:
            continue
        seen.add(weight.data_ptr())
        if not weight.dtype.is_floating_point:
            continue
        mask = weight.detach() != 0
        if 1 - float(mask.float().mean()) >= min_fraction:
            found.append((module, mask))
    return found


def reapply_(masks) -> None:
    """Zero again what was zero (a merge or an optimizer step may have filled it)."""
    import torch

    with torch.no_grad():
        for module, mask in masks:
            module.weight.mul_(mask.to(module.weight.dtype))


def keep_sparsity_callback(masks):
    """A TrainerCallback that re-applies the masks after every optimizer step."""
    from transformers import TrainerCallback

    class KeepSparsity(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            reapply_(masks)

    return KeepSparsity()
