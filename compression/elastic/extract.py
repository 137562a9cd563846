"""`mmkit extract`: cut a standalone smaller model out of an elastic super-network.

The sub-network keeps each layer's first FFN neurons and key/value heads (the super-network
put the important ones first) and the layers its depth keeps. With one width for every layer
the config can state the new sizes (intermediate_size, num_hidden_layers, and the head count
for ViT and Llama), so the result is a plain Hugging Face model; BERT and CLIP derive their
head size from hidden_size / heads, and per-layer widths (Mix'n'Match) differ by layer, so
those are written in mmkit's pruned format (`mmkit_prune.json`), which every mmkit command
loads.
"""

from __future__ import annotations

from pathlib import Path

from ...core.errors import InputError, shown
from ..prune import slicing
from ..prune.structured import HEADS_IN_CONFIG
from .widths import Cut, model_stacks

PER_LAYER_BYTES = 1 << 20


def space_of(loaded):
    """The super-network's space, or the error for a model that is not one."""
    space = loaded.extra.get("elastic")
    if space is None:
        raise InputError(f"'{shown(loaded.source.ref)}' is not an elastic super-network (it has "
                         "no mmkit_elastic.json): only a model trained with `mmkit finetune "
                         "--elastic` has sub-networks to extract. To make any model smaller, "
                         "use `mmkit prune --method heads|neurons|layers`.")
    return space


def check_cut(space, cut: Cut) -> None:
    """A cut must be one the super-network was trained for."""
    trained = space.space
    problems = []
    for what, value in (("ffn", cut.ffn), ("heads", cut.heads)):
        if not any(abs(value - v) < 1e-9 for v in trained["ffn" if what == "ffn" else "heads"]):
            problems.append(f"--{what} {value:g}")
    if cut.depth is not None and cut.depth not in [int(d) for d in trained["depth"]]:
        problems.append(f"--depth {cut.depth}")
    for stack, layers in (cut.per_layer or {}).items():
        for i, (f, h) in enumerate(layers):
            if not any(abs(f - v) < 1e-9 for v in trained["ffn"]) or \
                    not any(abs(h - v) < 1e-9 for v in trained["heads"]):
                problems.append(f"layer {i} of the per-layer file (ffn {f:g}, heads {h:g})")
    if problems:
        raise InputError(f"{', '.join(problems[:3])} lies outside the space this super-network "
                         f"was trained for ({space.text()}); its other sub-networks were never "
                         "trained. Pick values from that space.")


def read_per_layer(path: str, stacks_) -> dict:
    """{stack name: [(ffn, heads) per layer]} from a per-layer file ({ffn: [...], heads:
    [...]}: one value per layer of the full stack, a missing key meaning 1)."""
    import yaml

    file = Path(path)
    try:
        if file.stat().st_size > PER_LAYER_BYTES:
            raise InputError(f"{shown(path)} is too large to be a per-layer width file.")
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise InputError(f"Cannot read the per-layer file {shown(path)}: "
                         f"{shown(str(exc).splitlines()[0] if str(exc) else exc)}. Write it as "
                         "JSON or YAML: {ffn: [0.5, 1, ...], heads: [1, 0.75, ...]}.") from None
    if not isinstance(data, dict) or not data or set(data) - {"ffn", "heads"}:
        raise InputError(f"{shown(path)} must map ffn and / or heads to a list with one "
                         "fraction per layer, e.g. {ffn: [0.5, 1, 0.5, 1], heads: [1, 1, 0.75, "
                         "1]}.")
    out = {}
    for stack in stacks_:
        n = len(stack.blocks)
        columns = []
        for key in ("ffn", "heads"):
            values = data.get(key, [1.0] * n)
            ok = isinstance(values, list) and len(values) == n and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1
                for v in values)
            if not ok:
                raise InputError(f"{shown(path)}: '{key}' must list {n} fractions in (0, 1], one "
                                 f"per layer of {stack.name}.")
            columns.append([float(v) for v in values])
        out[stack.name] = list(zip(*columns))
    return out


def extract_(loaded, cfg, ctx):
    """Cut the sub-network `cfg` asks for out of the loaded super-network, in place."""
    space = space_of(loaded)
    stacks_ = model_stacks(loaded, "extract")
    described = {name: (st.layers, st.ffn, st.kv_heads) for name, st in space.stacks.items()}
    if described != {s.name: (len(s.blocks), s.ffn, s.kv_heads) for s in stacks_}:
        raise InputError(f"{loaded.source.ref}: its mmkit_elastic.json describes other layers "
                         "than the model has; the artifact is damaged. Re-create it.")
    per_layer = read_per_layer(cfg.per_layer, stacks_) if cfg.per_layer else None
    cut = Cut(cfg.ffn, cfg.heads, cfg.depth, per_layer)
    check_cut(space, cut)
    before = sum(p.numel() for p in loaded.model.parameters())
    for stack in stacks_:
        drop_order = space.stacks[stack.name].drop_order
        keep = stack.kept_layers(cut.depth, drop_order)
        for i in keep:
            ffn, kv = stack.widths(cut, i)
            block = stack.blocks[i]
            slicing.prune_neurons_(block, stack.parts, list(range(ffn)))
            slicing.prune_heads_(block, stack.parts, loaded.family, list(range(kv)),
                                 stack.heads, stack.kv_heads, stack.head_dim)
        slicing.drop_layers_(stack.blocks, keep)
        _describe(loaded, stack, cut, keep)
    loaded.extra.pop("elastic", None)  # the result is one sub-network, not a super-network
    uniform = per_layer is None
    if not uniform or loaded.family not in HEADS_IN_CONFIG:
        loaded.extra["format"] = "mmkit-pruned"
        loaded.extra.setdefault("pruned", {})["attention"] = _attention_layout(stacks_)
    after = sum(p.numel() for p in loaded.model.parameters())
    ctx.report.update({"subnetwork": cut.name(), "space": space.space,
                       "parameters_before": before, "parameters_after": after,
                       "parameter_fraction": after / before,
                       "format": "plain" if loaded.extra.get("format") is None else
                       loaded.extra["format"]})
    return loaded


def _describe(loaded, stack, cut: Cut, keep: list[int]) -> None:
    """Set the config's sizes where one width holds for every layer."""
    config = stack.config
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    if cut.per_layer:
        return
    ffn, kv = stack.widths(cut, keep[0])
    config.intermediate_size = ffn
    if loaded.family in HEADS_IN_CONFIG:
        config.head_dim = stack.head_dim
        config.num_attention_heads = kv * (stack.heads // stack.kv_heads)
        if getattr(config, "num_key_value_heads", None):
            config.num_key_value_heads = kv


def _attention_layout(stacks_) -> dict:
    """{attention module name: {heads, kv_heads, head_dim}} after the cut (renumbered)."""
    layout = {}
    for stack in stacks_:
        rep = stack.heads // stack.kv_heads
        for i, block in enumerate(stack.blocks):
            rows = block.get_submodule(stack.parts["k"]).weight.shape[0]
            kv = rows // stack.head_dim
            layout[f"{stack.name}.{i}.{stack.parts['attn']}"] = {
                "heads": kv * rep, "kv_heads": kv, "head_dim": stack.head_dim}
    return layout
