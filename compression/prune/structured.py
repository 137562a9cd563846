"""Structured pruning that makes the model smaller: attention heads, FFN neurons, layers.

One driver, `prune_structured`, does what the three share: plan how many units go from each
stack of blocks (refusing to remove them all), score the units (on calibration data through
hooks, or from the weights alone), keep the best and slice the tensors (`slicing.py`). Each
granularity says only what differs: its unit count, the module its calibration hook reads, its
score, and how it applies the choice.

The same number of heads / neurons goes from every layer, so a config can often say the new
sizes: FFN width (`intermediate_size`) and layer count always; head count for ViT and Llama
(which read an explicit `head_dim`). BERT and CLIP derive the head size from hidden_size /
heads, so their pruned heads are recorded in `mmkit_prune.json` and the artifact loads through
mmkit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.errors import InputError
from . import slicing

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
    from ..calibration import block_stacks

    out = []
    for name, blocks in block_stacks(model):
        config = model.config
        for tower in ("text", "vision"):
            if f"{tower}_model" in name:
                config = getattr(model.config, f"{tower}_config")
        out.append((name, blocks, config))
    return out


def removed_count(total: int, sparsity: float, what: str, where: str) -> int:
    """How many of `total` units `sparsity` removes; an error when that is all of them."""
    remove = round(total * sparsity)
    if remove >= total:
        raise InputError(f"--sparsity {sparsity} would remove all {total} {what} of {where}; "
                         f"use a smaller sparsity (below {(total - 0.5) / total:.2f}).")
    return remove


@dataclass
class Stack:
    """One stack of blocks and what pruning takes from it."""

    name: str
    blocks: object  # the ModuleList
    config: object  # the config that describes these blocks
    total: int  # units per block (heads, neurons) or blocks in the stack (layers)
    remove: int
    layout: tuple = ()  # heads: (query heads, key/value heads, head size)


# ---------------------------------------------------------------- weight importance
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


def neuron_weight_importance(block, parts):
    """Per intermediate neuron: norm of its input rows times norm of its output column."""
    rows = sum(block.get_submodule(p).weight.detach().float().pow(2).sum(1)
               for p in parts["ffn_in"]).sqrt()
    cols = block.get_submodule(parts["ffn_out"]).weight.detach().float().pow(2).sum(0).sqrt()
    return rows * cols


# ---------------------------------------------------------------- the granularities
class Heads:
    """Attention heads (key/value groups for Llama), the same number from every layer."""

    name, without_data, report_key = "heads", "weights", "attention"

    def size(self, loaded, name, blocks, config, parts):
        heads, kv, head_dim = head_layout(config, loaded.family)
        what = "key/value heads" if kv < heads else "heads"
        return kv, what, f"each layer of {name}", (heads, kv, head_dim)

    def probe(self, block, parts):
        return block.get_submodule(parts["o"])

    def calib_score(self, stack, o, x, out):
        # each head's share of the output projection: ||ctx_h W_o[:, h]^T||^2
        h, k, d = stack.layout
        context = x.detach().float().reshape(-1, h, d)
        w = o.weight.detach().float().reshape(o.weight.shape[0], h, d)
        share = torch.einsum("thd,ohd->tho", context, w).pow(2).sum((0, 2))
        return share.reshape(k, h // k).sum(1)

    def apply(self, loaded, parts, stack, scores) -> dict:
        heads, kv, head_dim = stack.layout
        layout = {}
        for i, block in enumerate(stack.blocks):
            score = scores.get((stack.name, i))
            if score is None:
                score = head_weight_importance(block, parts, heads, kv, head_dim)
            keep = torch.topk(score, kv - stack.remove).indices.tolist()
            layout[f"{stack.name}.{i}.{parts['attn']}"] = slicing.prune_heads_(
                block, parts, loaded.family, keep, heads, kv, head_dim)
        if loaded.family in HEADS_IN_CONFIG:
            config = stack.config
            config.head_dim = head_dim
            config.num_attention_heads = (kv - stack.remove) * (heads // kv)
            if getattr(config, "num_key_value_heads", None):
                config.num_key_value_heads = kv - stack.remove
        return layout

    def finish(self, loaded, results: dict) -> dict:
        layout = {k: v for stack_layout in results.values() for k, v in stack_layout.items()}
        if loaded.family not in HEADS_IN_CONFIG:  # the config cannot say it: mmkit_prune.json
            loaded.extra["format"] = "mmkit-pruned"
            loaded.extra.setdefault("pruned", {})["attention"] = layout
        return layout


class Neurons:
    """FFN intermediate neurons, the same number from every layer."""

    name, without_data, report_key = "neurons", "weights", "intermediate_size"

    def size(self, loaded, name, blocks, config, parts):
        width = blocks[0].get_submodule(parts["ffn_out"]).weight.shape[1]
        return width, "neurons", f"each FFN of {name}", ()

    def probe(self, block, parts):
        return block.get_submodule(parts["ffn_out"])

    def calib_score(self, stack, ffn_out, x, out):
        act = x.detach().float().reshape(-1, x.shape[-1]).abs().sum(0)
        return act * ffn_out.weight.detach().float().pow(2).sum(0).sqrt()

    def apply(self, loaded, parts, stack, scores) -> int:
        for i, block in enumerate(stack.blocks):
            score = scores.get((stack.name, i))
            if score is None:
                score = neuron_weight_importance(block, parts)
            keep = torch.topk(score, stack.total - stack.remove).indices.tolist()
            slicing.prune_neurons_(block, parts, keep)
        stack.config.intermediate_size = stack.total - stack.remove
        return stack.total - stack.remove

    def finish(self, loaded, results: dict) -> dict:
        return results


class Layers:
    """Whole layers: those that change their input least on calibration data (cosine
    similarity of a block's input and output), or without data the ones just below the top."""

    name, without_data, report_key = "layers", "position", "removed_layers"

    def size(self, loaded, name, blocks, config, parts):
        return len(blocks), "layers", name, ()

    def probe(self, block, parts):
        return block

    def calib_score(self, stack, block, x, out):
        y = out[0] if isinstance(out, tuple) else out
        return float(torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).mean())

    def apply(self, loaded, parts, stack, scores) -> list[int]:
        n, remove, config = stack.total, stack.remove, stack.config
        if scores:  # most similar input and output = least needed
            order = sorted(range(n), key=lambda i: -scores[(stack.name, i)])
            drop = sorted(order[:remove])
        else:  # keep the first and the last layer as long as possible; drop from the top down
            drop = sorted(([*range(n - 2, 0, -1), n - 1, 0])[:remove])
        slicing.drop_layers_(stack.blocks, [i for i in range(n) if i not in drop])
        config.num_hidden_layers = n - remove
        if getattr(config, "layer_types", None):
            config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in drop]
        return drop

    def finish(self, loaded, results: dict) -> dict:
        return results


