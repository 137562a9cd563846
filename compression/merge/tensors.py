"""tensors: the tensor math of model merging, one parameter at a time.

Every function takes the tensors of ONE parameter (same shape) from several models and returns
the merged tensor. Arithmetic runs in float32 (float64 when any input is float64) and the
result comes back in the input's dtype (the base's, or the first tensor's where there is no
base). Loading, streaming, naming and choosing which tensors to merge belong to the caller.

Methods and papers:

- `linear` — weighted sum (uniform model soup: Wortsman et al. 2022, arXiv:2203.05482).
- `task_arithmetic` — base + λ·Σ wᵢτᵢ, τᵢ = modelᵢ − base (Ilharco et al. 2023,
  arXiv:2212.04089).
- `ties` — trim, elect sign, disjoint mean (Yadav et al. 2023, arXiv:2306.01708).
- `dare` — drop and rescale, then linear or TIES (Yu et al. 2024, arXiv:2311.03099).
- `slerp` — spherical interpolation of two models (Shoemake 1985, as used for model merging).

Bad arguments raise ValueError with a message meant for the user; the caller turns it into a
usage error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch

__all__ = ["linear", "task_vectors", "task_arithmetic", "magnitude_threshold", "ties", "dare",
           "dare_drop", "slerp"]

TrimScope = Literal["tensor", "model"]
Sign = Literal["weighted", "unweighted"]
Divide = Literal["count", "weights"]
Tie = Literal["positive", "zero"]
Rescale = Literal["inverse", "l1"]
Then = Literal["linear", "ties"]

# Entries kept by magnitude come in 2**15-ulp buckets of the float32 bit pattern (the top 16
# bits of a non-negative float32 order like its value), so the threshold needs one histogram
# pass and one pass over a single bucket instead of holding every magnitude of a model.
_BUCKET_SHIFT = 15
_BUCKETS = 1 << (31 - _BUCKET_SHIFT)


# ------------------------------------------------------------------ validation and dtypes


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_density(density) -> float:
    d = _number(density, "density")
    if not 0.0 < d <= 1.0:
        raise ValueError(f"density must be in (0, 1] (the fraction of entries kept), got {d}")
    return d


def _check_choice(value, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _check_tensors(tensors, base: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The tensors as a list, all floating point and of one shape (the base's when given)."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise ValueError("tensors must be a list of tensors (one per model)")
    tensors = list(tensors)
    if not tensors:
        raise ValueError("tensors is empty: at least one model's tensor is needed")
    named = ([("base", base)] if base is not None else []) + [
        (f"tensor {i}", t) for i, t in enumerate(tensors)]
    ref_name, ref = named[0]
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} is a {type(t).__name__}, not a tensor")
        if not t.is_floating_point():
            raise ValueError(f"{name} has dtype {t.dtype}; only floating-point tensors merge")
        if t.shape != ref.shape:
            raise ValueError(f"shapes differ: {name} has shape {tuple(t.shape)}, "
                             f"{ref_name} has {tuple(ref.shape)}")
    return tensors


def _check_weights(weights, count: int) -> list[float]:
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().reshape(-1).tolist()
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ValueError("weights must be a list of numbers (one per model)")
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weights for {count} models: give one weight per model")
    return [_number(w, f"weight {i}") for i, w in enumerate(weights)]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _weights_column(weights: list[float], like: torch.Tensor) -> torch.Tensor:
    """Weights shaped to broadcast over a stack of tensors shaped like `like`."""
    return torch.tensor(weights, dtype=like.dtype, device=like.device).view(
        -1, *([1] * like.dim()))


# ------------------------------------------------------------------ linear and task arithmetic


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted sum Σ wᵢ·xᵢ of one parameter's tensors (a model soup when Σ wᵢ = 1).

    The weights are used as given, not renormalised: pass weights summing to 1 for a mean.
    Returns the dtype of ``tensors[0]``.
    """
    tensors = _check_tensors(tensors)
    w = _check_weights(weights, len(tensors))
    dtype = _compute_dtype(*tensors)
    out = torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    for wi, t in zip(w, tensors):
        out.add_(t.to(dtype), alpha=wi)
    return out.to(tensors[0].dtype)


