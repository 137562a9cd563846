"""Running a super-network as one of its sub-networks, without copying it.

Each attention and FFN Linear of every block becomes, for the time of training, an
`ElasticLinear`: the same module (same parameters, same state-dict names) whose forward can
use only a prefix of its output rows or input columns. A `Cut` (kept FFN fraction, kept head
fraction, depth) sets those prefixes in every block and, for a smaller depth, takes the
dropped blocks out of their ModuleList; `active` restores the full network afterwards. A
sub-network's forward and backward really cost less than the full network's: that is what
keeps elastic training within 2x of dense fine-tuning.

Attention modules of the families mmkit slices (BERT, ViT, CLIP, Llama) reshape their
projections as (-1 heads, head size), so fewer q/k/v rows mean fewer heads with no other
change; a Llama block keeps whole key/value groups with their query heads.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ...core.errors import InputError
from ..prune.structured import PARTS, head_layout, stacks


class ElasticLinear(torch.nn.Linear):
    """A Linear that may run on its first `keep_out` rows and / or first `keep_in` columns."""

    keep_out: int | None = None
    keep_in: int | None = None

    def forward(self, x):
        w, b = self.weight, self.bias
        if self.keep_out is not None:
            w = w[:self.keep_out]
            b = None if b is None else b[:self.keep_out]
        if self.keep_in is not None:
            w = w[:, :self.keep_in]
        return torch.nn.functional.linear(x, w, b)


@dataclass(frozen=True)
class Cut:
    """One sub-network: the fraction of FFN neurons and of key/value heads each layer keeps
    (a prefix), and the layers each stack keeps (None: all). `per_layer` ({stack: [(ffn,
    heads) per layer of the full stack]}) overrides the uniform fractions (Mix'n'Match)."""

    ffn: float = 1.0
    heads: float = 1.0
    depth: int | None = None
    per_layer: dict | None = field(default=None, compare=False, hash=False)

    def name(self) -> str:
        """'ffn 0.5 heads 0.75 depth 4'."""
        depth = "all" if self.depth is None else self.depth
        return f"ffn {self.ffn:g} heads {self.heads:g} depth {depth}" + (
            " per-layer" if self.per_layer else "")


def kept(total: int, fraction: float) -> int:
    """Units a fraction keeps of `total`: round(fraction x total), at least one."""
    return max(1, min(total, round(total * fraction)))


@dataclass
class Stack:
    """One stack of blocks of a model, with what slicing it needs to know."""

    name: str
    blocks: torch.nn.ModuleList
    config: object
    parts: dict  # the block's module paths (structured.PARTS)
    heads: int  # query heads per layer
    kv_heads: int
    head_dim: int
    ffn: int  # FFN neurons per layer

    def kept_layers(self, depth: int | None, drop_order: list[int]) -> list[int]:
        """The indices of the blocks a depth keeps, in order."""
        n = len(self.blocks)
        if depth is None or depth >= n:
            return list(range(n))
        dropped = set(drop_order[:n - depth])
        return [i for i in range(n) if i not in dropped]

    def widths(self, cut: Cut, layer: int) -> tuple[int, int]:
        """(FFN neurons, key/value heads) the cut keeps in one layer of the full stack."""
        ffn, heads = cut.ffn, cut.heads
        if cut.per_layer and self.name in cut.per_layer:
            ffn, heads = cut.per_layer[self.name][layer]
        return kept(self.ffn, ffn), kept(self.kv_heads, heads)


def model_stacks(loaded, what: str = "Elastic training") -> list[Stack]:
    """The model's stacks of blocks, or a clear error for a family mmkit cannot slice."""
    if loaded.family not in PARTS:
        raise InputError(f"{what} slices the blocks of {', '.join(PARTS)} models; this is a "
                         f"{loaded.family} model. Fine-tune it with --full (or a PEFT method) "
                         "and make it smaller with `mmkit prune` (unstructured methods work on "
                         "every family) or `mmkit quantize`.")
    parts = PARTS[loaded.family]
    out = []
    for name, blocks, config in stacks(loaded.model):
        heads, kv, head_dim = head_layout(config, loaded.family)
        widths = {(b.get_submodule(parts["ffn_out"]).weight.shape[1],
                   b.get_submodule(parts["k"]).weight.shape[0]) for b in blocks}
        if len(widths) > 1:  # e.g. a model pruned to per-layer widths
            raise InputError(f"{what} needs the same FFN width and head count in every layer "
                             f"of {name}; this model's differ by layer (pruned per layer?). "
                             "Start from a model with uniform layers.")
        # the layers' own sizes: a uniformly pruned BERT keeps its config's head count
        (width, kv_rows), rep = widths.pop(), heads // kv
        kv = kv_rows // head_dim
        out.append(Stack(name, blocks, config, parts, kv * rep, kv, head_dim, width))
    if not out:
        raise InputError(f"{what}: found no stack of transformer blocks in this "
                         f"{loaded.family} model.")
    return out


