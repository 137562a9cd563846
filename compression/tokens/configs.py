"""The configs of token merging (`mmkit merge-tokens`): typed, bounded, described (the
descriptions are the CLI's help). No torch here."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ...core.registry import MethodConfig


class TokenMergeConfig(MethodConfig):
    """How many tokens each transformer block merges, and how attention weighs merged ones."""

    r: list[int] | None = Field(None, description="tokens merged away in each block: one "
                                "number for every block (ToMe's r, e.g. 13 for ViT-B/16 at 224 "
                                "px) or one per block, e.g. 16,16,8,8,0,0")
    keep: float | None = Field(None, gt=0, le=1, description="instead of --r: the fraction of "
                               "the tokens left after the last block (spread evenly over the "
                               "blocks)")
    schedule: Literal["constant", "decreasing"] = Field(
        "constant", description="with one --r: the same r in every block, or decreasing "
                                "linearly from 2r to 0 (the same total, merged earlier)")
    proportional_attention: bool | None = Field(
        None, description="add log(token size) to the attention logits, so a merged token "
                          "counts for the tokens it holds; default: on for image classifiers "
                          "(supervised), off for CLIP")

    @field_validator("r")
    @classmethod
    def _r(cls, v):
        if v is not None and (not v or min(v) < 0):
            raise ValueError("--r takes token counts of at least 0, e.g. 13 or 16,16,8")
        return v

    @model_validator(mode="after")
    def _one_of(self):
        if (self.r is None) == (self.keep is None):
            raise ValueError("give either --r (tokens merged per block) or --keep (the "
                             "fraction of tokens left), not both or neither")
        if self.schedule != "constant" and (self.r is None or len(self.r) != 1):
            raise ValueError("--schedule applies to a single --r value")
        return self


class ToMeConfig(TokenMergeConfig):
    """ToMe: bipartite soft matching; each merged token joins its most similar partner."""


class TransformConfig(TokenMergeConfig):
    """Token Transforming: each merged token is shared among all partners by similarity."""

    temperature: float = Field(0.1, gt=0, le=10, description="softmax temperature of the "
                               "similarity-weighted assignment (near 0: ToMe's one-to-one "
                               "merge)")
