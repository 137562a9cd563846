"""Token merging inside a model's transformer blocks, and the setting that describes it.

Each block of the image tower merges its `r` tokens between attention and MLP (so the MLP
and every later block run on fewer tokens). The blocks stay the model's own modules, with the
same names and weights: only their class is swapped for a subclass whose forward merges
(`_merging_class`), so saving writes the plain model, a deep copy keeps merging, and a later
step (quantization, LoRA) that replaces a Linear inside a block is still used. The head-averaged
attention keys are read by a hook on the block's key projection during its own forward.

Proportional attention adds log(size) of each key token to the attention logits, passed to
the model's own attention (eager or SDPA) as an additive float mask, so a token that holds
s patches counts as s of them.

The setting (`mmkit_tokens.json`, installed by every command on load):

    {"format_version": 1, "method": "tome" | "transform", "stack": "vit.layers",
     "tokens": 197, "r": [13, 13, ...], "proportional_attention": true, "temperature": null}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...core.errors import InputError
from .matching import merge

SETTING_FILE = "mmkit_tokens.json"
FORMAT_VERSION = 1

# per family: the block's modules (pre-attention norm, attention, pre-MLP norm, MLP, dropout
# after each, key projection) and how its attention takes the mask
FAMILIES = {
    "vit": {"norm1": "layernorm_before", "attn": "attention", "norm2": "layernorm_after",
            "mlp": "mlp", "dropout": "dropout", "key": "attention.k_proj"},
    "clip": {"norm1": "layer_norm1", "attn": "self_attn", "norm2": "layer_norm2", "mlp": "mlp",
             "dropout": None, "key": "self_attn.k_proj"},
}


@dataclass
class _Run:
    """What one forward pass carries from block to block: the tokens' sizes."""

    size: torch.Tensor | None = None


@dataclass
class _BlockSetting:
    index: int
    last: bool
    r: int
    parts: dict
    proportional: bool
    temperature: float | None
    run: _Run = field(default_factory=_Run)


def _forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    """A transformer block that merges tokens between its attention and its MLP."""
    spec: _BlockSetting = self._mmkit_tokens
    parts = spec.parts
    x = hidden_states
    batch, tokens = x.shape[:2]
    size = spec.run.size if spec.index > 0 else None  # the first block starts a new pass
    if size is None or size.shape[:2] != (batch, tokens):
        size = torch.ones(batch, tokens, 1, dtype=x.dtype, device=x.device)
        merged_before = False
    else:
        merged_before = True
    if spec.proportional and merged_before:  # images carry no padding mask to combine with
        attention_mask = size.log()[:, None, None, :, 0].to(x.dtype)
    attention = self.get_submodule(parts["attn"])
    keys = []
    hook = (self.get_submodule(parts["key"]).register_forward_hook(
        lambda _m, _i, out: keys.append(out)) if spec.r > 0 else None)
    try:
        h = attention(self.get_submodule(parts["norm1"])(x), attention_mask=attention_mask,
                      **kwargs)[0]
    finally:
        if hook is not None:
            hook.remove()
    dropout = self.get_submodule(parts["dropout"]) if parts["dropout"] else (lambda t: t)
    x = x + dropout(h)
    if spec.r > 0:
        r = min(spec.r, math.ceil(tokens / 2) - 1)  # another resolution: at most what fits
        metric = keys[0].view(batch, tokens, -1, attention.head_dim).mean(dim=2)
        x, size = merge(x, size, metric, r, spec.temperature)
    spec.run.size = None if spec.last else size  # no tensor (or graph) kept after the pass
    return x + dropout(self.get_submodule(parts["mlp"])(self.get_submodule(parts["norm2"])(x)))


_CLASSES: dict[type, type] = {}


def _merging_class(cls: type) -> type:
    """The subclass of a block class whose forward merges tokens (one per class)."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"TokenMerging{cls.__name__}", (cls,), {"forward": _forward})
    return _CLASSES[cls]


# ---------------------------------------------------------------- where, and how many
def image_stack(loaded):
    """(name, blocks, vision config) of the model's image tower, or a clear error."""
    if loaded.family not in FAMILIES:
        raise InputError(f"Token merging works on image transformers (ViT, CLIP's image tower); "
                         f"'{loaded.source.ref}' is a {loaded.family} {loaded.kind} model. For "
                         "a text model, make it smaller with `mmkit prune` or `mmkit quantize`.")
    config = loaded.model.config
    config = getattr(config, "vision_config", config)
    parts = FAMILIES[loaded.family]
    for name, blocks in loaded.model.named_modules():  # whatever its Linear layers became
        if (isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0
                and all(_has(b, parts["attn"]) and _has(b, parts["mlp"]) for b in blocks)
                and (loaded.family == "vit" or "vision_model" in name)):
            return name, blocks, config
    raise InputError(f"Found no image transformer blocks in '{loaded.source.ref}'.")


