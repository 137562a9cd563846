"""Activation post-training quantization for ViT and BERT, in the spirit of RepQuant.

Simulated W8A8 / W4A8 (`bits` is the weights', `a_bits` the activations') ("fake quantization": values are rounded to the integer grid and kept
in floating point) to study accuracy; no integer kernels run.

- Calibration records, for every Linear layer's input, the min and max of each channel.
- Post-LayerNorm activations vary wildly across channels, so they get per-channel ranges. In
  pre-norm blocks (ViT: layernorm_before -> q, k, v; layernorm_after -> fc1) the per-channel
  range is reparameterized into one layer-wise range, as RepQuant does: with centre m_c and
  spread r_c of channel c, LayerNorm's gamma and beta become gamma / r_c and (beta - m_c) / r_c,
  and the Linear layers that read it get W diag(r) and b + W m. The model computes the same
  function, and one scale then serves every channel. BERT is post-norm: its LayerNorm output is
  also the residual stream, so it cannot absorb the scales; there the per-channel ranges are
  simulated as they are.
- Other Linear inputs (attention context, FFN activations) get one range per tensor.
- Weights: symmetric per-output-channel round-to-nearest at `w_bits`, after reparameterizing.
- Attention probabilities: log2 quantization, p ~ 2^-round(-log2 p), via a registered
  attention function.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...core.errors import InputError
from .configs import PTQConfig

PTQ_JSON = "mmkit_ptq.json"
PTQ_TENSORS = "mmkit_ptq.safetensors"
ATTENTION = "mmkit_log2_softmax"
FAMILIES = ("vit", "bert")


class ActQuant(torch.nn.Module):
    """Fake-quantizes a Linear layer's input on a fixed grid: per tensor or per channel."""

    def __init__(self, lo, step, bits: int):
        super().__init__()
        self.bits = bits
        self.register_buffer("lo", lo)
        self.register_buffer("step", step)

    def forward(self, x):
        q = torch.clamp(torch.round((x - self.lo) / self.step), 0, 2 ** self.bits - 1)
        return q * self.step + self.lo


def _attach(linear, aq: ActQuant) -> None:
    linear.mmkit_aq = aq
    linear.register_forward_pre_hook(lambda mod, args: (mod.mmkit_aq(args[0]), *args[1:]))


def log2_softmax_attention(module, query, key, value, attention_mask, scaling=None,
                           dropout=0.0, **kwargs):
    """Eager attention whose probabilities are log2-quantized to the module's `mmkit_softmax_bits`."""
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling or query.shape[-1] ** -0.5)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., :key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    bits = getattr(module, "mmkit_softmax_bits", None)
    if bits:
        levels = 2 ** bits - 1  # codes 0 .. levels-1 are 2^-code; the last code is zero
        code = torch.round(-torch.log2(probs.clamp_min(1e-30)))
        probs = torch.where(code >= levels, torch.zeros_like(probs), torch.exp2(-code))
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, log2_softmax_attention)


def _set_softmax_bits(model, bits) -> None:
    if not bits:
        return
    _register_attention()
    for module in model.modules():
        if hasattr(module, "scaling") and hasattr(module, "config"):
            module.mmkit_softmax_bits = bits
    for config in [model.config, *[getattr(model.config, k) for k in ("text_config",
                                                                      "vision_config")
                                   if hasattr(model.config, k)]]:
        config._attn_implementation = ATTENTION


def _pre_norm_groups(model) -> list[tuple[str, list[str]]]:
    """(LayerNorm name, names of the Linear layers that read only it) in pre-norm blocks."""
    groups = []
    for name, module in model.named_modules():
        if hasattr(module, "layernorm_before") and hasattr(module, "attention"):
            attn = f"{name}.attention"
            groups.append((f"{name}.layernorm_before",
                           [f"{attn}.{p}" for p in ("q_proj", "k_proj", "v_proj")]))
            groups.append((f"{name}.layernorm_after", [f"{name}.mlp.fc1"]))
    return groups


def _min_max(state, x):
    lo, hi = x.min(0).values, x.max(0).values
    return (lo, hi) if state is None else (torch.minimum(state[0], lo), torch.maximum(state[1], hi))


def _calibrate(loaded, batches, names) -> dict:
    """Per-channel (min, max) of every named Linear's input over the calibration batches."""
    from ..calibration import collect_inputs

    return collect_inputs(loaded.model, names, batches, _min_max)


def _fold(model, ln_name, linear_names, lo, hi) -> tuple:
    """RepQuant's reparameterization of one LayerNorm and its readers; returns the new range."""
    ln = model.get_submodule(ln_name)
    centre, spread = (hi + lo) / 2, (hi - lo).clamp_min(1e-8)
    r = spread / spread.mean()
    with torch.no_grad():
        ln.weight.div_(r)
        ln.bias.sub_(centre).div_(r)
        for name in linear_names:
            linear = model.get_submodule(name)
            linear.bias.add_(linear.weight @ centre)
            linear.weight.mul_(r)
    half = spread.mean() / 2
    return -half, half


def _weight_rtn_(linear, bits: int) -> float:
    from . import grid

    w = linear.weight.detach()
    codes, scales, zeros = grid.quantize_rows(w.float(), bits, None, True)
    q = grid.from_codes(codes, scales, zeros).to(w.dtype)
    err = float((w - q).norm() / w.norm().clamp_min(1e-12))
    with torch.no_grad():
        linear.weight.copy_(q)
    return err