def _linears(stack: Stack, block):
    p = stack.parts
    return ([block.get_submodule(p[k]) for k in "qkvo"]
            + [block.get_submodule(n) for n in p["ffn_in"]] + [block.get_submodule(p["ffn_out"])])


def install_(stacks_: list[Stack]) -> None:
    """Make every attention / FFN Linear of every block elastic (same parameters)."""
    for stack in stacks_:
        for block in stack.blocks:
            for linear in _linears(stack, block):
                if type(linear) is not torch.nn.Linear:
                    raise InputError(f"Elastic training needs plain Linear layers; this model's "
                                     f"are {type(linear).__name__} (quantized or adapted?). Start "
                                     "from a full-precision model without an adapter.")
                linear.__class__ = ElasticLinear


def uninstall_(stacks_: list[Stack]) -> None:
    """Turn the elastic layers back into plain Linear layers."""
    for stack in stacks_:
        for block in stack.blocks:
            for linear in _linears(stack, block):
                if isinstance(linear, ElasticLinear):
                    linear.__dict__.pop("keep_out", None)
                    linear.__dict__.pop("keep_in", None)
                    linear.__class__ = torch.nn.Linear


def _set_widths(stack: Stack, block, ffn: int | None, kv: int | None) -> None:
    p = stack.parts
    q_rows = None if kv is None else kv * (stack.heads // stack.kv_heads) * stack.head_dim
    kv_rows = None if kv is None else kv * stack.head_dim
    block.get_submodule(p["q"]).keep_out = q_rows
    block.get_submodule(p["k"]).keep_out = kv_rows
    block.get_submodule(p["v"]).keep_out = kv_rows
    block.get_submodule(p["o"]).keep_in = q_rows
    for name in p["ffn_in"]:
        block.get_submodule(name).keep_out = ffn
    block.get_submodule(p["ffn_out"]).keep_in = ffn


@contextmanager
def active(stacks_: list[Stack], cut: Cut, drop_orders: dict[str, list[int]]):
    """While inside, the model (made elastic by `install_`) runs as the sub-network `cut`."""
    saved = []
    try:
        for stack in stacks_:
            for i, block in enumerate(stack.blocks):
                ffn, kv = stack.widths(cut, i)
                _set_widths(stack, block, ffn if ffn < stack.ffn else None,
                            kv if kv < stack.kv_heads else None)
            keep = stack.kept_layers(cut.depth, drop_orders[stack.name])
            if len(keep) < len(stack.blocks):
                saved.append((stack.blocks, list(stack.blocks)))
                _replace(stack.blocks, [stack.blocks[i] for i in keep])
        yield
    finally:
        for blocks, original in saved:
            _replace(blocks, original)
        for stack in stacks_:
            for block in stack.blocks:
                _set_widths(stack, block, None, None)


def _replace(blocks: torch.nn.ModuleList, modules: list) -> None:
    while len(blocks):
        del blocks[len(blocks) - 1]
    for m in modules:
        blocks.append(m)
