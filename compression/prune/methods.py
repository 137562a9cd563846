"""The prune methods: magnitude, wanda, nm (unstructured, masks applied to the weights) and
heads, neurons, layers (structured, tensors sliced)."""

from __future__ import annotations

import logging

from ...core.errors import InputError
from ...core.layers import weight_view
from ..layers import target_linears
from . import structured as st
from . import unstructured as un
from .configs import MagnitudeConfig, NMConfig, StructuredConfig, WandaConfig

log = logging.getLogger("mmkit")


# ---------------------------------------------------------------- shared
def _check_model(loaded) -> None:
    """Merge an adapter into its base first (saying so); refuse a quantized model."""
    from ...adapters.merging import merge_adapter_

    model = merge_adapter_(loaded, "prune").model
    if loaded.extra.get("format") in ("mmkit-quantized", "mmkit-ptq",
                                      "compressed-tensors") or getattr(
            model.config, "quantization_config", None) is not None:
        raise InputError(f"'{loaded.source.ref}' is a quantized model; prune its "
                         "floating-point original, then quantize.")


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
    from ..calibration import every_block, fold_inputs, hooked, load_calibration

    model = loaded.model
    batches = load_calibration(loaded, cfg, ctx)
    ids = {id(m): n for n, m in model.named_modules()}
    wanted, done = set(names), set()

    def prune_block(block, run):
        targets = {ids[id(m)]: m for m in block.modules() if ids.get(id(m)) in wanted}
        sums = {}
        with hooked(targets, fold_inputs(sums, un.sum_squares)):
            run()
        for n, m in targets.items():
            un.apply_mask_(m, make_mask(un.wanda_scores(m, sums[n].sqrt())))
            done.add(n)

    every_block(model, batches, prune_block, desc="wanda")
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
    widths = {name: weight_view(model.get_submodule(name)).shape[1] for name in names}
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
def heads_(loaded, cfg: StructuredConfig, ctx):
    """Remove the least important attention heads (key/value groups for Llama) of every layer."""
    _check_model(loaded)
    return st.prune_structured(loaded, cfg, ctx, "heads")


def neurons_(loaded, cfg: StructuredConfig, ctx):
    """Remove the least important FFN intermediate neurons of every layer."""
    _check_model(loaded)
    return st.prune_structured(loaded, cfg, ctx, "neurons")


def layers_(loaded, cfg: StructuredConfig, ctx):
    """Remove whole layers: those that change their input least on calibration data (cosine
    similarity of a block's input and output), or without data the ones just below the top."""
    _check_model(loaded)
    return st.prune_structured(loaded, cfg, ctx, "layers")
