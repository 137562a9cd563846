"""cast: convert a model's floating-point weights to another dtype (fp32 / fp16 / bf16)."""

from __future__ import annotations

from typing import Literal

from ..core.layers import weight_bytes
from pydantic import Field

from ..core.registry import MethodConfig

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


class CastConfig(MethodConfig):
    """dtype: the target floating-point type."""

    dtype: Literal["float32", "fp32", "float16", "fp16", "bfloat16", "bf16"] = Field(
        "float16", description="the floating-point type to cast to")


def cast_(loaded, config: CastConfig, ctx):
    """Cast every floating-point parameter and buffer to `config.dtype` (in place)."""
    import torch

    dtype = getattr(torch, DTYPES[config.dtype])
    before = weight_bytes(loaded.model)
    loaded.model.to(dtype)
    after = weight_bytes(loaded.model)
    ctx.report.update({"dtype": DTYPES[config.dtype], "weights_mb_before": before / 1e6,
                       "weights_mb_after": after / 1e6})
    return loaded
