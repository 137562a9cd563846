"""The compressed-tensors format of RTN / GPTQ weight-only models: what llm-compressor writes
and transformers (with the `compressed-tensors` package), vLLM and SGLang load. mmkit writes
and reads it without that package.

The folder holds config.json with a `quantization_config` (quant_method "compressed-tensors",
format "pack-quantized", one config group per weight scheme, the Linear layers left in floating
point under `ignore`) and model.safetensors. Each quantized Linear `name` is stored as
`name.weight_packed` (int32 words: `bits`-bit values along the input dimension, value i of a row
at bit i * bits, lowest bits first), `name.weight_scale` (out x groups), `name.weight_shape`
([out, in]), `name.weight_zero_point` (asymmetric only: int32, the same packing along the output
dimension) and `name.bias`; every other tensor is stored as it is.

mmkit's grid maps onto it exactly. compressed-tensors rounds to signed values
q in [-2^(b-1), 2^(b-1) - 1] with a signed zero point zp and stores q + 2^(b-1): that is mmkit's
unsigned code, and zp + 2^(b-1) is mmkit's zero, so (q - zp) * scale = (code - zero) * scale.
A symmetric grid (zero 2^(b-1) everywhere) stores no zero point.

What the format cannot state exactly, mmkit keeps in its own format (`survey` says why): codes
of 3, 5, 6 or 7 bits (compressed-tensors packs them densely since 0.18 and whole codes per word
before, so a reader of the other kind misreads them, and vLLM serves 4 and 8 bits), act-order
groups (a permuted g_idx, which compressed-tensors 0.19 no longer accepts), groups that do not
divide a layer's input width, the dynamic-int8 kernel (its activations are quantized too),
GPT-2's Conv1D layers, model families whose weights transformers renames while loading (ViT),
a quantized embedding table, and bfloat16 models (readers hold the scales in the model's dtype).
`auto` also keeps asymmetric grids in mmkit's format: transformers with compressed-tensors 0.18
to 0.20 cannot load packed zero points (`choose_format_`).
Reading also takes what llm-compressor writes for weight-only int models: pack-quantized or
int8 `weight` tensors (naive / int-quantized), channel, group or tensor scales, and the
`weight_g_idx` of act-order files written before 0.19.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

from ...core.errors import InputError

log = logging.getLogger("mmkit")

NAME = "compressed-tensors"
WEIGHTS = "model.safetensors"
PACKED = "pack-quantized"
WRITTEN_BITS = (2, 4, 8)  # whole codes per int32 word: the same layout in every version
READ_FORMATS = (PACKED, "int-quantized", "naive-quantized")
DENSE_SINCE = (0, 18)  # compressed-tensors packs other widths densely from this version on
KEEP_FLOAT = 16  # in a bits mapping: a layer left in floating point


# ---------------------------------------------------------------- packing
def pack(values, bits: int):
    """Pack unsigned values (rows x n, each < 2^bits) into int32 words along each row: value
    i at bit i * bits (a value may straddle two words), lowest bits first."""
    import torch

    rows, n = values.shape
    words = -(-n * bits // 32)
    if 8 % bits == 0 and sys.byteorder == "little":  # 1, 2, 4, 8 bits: whole bytes, fast
        per = 8 // bits
        v = torch.nn.functional.pad(values.to(torch.uint8), (0, words * 4 * per - n))
        v = v.reshape(rows, words * 4, per)
        byte = v[..., 0].clone(memory_format=torch.contiguous_format)
        for k in range(1, per):
            byte |= v[..., k] << (k * bits)
        return byte.view(torch.int32)  # little-endian: byte j of a word holds bits 8j..8j+7
    if 32 % bits == 0:
        per = 32 // bits
        grouped = torch.nn.functional.pad(values.long(), (0, words * per - n))
        word = (grouped.reshape(rows, words, per) << (torch.arange(per) * bits)).sum(-1)
    else:
        stream = (values.long().unsqueeze(-1) >> torch.arange(bits)) & 1  # rows, n, bits
        stream = torch.nn.functional.pad(stream.reshape(rows, n * bits), (0, words * 32 - n * bits))
        word = (stream.reshape(rows, words, 32) << torch.arange(32)).sum(-1)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)


def unpack(words, bits: int, n: int, dense: bool = True):
    """Inverse of `pack`: int64 values (rows x n). `dense=False` reads the older layout of
    widths that do not divide 32: floor(32 / bits) whole values per word, the rest unused."""
    import torch

    rows = words.shape[0]
    if 8 % bits == 0 and sys.byteorder == "little":
        byte = words.contiguous().view(torch.uint8)  # rows, 4 * words
        parts = [(byte >> (k * bits)) & (2 ** bits - 1) for k in range(8 // bits)]
        return torch.stack(parts, -1).reshape(rows, -1)[:, :n].long()
    value = words.long() & 0xFFFFFFFF
    if 32 % bits == 0 or not dense:
        per = 32 // bits
        out = (value.unsqueeze(-1) >> (torch.arange(per) * bits)) & (2 ** bits - 1)
        return out.reshape(rows, -1)[:, :n]
    stream = ((value.unsqueeze(-1) >> torch.arange(32)) & 1).reshape(rows, -1)[:, :n * bits]
    return (stream.reshape(rows, n, bits) << torch.arange(bits)).sum(-1)


# ---------------------------------------------------------------- what the format can state
def model_problem(model) -> str | None:
    """Why the model's family or dtype cannot be written as compressed-tensors exactly (None
    if it can)."""
    import torch
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    renames = [c for c in get_model_conversion_mapping(model, add_legacy=False)
               if not isinstance(c, PrefixChange)]
    if renames or getattr(model, "_weight_conversions", None):
        return (f"transformers renames {type(model).__name__}'s weights while loading them, so "
                "packed weights saved under the layer names would not be found")
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        return ("the model is bfloat16, and its readers hold the scales in the model's dtype: "
                "mmkit's fp16 scales would be rounded to bfloat16, changing the weights (cast "
                "it to float32 or float16 before quantizing)")
    return None


def bits_problem(bits: int) -> str | None:
    """Why codes of `bits` bits are not written as compressed-tensors (None if they are)."""
    if bits in WRITTEN_BITS or bits == KEEP_FLOAT:
        return None
    return (f"{bits}-bit codes, which compressed-tensors packs densely since version 0.18 and "
            "whole codes per word before, so a reader of the other kind misreads them (and vLLM "
            "serves 4 and 8 bits); it is exact for 2, 4 and 8 bits")


EMBEDDINGS = ("its token-embedding table is quantized (--embeddings), which mmkit writes in its "
              "own format only")
ACT_ORDER = ("act-order groups (a permuted g_idx), which compressed-tensors no longer accepts "
             "(since 0.19)")


def layer_problem(name: str, bits: int, in_features: int, group_size: int | None,
                  conv1d: bool = False, act_order: bool = False,
                  kernel: str = "dequant") -> str | None:
    """Why one layer's quantization cannot be stated in compressed-tensors (None if it can)."""
    if kernel != "dequant":
        return (f"layer {name} runs the {kernel} kernel, which quantizes activations too; "
                "compressed-tensors would load it as weight-only")
    if conv1d:
        return f"layer {name} is a GPT-2 Conv1D, which compressed-tensors does not quantize"
    if bits_problem(bits):
        return f"layer {name} has {bits_problem(bits)}"
    if group_size and group_size < in_features:
        if act_order:
            return f"layer {name} has {ACT_ORDER}"
        if in_features % group_size:
            return (f"layer {name} has {in_features} inputs, not a multiple of the group size "
                    f"{group_size}, and compressed-tensors needs whole groups")
    return None