GRANULARITIES = {g.name: g for g in (Heads(), Neurons(), Layers())}


# ---------------------------------------------------------------- the driver
def _calibration_scores(loaded, cfg, ctx, g, parts, plan: list[Stack]) -> dict:
    """{(stack name, block index): the granularity's score summed over the calibration data}."""
    from ..calibration import hooked_pass, load_calibration

    batches = load_calibration(loaded, cfg, ctx)
    by_name = {s.name: s for s in plan}
    probes = {(s.name, i): g.probe(block, parts) for s in plan for i, block in enumerate(s.blocks)}
    scores = {}

    def add(key, module, x, out):
        scores[key] = scores.get(key, 0) + g.calib_score(by_name[key[0]], module, x, out)

    hooked_pass(loaded.model, probes, add, batches)
    return scores


def prune_structured(loaded, cfg, ctx, granularity: str):
    """Remove `cfg.sparsity` of one granularity's units ("heads", "neurons", "layers") from
    every stack of blocks, scored on calibration data when `cfg` asks for it; reports what
    was removed."""
    g = GRANULARITIES[granularity]
    parts = check_family(loaded.family, g.name)
    plan = []
    for name, blocks, config in stacks(loaded.model):
        total, what, where, layout = g.size(loaded, name, blocks, config, parts)
        plan.append(Stack(name, blocks, config, total,
                          removed_count(total, cfg.sparsity, what, where), layout))
    use_data = cfg.importance == "calibration" or (cfg.importance is None and bool(cfg.calib))
    scores = _calibration_scores(loaded, cfg, ctx, g, parts, plan) if use_data else {}
    results = {s.name: g.apply(loaded, parts, s, scores) for s in plan}
    ctx.report.update({"method": g.name, "importance": "calibration" if scores else g.without_data,
                       g.report_key: g.finish(loaded, results)})
    return loaded
