"""The quantize methods: bitsandbytes nf4 / fp4 / int8, RTN and GPTQ weight-only, and
dynamic int8. Which layers: every Linear (and GPT-2 Conv1D) but the task heads and `skip`
patterns; `bits` may map module patterns to bits (mixed precision)."""

from __future__ import annotations

import logging

from ...core.errors import InputError
from ...core.layers import TASK_HEADS, is_linear, weight_bytes, weight_view
from ..layers import matches, target_linears
from . import compressed_tensors
from .configs import KEEP, BnbConfig, DynamicInt8Config, GPTQConfig, RTNConfig

log = logging.getLogger("mmkit")



# ---------------------------------------------------------------- which layers, how many bits
def check_quantizable(loaded) -> None:
    """Merge an adapter into its base first (saying so); refuse a model that is already
    quantized, or one without Linear layers."""
    from ...adapters.merging import merge_adapter_
    from .qlinear import QuantLinear

    model = merge_adapter_(loaded, "quantize").model
    already = getattr(model.config, "quantization_config", None) is not None or any(
        isinstance(m, QuantLinear) or type(m).__name__ in ("Linear4bit", "Linear8bitLt")
        or hasattr(m, "mmkit_aq") for m in model.modules())
    if already:
        parent = (loaded.source.manifest.get("parent") or {}).get("ref")
        raise InputError(f"'{loaded.source.ref}' is already quantized; quantizing it again would "
                         "stack rounding errors on rounded weights. Quantize its floating-point "
                         f"original instead{f' ({parent})' if parent else ''}.")
    if not any(is_linear(m) for m in model.modules()):
        raise InputError(f"'{loaded.source.ref}' has no Linear layers, so there is nothing for "
                         "weight quantization to do.")


def layer_bits(model, bits, skip: list[str]) -> dict[str, int]:
    """{layer name: bits} for every layer to quantize, from an int or a pattern mapping."""
    names = target_linears(model, skip)
    if not isinstance(bits, dict):
        return {n: bits for n in names}
    default = bits.get("default")
    patterns = {p: b for p, b in bits.items() if p != "default"}
    unused = [p for p in patterns if not any(matches(n, p) for n in names)]
    if unused:
        raise InputError(f"The bits mapping's pattern '{unused[0]}' matches no quantizable "
                         f"layer. Layer names look like {names[0]} (patterns are globs on the "
                         "full name, or a name suffix such as mlp.down_proj).")
    out = {}
    for n in names:
        b = next((b for p, b in patterns.items() if matches(n, p)), default)
        if b is None:
            raise InputError(f"The bits mapping gives no bits for layer {n}; add a 'default' "
                             "entry (e.g. default=4).")
        if b != KEEP:
            out[n] = b
    if names and not out:
        raise InputError(f"The bits mapping keeps every layer in floating point ({KEEP}), so "
                         "there is nothing to quantize; give some layers 2-8 bits.")
    return out


def _disk_mb(loaded):
    from ...core.profile import disk_bytes

    size = disk_bytes(loaded.source.path)
    return None if size is None else size / 1e6


def _report(ctx, loaded, before: int, plan: dict, errors: dict, how: dict, method: str):
    quantized = [m for n, m in loaded.model.named_modules() if n in plan]
    payload = sum(8 * sum(t.numel() * t.element_size() for t in (m.qweight, m.scales, m.zeros,
                                                                    m.g_idx))
                  for m in quantized if hasattr(m, "qweight"))
    weights = sum(m.in_features * m.out_features for m in quantized if hasattr(m, "qweight"))
    ctx.report.update({
        "method": method, "layers_quantized": len(plan),
        "bits_per_weight": payload / weights if weights else None,
        "weights_mb_before": before / 1e6, "weights_mb_after": weight_bytes(loaded.model) / 1e6,
        "disk_mb_before": _disk_mb(loaded),  # after: the manifest's weights_disk_mb
        "layers": {n: {"bits": plan[n], **errors.get(n, {}), "how": how.get(n, method)}
                   for n in plan},
    })


