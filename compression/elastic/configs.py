"""The configs of elastic training, sub-network extraction and distillation: typed, bounded,
described (the descriptions are the CLI's help). No torch here."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ...core.registry import MethodConfig
from ...core.train import TrainingConfig


class DistillSettings(MethodConfig):
    """How a student learns from a teacher's logits."""

    teacher: str | None = Field(None, description="distil from this model (same task and "
                                                  "tokenizer); default: elastic training's "
                                                  "largest sub-network, or the run's input "
                                                  "model for distill")
    distill_weight: float = Field(0.5, ge=0, le=1, description="weight of the distillation "
                                  "term (the rest: the labels' cross-entropy)")
    temperature: float = Field(1.0, gt=0, le=20, description="softmax temperature of the "
                                                             "distillation term")


def _fractions(values: list[float], what: str) -> list[float]:
    if not values:
        raise ValueError(f"--{what} needs at least one fraction, e.g. 0.5,1")
    for v in values:
        if not 0 < v <= 1:
            raise ValueError(f"--{what} {v:g} is not a fraction in (0, 1]")
    if max(values) != 1:
        raise ValueError(f"--{what} must include 1 (the full network)")
    return sorted(set(values))


class ElasticConfig(TrainingConfig, DistillSettings):
    """Full fine-tuning of a super-network whose sub-networks are trained with it."""

    mode: Literal["nested", "sampled"] = Field(
        "nested", description="nested (MatFormer): each step trains the full network and "
                              "random nested widths; sampled (InstaTune): the full network, "
                              "the smallest and random sub-networks, depth included")
    ffn: list[float] = Field([0.25, 0.5, 0.75, 1.0], description="FFN widths trained "
                                                                 "(fractions of the neurons)")
    heads: list[float] = Field([0.5, 0.75, 1.0], description="attention widths trained "
                                                             "(fractions of the heads)")
    depth: list[int] | None = Field(None, description="layer counts trained; default: all "
                                                      "layers (nested); all, and one or two "
                                                      "fewer (sampled)")
    samples: int = Field(1, ge=0, le=8, description="random sub-networks per step besides "
                                                    "the full one (and the smallest)")
    importance_samples: int = Field(64, ge=1, description="training examples that score "
                                                          "neurons, heads and layers")

    @field_validator("ffn")
    @classmethod
    def _ffn(cls, v):
        return _fractions(v, "ffn")

    @field_validator("heads")
    @classmethod
    def _heads(cls, v):
        return _fractions(v, "heads")

    @field_validator("depth")
    @classmethod
    def _depth(cls, v):
        if v is not None and (not v or min(v) < 1):
            raise ValueError("--depth takes layer counts of at least 1, e.g. 4,5,6")
        return None if v is None else sorted(set(v))


class DistillConfig(TrainingConfig, DistillSettings):
    """Full fine-tuning that learns from a teacher's logits as well as the labels."""


class ExtractConfig(MethodConfig):
    """Which sub-network of an elastic super-network to cut out."""

    ffn: float = Field(1.0, gt=0, le=1, description="fraction of each layer's FFN neurons "
                                                    "kept")
    heads: float = Field(1.0, gt=0, le=1, description="fraction of each layer's attention "
                                                      "heads kept")
    depth: int | None = Field(None, ge=1, description="layers kept in each stack; default: all")
    per_layer: str | None = Field(None, description="a JSON / YAML file of per-layer widths "
                                                    "({ffn: [...], heads: [...]}, one value per "
                                                    "layer)")

    @model_validator(mode="after")
    def _one_source_of_widths(self):
        if self.per_layer and (self.ffn != 1.0 or self.heads != 1.0):
            given = "--ffn" if self.ffn != 1.0 else "--heads"
            raise ValueError(f"--per-layer sets every layer's widths, so {given} would go "
                             f"unused; drop {given}, or put its value in the file (a key the "
                             "file leaves out keeps that width at 1)")
        return self
