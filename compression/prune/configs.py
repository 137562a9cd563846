"""The prune methods' configs: typed, bounded, described (the descriptions are the CLI's
help). No torch here, so registering the methods and `mmkit --help` stay fast."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ...core.registry import MethodConfig


class _Calib(MethodConfig):
    calib: str | None = Field(None, description="calibration data (any --data reference)")
    calib_samples: int = Field(64, ge=1, description="calibration samples")
    calib_length: int = Field(128, ge=8, description="tokens per calibration sample")


class MagnitudeConfig(MethodConfig):
    """Zero the smallest weights, in each layer or across all layers."""

    sparsity: float = Field(0.5, ge=0, lt=1, description="fraction of weights zeroed")
    scope: Literal["layer", "global"] = Field("layer", description="one threshold per layer, "
                                              "or one for all")
    skip: list[str] = Field(default_factory=list, description="layer patterns left dense")


class WandaConfig(_Calib):
    """Zero the weights with the smallest |W| x input-activation norm, per output row."""

    sparsity: float = Field(0.5, ge=0, lt=1, description="fraction of weights zeroed")
    skip: list[str] = Field(default_factory=list, description="layer patterns left dense")

    @model_validator(mode="after")
    def _needs_calib(self):
        if not self.calib:
            raise ValueError("wanda scores weights by their input activations: pass --calib D")
        return self


class NMConfig(_Calib):
    """N:M sparsity: N of every M consecutive input weights kept (2:4 runs on sparse tensor
    cores)."""

    nm: str = Field("2:4", description="keep N of every M weights, e.g. 2:4")
    score: Literal["magnitude", "wanda"] = Field("magnitude", description="the weight score")
    skip: list[str] = Field(default_factory=list, description="layer patterns left dense")

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

    sparsity: float = Field(0.25, ge=0, lt=1, description="fraction of heads / neurons / layers "
                                                          "removed")
    importance: Literal["weights", "calibration"] | None = Field(
        None, description="how to rank them; default: calibration with --calib, else weights")

    @model_validator(mode="after")
    def _check(self):
        if self.importance == "calibration" and not self.calib:
            raise ValueError("importance calibration needs calibration data: pass --calib D")
        return self
