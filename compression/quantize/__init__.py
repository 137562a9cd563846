"""Weight and activation quantization methods.

Importing this package registers the quantize methods (`auto` picks one for the device and
bits) and the formats they write: compressed-tensors and mmkit-quantized (packed RTN / GPTQ /
int8 layers) and mmkit-ptq (plain weights plus activation grids).
"""

from ...core.formats import Format, register_format
from ...core.registry import Method, lazy, register
from . import auto
from . import configs as qc

_M = "mmkit.compression.quantize."


def _quantize(name, config, apply, summary, **more):
    return register(Method("quantize", name, config, apply, summary, **more),
                    default=name == "auto")


_quantize("auto", auto.AutoConfig, None, "picked for the device and bits (CUDA: nf4 / int8; "
          "CPU: dynamic-int8 at 8 bits, rtn for causal LMs; gptq with --calib, else rtn)",
          pick=auto.pick)
_quantize("rtn", qc.RTNConfig, lazy(_M + "methods:rtn_"),
          "round-to-nearest weight-only, 2-8 bits, per channel or grouped")
_quantize("gptq", qc.GPTQConfig, lazy(_M + "methods:gptq_"),
          "GPTQ weight-only, 2-8 bits, Hessian-aware rounding from calibration data")
_quantize("dynamic-int8", qc.DynamicInt8Config, lazy(_M + "methods:dynamic_int8_"),
          "int8 weights and dynamic int8 activations (integer matmuls on CPU)")
_quantize("ptq", qc.PTQConfig, lazy(_M + "ptq:ptq_"),
          "simulated W8A8 / W4A8 activation PTQ (RepQuant-style LayerNorm folding, log2 "
          "softmax)", kinds=("text-encoder", "vision"), hint="Use rtn, gptq or dynamic-int8.")
for _kind, _summary in (("nf4", "bitsandbytes 4-bit NormalFloat (double quantization)"),
                       ("fp4", "bitsandbytes 4-bit float"),
                       ("int8", "bitsandbytes LLM.int8 8-bit weights")):
    _quantize(_kind, qc.BNB_CONFIGS[_kind], lazy(f"{_M}methods:{_kind}_"), _summary)


def _load_quantized(cls, source, config, opts):
    from .storage import load_quantized

    return load_quantized(cls, source.path, config), {}


def _save_quantized(loaded, folder):
    from .storage import save_quantized

    save_quantized(loaded.model, folder)


def _ct():
    from . import compressed_tensors

    return compressed_tensors


def _load_ptq(cls, source, config, opts):
    from ...core.loading import from_pretrained
    from .ptq import attach_ptq

    model = from_pretrained(cls, source, config, opts)
    return model, {"ptq": attach_ptq(model, source.path)}


def _save_ptq(loaded, folder):
    from .ptq import save_ptq

    save_ptq(loaded, folder)


register_format(Format(
    "mmkit-quantized", detect=lambda folder: (folder / "mmkit_quant.json").is_file(),
    load=_load_quantized, save=_save_quantized,
    summary="packed RTN / GPTQ / dynamic-int8 layers (mmkit_quantized.safetensors)"))
register_format(Format(
    "compressed-tensors", detect=lambda folder: _ct().detect(folder),
    load=lambda cls, source, config, opts: (_ct().load(cls, source.path, config, opts.dtype),
                                            {}),
    save=lambda loaded, folder: _ct().save(loaded.model, folder),
    summary="packed RTN / GPTQ layers as llm-compressor writes them (config.json's "
    "quantization_config; transformers, vLLM and SGLang load it)"))
register_format(Format(
    "mmkit-ptq", detect=lambda folder: (folder / "mmkit_ptq.json").is_file(),
    load=_load_ptq, save=_save_ptq,
    summary="plain weights plus activation-quantization grids (mmkit_ptq.json)"))