def _has(module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def token_count(config) -> int:
    """Tokens entering the first block: the patches and the class token."""
    return (config.image_size // config.patch_size) ** 2 + 1


def _most(left: int) -> int:
    """The most tokens one block with `left` tokens can merge: half, less the class token."""
    return math.ceil(left / 2) - 1


def _first_over(r: list[int], tokens: int):
    """(block, excess) of the first block that merges more than it can, or None."""
    left = tokens
    for i, n in enumerate(r):
        if n > _most(left):
            return i, n - _most(left)
        left -= n
    return None


def _spread(remove: int, tokens: int, layers: int, keep: float) -> list[int]:
    """`remove` tokens over the blocks as evenly as each block allows: what a late block
    cannot merge (it has fewer tokens) moves to the earliest block that can."""
    r = [remove // layers + (i < remove % layers) for i in range(layers)]
    while (over := _first_over(r, tokens)) is not None:
        i, excess = over
        r[i] -= excess
        left = tokens
        for j in range(i):
            add = min(max(0, _most(left) - r[j]), excess)
            r[j], excess = r[j] + add, excess - add
            left -= r[j]
        if excess:
            most = tokens
            for _ in range(layers):
                most -= _most(most)
            raise InputError(f"--keep {keep:g} would leave {tokens - remove} of {tokens} tokens; "
                             f"{layers} blocks can merge down to {most} at most (each merges at "
                             f"most half of its tokens). Use --keep {most / tokens:.2f} or more.")
    return r


def _clamped(r: list[int], tokens: int) -> list[int]:
    """Each block's r, cut to what the tokens it has allow."""
    out, left = [], tokens
    for n in r:
        out.append(min(n, _most(left)))
        left -= out[-1]
    return out


def per_block_r(cfg, tokens: int, layers: int) -> list[int]:
    """The r of every block from --r / --keep / --schedule. One r (ToMe's) must fit the first
    block and is cut in late blocks to what they can merge (at most half their tokens, less
    the class token), as ToMe does; a per-block list must fit every block as given."""
    if cfg.keep is not None:
        return _spread(tokens - max(1, round(cfg.keep * tokens)), tokens, layers, cfg.keep)
    if len(cfg.r) == 1:
        if cfg.r[0] > _most(tokens):
            raise InputError(f"r = {cfg.r[0]}: the first block has {tokens} tokens, of which at "
                             f"most {_most(tokens)} (half of them, less the class token) can "
                             "merge. Use a smaller --r, or --keep.")
        if cfg.schedule == "decreasing":
            total = cfg.r[0] * layers  # 2r falling linearly to 0, the same total
            weights = [layers - i for i in range(layers)]
            r = [round(total * w / sum(weights)) for w in weights]
        else:
            r = cfg.r * layers
        return _clamped(r, tokens)  # as ToMe does: a late block merges what it can
    r = list(cfg.r)
    if len(r) != layers:
        raise InputError(f"--r lists {len(r)} values; this model's image tower has {layers} "
                         "blocks. Give one value per block, or one for all.")
    over = _first_over(r, tokens)
    if over is not None:
        i = over[0]
        left = tokens - sum(r[:i])
        raise InputError(f"r = {r[i]} in block {i + 1}, which has {left} tokens: at most "
                         f"{_most(left)} (half of them, less the class token) can merge in one "
                         "block. Use a smaller --r, or spread it over the blocks with a "
                         "per-block list (or --keep).")
    return r


# ---------------------------------------------------------------- install
def install(loaded, data: dict) -> None:
    """Make the model merge tokens as the setting says (checked against the model)."""
    name, blocks, config = image_stack(loaded)
    r = data.get("r")
    if (data.get("format_version") != FORMAT_VERSION or data.get("stack") != name
            or not isinstance(r, list) or len(r) != len(blocks)
            or data.get("method") not in ("tome", "transform")):
        raise InputError(f"{SETTING_FILE} does not fit this model (it describes "
                         f"{data.get('stack')!r} with {len(r) if isinstance(r, list) else '?'} "
                         f"blocks; the model has {name!r} with {len(blocks)}). Re-create the "
                         f"artifact with `mmkit merge-tokens`, or delete {SETTING_FILE}.")
    run = _Run()  # one per model: shared by its blocks
    for i, (block, n) in enumerate(zip(blocks, r)):
        base = type(block).__mro__[1] if type(block) in _CLASSES.values() else type(block)
        block.__class__ = _merging_class(base)
        block._mmkit_tokens = _BlockSetting(i, i == len(blocks) - 1, int(n),
                                            FAMILIES[loaded.family],
                                            bool(data.get("proportional_attention")),
                                            data.get("temperature"), run)


def setting(loaded, cfg, method: str) -> dict:
    """The setting a config makes for this model."""
    name, blocks, config = image_stack(loaded)
    tokens = token_count(config)
    proportional = cfg.proportional_attention
    if proportional is None:
        proportional = loaded.kind == "vision"  # a supervised classifier; CLIP: off
    return {"format_version": FORMAT_VERSION, "method": method, "stack": name,
            "tokens": tokens, "r": per_block_r(cfg, tokens, len(blocks)),
            "proportional_attention": proportional,
            "temperature": getattr(cfg, "temperature", None)}