# ---------------------------------------------------------------- RTN, dynamic int8, GPTQ
def _quantize_layer(module, bits, group_size, symmetric, kernel="dequant"):
    from . import grid
    from .qlinear import QuantLinear

    w = weight_view(module).detach().float()
    codes, scales, zeros = grid.quantize_rows(w, bits, group_size, symmetric)
    g_idx = grid.group_index(w.shape[1], group_size)
    layer = QuantLinear.from_codes(codes, scales, zeros, g_idx, bits, module.bias, kernel)
    layer.conv1d, layer.symmetric = type(module).__name__ == "Conv1D", symmetric
    return layer.to(w.device), _weight_error(w, layer)


def _weight_error(w, layer) -> dict:
    diff = (w - layer.weight_float()).norm() / w.norm().clamp_min(1e-12)
    return {"weight_rel_error": float(diff)}


def _apply_weight_only(loaded, cfg, ctx, kernel: str, method: str):
    from .qlinear import set_module

    check_quantizable(loaded)
    model = loaded.model
    before = weight_bytes(model)
    plan = layer_bits(model, cfg.bits, cfg.skip)
    group = getattr(cfg, "group_size", None)
    compressed_tensors.check_before(model, plan, cfg)
    errors = {}
    for name, bits in plan.items():
        layer, errors[name] = _quantize_layer(model.get_submodule(name), bits, group,
                                              getattr(cfg, "symmetric", True), kernel)
        set_module(model, name, layer)
    _report(ctx, loaded, before, plan, errors, {}, method)
    _quantize_embeddings(loaded, cfg, ctx)
    compressed_tensors.choose_format_(loaded, getattr(cfg, "format", None), ctx.report)
    return loaded


def _quantize_embeddings(loaded, cfg, ctx) -> None:
    """The `embeddings` setting: the token-embedding table (and a head tied to it) on a
    per-row grid. Reported under "embeddings"; sizes in the report are updated."""
    bits = getattr(cfg, "embeddings", None)
    if not bits:
        return
    import torch

    from .qembedding import QuantEmbedding
    from .qlinear import set_module

    model = loaded.model
    table = model.get_input_embeddings()
    if not isinstance(table, torch.nn.Embedding):
        raise InputError(f"--embeddings: '{loaded.source.ref}' has no plain token-embedding "
                         f"table to quantize (its input embeddings are a "
                         f"{type(table).__name__}). Leave --embeddings out.")
    names = {id(m): n for n, m in model.named_modules()}
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is table.weight
    qtable, error = QuantEmbedding.quantize(table, bits, cfg.symmetric)
    set_module(model, names[id(table)], qtable)
    account = {"bits": bits, "table": names[id(table)], "rows": qtable.num_embeddings,
               "weight_rel_error": round(error, 6), "tied_head": None}
    if tied:
        set_module(model, names[id(head)], qtable.tied_head(head.bias))
        account["tied_head"] = names[id(head)]
    ctx.report["embeddings"] = account
    ctx.report["weights_mb_after"] = weight_bytes(model) / 1e6


def rtn_(loaded, cfg: RTNConfig, ctx):
    """Round every target weight to the nearest grid point (per group of columns)."""
    return _apply_weight_only(loaded, cfg, ctx, "dequant", "rtn")


def dynamic_int8_(loaded, cfg: DynamicInt8Config, ctx):
    """int8 per-channel symmetric weights, run by torch's dynamic int8 Linear on CPU."""
    return _apply_weight_only(loaded, cfg, ctx, "int8-dynamic", "dynamic-int8")


