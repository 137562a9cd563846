"""Slicing a transformer block's tensors for structured pruning: keep some heads' rows and
columns, some FFN neurons, or some blocks of a stack. transformers 5 has no `prune_heads` any
more, so the Linear layers are replaced by smaller ones holding the kept slices."""

from __future__ import annotations

import torch


def _linear_like(old, weight, bias):
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                          device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def keep_rows(linear, idx):
    """The Linear with only output features `idx`."""
    bias = None if linear.bias is None else linear.bias.detach()[idx]
    return _linear_like(linear, linear.weight.detach()[idx], bias)


def keep_cols(linear, idx):
    """The Linear with only input features `idx`."""
    bias = None if linear.bias is None else linear.bias.detach()
    return _linear_like(linear, linear.weight.detach()[:, idx], bias)


def _set(block, path: str, module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, module)


# ---------------------------------------------------------------- heads
def prune_heads_(block, parts, family, keep_groups, heads, kv, head_dim) -> dict:
    """Keep only the key/value groups `keep_groups` (each with its query heads)."""
    rep = heads // kv
    keep_groups = torch.as_tensor(sorted(keep_groups))
    q_heads = (keep_groups.unsqueeze(1) * rep + torch.arange(rep)).flatten()
    q_rows = (q_heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()
    kv_rows = (keep_groups.unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()
    _set(block, parts["q"], keep_rows(block.get_submodule(parts["q"]), q_rows))
    _set(block, parts["k"], keep_rows(block.get_submodule(parts["k"]), kv_rows))
    _set(block, parts["v"], keep_rows(block.get_submodule(parts["v"]), kv_rows))
    _set(block, parts["o"], keep_cols(block.get_submodule(parts["o"]), q_rows))
    new_heads, new_kv = len(q_heads), len(keep_groups)
    set_head_count(block.get_submodule(parts["attn"]), family, new_heads, new_kv, head_dim)
    return {"heads": new_heads, "kv_heads": new_kv, "head_dim": head_dim}


def set_head_count(attn, family: str, heads: int, kv: int, head_dim: int) -> None:
    """Update an attention module's own head bookkeeping after slicing."""
    if family == "bert":
        attn.num_attention_heads, attn.all_head_size = heads, heads * head_dim
    elif family == "vit":
        attn.num_attention_heads = heads
    elif family == "clip":
        attn.num_heads = heads
    elif family == "llama":
        attn.num_key_value_groups = heads // kv


# ---------------------------------------------------------------- FFN neurons
def prune_neurons_(block, parts, keep) -> int:
    """Keep only intermediate neurons `keep`; returns the new width."""
    keep = torch.as_tensor(sorted(keep))
    for p in parts["ffn_in"]:
        _set(block, p, keep_rows(block.get_submodule(p), keep))
    _set(block, parts["ffn_out"], keep_cols(block.get_submodule(parts["ffn_out"]), keep))
    return len(keep)


# ---------------------------------------------------------------- layers
def drop_layers_(blocks, keep: list[int]) -> None:
    """Keep only blocks `keep` (in order) in the ModuleList, renumbering cache indices."""
    kept = [blocks[i] for i in keep]
    for i, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
    while len(blocks):
        del blocks[len(blocks) - 1]
    for block in kept:
        blocks.append(block)
