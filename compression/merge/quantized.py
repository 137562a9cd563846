"""Merging quantized models: dequantize, merge in floating point, quantize again.

A quantized input (mmkit-quantized RTN / GPTQ / dynamic-int8 layers, or a bitsandbytes
nf4 / fp4 / int8 model) is turned back into floating-point layers before its tensors are read.
A quantized base is too, and the merged model is quantized again in the base's own format:
- mmkit-quantized: each layer on the grid it had (bits, group size, symmetric or not, kernel),
  by round-to-nearest: a GPTQ base is re-rounded without calibration data, and the report says
  so; run `mmkit quantize --method gptq` on a floating-point merge for GPTQ's rounding.
- bitsandbytes: the same quantization type, double quantization and skipped modules.
The report gives the re-quantization's relative weight error per layer (mean and worst), the
error of the result against the floating-point merge.
"""

from __future__ import annotations

import logging

from ...core.errors import InputError

log = logging.getLogger("mmkit")


def quantization_of(loaded) -> str | None:
    """"mmkit-quantized", "bitsandbytes", "mmkit-ptq" or None: how the loaded model is
    quantized."""
    from ..quantize.qlinear import QuantLinear

    model = loaded.model
    if loaded.extra.get("format") == "mmkit-ptq":
        return "mmkit-ptq"
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        return "mmkit-quantized"
    if getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config",
                                                        None) is not None:
        return "bitsandbytes"
    return None


def dequantize_(loaded, what: str) -> dict | None:
    """Turn a quantized model's layers back into floating point, in place; returns how to
    quantize it again (None for a floating-point model). `what` names the model in errors."""
    kind = quantization_of(loaded)
    if kind is None:
        return None
    if kind == "mmkit-ptq":
        raise InputError(f"{what} carries activation-quantization grids (mmkit ptq) calibrated "
                         "for its own weights; a merge changes the weights, so the grids would "
                         "be wrong. Merge the floating-point models, then run mmkit quantize "
                         "--method ptq on the result.")
    if kind == "mmkit-quantized":
        plan = _dequantize_mmkit(loaded.model)
    else:
        plan = _dequantize_bnb(loaded)
    loaded.extra.pop("format", None)
    log.info("merge: dequantized %s (%s)", what, kind)
    return {"format": kind, **plan}


def _dequantize_mmkit(model) -> dict:
    import torch
    from transformers.pytorch_utils import Conv1D

    from ..quantize.qlinear import QuantLinear, set_module

    layers = {}
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]:
        groups = layer.scales.shape[1]
        symmetric = layer.symmetric  # recorded since mmkit 0.2; before, read off the zeros
        if symmetric is None:
            symmetric = bool((layer.zeros == 2 ** (layer.bits - 1)).all())
        layers[name] = {"bits": layer.bits, "kernel": layer.kernel, "symmetric": symmetric,
                        "group_size": -(-layer.in_features // groups) if groups > 1 else None}
        w = layer.weight_float()
        dtype = layer.bias.dtype if layer.bias is not None else torch.float32
        if getattr(layer, "conv1d", False):
            new = Conv1D(layer.out_features, layer.in_features)
            new.weight = torch.nn.Parameter(w.T.contiguous().to(dtype))
        else:
            new = torch.nn.Linear(layer.in_features, layer.out_features,
                                  bias=layer.bias is not None, dtype=dtype)
            new.weight = torch.nn.Parameter(w.to(dtype))
        if layer.bias is not None:
            new.bias = torch.nn.Parameter(layer.bias.detach().clone())
        set_module(model, name, new.to(w.device))
    return {"layers": layers}


def _dequantize_bnb(loaded) -> dict:
    config = loaded.model.config.quantization_config
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if config.get("load_in_8bit"):
        kind = "int8"
    else:
        kind = config.get("bnb_4bit_quant_type", "nf4")
    loaded.model = _plain_copy(loaded.model.dequantize())
    return {"kind": kind, "double_quant": bool(config.get("bnb_4bit_use_double_quant")),
            "skip": [s for s in config.get("llm_int8_skip_modules") or []]}


def _plain_copy(model):
    """The same weights in a model built from its config alone: a dequantized model keeps
    transformers' quantizer state, which refuses to save it again."""
    import torch

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), assign=True, strict=False)
    plain.tie_weights()
    return plain.eval()


