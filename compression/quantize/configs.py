"""The quantize methods' configs: typed, bounded, described (the descriptions are the CLI's
help). No torch here, so registering the methods and `mmkit --help` stay fast."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ...core.registry import MethodConfig

KEEP = 16  # in a bits mapping: leave the layer in floating point


def _check_bits(value, allowed: tuple[int, ...], method: str):
    values = list(value.values()) if isinstance(value, dict) else [value]
    bad = [b for b in values if b not in allowed and b != KEEP]
    if bad:
        raise ValueError(f"{method} takes bits {', '.join(map(str, allowed))}, not {bad[0]}")
    if all(b == KEEP for b in values):  # 16 keeps a layer float: alone, it quantizes nothing
        raise ValueError(f"bits {KEEP} leaves a layer in floating point, so it belongs in a "
                         f"per-layer map beside layers that are quantized (q_proj={KEEP},"
                         f"default=4); {method} takes bits {', '.join(map(str, allowed))}")
    return value


class _Common(MethodConfig):
    skip: list[str] = Field(default_factory=list, description="module name patterns to leave "
                                                                "in floating point")


class RTNConfig(_Common):
    """Round-to-nearest weight-only quantization."""

    bits: int | dict[str, int] = Field(4, description="2-8, or {pattern: bits, default: bits}")
    group_size: int | None = Field(128, ge=1, description="columns sharing a scale; 0 = one per "
                                   "output channel (the default at 8 bits, where the fused int8 "
                                   "kernel needs it)",
                                   json_schema_extra={"cli": {"zero_is_none": True}})
    symmetric: bool = Field(False, description="symmetric grid (no zero point)")
    embeddings: int | None = Field(None, ge=2, le=8, description="also quantize the "
                                   "token-embedding table to these bits (2-8, one scale per "
                                   "row; a tied LM head shares its codes); 0 = keep it float",
                                   json_schema_extra={"cli": {"zero_is_none": True}})
    format: Literal["auto", "compressed-tensors", "mmkit"] = Field(
        "auto", description="how OUT stores the model: compressed-tensors (transformers, vLLM "
        "and SGLang load it) or mmkit's own; auto: compressed-tensors where it states the model "
        "exactly and plain transformers loads it (2 / 4 / 8 bits, symmetric, whole groups), "
        "else mmkit (the output says why)")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v):
        return _check_bits(v, tuple(range(2, 9)), "rtn / gptq")

    @model_validator(mode="before")
    @classmethod
    def _per_channel_at_8_bits(cls, data):
        # 8-bit codes lose little to a per-channel grid, and only that grid runs the fused
        # int8 kernel (grouped 8-bit dequantizes at every call); groups stay when asked for
        if isinstance(data, dict) and "group_size" not in data and data.get("bits") == 8:
            return {**data, "group_size": None}
        return data

    @model_validator(mode="after")
    def _format(self):
        from .compressed_tensors import config_problem

        why = config_problem(self)
        if why:
            raise ValueError(why)
        return self


class GPTQConfig(RTNConfig):
    """GPTQ: Hessian-aware rounding with error compensation, from calibration data."""

    calib: str | None = Field(None, description="calibration data (any --data reference)")
    calib_samples: int = Field(128, ge=1, description="calibration samples")
    calib_length: int = Field(256, ge=8, description="tokens per calibration sample")
    # measured: closes 52% of RTN's gap on smollm2 vs 11% without
    act_order: bool = Field(True, description="quantize columns by decreasing Hessian diagonal")
    damp: float = Field(0.01, gt=0, lt=1, description="Hessian dampening, a fraction of its "
                                                      "mean diagonal")

    @model_validator(mode="after")
    def _needs_calib(self):
        if not self.calib:
            raise ValueError("gptq needs calibration data: pass --calib D (e.g. the training "
                             "data, or bbc-text for a language model)")
        return self


class DynamicInt8Config(_Common):
    """int8 weights (per channel, symmetric) with dynamic int8 activations (CPU)."""

    bits: int = 8

    @field_validator("bits")
    @classmethod
    def _bits(cls, v):
        return _check_bits(v, (8,), "dynamic-int8")


class BnbConfig(_Common):
    """bitsandbytes: nf4 / fp4 (4-bit) or int8 (LLM.int8), quantized while loading."""

    bits: int = 4
    double_quant: bool = Field(True, description="quantize the scales again")


def _bnb_config(kind: Literal["nf4", "fp4", "int8"]):
    allowed = (8,) if kind == "int8" else (4,)

    class Config(BnbConfig):
        bits: int = allowed[0]

        @field_validator("bits")
        @classmethod
        def _bits(cls, v):
            return _check_bits(v, allowed, kind)

    Config.__name__ = f"{kind.upper()}Config"
    Config.__doc__ = f"bitsandbytes {kind}."
    return Config


NF4Config, FP4Config, Int8Config = _bnb_config("nf4"), _bnb_config("fp4"), _bnb_config("int8")
BNB_CONFIGS = {"nf4": NF4Config, "fp4": FP4Config, "int8": Int8Config}


class PTQConfig(MethodConfig):
    """Simulated activation + weight quantization (W8A8 / W4A8) from calibration data."""

    bits: int = Field(8, description="weight bits: 4 or 8")
    a_bits: int = Field(8, ge=4, le=8, description="activation bits")
    softmax_bits: int | None = Field(4, ge=2, le=8, description="log2 bits of attention "
                                     "probabilities; 0 = float",
                                     json_schema_extra={"cli": {"zero_is_none": True}})
    calib: str | None = Field(None, description="calibration data (any --data reference)")
    calib_samples: int = Field(64, ge=1, description="calibration samples")
    calib_length: int = Field(128, ge=8, description="tokens per calibration sample")
    skip: list[str] = Field(default_factory=list, description="module name patterns to leave "
                                                          "in floating point")

    @model_validator(mode="after")
    def _check(self):
        if self.bits not in (4, 8):
            raise ValueError(f"ptq takes bits 4 or 8 (weights; activations: a_bits), "
                             f"not {self.bits}")
        if not self.calib:
            raise ValueError("ptq needs calibration data to set activation ranges: pass --calib D")
        return self