def ptq_(loaded, cfg: PTQConfig, ctx):
    """Calibrate, reparameterize pre-norm LayerNorms, fake-quantize weights and activations."""
    from ..calibration import load_calibration
    from .methods import check_quantizable, layer_bits

    check_quantizable(loaded)
    if loaded.family not in FAMILIES:
        raise InputError(f"ptq (activation quantization) is written for "
                         f"{' and '.join(FAMILIES)} models; this is {loaded.family}. Use "
                         "--method rtn, gptq or dynamic-int8 for weight quantization.")
    model = loaded.model
    names = list(layer_bits(model, cfg.bits, cfg.skip))
    batches = load_calibration(loaded, cfg, ctx)
    stats = _calibrate(loaded, batches, names)
    levels = 2 ** cfg.a_bits - 1
    ranges, folded = {}, []
    for ln_name, readers in _pre_norm_groups(model):
        readers = [n for n in readers if n in stats]
        if not readers:
            continue
        lo = torch.stack([stats[n][0] for n in readers]).min(0).values
        hi = torch.stack([stats[n][1] for n in readers]).max(0).values
        lo_t, hi_t = _fold(model, ln_name, readers, lo, hi)
        for n in readers:
            ranges[n] = (lo_t.reshape(1), hi_t.reshape(1))
        folded.append(ln_name)
    post_norm = loaded.family == "bert"
    for n in names:
        if n in ranges:
            continue
        lo, hi = stats[n]
        per_channel = post_norm and not n.endswith(("attention.output.dense", "output.dense"))
        ranges[n] = (lo, hi) if per_channel else (lo.min().reshape(1), hi.max().reshape(1))
    errors = {}
    for n in names:
        lo, hi = ranges[n]
        step = ((hi - lo) / levels).clamp_min(1e-8)
        linear = model.get_submodule(n)
        errors[n] = _weight_rtn_(linear, cfg.bits)
        _attach(linear, ActQuant(lo.to(linear.weight), step.to(linear.weight), cfg.a_bits))
    _set_softmax_bits(model, cfg.softmax_bits)
    ctx.report.update({
        "method": "ptq", "simulated": True, "bits": cfg.bits, "a_bits": cfg.a_bits,
        "softmax_bits": cfg.softmax_bits, "layers_quantized": len(names),
        "layernorms_reparameterized": len(folded),
        "per_channel_activation_layers": sum(1 for n in names if ranges[n][0].numel() > 1),
        "layers": {n: {"weight_rel_error": e} for n, e in errors.items()},
    })
    loaded.extra["format"] = "mmkit-ptq"
    loaded.extra["ptq"] = {"bits": cfg.bits, "a_bits": cfg.a_bits,
                           "softmax_bits": cfg.softmax_bits}
    return loaded


# ---------------------------------------------------------------- save / load
def save_ptq(loaded, folder: Path) -> None:
    """The reparameterized, weight-rounded model as plain HF files, plus the activation grids."""
    from safetensors.torch import save_file

    state = loaded.model.state_dict()
    base = {k: v for k, v in state.items() if ".mmkit_aq." not in k}
    grids = {k: v.detach().cpu().clone() for k, v in state.items() if ".mmkit_aq." in k}
    attn = loaded.model.config._attn_implementation
    loaded.model.config._attn_implementation = "eager"  # a plain reader gets float softmax
    try:
        loaded.model.save_pretrained(folder, state_dict=base)
    finally:
        loaded.model.config._attn_implementation = attn
    save_file(grids, str(folder / PTQ_TENSORS), metadata={"format": "pt"})
    layers = {n: m.mmkit_aq.bits for n, m in loaded.model.named_modules() if hasattr(m, "mmkit_aq")}
    (folder / PTQ_JSON).write_text(json.dumps({**loaded.extra["ptq"], "format_version": 1,
                                               "layers": layers}, indent=2))


def attach_ptq(model, folder) -> dict:
    """Put the saved activation grids and softmax quantization back on a loaded model."""
    from safetensors.torch import load_file

    from ...core.artifacts import read_json_file

    spec = read_json_file(Path(folder, PTQ_JSON), "an mmkit activation-quantization "
                          "description", {"layers": dict, "bits": int, "a_bits": int})
    if spec.get("softmax_bits") is not None and not isinstance(spec["softmax_bits"], int):
        raise InputError(f"{Path(folder, PTQ_JSON)}: softmax_bits must be a whole number; the "
                         "artifact is damaged. Re-create it.")
    try:
        grids = load_file(str(Path(folder, PTQ_TENSORS)))
        for name, bits in spec["layers"].items():
            lo, step = grids[f"{name}.mmkit_aq.lo"], grids[f"{name}.mmkit_aq.step"]
            _attach(model.get_submodule(name), ActQuant(lo, step, int(bits)))
    except (OSError, KeyError, AttributeError, TypeError, ValueError) as exc:
        raise InputError(f"{folder}: {PTQ_JSON} and {PTQ_TENSORS} do not describe this model "
                         f"({type(exc).__name__}: {str(exc)[:200]}); the artifact is damaged. "
                         "Re-create it.") from None
    _set_softmax_bits(model, spec.get("softmax_bits"))
    return {k: spec.get(k) for k in ("bits", "a_bits", "softmax_bits")}


def is_ptq_folder(path) -> bool:
    """True for a folder written by save_ptq."""
    return path is not None and Path(path, PTQ_JSON).is_file()

