"""The merge methods' configs: typed, bounded, described (the descriptions are the CLI's
help). No torch here, so registering the methods and `mmkit --help` stay fast.

A merge step names the models to merge in `models`; the recipe's own model is the BASE: task
vectors are taken against it, and for linear / slerp it supplies the architecture (it is not
averaged unless it is listed in `models` too).
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from ...core.registry import MethodConfig


DENSITY = ("fraction of each task vector's entries kept: the largest (TIES), or a random draw "
           "seeded by --seed (DARE)")


class _Models(MethodConfig):
    # `lambda` is a Python keyword: the field is `lam`, the recipe key (and what recipe.yaml
    # and mmkit.json record) `lambda`; both names are accepted
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    models: list[str] = Field(min_length=1, description="the models to merge (references); "
                              "the recipe's model is the base")


MAX_SCALE = 1000.0  # a weight or lambda beyond it overflows float32 weights (1e39: inf)


def _check_scale(option: str, values) -> None:
    big = [v for v in values if isinstance(v, (int, float)) and abs(v) > MAX_SCALE]
    if big:
        raise ValueError(f"{option} {big[0]:g} is too large: weights and lambda scale the "
                         f"models' weights, so they stay within +-{MAX_SCALE:g} (merges use "
                         "0.1 to a few)")


class _Weighted(_Models):
    weights: list[float] | None = Field(None, description="one weight per model, comma-"
                                        "separated")

    @model_validator(mode="after")
    def _weights_count(self):
        if self.weights is not None and len(self.weights) != len(self.models):
            raise ValueError(f"--weights gives {len(self.weights)} weights for "
                             f"{len(self.models)} models: give one weight per model")
        _check_scale("--weights", self.weights or [])
        return self


class _AsAdapter(MethodConfig):
    as_adapter: Literal["cat", "svd"] | None = Field(
        None, description="LoRA adapters of the base only: write one LoRA adapter instead of "
        "full weights; cat stacks the ranks (exact), svd keeps the best rank --rank "
        "approximation")
    rank: int | None = Field(None, ge=1, description="rank of an --as-adapter svd merge "
                             "[default: the largest input rank]")

    @model_validator(mode="after")
    def _rank_needs_svd(self):
        if self.rank is not None and self.as_adapter != "svd":
            raise ValueError("--rank sets the rank of --as-adapter svd; cat keeps every rank "
                             "(their sum)")
        return self


class LinearConfig(_Weighted, _AsAdapter):
    """Weighted mean of the models' weights (a uniform model soup with equal weights)."""

    @model_validator(mode="after")
    def _sum(self):
        if self.weights is not None and sum(self.weights) == 0:
            raise ValueError("--weights sum to 0; linear divides by their sum (it is a mean)")
        return self


def _data(required: bool = False):
    return Field(None, min_length=1, description="the datasets to choose or learn on, one per "
                 "task (each scored with the head whose labels fit it)" + (
                     "" if required else "; default: the recipe's data"))


class _TaskVectors(_Weighted):
    lam: float | Literal["auto"] = Field(
        1.0, alias="lambda", description="scale of the summed task vectors, or auto: the value "
        "of 0.1, 0.2, ... 1.5 that scores best on the validation split of the data")
    data: list[str] | None = _data()

    @model_validator(mode="after")
    def _lambda_scale(self):
        _check_scale("--lambda", [self.lam])
        return self


class TaskArithmeticConfig(_TaskVectors, _AsAdapter):
    """base + lambda x sum of w_i x (model_i - base) (Ilharco et al. 2023)."""

    @model_validator(mode="after")
    def _auto_needs_weights(self):
        if self.as_adapter and self.lam == "auto":
            raise ValueError("--lambda auto scores full merged weights; give a number with "
                             "--as-adapter")
        return self


def _sign():
    return Field("unweighted", description="TIES sign election: the sign of the sum of the "
                 "trimmed task vectors (the paper) or of the weighted sum (mergekit)")


