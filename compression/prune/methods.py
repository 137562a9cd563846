"""The prune methods: magnitude, wanda, nm (unstructured, masks applied to the weights) and
heads, neurons, layers (structured, tensors sliced)."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field, model_validator

from ...core.errors import InputError
from ...core.registry import MethodConfig
from ..layers import target_linears
from . import structured as st
from . import unstructured as un

log = logging.getLogger("mmkit")


class _Calib(MethodConfig):
    calib: str | None = Field(None, description="calibration data (any --data reference)")
    calib_samples: int = Field(64, ge=1)
    calib_length: int = Field(128, ge=8)


class MagnitudeConfig(MethodConfig):
    """Zero the smallest weights, in each layer or across all layers."""

    sparsity: float = Field(0.5, ge=0, lt=1)
    scope: Literal["layer", "global"] = "layer"
    skip: list[str] = Field(default_factory=list)


class WandaConfig(_Calib):
    """Zero the weights with the smallest |W| x input-activation norm, per output row."""

    sparsity: float = Field(0.5, ge=0, lt=1)
    skip: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _needs_calib(self):
        if not self.calib:
            raise ValueError("wanda scores weights by their input activations: pass --calib D")
        return self


class NMConfig(_Calib):
    """N:M sparsity: N of every M consecutive input weights kept (2:4 runs on sparse tensor
    cores)."""

    nm: str = Field("2:4", description="N:M")
    score: Literal["magnitude", "wanda"] = "magnitude"
    skip: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self):
        n, _, m = self.nm.partition(":")
        if not (n.isdigit() and m.isdigit()):
            raise ValueError(f"nm must look like 2:4, not '{self.nm}'")
        if not 0 < int(n) < int(m):
            raise ValueError(f"N:M needs 0 < N < M (it keeps N of every M weights); got {self.nm}")
        if self.score == "wanda" and not self.calib:
            raise ValueError("score wanda needs calibration data: pass --calib D")
        return self


class StructuredConfig(_Calib):
    """Remove a fraction of attention heads, FFN neurons or layers."""

    sparsity: float = Field(0.25, ge=0, lt=1, description="fraction removed")
    importance: Literal["weights", "calibration"] | None = Field(
        None, description="default: calibration when --calib is given, else weights")

    @model_validator(mode="after")
    def _check(self):
        if self.importance == "calibration" and not self.calib:
            raise ValueError("importance calibration needs calibration data: pass --calib D")
        return self


# ---------------------------------------------------------------- shared
def _check_model(loaded) -> None:
    """Merge an adapter into its base first (saying so); refuse a quantized model."""
    from ...adapters.merging import merge_adapter_

    model = merge_adapter_(loaded, "prune").model
    if loaded.extra.get("format") in ("mmkit-quantized", "mmkit-ptq") or getattr(
            model.config, "quantization_config", None) is not None:
        raise InputError(f"'{loaded.source.ref}' is a quantized model; prune its "
                         "floating-point original, then quantize.")


def _batches(loaded, cfg, ctx):
    from ...core.data import load_data
    from ..quantize.calibrate import calibration_batches

    data = load_data(cfg.calib, loaded.task, seed=ctx.seed, max_samples=cfg.calib_samples)
    return calibration_batches(loaded, data, cfg.calib_samples, cfg.calib_length)


def _sparsity_report(ctx, model, names, method):
    modules = dict(model.named_modules())
    per_layer = {n: un.sparsity_of(modules[n]) for n in names}
    total = sum(modules[n].weight.numel() for n in names)
    zeros = sum(per_layer[n] * modules[n].weight.numel() for n in names)
    ctx.report.update({"method": method, "layers_pruned": len(names),
                       "sparsity": zeros / total if total else 0.0, "layer_sparsity": per_layer})


# ---------------------------------------------------------------- unstructured
def magnitude_(loaded, cfg: MagnitudeConfig, ctx):
    """Magnitude pruning, per layer or with one global threshold."""
    _check_model(loaded)
    model = loaded.model
    names = target_linears(model, cfg.skip)
    modules = dict(model.named_modules())
    scores = {n: un.magnitude_scores(modules[n]) for n in names}
    if cfg.scope == "global":
        cut = un.global_threshold(list(scores.values()), cfg.sparsity)
        for n in names:
            un.apply_mask_(modules[n], scores[n] > cut)
    else:
        for n in names:
            un.apply_mask_(modules[n], un.layer_mask(scores[n], cfg.sparsity))
    _sparsity_report(ctx, model, names, "magnitude")
    return loaded


def _wanda_pass(loaded, cfg, ctx, names, make_mask):
    """Block by block: input norms on the pruned model so far, then prune the block."""
    from ..quantize import calibrate

    model = loaded.model
    batches = _batches(loaded, cfg, ctx)
    device = next(model.parameters()).device
    ids = {id(m): n for n, m in model.named_modules()}
    wanted, done = set(names), set()

    def prune_block(block, run):
        targets = {ids[id(m)]: m for m in block.modules() if ids.get(id(m)) in wanted}
        sums = {n: 0 for n in targets}

        def record(n):
            def hook(mod, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                sums[n] = sums[n] + (x * x).sum(0)
            return hook

        hooks = [m.register_forward_pre_hook(record(n)) for n, m in targets.items()]
        run()
        for h in hooks:
            h.remove()
        for n, m in targets.items():
            un.apply_mask_(m, make_mask(un.wanda_scores(m, sums[n].sqrt())))
            done.add(n)

    for _, blocks in calibrate.block_stacks(model):
        calibrate.run_blocks(blocks, calibrate.capture_inputs(model, blocks, batches, device),
                             prune_block, desc="wanda")
    rest = [n for n in names if n not in done]  # outside every block (e.g. BERT's pooler)
    if rest:
        norms = un.input_norms(model, rest, batches)
        for n in rest:
            m = model.get_submodule(n)
            un.apply_mask_(m, make_mask(un.wanda_scores(m, norms[n])))


def wanda_(loaded, cfg: WandaConfig, ctx):
    """Wanda (Sun et al. 2023): |W| x ||X||, per output row, block by block."""
    _check_model(loaded)
    names = target_linears(loaded.model, cfg.skip)
    _wanda_pass(loaded, cfg, ctx, names, lambda s: un.row_mask(s, cfg.sparsity))
    _sparsity_report(ctx, loaded.model, names, "wanda")
    return loaded


def nm_(loaded, cfg: NMConfig, ctx):
    """N:M sparsity with magnitude or Wanda scores."""
    _check_model(loaded)
    n, m = (int(x) for x in cfg.nm.split(":"))
    model = loaded.model
    names = target_linears(model, cfg.skip)
    widths = {name: un.weight_of(model.get_submodule(name)).shape[1] for name in names}
    misfit = [name for name, w in widths.items() if w % m]
    if misfit:
        raise InputError(f"N:M {cfg.nm} needs input widths that are multiples of {m}; "
                         f"{misfit[0]} has {widths[misfit[0]]}. Skip it with --skip.")
    if cfg.score == "wanda":
        _wanda_pass(loaded, cfg, ctx, names, lambda s: un.nm_mask(s, n, m))
    else:
        for name in names:
            module = model.get_submodule(name)
            un.apply_mask_(module, un.nm_mask(un.magnitude_scores(module), n, m))
    _sparsity_report(ctx, model, names, f"nm {cfg.nm}")
    return loaded


# ---------------------------------------------------------------- structured
def _count(total: int, sparsity: float, what: str, where: str) -> int:
    remove = round(total * sparsity)
    if remove >= total:
        raise InputError(f"--sparsity {sparsity} would remove all {total} {what} of {where}; "
                         f"use a smaller sparsity (below {(total - 0.5) / total:.2f}).")
    return remove


def _calib_importance(loaded, cfg, ctx, collect):
    """Run the calibration data with the hooks `collect()` registers (they store scores)."""
    from ..quantize.calibrate import run_batches

    batches = _batches(loaded, cfg, ctx)
    run_batches(loaded.model, batches, collect())


def _use_calibration(cfg) -> bool:
    return cfg.importance == "calibration" or (cfg.importance is None and bool(cfg.calib))


def heads_(loaded, cfg: StructuredConfig, ctx):
    """Remove the least important attention heads (key/value groups for Llama) of every layer."""
    _check_model(loaded)
    parts = st.check_family(loaded.family, "heads")
    model = loaded.model
    plans = []
    for name, blocks, config in st.stacks(model):
        heads, kv, head_dim = st.head_layout(config, loaded.family)
        remove = _count(kv, cfg.sparsity, "key/value heads" if kv < heads else "heads",
                        f"each layer of {name}")
        plans.append((name, blocks, config, heads, kv, head_dim, remove))
    scores = {}
    if _use_calibration(cfg):
        def collect():
            hooks = []
            for name, blocks, _, heads, kv, head_dim, _ in plans:
                for i, block in enumerate(blocks):
                    o = block.get_submodule(parts["o"])

                    def hook(mod, args, key=(name, i), h=heads, k=kv, d=head_dim):
                        # each head's share of the output projection: ||ctx_h W_o[:, h]^T||^2
                        context = args[0].detach().float().reshape(-1, h, d)
                        w = mod.weight.detach().float().reshape(mod.weight.shape[0], h, d)
                        share = torch.einsum("thd,ohd->tho", context, w).pow(2).sum((0, 2))
                        scores[key] = scores.get(key, 0) + share.reshape(k, h // k).sum(1)
                    hooks.append(o.register_forward_pre_hook(hook))
            return hooks
        _calib_importance(loaded, cfg, ctx, collect)
    layout = {}
    for name, blocks, config, heads, kv, head_dim, remove in plans:
        for i, block in enumerate(blocks):
            score = scores.get((name, i))
            if score is None:
                score = st.head_weight_importance(block, parts, heads, kv, head_dim)
            keep = torch.topk(score, kv - remove).indices.tolist()
            layout[f"{name}.{i}.{parts['attn']}"] = st.prune_heads_(
                block, parts, loaded.family, keep, heads, kv, head_dim)
        if loaded.family in st.HEADS_IN_CONFIG:
            rep = heads // kv
            config.head_dim = head_dim
            config.num_attention_heads = (kv - remove) * rep
            if getattr(config, "num_key_value_heads", None):
                config.num_key_value_heads = kv - remove
    if loaded.family not in st.HEADS_IN_CONFIG:
        loaded.extra["format"] = "mmkit-pruned"
        loaded.extra.setdefault("pruned", {})["attention"] = layout
    ctx.report.update({"method": "heads", "importance": "calibration" if scores else "weights",
                       "attention": layout})
    return loaded


def neurons_(loaded, cfg: StructuredConfig, ctx):
    """Remove the least important FFN intermediate neurons of every layer."""
    _check_model(loaded)
    parts = st.check_family(loaded.family, "neurons")
    model = loaded.model
    plans = []
    for name, blocks, config in st.stacks(model):
        width = blocks[0].get_submodule(parts["ffn_out"]).weight.shape[1]
        plans.append((name, blocks, config, width, _count(width, cfg.sparsity, "neurons",
                                                          f"each FFN of {name}")))
    scores = {}
    if _use_calibration(cfg):
        def collect():
            hooks = []
            for name, blocks, *_ in plans:
                for i, block in enumerate(blocks):
                    out = block.get_submodule(parts["ffn_out"])

                    def hook(mod, args, key=(name, i)):
                        act = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().sum(0)
                        scores[key] = scores.get(key, 0) + act * mod.weight.detach().float() \
                            .pow(2).sum(0).sqrt()
                    hooks.append(out.register_forward_pre_hook(hook))
            return hooks
        _calib_importance(loaded, cfg, ctx, collect)
    for name, blocks, config, width, remove in plans:
        for i, block in enumerate(blocks):
            score = scores.get((name, i))
            if score is None:
                score = st.neuron_weight_importance(block, parts)
            st.prune_neurons_(block, parts, torch.topk(score, width - remove).indices.tolist())
        config.intermediate_size = width - remove
    ctx.report.update({"method": "neurons", "importance": "calibration" if scores else "weights",
                       "intermediate_size": {name: width - remove
                                             for name, _, _, width, remove in plans}})
    return loaded


def layers_(loaded, cfg: StructuredConfig, ctx):
    """Remove whole layers: those that change their input least on calibration data (cosine
    similarity of a block's input and output), or without data the ones just below the top."""
    _check_model(loaded)
    st.check_family(loaded.family, "layers")
    model = loaded.model
    plans = []
    for name, blocks, config in st.stacks(model):
        plans.append((name, blocks, config, _count(len(blocks), cfg.sparsity, "layers", name)))
    sims = {}
    if _use_calibration(cfg):
        def collect():
            hooks = []
            for name, blocks, *_ in plans:
                for i, block in enumerate(blocks):
                    def hook(mod, args, kwargs, out, key=(name, i)):
                        x = args[0] if args else kwargs["hidden_states"]
                        y = out[0] if isinstance(out, tuple) else out
                        cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
                        sims[key] = sims.get(key, 0) + float(cos.mean())
                    hooks.append(block.register_forward_hook(hook, with_kwargs=True))
            return hooks
        _calib_importance(loaded, cfg, ctx, collect)
    removed = {}
    for name, blocks, config, remove in plans:
        n = len(blocks)
        if sims:  # most similar input and output = least needed
            order = sorted(range(n), key=lambda i: -sims[(name, i)])
            drop = sorted(order[:remove])
        else:  # keep the first and the last layer as long as possible; drop from the top down
            drop = sorted(([*range(n - 2, 0, -1), n - 1, 0])[:remove])
        st.drop_layers_(blocks, [i for i in range(n) if i not in drop])
        config.num_hidden_layers = n - remove
        if getattr(config, "layer_types", None):
            config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in drop]
        removed[name] = drop
    ctx.report.update({"method": "layers", "importance": "calibration" if sims else "position",
                       "removed_layers": removed})
    return loaded