def _grid_of(name: str, layer) -> tuple[dict | None, str | None]:
    """(the compressed-tensors weight arguments of a QuantLinear, None) or (None, why not)."""
    import torch

    groups = layer.scales.shape[1]
    in_f = layer.in_features
    g_idx = layer.g_idx.long().cpu()
    size = int((g_idx == 0).sum()) if groups > 1 else None  # group 0's width
    contiguous = torch.equal(g_idx, torch.arange(in_f) // (size or in_f))
    why = layer_problem(name, layer.bits, in_f, size, bool(getattr(layer, "conv1d", False)),
                        not contiguous, layer.kernel)
    if why is None and not contiguous:
        why = f"layer {name}'s g_idx is not one its scales' groups can state"
    if why:
        return None, why
    zeros = layer.zeros.float().cpu()
    mid = 2 ** (layer.bits - 1)
    if not (torch.equal(zeros, zeros.round()) and zeros.min() >= 0
            and zeros.max() <= 2 ** layer.bits - 1):
        return None, f"layer {name}'s zero points are not whole codes"
    symmetric = bool((zeros == mid).all()) and layer.symmetric is not False
    args = {"num_bits": layer.bits, "type": "int", "symmetric": symmetric,
            "strategy": "group" if size else "channel", "group_size": size or None,
            "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}
    return args, None


def survey(model) -> tuple[dict | None, str | None]:
    """({layer: its compressed-tensors weight arguments}, None) for a model holding
    QuantLinear layers that the format states exactly, else (None, why not)."""
    from .qlinear import QuantLinear

    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        return None, "the model has no RTN / GPTQ layers"
    if any(type(m).__name__ == "QuantEmbedding" for m in model.modules()):
        return None, EMBEDDINGS
    why = model_problem(model)
    if why:
        return None, why
    args = {}
    for name, layer in layers.items():
        args[name], why = _grid_of(name, layer)
        if why:
            return None, why
    # a layer whose one group spans its input width joins the group size of that width
    grouped = {(a["num_bits"], a["symmetric"], a["group_size"]): a for a in args.values()
               if a["strategy"] == "group"}
    for name, a in args.items():
        if a["strategy"] == "channel":
            args[name] = grouped.get((a["num_bits"], a["symmetric"], layers[name].in_features), a)
    return args, None


def problem(model) -> str | None:
    """Why a model holding QuantLinear layers cannot be written as compressed-tensors exactly
    (None when it can)."""
    return survey(model)[1]


def config_problem(cfg) -> str | None:
    """Why an RTN / GPTQ config asking for compressed-tensors cannot get it, known before any
    model is loaded: bits it does not pack alike in every version, act-order groups."""
    if getattr(cfg, "format", "auto") != NAME:
        return None
    values = cfg.bits.values() if isinstance(cfg.bits, dict) else [cfg.bits]
    why = next((f"the layers would have {bits_problem(b)}" for b in values if bits_problem(b)),
               None)
    if why is None and getattr(cfg, "act_order", False) and cfg.group_size:
        why = f"GPTQ with act-order and groups gives {ACT_ORDER}"
    if why is None and getattr(cfg, "embeddings", None):
        why = EMBEDDINGS
    return refusal(why).rstrip(".") if why else None  # the caller adds its own full stop


def check_before(model, plan: dict, cfg) -> None:
    """Refuse an explicit compressed-tensors request the model cannot meet, before spending
    time quantizing it: its family, Conv1D layers, groups that do not divide a layer."""
    if getattr(cfg, "format", "auto") != NAME:
        return
    why = model_problem(model)
    for name in plan:
        if why:
            break
        module = model.get_submodule(name)
        conv1d = type(module).__name__ == "Conv1D"
        in_f = module.weight.shape[0] if conv1d else module.in_features
        why = layer_problem(name, plan[name], in_f, cfg.group_size, conv1d)
    if why:
        raise InputError(refusal(why))


def choose_format_(loaded, requested: str | None, report: dict) -> str:
    """Set the format a quantized model is saved in and say which (and why) in the report.

    `compressed-tensors` writes that format or refuses (InputError) what it cannot state;
    `mmkit` writes mmkit's own; `auto` writes compressed-tensors where it states the model
    exactly and plain transformers loads it, which leaves out asymmetric grids: their packed
    zero points do not load into transformers with compressed-tensors 0.18 to 0.20 (vLLM and
    SGLang read them; transformers does with `CompressedTensorsConfig(dequantize=True)`)."""
    if requested is None:  # a method that writes mmkit's format only (dynamic-int8)
        loaded.extra["format"] = "mmkit-quantized"
        return "mmkit-quantized"
    args, why = survey(loaded.model) if requested != "mmkit" else (
        None, "asked for (--format mmkit)")
    if requested == NAME and why:
        raise InputError(refusal(why))
    asymmetric = args is not None and not all(a["symmetric"] for a in args.values())
    if requested == "auto" and asymmetric:
        why = ASYMMETRIC
    fmt = NAME if why is None else "mmkit-quantized"
    loaded.extra["format"] = fmt
    report["format"] = fmt
    if why:
        report["format_note"] = f"kept in mmkit's format: {why}"
    elif asymmetric:
        log.warning("compressed-tensors with asymmetric grids: vLLM and SGLang load it, but "
                    "transformers with compressed-tensors 0.18 to 0.20 needs "
                    "quantization_config=CompressedTensorsConfig(dequantize=True) to load it.")
    return fmt


ASYMMETRIC = ("asymmetric grids (zero points) do not load into plain transformers with "
              "compressed-tensors 0.18 to 0.20; pass --format compressed-tensors to write them "
              "anyway (vLLM and SGLang serve them), or quantize with --symmetric")


def refusal(why: str) -> str:
    """The InputError text of an explicit --format compressed-tensors it cannot meet."""
    return (f"--format compressed-tensors cannot state this model exactly: {why}. Use "
            "--format mmkit (or the default, auto, which keeps such models in mmkit's own "
            "format), or quantize to 4 or 8 bits with group sizes that divide every layer "
            "(GPTQ: --no-act-order, or per-channel --group-size 0).")


# ---------------------------------------------------------------- save
def save(model, folder: Path) -> None:
    """Write a model holding QuantLinear layers as compressed-tensors (pack-quantized)."""
    import torch
    from safetensors.torch import save_file

    from ...core.train import tied_duplicates
    from .qlinear import QuantLinear

    layer_args, why = survey(model)
    if why:
        raise InputError(refusal(why))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    scale_dtype = _float_dtype(model)
    state = model.state_dict()
    for key in tied_duplicates(state):
        del state[key]
    tensors = {k: v for k, v in state.items()
               if k.rpartition(".")[0] not in layers or k.endswith(".bias")}
    for name, layer in layers.items():
        # mmkit's codes are compressed-tensors' stored values (q + 2^(b-1))
        tensors[f"{name}.weight_packed"] = pack(layer.codes().cpu(), layer.bits)
        # fp16 scales are exact in float32 (and kept fp16 for a half-precision model)
        tensors[f"{name}.weight_scale"] = layer.scales.cpu().to(scale_dtype)
        tensors[f"{name}.weight_shape"] = torch.tensor([layer.out_features, layer.in_features])
        if not layer_args[name]["symmetric"]:
            zeros = layer.zeros.cpu().round().long()  # in [0, 2^b): zp + 2^(b-1)
            tensors[f"{name}.weight_zero_point"] = pack(zeros.T, layer.bits).T
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = _quantization_config(model, layer_args)
    config["dtype"] = str(_float_dtype(model, exact=True)).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
              str(folder / WEIGHTS), metadata={"format": "pt"})


def _float_dtype(model, exact: bool = False):
    """The model's floating-point dtype (float32 when mixed); unless `exact`, the dtype its
    fp16 scales are stored in: float32 (exact) or float16."""
    import torch

    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    dtype = torch.float32 if not dtypes or torch.float32 in dtypes else dtypes.pop()
    return dtype if exact or dtype == torch.float32 else torch.float16


def _quantization_config(model, layer_args: dict) -> dict:
    """config.json's quantization_config: one group targeting every Linear but the ignored
    ones when all layers share a scheme (what llm-compressor writes), else one group per
    scheme naming its layers."""
    import torch

    schemes: dict[str, tuple[dict, list[str]]] = {}
    for name, args in layer_args.items():
        schemes.setdefault(json.dumps(args, sort_keys=True), (args, []))[1].append(name)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    one = len(schemes) == 1
    groups = {}
    for i, (args, names) in enumerate(schemes.values()):
        groups[f"group_{i}"] = {"targets": ["Linear"] if one else sorted(names),
                                "weights": args, "input_activations": None,
                                "output_activations": None, "format": PACKED}
    return {"quant_method": NAME, "format": PACKED, "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": sorted(n for n in linears if n not in layer_args) if one else [],
            "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": {}, "transform_config": {}}


# ---------------------------------------------------------------- detect and load
def _groups(qc) -> list[tuple[dict, list[str], str]] | None:
    """The weight schemes of a quantization_config that mmkit reads, as (weight arguments,
    targets, format); None when any group is something else (activation quantization, floats,
    blocks, ...), left to transformers and the compressed-tensors package."""
    if not isinstance(qc, dict) or qc.get("quant_method") != NAME:
        return None
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        return None
    out = []
    for scheme in groups.values():
        if not isinstance(scheme, dict) or scheme.get("input_activations") or scheme.get(
                "output_activations"):
            return None
        w, targets = scheme.get("weights"), scheme.get("targets")
        fmt = scheme.get("format") or qc.get("format")
        if not isinstance(w, dict) or not isinstance(targets, list) or fmt not in READ_FORMATS:
            return None
        bits, strategy = w.get("num_bits"), w.get("strategy")
        if w.get("type", "int") != "int" or not isinstance(bits, int) or not 1 <= bits <= 8 or \
                w.get("dynamic") or strategy not in ("tensor", "channel", "group"):
            return None
        if strategy == "group" and not (isinstance(w.get("group_size"), int)
                                        and w["group_size"] > 0):
            return None
        if fmt != PACKED and bits != 8:  # an int8 tensor per weight: 8-bit values only
            return None
        out.append((w, [str(t) for t in targets], fmt))
    return out


def _config_quantization(folder) -> dict | None:
    try:
        config = json.loads(Path(folder, "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return config.get("quantization_config") if isinstance(config, dict) else None


def detect(folder) -> bool:
    """True for a folder of compressed-tensors weight-only int layers that mmkit reads."""
    return Path(folder, WEIGHTS).is_file() and _groups(_config_quantization(folder)) is not None


def _matches(name: str, module, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or any(c.__name__ == target for c in type(module).__mro__)


def _version(qc: dict) -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", str(qc.get("version", "")))
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def load(cls, folder, config, dtype=None):
    """Build a model of `cls` (an Auto class) from a compressed-tensors folder, its quantized
    Linear layers as QuantLinear, without the compressed-tensors package; in `dtype`, else
    the dtype config.json records."""
    import copy

    import torch
    from safetensors import safe_open

    from .qlinear import set_module

    qc = config.quantization_config
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    groups = _groups(qc)
    if groups is None:
        raise InputError(f"{folder}: its compressed-tensors quantization is not weight-only "
                         "int (pack-quantized); load it with transformers and the "
                         "compressed-tensors package.")
    plain = copy.deepcopy(config)
    del plain.quantization_config  # the model holds QuantLinear layers; a save restates it
    dtype = dtype or getattr(config, "dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    model = cls.from_config(plain, **({"dtype": dtype} if isinstance(dtype, torch.dtype) else {}))
    ignore = [str(t) for t in qc.get("ignore") or []]
    dense = _version(qc) >= DENSE_SINCE
    weights = Path(folder, WEIGHTS)
    done, quantized = set(), set()
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        for name, module in list(model.named_modules()):
            if not isinstance(module, torch.nn.Linear) or any(
                    _matches(name, module, t) for t in ignore):
                continue
            scheme = next(((w, fmt) for w, targets, fmt in groups
                           if any(_matches(name, module, t) for t in targets)), None)
            if scheme is None:
                continue
            layer = _read_layer(f, keys, name, module, *scheme, dense, folder)
            set_module(model, name, layer)
            quantized.add(name)
            done.update(k for k in keys if k.startswith(name + ".weight"))
        state = {k: f.get_tensor(k) for k in keys - done}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise InputError(f"{folder}: the weights do not match config.json ({str(exc)[:300]}); "
                         "the artifact is damaged. Re-create it.") from None
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in result.missing_keys if k not in tied and "lm_head" not in k
               and k.rpartition(".")[0] not in quantized]  # read above, from their own keys
    if missing or result.unexpected_keys:
        raise InputError(f"{folder} does not match its own config (missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}); the artifact is damaged. "
                         "Re-create it.")
    model.tie_weights()
    return model.eval()


def _read_layer(f, keys, name, module, w: dict, fmt: str, dense: bool, folder):
    """One QuantLinear from a layer's compressed-tensors tensors."""
    import torch

    from .qlinear import QuantLinear

    out_f, in_f = module.out_features, module.in_features
    bits, strategy = w["num_bits"], w["strategy"]
    mid = 2 ** (bits - 1)

    def need(suffix):
        if f"{name}.{suffix}" not in keys:
            raise InputError(f"{folder}: {WEIGHTS} has no {name}.{suffix}, which its "
                             f"quantization_config implies; the artifact is damaged.")
        return f.get_tensor(f"{name}.{suffix}")

    try:
        if fmt == PACKED:
            codes = unpack(need("weight_packed"), bits, in_f, dense)
        else:  # int8 values, signed
            codes = need("weight").long() + mid
        scale = need("weight_scale").reshape(out_f if strategy != "tensor" else 1, -1)
        scale = scale.expand(out_f, -1)
        n_groups = scale.shape[1]
        if w.get("symmetric", True):
            zeros = torch.full((out_f, n_groups), float(mid))
        elif fmt == PACKED and strategy != "tensor":
            zeros = unpack(need("weight_zero_point").T.contiguous(), bits, out_f, dense).T
        else:
            zeros = need("weight_zero_point").long().reshape(-1, n_groups).expand(
                out_f, -1) + mid
        if f"{name}.weight_g_idx" in keys:  # act-order files written before 0.19
            g_idx = f.get_tensor(f"{name}.weight_g_idx").long()
        elif strategy == "group":
            g_idx = torch.arange(in_f) // w["group_size"]
        else:
            g_idx = torch.zeros(in_f, dtype=torch.long)
        if codes.shape != (out_f, in_f) or g_idx.shape != (in_f,) or zeros.shape != (
                out_f, n_groups) or int(g_idx.max()) >= n_groups:
            raise ValueError("shapes differ from the layer's")
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"{folder}: layer {name}'s packed weights do not fit its "
                         f"{out_f} x {in_f} shape ({str(exc)[:200]}); the artifact is "
                         "damaged.") from None
    layer = QuantLinear.from_codes(codes, scale.float(), zeros.float(), g_idx.int(), bits,
                                   module.bias)
    if not torch.equal(layer.scales.float(), scale.float()):  # not fp16 values: keep them exact
        layer.scales = scale.float().contiguous()
    layer.symmetric = bool(w.get("symmetric", True))
    return layer
