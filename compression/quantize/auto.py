"""quantize auto: the method `--bits` alone stands for, picked for the device and the model
kind. It is a registered method like the others, so `mmkit quantize --bits 8` and a recipe step
`{step: quantize, bits: 8}` pick the same one; the plan records the method it picked."""

from __future__ import annotations

from pydantic import ConfigDict

from ...core.registry import MethodConfig


class AutoConfig(MethodConfig):
    """`bits` plus the options of whichever method is picked (checked by that method)."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    bits: int | dict


def pick(params: dict, kind: str, device: str) -> tuple[str, str]:
    """The method for these parameters on a device and model kind, and why."""
    bits, calib = params.get("bits"), params.get("calib")
    if params.get("format") in ("compressed-tensors", "mmkit"):  # formats of rtn / gptq output
        return ("gptq", "--format given, calibration data given") if calib else (
            "rtn", "--format given, no calibration data")
    if isinstance(bits, dict):
        return ("gptq", "per-layer bits, calibration data given") if calib else (
            "rtn", "per-layer bits, no calibration data")
    if device.startswith("cuda"):
        return ("nf4", "bitsandbytes nf4 kernels on CUDA") if bits == 4 else (
            ("int8", "bitsandbytes int8 kernels on CUDA") if bits == 8 else
            ("gptq", "calibration data given") if calib else ("rtn", "no calibration data"))
    if bits == 8 and kind == "causal-lm":  # per-tensor int8 activations lose the outliers
        return "rtn", ("weight-only: dynamic int8 activations cost smollm2 its perplexity, "
                       "38.8 -> 154")
    if bits == 8:
        return "dynamic-int8", "int8 matmuls are the one variant faster than fp32 on CPU"
    if calib:
        return "gptq", "calibration data given (GPTQ beats RTN at the same bits)"
    return "rtn", "no calibration data (pass --calib D for GPTQ)"