def task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The task vectors τᵢ = tensorᵢ − base.

    Unlike the merge functions these stay in the compute dtype (float32, or float64 when an
    input is float64), bit for bit the values `ties` trims internally, so a model-scope
    threshold computed from them (`magnitude_threshold`) selects exactly the same entries.
    """
    tensors = _check_tensors(tensors, base)
    dtype = _compute_dtype(base, *tensors)
    b = base.to(dtype)
    return [t.to(dtype) - b for t in tensors]


def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor],
                    weights: Sequence[float], lam: float) -> torch.Tensor:
    """Task arithmetic: base + λ·Σ wᵢ·(tensorᵢ − base) (Ilharco et al. 2023).

    The paper adds task vectors with one scaling λ (weights 1) chosen on validation data.
    Returns the base's dtype.
    """
    lam = _number(lam, "lam")
    taus = task_vectors(base, tensors)
    w = _check_weights(weights, len(taus))
    merged = torch.zeros_like(taus[0])
    for wi, tau in zip(w, taus):
        merged.add_(tau, alpha=wi)
    return (base.to(merged.dtype) + lam * merged).to(base.dtype)


# ------------------------------------------------------------------ TIES


def _magnitude_key(x: torch.Tensor) -> torch.Tensor:
    """Bucket index of |x|: monotone in |x| (float32 rounding and the bit pattern both are)."""
    return _float32_bits(x) >> _BUCKET_SHIFT


def magnitude_threshold(taus: Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]],
                        density: float) -> float:
    """The magnitude at or above which the top ``density`` fraction of all entries of ``taus``
    lies: the k-th largest |x| with k = round(density·n), at least 1, n = all entries together.

    For TIES at model scope: pass all task vectors of ONE model (every parameter it merges,
    computed with `task_vectors`), then give each model's threshold to `ties(threshold=...)`.
    With one tensor this is exactly the per-tensor threshold `ties` uses. Entries equal to
    the threshold are all kept, so ties in magnitude can keep slightly more than k entries.

    ``taus`` is a sequence of tensors, or a function returning a fresh iterable of them: it is
    read a few times (a histogram of the top bits, one of the low bits inside the bucket
    found, and for float64 input the few values rounding to the float32 found), one tensor at
    a time, so a caller streaming from disk never holds all the model's magnitudes at once.
    """
    d = _check_density(density)
    again = taus if callable(taus) else None
    if again is None:
        if isinstance(taus, torch.Tensor) or not isinstance(taus, Sequence):
            raise ValueError("taus must be a list of tensors or a function returning them "
                             "(it is read more than once)")
        taus = list(taus)
        again = lambda: taus  # noqa: E731
    counts = None
    n, wide = 0, False
    for tau in again():
        if not isinstance(tau, torch.Tensor) or not tau.is_floating_point():
            raise ValueError("taus must hold floating-point tensors")
        hist = torch.bincount(_magnitude_key(tau), minlength=_BUCKETS).cpu()
        counts = hist if counts is None else counts + hist
        n += tau.numel()
        wide = wide or tau.dtype == torch.float64
    if not n:
        raise ValueError("taus holds no entries")
    k = min(n, max(1, math.floor(d * n + 0.5)))
    # the bucket holding the k-th largest: the first (from the top) whose cumulative count ≥ k
    above = torch.flip(torch.cumsum(torch.flip(counts, [0]), 0), [0])  # entries in buckets ≥ b
    bucket = int((above >= k).nonzero().max())
    rank = k - (int(above[bucket + 1]) if bucket + 1 < _BUCKETS else 0)  # rank inside bucket
    # a second histogram over the bucket's low bits: each of its cells is one float32 value,
    # so no pass ever holds a bucket's entries (all of them, when a model equals the base)
    low = (1 << _BUCKET_SHIFT) - 1
    cells = None
    for tau in again():
        bits = _float32_bits(tau)
        hist = torch.bincount(bits[(bits >> _BUCKET_SHIFT) == bucket] & low,
                              minlength=low + 1).cpu()
        cells = hist if cells is None else cells + hist
    above = torch.flip(torch.cumsum(torch.flip(cells, [0]), 0), [0])
    cell = int((above >= rank).nonzero().max())
    rank -= int(above[cell + 1]) if cell < low else 0
    key = (bucket << _BUCKET_SHIFT) | cell
    value = float(torch.tensor([key], dtype=torch.int32).view(torch.float32))
    if not wide:
        return value
    # float64 magnitudes: the k-th largest of those that round to this float32 value
    inside = [tau.reshape(-1)[_float32_bits(tau) == key].abs().double().cpu()
              for tau in again()]
    values = torch.cat(inside)
    return float(torch.kthvalue(values, values.numel() - rank + 1).values)


def _float32_bits(x: torch.Tensor) -> torch.Tensor:
    """The float32 bit pattern of |x|, flat: it orders like the value."""
    return x.abs().to(torch.float32).view(torch.int32).reshape(-1)


def _elect_and_merge(taus: list[torch.Tensor], weights: list[float], sign: str, divide: str,
                     tie: str) -> torch.Tensor:
    """TIES steps 2-3 on already sparse task vectors: elect a sign per entry, then the mean of
    the (weighted) entries that agree with it."""
    stacked = torch.stack(taus)
    w = _weights_column(weights, taus[0])
    contrib = stacked * w
    # the vote and the agreement are judged in the same space: raw τ or weighted wτ
    votes = contrib if sign == "weighted" else stacked
    total = votes.sum(0)
    elected = torch.sign(total)
    if tie == "positive":
        elected[total == 0] = 1
    # agreeing = same non-zero sign as the elected one; an elected 0 ("zero" tie) matches
    # nothing, so the entry merges to 0
    agree = (votes * elected) > 0
    numerator = (contrib * agree).sum(0)
    if divide == "count":
        denominator = agree.sum(0, dtype=numerator.dtype)
    else:
        denominator = (w * agree).sum(0)
    # nothing agrees → numerator is 0; agreeing weights summing to 0 → undivided sum (as
    # mergekit), rather than inf
    denominator = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return numerator / denominator


def ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
         lam: float, density: float, *, trim_scope: TrimScope = "tensor",
         threshold: Sequence[float] | None = None, sign: Sign = "unweighted",
         divide: Divide = "count", tie: Tie = "zero") -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): base + λ·merged, where merged is built from the task
    vectors τᵢ = tensorᵢ − base in three steps.

    1. Trim: keep the entries of each τᵢ with |τᵢ| ≥ its threshold (the top ``density``
       fraction by magnitude, see `magnitude_threshold`), zero the rest.
       ``trim_scope="tensor"`` computes the threshold over this tensor; ``"model"`` takes it
       from ``threshold`` (one per model, from `magnitude_threshold` over all of that model's
       task vectors). The paper's reference code trims over the whole model; this function sees
       one tensor, so its default is "tensor" and the caller provides the model scope.
    2. Elect: the sign of Σᵢ τ̂ᵢ per entry (``sign="unweighted"``, the paper's equation) or of
       Σᵢ wᵢτ̂ᵢ (``"weighted"``, mergekit). A sum of exactly 0 gives 0 (``tie="zero"``, the
       paper's equation: sgn(0) = 0, so no entry agrees and the entry merges to 0) or +1
       (``"positive"``, peft and mergekit); the authors' code uses the majority elected sign
       of the whole vector instead.
    3. Disjoint mean: Σ wᵢτ̂ᵢ over the models agreeing with the elected sign (judged on τ̂ᵢ,
       or on wᵢτ̂ᵢ with ``sign="weighted"``), divided by how many agree (``divide="count"``,
       the paper; peft) or by the sum of their weights (``"weights"``, mergekit).

    The paper has no per-model weights: its setting is weights of 1 with ``divide="count"``
    (with ``"weights"`` the weights' scale cancels). Returns the base's dtype.
    """
    lam = _number(lam, "lam")
    d = _check_density(density)
    _check_choice(trim_scope, "trim_scope", ("tensor", "model"))
    _check_choice(sign, "sign", ("weighted", "unweighted"))
    _check_choice(divide, "divide", ("count", "weights"))
    _check_choice(tie, "tie", ("positive", "zero"))
    taus = task_vectors(base, tensors)
    w = _check_weights(weights, len(taus))
    if trim_scope == "model":
        if threshold is None:
            raise ValueError("trim_scope='model' needs threshold=[one per model], computed with "
                             "magnitude_threshold over each model's task vectors")
        if isinstance(threshold, (str, bytes)) or not isinstance(threshold, Sequence) \
                or len(threshold) != len(taus):
            raise ValueError(f"threshold must list one number per model ({len(taus)})")
        cuts = [_number(c, f"threshold {i}") for i, c in enumerate(threshold)]
    else:
        if threshold is not None:
            raise ValueError("threshold is only used with trim_scope='model'")
        cuts = [magnitude_threshold([tau], d) if d < 1 else 0.0 for tau in taus]
    trimmed = [torch.where(tau.abs() >= cut, tau, torch.zeros_like(tau))
               for tau, cut in zip(taus, cuts)]
    merged = _elect_and_merge(trimmed, w, sign, divide, tie)
    return (base.to(merged.dtype) + lam * merged).to(base.dtype)


