"""Unstructured and N:M pruning: magnitude (per layer or global), Wanda, and N:M patterns.

Scores: magnitude |W|; Wanda |W| * ||X_j|| with ||X_j|| the L2 norm of input feature j over
the calibration tokens (Sun et al. 2023), compared within each output row as the paper does.
The lowest-scoring weights are set to zero; N:M keeps the N highest of every M consecutive
input weights of a row.
"""

from __future__ import annotations

import torch

from ...core.layers import weight_view



def magnitude_scores(module):
    """|W|, (out, in)."""
    return weight_view(module).detach().abs().float()


def wanda_scores(module, input_norm):
    """|W| * ||X_j||, (out, in)."""
    return magnitude_scores(module) * input_norm.to(module.weight.device).float().unsqueeze(0)


def row_mask(scores, sparsity: float):
    """Keep-mask removing the `sparsity` fraction of lowest scores in every row."""
    k = int(scores.shape[1] * sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        drop = torch.topk(scores, k, dim=1, largest=False).indices
        mask.scatter_(1, drop, False)
    return mask


def layer_mask(scores, sparsity: float):
    """Keep-mask removing the `sparsity` fraction of lowest scores in the whole layer."""
    k = int(scores.numel() * sparsity)
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[torch.topk(scores.flatten(), k, largest=False).indices] = False
    return mask.reshape(scores.shape)


def global_threshold(all_scores: list, sparsity: float) -> float:
    """The score below which `sparsity` of all weights (every layer together) fall."""
    flat = torch.cat([s.flatten() for s in all_scores])
    k = int(flat.numel() * sparsity)
    if k == 0:
        return float("-inf")
    return float(torch.kthvalue(flat.cpu(), k).values)


def nm_mask(scores, n: int, m: int):
    """Keep-mask with N of every M consecutive input weights of each row kept."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise ValueError(f"input width {in_f} is not a multiple of M={m}")
    groups = scores.reshape(out_f, in_f // m, m)
    keep = torch.topk(groups, n, dim=2).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, keep, True)
    return mask.reshape(out_f, in_f)


def apply_mask_(module, mask) -> None:
    """Zero the pruned weights in place."""
    with torch.no_grad():
        weight_view(module).mul_(mask.to(module.weight.dtype))


def sum_squares(total, x):
    """Fold for calibration: the running per-feature sum of x^2 over the tokens seen."""
    return (x * x).sum(0) + (0 if total is None else total)


def input_norms(model, names, batches) -> dict:
    """||X_j||_2 over all calibration tokens, for the input of every named layer."""
    from ..calibration import collect_inputs

    sums = collect_inputs(model, names, batches, sum_squares)
    return {n: s.sqrt() for n, s in sums.items()}


def sparsity_of(module) -> float:
    """Fraction of exactly-zero weights."""
    w = module.weight
    return float((w == 0).sum()) / w.numel()