def requantize_(loaded, plan: dict, ctx) -> dict:
    """Quantize the merged model again as `plan` says; returns the report's account."""
    if plan["format"] == "mmkit-quantized":
        return _requantize_mmkit(loaded, plan)
    return _requantize_bnb(loaded, plan, ctx)


def _requantize_mmkit(loaded, plan) -> dict:
    from ..quantize.methods import _quantize_layer
    from ..quantize.qlinear import set_module

    errors = {}
    for name, spec in plan["layers"].items():
        layer, error = _quantize_layer(loaded.model.get_submodule(name), spec["bits"],
                                       spec["group_size"], spec["symmetric"], spec["kernel"])
        set_module(loaded.model, name, layer)
        errors[name] = error["weight_rel_error"]
    loaded.extra["format"] = "mmkit-quantized"
    return {"format": "mmkit-quantized", "method": "rtn on each layer's own grid",
            "layers": len(errors), **_spread(errors)}


def _requantize_bnb(loaded, plan, ctx) -> dict:
    from ...core.layers import is_linear, weight_view
    from ..quantize.configs import BNB_CONFIGS
    from ..quantize.methods import bnb_apply

    before = {n: weight_view(m).detach().float().clone() for n, m in loaded.model.named_modules()
              if is_linear(m)}
    kind = plan["kind"]
    cfg = BNB_CONFIGS[kind](skip=[s for s in plan["skip"] if s not in _heads()],
                            **({} if kind == "int8" else {"double_quant": plan["double_quant"]}))
    report = dict(ctx.report)
    bnb_apply(kind)(loaded, cfg, ctx)  # writes its own account into ctx.report: put ours back
    ctx.report.clear()
    ctx.report.update(report)
    errors = {}
    for name, module in loaded.model.named_modules():
        if name in before and type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            w = before[name]
            errors[name] = float((w - _bnb_weight(module)).norm() / w.norm().clamp_min(1e-12))
    return {"format": "bitsandbytes", "method": kind, "layers": len(errors), **_spread(errors)}


def _heads():
    from ...core.layers import TASK_HEADS

    return TASK_HEADS


def _bnb_weight(module):
    """A bitsandbytes layer's weight, dequantized (float32, out x in)."""
    weight = module.weight
    if type(module).__name__ == "Linear4bit":
        return dequantize_4bit_exact(weight.data, weight.quant_state)
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    return weight.data.float() * scb.float().unsqueeze(1) / 127


def dequantize_4bit_exact(packed, state):
    """A 4-bit bitsandbytes weight in float32, from its codes and block scales in plain torch.

    Not bitsandbytes' own dequantize: its AVX-512 CPU kernel (0.50) is wrong for rows shorter
    than a quantization block or not a multiple of it (a (64, 32) weight comes back with 40%
    error instead of 9%); real models' rows are multiples of 64, tiny test models' are not."""
    import bitsandbytes.functional as F
    import torch

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2).float() + state.offset
    table = F.get_4bit_type(state.quant_type, device=packed.device).float()
    data = packed.reshape(-1).view(torch.uint8)
    nibbles = torch.stack([data >> 4, data & 15], dim=-1).reshape(-1).long()  # high nibble first
    n = int(torch.tensor(state.shape).prod())
    values = table[nibbles][:n]
    pad = -n % state.blocksize
    blocks = torch.nn.functional.pad(values, (0, pad)).view(-1, state.blocksize)
    return (blocks * absmax.float().view(-1, 1)).reshape(-1)[:n].view(*state.shape)


def _spread(errors: dict) -> dict:
    if not errors:
        return {"weight_rel_error_mean": None, "weight_rel_error_max": None}
    worst = max(errors, key=errors.get)
    return {"weight_rel_error_mean": round(sum(errors.values()) / len(errors), 6),
            "weight_rel_error_max": round(errors[worst], 6), "worst_layer": worst}