# ------------------------------------------------------------------ DARE


def dare_drop(tau: torch.Tensor, density: float, generator: torch.Generator,
              rescale: Rescale = "inverse") -> torch.Tensor:
    """DARE's drop-and-rescale of one task vector: keep each entry with probability
    ``density`` (drop with p = 1 − density), then multiply the kept entries by 1/(1 − p)
    (``rescale="inverse"``, the paper: unbiased, E[result] = τ) or by ‖τ‖₁ / ‖kept‖₁
    (``"l1"``, mergekit's estimator: the L1 norm is preserved exactly; all dropped → zeros).

    Draws one uniform tensor of τ's shape from ``generator`` (none when density is 1, which
    returns τ unchanged), so a seeded generator used in a fixed order is deterministic.
    """
    d = _check_density(density)
    _check_choice(rescale, "rescale", ("inverse", "l1"))
    if d == 1.0:
        return tau.clone()
    draw = torch.rand(tau.shape, generator=generator, device=generator.device)
    kept = torch.where(draw.to(tau.device) < d, tau, torch.zeros_like(tau))
    if rescale == "inverse":
        return kept / d
    before, after = tau.abs().sum(), kept.abs().sum()
    return kept * (before / after) if after > 0 else kept


def dare(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
         lam: float, density: float, generator: torch.Generator, *,
         rescale: Rescale = "inverse", then: Then = "linear", **ties_options) -> torch.Tensor:
    """DARE (Yu et al. 2024): each task vector τᵢ = tensorᵢ − base goes through `dare_drop`
    (drop with p = 1 − density, rescale by 1/(1 − p) — the paper — or to keep ‖τᵢ‖₁, ``"l1"``),
    then the sparse vectors combine as base + λ·Σ wᵢτ̃ᵢ (``then="linear"``, DARE + task
    arithmetic, the paper's main setting) or by TIES's sign election and disjoint mean
    (``then="ties"``; the random drop replaces TIES's magnitude trim, as in mergekit's
    dare_ties). ``ties_options`` are `ties`'s ``sign``, ``divide`` and ``tie`` (same defaults).

    Task vectors draw from ``generator`` in model order. Returns the base's dtype.
    """
    lam = _number(lam, "lam")
    d = _check_density(density)
    _check_choice(rescale, "rescale", ("inverse", "l1"))
    _check_choice(then, "then", ("linear", "ties"))
    if not isinstance(generator, torch.Generator):
        raise ValueError("generator must be a torch.Generator (seed it for a repeatable merge)")
    unknown = set(ties_options) - {"sign", "divide", "tie"}
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}; DARE accepts "
                         "sign, divide and tie for then='ties'")
    if ties_options and then != "ties":
        raise ValueError(f"{', '.join(sorted(ties_options))} only apply with then='ties'")
    opts = {"sign": "unweighted", "divide": "count", "tie": "zero", **ties_options}
    _check_choice(opts["sign"], "sign", ("weighted", "unweighted"))
    _check_choice(opts["divide"], "divide", ("count", "weights"))
    _check_choice(opts["tie"], "tie", ("positive", "zero"))
    taus = task_vectors(base, tensors)
    w = _check_weights(weights, len(taus))
    sparse = [dare_drop(tau, d, generator, rescale) for tau in taus]
    if then == "ties":
        merged = _elect_and_merge(sparse, w, opts["sign"], opts["divide"], opts["tie"])
    else:
        merged = torch.zeros_like(sparse[0])
        for wi, tau in zip(w, sparse):
            merged.add_(tau, alpha=wi)
    return (base.to(merged.dtype) + lam * merged).to(base.dtype)