def _divide():
    return Field("count", description="TIES disjoint mean: divide by the number of agreeing "
                 "models (the paper, peft) or by the sum of their weights (mergekit)")


def _tie():
    return Field("zero", description="an entry whose vote sums to exactly 0: merges to 0 (the "
                 "paper's sgn(0) = 0) or takes the positive sign (peft, mergekit)")


Sign = Literal["unweighted", "weighted"]
Divide = Literal["count", "weights"]
Tie = Literal["zero", "positive"]


class TiesConfig(_TaskVectors):
    """TIES-merging: trim, elect sign, disjoint mean (Yadav et al. 2023)."""

    density: float = Field(0.2, gt=0, le=1, description=DENSITY)
    trim_scope: Literal["model", "tensor"] = Field(
        "model", description="TIES trims by one magnitude threshold over the whole model (the "
        "paper's code) or per tensor")
    sign: Sign = _sign()
    divide: Divide = _divide()
    tie: Tie = _tie()


class DareLinearConfig(_TaskVectors):
    """DARE: drop task-vector entries at random, rescale, then task arithmetic (Yu et al.
    2024)."""

    density: float = Field(0.5, gt=0, le=1, description=DENSITY)
    rescale: Literal["inverse", "l1"] = Field(
        "inverse", description="DARE rescaling of the kept entries: by 1/density (the paper, "
        "unbiased) or to keep the task vector's L1 norm (mergekit)")


class DareTiesConfig(DareLinearConfig):
    """DARE's random drop, then TIES's sign election and disjoint mean (mergekit's
    dare_ties)."""

    sign: Sign = _sign()
    divide: Divide = _divide()
    tie: Tie = _tie()


class SlerpConfig(_Models):
    """Spherical interpolation between exactly two models, per tensor."""

    t: float = Field(0.5, ge=0, le=1, description="slerp position: 0 gives the first model, 1 "
                     "the second")

    @model_validator(mode="after")
    def _two(self):
        if len(self.models) != 2:
            raise ValueError(f"slerp interpolates exactly two models; {len(self.models)} given "
                             "(the base only supplies the architecture: to interpolate from the "
                             "base, list it as one of the two)")
        return self


class GreedySoupConfig(_Models):
    """Greedy soup (Wortsman et al. 2022): rank the models by validation score, then add each
    to the uniform soup only when the soup's validation score does not drop."""

    data: list[str] | None = _data()


class AtlasConfig(_Weighted):
    """aTLAS (Zhang et al. 2024): one coefficient per task vector per parameter block, learned
    by gradient on a few labelled examples of each task, the backbone frozen."""

    lam: float = Field(0.3, alias="lambda", description="the coefficients' starting value (task "
                       "arithmetic's scale)")
    data: list[str] | None = _data()
    shots: int = Field(16, ge=1, le=100_000, description="labelled training examples per class "
                       "(documents, for a causal LM) the coefficients learn from (aTLAS's "
                       "k-shot setting)")
    steps: int = Field(60, ge=1, le=100_000, description="gradient steps over those examples")
    lr: float = Field(0.05, gt=0, le=10, description="Adam's learning rate for the coefficients")
    max_length: int = Field(128, ge=2, description="tokens per text example")


class AdapterConfig(MethodConfig):
    """Fold the recipe model's adapter (LoRA, SVFit, ...) into its base weights."""


CONFIGS = {"linear": LinearConfig, "task-arithmetic": TaskArithmeticConfig,
           "ties": TiesConfig, "dare-linear": DareLinearConfig, "dare-ties": DareTiesConfig,
           "slerp": SlerpConfig, "greedy-soup": GreedySoupConfig, "atlas": AtlasConfig}
# the methods whose task vectors are taken against the base: they need one
NEEDS_BASE = ("task-arithmetic", "ties", "dare-linear", "dare-ties", "atlas")
# the methods that choose or learn on data: they need --data
NEEDS_DATA = ("greedy-soup", "atlas")
