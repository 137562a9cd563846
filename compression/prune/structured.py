"""Structured pruning that makes the model smaller: attention heads, FFN neurons, layers.

Weight tensors are sliced (transformers 5 has no `prune_heads` any more), so the result has
fewer parameters and FLOPs. The same number of heads / neurons goes from every layer, so a
config can often say the new sizes: FFN width (`intermediate_size`) and layer count always; head
count for ViT and Llama (which read an explicit `head_dim`). BERT and CLIP derive the head size
from hidden_size / heads, so their pruned heads are recorded in `mmkit_prune.json` and the
artifact loads through mmkit.
"""

from __future__ import annotations

import torch

from ...core.errors import InputError

# module paths inside one transformer block, per family
PARTS = {
    "bert": {"attn": "attention.self", "q": "attention.self.query", "k": "attention.self.key",
             "v": "attention.self.value", "o": "attention.output.dense",
             "ffn_in": ["intermediate.dense"], "ffn_out": "output.dense"},
    "vit": {"attn": "attention", "q": "attention.q_proj", "k": "attention.k_proj",
            "v": "attention.v_proj", "o": "attention.o_proj", "ffn_in": ["mlp.fc1"],
            "ffn_out": "mlp.fc2"},
    "clip": {"attn": "self_attn", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
             "v": "self_attn.v_proj", "o": "self_attn.out_proj", "ffn_in": ["mlp.fc1"],
             "ffn_out": "mlp.fc2"},
    "llama": {"attn": "self_attn", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
              "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "ffn_in": ["mlp.gate_proj", "mlp.up_proj"], "ffn_out": "mlp.down_proj"},
}
HEADS_IN_CONFIG = ("vit", "llama")  # families whose config can state a smaller head count


def check_family(family: str, method: str) -> dict:
    """The block layout of a family, or a clear error naming the families that work."""
    if family not in PARTS:
        raise InputError(f"Structured pruning ({method}) knows the block layout of "
                         f"{', '.join(PARTS)} models; this is a {family} model. Unstructured "
                         "pruning (magnitude, wanda, nm) works on every family.")
    return PARTS[family]


def stacks(model):
    """(name, ModuleList of blocks, config that describes them): CLIP has one per tower."""
    from ..quantize.calibrate import block_stacks

    out = []
    for name, blocks in block_stacks(model):
        config = model.config
        for tower in ("text", "vision"):
            if f"{tower}_model" in name:
                config = getattr(model.config, f"{tower}_config")
        out.append((name, blocks, config))
    return out


# ---------------------------------------------------------------- slicing
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
def head_layout(config, family: str) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size)."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, head_dim


def head_weight_importance(block, parts, heads, kv, head_dim):
    """Per key/value group: the squared norm of its q, k, v rows and o columns."""
    q, k, v, o = (block.get_submodule(parts[p]).weight.detach().float() for p in "qkvo")
    per_q = (q.reshape(heads, head_dim, -1).pow(2).sum((1, 2))
             + o.reshape(o.shape[0], heads, head_dim).pow(2).sum((0, 2)))
    per_kv = (k.reshape(kv, head_dim, -1).pow(2).sum((1, 2))
              + v.reshape(kv, head_dim, -1).pow(2).sum((1, 2)))
    return per_q.reshape(kv, heads // kv).sum(1) + per_kv


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
def neuron_weight_importance(block, parts):
    """Per intermediate neuron: norm of its input rows times norm of its output column."""
    rows = sum(block.get_submodule(p).weight.detach().float().pow(2).sum(1)
               for p in parts["ffn_in"]).sqrt()
    cols = block.get_submodule(parts["ffn_out"]).weight.detach().float().pow(2).sum(0).sqrt()
    return rows * cols


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