# ------------------------------------------------------------------ SLERP


def _orthogonal_unit(u: torch.Tensor) -> torch.Tensor:
    """A unit vector orthogonal to the unit vector u: the coordinate axis least aligned with u
    (|u_j| ≤ 1/√n, so the remainder has norm ≥ √(1 − 1/n)) minus its component along u."""
    j = int(torch.argmin(u.abs()))
    v = -u[j] * u
    v[j] += 1
    return v / v.norm()


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-4) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1) of one parameter, on the
    flattened vectors: the direction moves along the great circle from â to b̂ at constant
    angular speed, and the norm moves linearly, ‖x(t)‖ = (1−t)‖a‖ + t‖b‖.

    - t = 0 and t = 1 return ``a`` and ``b`` exactly (copies, in a's dtype).
    - Near-parallel (cos ≥ 1 − eps, the same direction; then lerp differs from slerp by about
      eps/4 relative) and zero-norm vectors fall back to linear a + t·(b − a).
    - Anti-parallel (cos ≤ −1 + eps): every great circle joins â to −â, so the path is not
      defined by a and b; a fixed one is chosen through `_orthogonal_unit` (the coordinate
      axis least aligned with a, made orthogonal), deterministic and independent of rounding
      noise, and b̂ is taken as exactly −â (within √(2·eps) rad of the truth). The direction
      stays a unit vector, so nothing cancels: at t = 0.5 the result is orthogonal to a with
      norm (‖a‖ + ‖b‖)/2. A one-entry tensor has no orthogonal direction and falls back to
      linear.
    - Unlike mergekit, which slerps the raw vectors (equal to this when ‖a‖ = ‖b‖) and lerps
      anti-parallel ones (cancelling them), directions and norms are interpolated separately.

    Returns a's dtype.
    """
    t = _number(t, "t")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1] (0 gives the first model, 1 the second), got {t}")
    eps = _number(eps, "eps")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    _check_tensors([a, b])
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.to(a.dtype, copy=True)
    dtype = _compute_dtype(a, b)
    x, y = a.to(dtype).reshape(-1), b.to(dtype).reshape(-1)
    na, nb = x.norm(), y.norm()
    if na == 0 or nb == 0:
        return (x + t * (y - x)).reshape(a.shape).to(a.dtype)
    ua, ub = x / na, y / nb
    cos = torch.clamp(torch.dot(ua, ub), -1.0, 1.0)
    if cos >= 1.0 - eps or (cos <= -1.0 + eps and x.numel() == 1):
        return (x + t * (y - x)).reshape(a.shape).to(a.dtype)
    if cos <= -1.0 + eps:
        theta, v = torch.tensor(math.pi, dtype=dtype), _orthogonal_unit(ua)
    else:
        w = ub - cos * ua  # the part of b̂ orthogonal to â, norm sin θ
        wn = w.norm()
        theta, v = torch.atan2(wn, cos), w / wn  # atan2: accurate at every angle
    direction = torch.cos(t * theta) * ua + torch.sin(t * theta) * v
    norm = (1.0 - t) * na + t * nb
    return (norm * direction).reshape(a.shape).to(a.dtype)
