"""Ordering a network's units by importance, so that every prefix keeps the important ones.

Before elastic training, each layer's FFN neurons and key/value heads are scored on a few
training batches (the same activation-based scores structured pruning uses) and permuted,
most important first: q / k / v rows and output-projection columns move with their head, FFN
input rows (gate and up for gated MLPs) with their output-projection column. A permutation
of hidden units changes no output: the full network computes exactly what it did.

Layers are scored the same way as `prune layers` does: a block whose output is most like its
input (cosine similarity) changes the least, and goes first when a smaller depth is asked for.
"""

from __future__ import annotations

import torch

from ..calibration import hooked_pass
from ..prune.structured import GRANULARITIES
from ..prune.structured import Stack as PruneStack
from .widths import Stack


def _permute_rows_(linear, order) -> None:
    with torch.no_grad():
        linear.weight.copy_(linear.weight[order])
        if linear.bias is not None:
            linear.bias.copy_(linear.bias[order])


def _permute_cols_(linear, order) -> None:
    with torch.no_grad():
        linear.weight.copy_(linear.weight[:, order])


def reorder_neurons_(stack: Stack, block, order) -> None:
    """Put the FFN neurons of one block in the order `order` (an index tensor)."""
    for name in stack.parts["ffn_in"]:
        _permute_rows_(block.get_submodule(name), order)
    _permute_cols_(block.get_submodule(stack.parts["ffn_out"]), order)


def reorder_heads_(stack: Stack, block, group_order) -> None:
    """Put the key/value groups of one block (each with its query heads) in `group_order`."""
    p, d = stack.parts, stack.head_dim
    rep = stack.heads // stack.kv_heads
    groups = torch.as_tensor(group_order)
    q_heads = (groups.unsqueeze(1) * rep + torch.arange(rep)).flatten()
    q_rows = (q_heads.unsqueeze(1) * d + torch.arange(d)).flatten()
    kv_rows = (groups.unsqueeze(1) * d + torch.arange(d)).flatten()
    _permute_rows_(block.get_submodule(p["q"]), q_rows)
    _permute_rows_(block.get_submodule(p["k"]), kv_rows)
    _permute_rows_(block.get_submodule(p["v"]), kv_rows)
    _permute_cols_(block.get_submodule(p["o"]), q_rows)


def _scores(model, stacks_: list[Stack], batches, granularity: str) -> dict:
    """{(stack, block): score} of one granularity (heads / neurons / layers) on `batches`."""
    g = GRANULARITIES[granularity]
    by_name = {}
    probes = {}
    for s in stacks_:
        by_name[s.name] = PruneStack(s.name, s.blocks, s.config, 0, 0,
                                     (s.heads, s.kv_heads, s.head_dim))
        for i, block in enumerate(s.blocks):
            probes[(s.name, i)] = g.probe(block, s.parts)
    scores = {}

    def add(key, module, x, out):
        scores[key] = scores.get(key, 0) + g.calib_score(by_name[key[0]], module, x, out)

    hooked_pass(model, probes, add, batches)
    return scores


def order_by_importance_(model, stacks_: list[Stack], batches) -> dict[str, list[int]]:
    """Reorder every block's FFN neurons and heads by importance on `batches` (the full
    network's outputs do not change) and return each stack's layer drop order (least
    important first)."""
    neurons = _scores(model, stacks_, batches, "neurons")
    heads = _scores(model, stacks_, batches, "heads")
    layers = _scores(model, stacks_, batches, "layers")
    drop_orders = {}
    for s in stacks_:
        for i, block in enumerate(s.blocks):
            reorder_neurons_(s, block, torch.argsort(neurons[(s.name, i)], descending=True))
            reorder_heads_(s, block, torch.argsort(heads[(s.name, i)], descending=True).tolist())
        n = len(s.blocks)
        # most similar input and output first; ties (and no data) drop from the top down
        drop_orders[s.name] = sorted(range(n), key=lambda i: (-layers.get((s.name, i), 0), -i))
    return drop_orders