def gptq_(loaded, cfg: GPTQConfig, ctx):
    """GPTQ block by block on calibration data; layers outside the blocks get RTN."""
    from .. import calibration
    from . import gptq
    from .qlinear import QuantLinear, set_module

    check_quantizable(loaded)
    model = loaded.model
    before = weight_bytes(model)
    plan = layer_bits(model, cfg.bits, cfg.skip)
    compressed_tensors.check_before(model, plan, cfg)
    batches = calibration.load_calibration(loaded, cfg, ctx)
    device = next(model.parameters()).device
    errors, how = {}, {}
    names = {id(m): n for n, m in model.named_modules()}

    def quantize_block(block, run):
        targets = {names[id(m)]: m for m in block.modules() if names.get(id(m)) in plan}
        hessians = {n: gptq.HessianCollector(weight_view(m).shape[1]) for n, m in targets.items()}
        with calibration.hooked(targets, lambda n, m, x, out: hessians[n].add(x)):
            run()
        for n, m in targets.items():
            w, h = weight_view(m).detach().float(), hessians[n].h
            codes, scales, zeros, g_idx = gptq.gptq_quantize(
                w.cpu(), h, plan[n], cfg.group_size, cfg.symmetric, cfg.act_order, cfg.damp)
            layer = QuantLinear.from_codes(codes, scales.float(), zeros.float(), g_idx, plan[n],
                                           m.bias).to(device)
            layer.conv1d, layer.symmetric = type(m).__name__ == "Conv1D", cfg.symmetric
            errors[n] = {**_weight_error(w, layer), **_output_error(w, layer, h)}
            how[n] = "gptq"
            set_module(model, n, layer)

    calibration.every_block(model, batches, quantize_block, desc="gptq {stack}")
    for name in [n for n in plan if n not in how]:  # outside every block (e.g. BERT's pooler)
        layer, errors[name] = _quantize_layer(model.get_submodule(name), plan[name],
                                              cfg.group_size, cfg.symmetric)
        set_module(model, name, layer)
        how[name] = "rtn"
    _report(ctx, loaded, before, plan, errors, how, "gptq")
    _quantize_embeddings(loaded, cfg, ctx)
    ctx.report["calibration"] = {"data": cfg.calib, "samples": sum(len(next(iter(b.values())))
                                                                   for b in batches)}
    compressed_tensors.choose_format_(loaded, cfg.format, ctx.report)
    return loaded


def _output_error(w, layer, h) -> dict:
    """||(W - Q) X||^2 / ||W X||^2 on the calibration inputs, through H = 2 X X^T / n."""
    diff = (w.cpu().double() - layer.weight_float().cpu().double())
    num = (diff @ h * diff).sum()
    den = (w.cpu().double() @ h * w.cpu().double()).sum()
    return {"output_rel_error": float(num / den.clamp_min(1e-30))}


# ---------------------------------------------------------------- bitsandbytes
def bnb_apply(kind: str):
    """The apply function of one bitsandbytes method."""

    def apply(loaded, cfg: BnbConfig, ctx):
        import logging as _logging

        import torch
        from transformers import BitsAndBytesConfig

        from ...core.bnb_cpu import fit_cpu_kernels_
        from ...core.loading import auto_class, requantize

        check_quantizable(loaded)
        plan = layer_bits(loaded.model, cfg.bits, cfg.skip)
        before = weight_bytes(loaded.model)
        device = str(next(loaded.model.parameters()).device)
        skip = list(TASK_HEADS) + list(cfg.skip)
        compute = torch.bfloat16 if device.startswith("cuda") else torch.float32
        if kind == "int8":
            _logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)  # a warning per matmul
            qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        else:
            qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind,
                                    bnb_4bit_use_double_quant=cfg.double_quant,
                                    bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=skip)
        task = "zero-shot-image-classification" if loaded.kind == "clip" else loaded.task
        loaded.model = requantize(auto_class(task), loaded.model,
                                  {"quantization_config": qc, "device_map": {"": device}}).eval()
        fit_cpu_kernels_(loaded.model)
        ctx.report.update({"method": kind, "layers_quantized": len(plan), "bits_per_weight": None,
                           "disk_mb_before": _disk_mb(loaded), "weights_mb_before": before / 1e6,
                           "weights_mb_after": weight_bytes(loaded.model) / 1e6})
        return loaded

    apply.__name__ = f"{kind}_"
    return apply


nf4_, fp4_, int8_ = bnb_apply("nf4"), bnb_apply("fp4"), bnb_apply("int8")
