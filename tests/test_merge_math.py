"""The tensor math of merging (compression/merge/tensors.py) against float64 references written
out longhand here with numpy and loops, on small random tensors."""

import math

import numpy as np
import pytest
import torch

from mmkit.compression.merge import tensors as mt


def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _models(n=3, shape=(6, 5), seed=0, scale=0.1):
    """A base and n fine-tunes around it (float64)."""
    base = _rand(shape, seed)
    return base, [base + scale * _rand(shape, seed + 1 + i) for i in range(n)]


def _np(t):
    return t.detach().to(torch.float64).numpy()


def _close(got, want, tol=1e-12):
    np.testing.assert_allclose(_np(got), want, rtol=tol, atol=tol)


# ------------------------------------------------------------------ longhand references


def ref_trim(tau, density):
    """Keep |x| ≥ the k-th largest magnitude, k = round(density·n) (at least 1)."""
    flat = tau.reshape(-1)
    k = max(1, math.floor(density * flat.size + 0.5))
    cut = sorted((abs(v) for v in flat), reverse=True)[k - 1]
    return np.array([v if abs(v) >= cut else 0.0 for v in flat]).reshape(tau.shape), cut


def ref_elect_merge(taus, weights, sign, divide, tie):
    """TIES sign election and disjoint mean, entry by entry."""
    out = np.zeros(taus[0].size)
    flat = [t.reshape(-1) for t in taus]
    for j in range(out.size):
        votes = [(w * t[j] if sign == "weighted" else t[j]) for w, t in zip(weights, flat)]
        total = sum(votes)
        elected = 1.0 if total > 0 else -1.0 if total < 0 else (1.0 if tie == "positive" else 0.0)
        num, den = 0.0, 0.0
        for w, t, v in zip(weights, flat, votes):
            if v != 0 and np.sign(v) == elected:
                num += w * t[j]
                den += 1.0 if divide == "count" else w
        out[j] = num / den if den != 0 else num
    return out.reshape(taus[0].shape)


def ref_slerp(a, b, t):
    """Textbook slerp of the unit directions (sin formula) times the linearly moved norm."""
    a, b = a.reshape(-1), b.reshape(-1)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    ua, ub = a / na, b / nb
    theta = math.acos(float(np.clip(ua @ ub, -1, 1)))
    u = (math.sin((1 - t) * theta) * ua + math.sin(t * theta) * ub) / math.sin(theta)
    return ((1 - t) * na + t * nb) * u


# ------------------------------------------------------------------ linear, task arithmetic


def test_linear_is_the_weighted_sum():
    _, xs = _models(3)
    w = [0.2, 0.5, 0.3]
    want = np.zeros(xs[0].shape)
    for wi, x in zip(w, xs):
        for i in range(want.shape[0]):
            for j in range(want.shape[1]):
                want[i, j] += wi * float(x[i, j])
    _close(mt.linear(xs, w), want)


def test_linear_does_not_renormalise_the_weights():
    _, xs = _models(2)
    _close(mt.linear(xs, [1.0, 1.0]), _np(xs[0]) + _np(xs[1]))


def test_task_vectors_and_task_arithmetic():
    base, xs = _models(3)
    taus = mt.task_vectors(base, xs)
    for tau, x in zip(taus, xs):
        _close(tau, _np(x) - _np(base))
    w, lam = [1.0, 0.5, -0.25], 0.3
    want = _np(base) + lam * sum(wi * (_np(x) - _np(base)) for wi, x in zip(w, xs))
    _close(mt.task_arithmetic(base, xs, w, lam), want)


def test_task_vectors_stay_in_the_compute_dtype():
    base, xs = _models(2)
    taus = mt.task_vectors(base.bfloat16(), [x.bfloat16() for x in xs])
    assert all(t.dtype == torch.float32 for t in taus)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_task_arithmetic_with_one_model_and_lambda_1_is_that_model(dtype):
    base, (x,) = _models(1)
    got = mt.task_arithmetic(base.to(dtype), [x.to(dtype)], [1.0], 1.0)
    assert got.dtype == dtype
    if dtype == torch.float32:  # (x − b) + b rounds once in float32
        torch.testing.assert_close(got, x.float(), rtol=1e-6, atol=1e-6)
    else:  # exact: bf16 / fp16 differences are exact in float32, float64 is the reference
        assert torch.equal(got, x.to(dtype))


# ------------------------------------------------------------------ TIES


@pytest.mark.parametrize("sign", ["unweighted", "weighted"])
@pytest.mark.parametrize("divide", ["count", "weights"])
@pytest.mark.parametrize("tie", ["zero", "positive"])
def test_ties_against_the_longhand_reference(sign, divide, tie):
    base, xs = _models(3, shape=(7, 6))
    w, lam, density = [0.7, 1.3, 0.4], 0.8, 0.3
    trimmed = [ref_trim(_np(x) - _np(base), density)[0] for x in xs]
    want = _np(base) + lam * ref_elect_merge(trimmed, w, sign, divide, tie)
    got = mt.ties(base, xs, w, lam, density, sign=sign, divide=divide, tie=tie)
    _close(got, want)


def test_ties_sign_modes_differ_where_weights_flip_the_vote():
    base = torch.zeros(1, dtype=torch.float64)
    xs = [torch.tensor([0.25], dtype=torch.float64), torch.tensor([-0.125], dtype=torch.float64)]
    w = [0.25, 1.0]  # unweighted: 0.25 − 0.125 > 0; weighted: 0.0625 − 0.125 < 0
    assert mt.ties(base, xs, w, 1.0, 1.0, sign="unweighted").item() == 0.25 * 0.25
    assert mt.ties(base, xs, w, 1.0, 1.0, sign="weighted").item() == -0.125
    # divide by the agreeing weight (one model agreeing) recovers its raw value
    assert mt.ties(base, xs, w, 1.0, 1.0, sign="weighted", divide="weights").item() == -0.125
    assert mt.ties(base, xs, w, 1.0, 1.0, sign="unweighted", divide="weights").item() == 0.25


def test_ties_sign_ties_both_modes():
    base = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    # entry 0: +0.5 and −0.5 sum to exactly 0; entry 1: a clear positive; entry 2: all zero
    d1 = torch.tensor([0.5, 0.25, 0.0], dtype=torch.float64)
    d2 = torch.tensor([-0.5, 0.75, 0.0], dtype=torch.float64)
    xs = [base + d1, base + d2]
    zero = mt.ties(base, xs, [1.0, 1.0], 1.0, 1.0, tie="zero")
    positive = mt.ties(base, xs, [1.0, 1.0], 1.0, 1.0, tie="positive")
    assert zero.tolist() == [1.0, 2.5, 3.0]  # the tied entry keeps the base
    assert positive.tolist() == [1.5, 2.5, 3.0]  # +1 elected: only +0.5 agrees, mean 0.5
    assert torch.equal(mt.ties(base, xs, [1.0, 1.0], 1.0, 1.0), zero)  # the paper's default
    # weighted votes that cancel exactly: 2·0.25 − 1·0.5 = 0
    xs = [base + torch.tensor([0.25, 0, 0.0], dtype=torch.float64),
          base + torch.tensor([-0.5, 0, 0.0], dtype=torch.float64)]
    w = [2.0, 1.0]
    assert mt.ties(base, xs, w, 1.0, 1.0, sign="weighted", tie="zero")[0].item() == 1.0
    assert mt.ties(base, xs, w, 1.0, 1.0, sign="weighted", tie="positive")[0].item() == 1.5
    assert mt.ties(base, xs, w, 1.0, 1.0, sign="weighted", tie="positive",
                   divide="weights")[0].item() == 1.25  # 2·0.25 / 2


def test_ties_density_1_with_agreeing_signs_is_the_mean_of_the_task_vectors():
    base = torch.zeros(4, dtype=torch.float64)
    xs = [torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64),
          torch.tensor([3.0, 1.0, -2.0, 0.5], dtype=torch.float64)]
    _close(mt.ties(base, xs, [1.0, 1.0], 1.0, 1.0), [2.0, 1.5, -1.5, 0.5])


def test_magnitude_threshold_is_the_kth_largest_magnitude():
    base, xs = _models(2, shape=(13, 11))
    taus = mt.task_vectors(base, xs)
    for density in (0.01, 0.2, 0.5, 0.93, 1.0):
        allmag = np.sort(np.abs(np.concatenate([_np(t).reshape(-1) for t in taus])))[::-1]
        k = max(1, math.floor(density * allmag.size + 0.5))
        assert mt.magnitude_threshold(taus, density) == allmag[k - 1]
        assert mt.magnitude_threshold(lambda: iter(taus), density) == allmag[k - 1]


def test_magnitude_threshold_with_values_in_one_bucket_and_ties():
    # values differing in the last bits share a histogram bucket; equal magnitudes tie
    tau = torch.tensor([1.0, 1.0 + 2**-20, -(1.0 + 2**-21), 1.0 + 2**-22, -1.0, 0.5],
                       dtype=torch.float32)
    mags = sorted((abs(v) for v in tau.tolist()), reverse=True)
    for k in range(1, 7):
        assert mt.magnitude_threshold([tau], k / 6) == mags[k - 1]
    # 4 of 6 requested, the 4th and 5th largest are equal: both kept
    trimmed = mt.ties(torch.zeros(6), [tau], [1.0], 1.0, 4 / 6)
    assert int((trimmed != 0).sum()) == 5


def test_ties_model_scope_uses_one_threshold_over_all_tensors():
    density, w, lam = 0.25, [1.0, 0.6], 1.0
    # two parameters; model 0 changes the first one much more than the second
    b1, b2 = _rand((5, 4), 50), _rand((9,), 51)
    m1 = [b1 + 1.0 * _rand((5, 4), 52), b1 + 0.1 * _rand((5, 4), 53)]
    m2 = [b2 + 0.1 * _rand((9,), 54), b2 + 1.0 * _rand((9,), 55)]
    thresholds = []
    trimmed1, trimmed2 = [], []
    for i in range(2):  # the reference trims each model's concatenated task vector
        flat = np.concatenate([(_np(m1[i]) - _np(b1)).reshape(-1), _np(m2[i]) - _np(b2)])
        cut_flat, cut = ref_trim(flat, density)
        thresholds.append(mt.magnitude_threshold(
            [mt.task_vectors(b1, [m1[i]])[0], mt.task_vectors(b2, [m2[i]])[0]], density))
        assert thresholds[-1] == cut
        trimmed1.append(cut_flat[:20].reshape(5, 4))
        trimmed2.append(cut_flat[20:])
    want1 = _np(b1) + lam * ref_elect_merge(trimmed1, w, "unweighted", "count", "zero")
    want2 = _np(b2) + lam * ref_elect_merge(trimmed2, w, "unweighted", "count", "zero")
    _close(mt.ties(b1, m1, w, lam, density, trim_scope="model", threshold=thresholds), want1)
    _close(mt.ties(b2, m2, w, lam, density, trim_scope="model", threshold=thresholds), want2)
    # and it differs from the per-tensor scope on this input
    assert not torch.allclose(mt.ties(b1, m1, w, lam, density), torch.from_numpy(want1))


# ------------------------------------------------------------------ DARE


def test_dare_is_deterministic_for_a_seed():
    base, xs = _models(3)
    w = [0.3, 0.3, 0.4]
    for then in ("linear", "ties"):
        one = mt.dare(base, xs, w, 1.0, 0.3, torch.Generator().manual_seed(7), then=then)
        two = mt.dare(base, xs, w, 1.0, 0.3, torch.Generator().manual_seed(7), then=then)
        other = mt.dare(base, xs, w, 1.0, 0.3, torch.Generator().manual_seed(8), then=then)
        assert torch.equal(one, two)
        assert not torch.equal(one, other)


def test_dare_drop_keeps_about_density_and_rescales_by_the_inverse():
    tau = _rand((100, 100), 3)
    out = mt.dare_drop(tau, 0.3, torch.Generator().manual_seed(1))
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 1e4)
    _close(out[kept], _np(tau[kept]) / 0.3)


def test_dare_l1_rescale_preserves_the_l1_norm():
    base, xs = _models(1, shape=(40, 30))
    tau = mt.task_vectors(base, xs)[0]
    for density in (0.05, 0.5, 0.9):
        out = mt.dare_drop(tau, density, torch.Generator().manual_seed(2), rescale="l1")
        assert abs(out.abs().sum().item() - tau.abs().sum().item()) < 1e-9 * tau.abs().sum().item()
        merged = mt.dare(base, xs, [1.0], 1.0, density, torch.Generator().manual_seed(2),
                         rescale="l1")
        assert math.isclose((merged - base).abs().sum().item(), tau.abs().sum().item(),
                            rel_tol=1e-9)


def test_dare_expectation_is_task_arithmetic():
    """Each entry of the merged delta is Σ wᵢτᵢ·mᵢ/d with mᵢ ~ Bernoulli(d), so its variance is
    σ² = λ²·Σ wᵢ²τᵢ²·(1 − d)/d; the mean of S seeds is within 5σ/√S of the task-arithmetic
    merge for every entry (each entry fails with probability < 6e-7)."""
    base, xs = _models(3, shape=(4, 5))
    w, lam, d, seeds = [0.5, 0.3, 0.2], 0.7, 0.4, 4000
    total = torch.zeros_like(base)
    for s in range(seeds):
        total += mt.dare(base, xs, w, lam, d, torch.Generator().manual_seed(s))
    mean = _np(total / seeds)
    want = _np(base) + lam * sum(wi * (_np(x) - _np(base)) for wi, x in zip(w, xs))
    var = lam**2 * sum(wi**2 * (_np(x) - _np(base)) ** 2 for wi, x in zip(w, xs)) * (1 - d) / d
    assert np.all(np.abs(mean - want) <= 5 * np.sqrt(var / seeds) + 1e-12)


def test_dare_with_density_1_is_task_arithmetic_or_ties():
    base, xs = _models(3)
    w, g = [0.5, 0.3, 0.2], torch.Generator().manual_seed(0)
    _close(mt.dare(base, xs, w, 0.9, 1.0, g), _np(mt.task_arithmetic(base, xs, w, 0.9)))
    _close(mt.dare(base, xs, w, 0.9, 1.0, g, then="ties", sign="weighted"),
           _np(mt.ties(base, xs, w, 0.9, 1.0, sign="weighted")))


@pytest.mark.parametrize("rescale", ["inverse", "l1"])
@pytest.mark.parametrize("opts", [{}, {"sign": "weighted", "divide": "weights",
                                       "tie": "positive"}])
def test_dare_ties_against_the_longhand_reference(rescale, opts):
    """The documented draw order: one uniform tensor per model, in order, from the generator;
    an entry is kept when its draw is below the density."""
    base, xs = _models(3, shape=(6, 7))
    w, lam, d = [0.5, 0.8, 0.4], 0.9, 0.5
    g = torch.Generator().manual_seed(11)
    sparse = []
    for x in xs:
        draw = torch.rand(base.shape, generator=g).double().numpy()
        tau = _np(x) - _np(base)
        kept = np.where(draw < d, tau, 0.0)
        if rescale == "inverse":
            sparse.append(kept / d)
        else:
            sparse.append(kept * np.abs(tau).sum() / np.abs(kept).sum())
    full = {"sign": "unweighted", "divide": "count", "tie": "zero", **opts}
    want = _np(base) + lam * ref_elect_merge(sparse, w, full["sign"], full["divide"], full["tie"])
    got = mt.dare(base, xs, w, lam, d, torch.Generator().manual_seed(11), rescale=rescale,
                  then="ties", **opts)
    _close(got, want)


# ------------------------------------------------------------------ SLERP


def test_slerp_endpoints_are_exact():
    a, b = _rand((4, 3), 1).float(), _rand((4, 3), 2).float()
    assert torch.equal(mt.slerp(a, b, 0.0), a)
    assert torch.equal(mt.slerp(a, b, 1.0), b)
    assert torch.equal(mt.slerp(a, -a, 1.0), -a)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.77])
def test_slerp_general_angle_matches_the_textbook_formula(t):
    a, b = _rand((5, 4), 3), _rand((5, 4), 4) * 2.5
    _close(mt.slerp(a, b, t), ref_slerp(_np(a), _np(b), t).reshape(5, 4), tol=1e-10)


@pytest.mark.parametrize("t", [0.25, 0.5, 0.9])
def test_slerp_orthogonal_closed_form(t):
    a = torch.tensor([[3.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # ⊥ a, norms 3 and 1
    norm = (1 - t) * 3 + t * 1
    want = [[norm * math.cos(t * math.pi / 2), 0.0], [0.0, norm * math.sin(t * math.pi / 2)]]
    _close(mt.slerp(a, b, t), want)


def test_slerp_parallel_and_near_parallel_are_linear():
    a = _rand((10,), 5)
    _close(mt.slerp(a, 3 * a, 0.25), 1.5 * _np(a))
    b = a + 1e-4 * _rand((10,), 6)  # cos > 1 − 1e-4
    _close(mt.slerp(a, b, 0.3), 0.7 * _np(a) + 0.3 * _np(b))


def test_slerp_anti_parallel_does_not_cancel():
    a = _rand((6, 2), 7)
    b = -2 * a
    mid = mt.slerp(a, b, 0.5)
    na = float(a.norm())
    assert math.isclose(float(mid.norm()), 1.5 * na, rel_tol=1e-12)  # norm interpolated
    assert abs(float((mid * a).sum())) < 1e-12 * na * na  # a quarter turn: orthogonal to a
    quarter = mt.slerp(a, b, 0.25)
    cos = float((quarter * a).sum() / (quarter.norm() * a.norm()))
    assert math.isclose(cos, math.cos(math.pi / 4), rel_tol=1e-12)
    assert math.isclose(float(quarter.norm()), 1.25 * na, rel_tol=1e-12)
    assert torch.equal(mid, mt.slerp(a, b, 0.5))  # one fixed great circle
    # nearly anti-parallel: inside eps the fixed circle, just outside it the textbook formula
    near = -a + 1e-4 * _rand((6, 2), 9)
    assert math.isclose(float(mt.slerp(a, near, 0.5).norm()), (na + float(near.norm())) / 2,
                        rel_tol=1e-12)
    wider = -a + 0.05 * na * _rand((6, 2), 10)
    assert float((wider * a).sum() / (wider.norm() * a.norm())) > -1 + 1e-4
    _close(mt.slerp(a, wider, 0.5), ref_slerp(_np(a), _np(wider), 0.5).reshape(6, 2), tol=1e-9)
    # float32 anti-parallel, the common case of a sign-flipped tensor
    mid32 = mt.slerp(a.float(), -a.float(), 0.5)
    assert math.isclose(float(mid32.norm()), na, rel_tol=1e-5)


def test_slerp_zero_norm_and_single_entry_fall_back_to_linear():
    a = _rand((3, 3), 8)
    _close(mt.slerp(torch.zeros_like(a), a, 0.4), 0.4 * _np(a))
    _close(mt.slerp(a, torch.zeros_like(a), 0.4), 0.6 * _np(a))
    one = torch.tensor([2.0], dtype=torch.float64)
    _close(mt.slerp(one, -one * 3, 0.5), [-2.0])


# ------------------------------------------------------------------ identical inputs, dtypes


def test_identical_models_merge_to_the_model():
    base, (x,) = _models(1)
    x = x.float()
    base = base.float()
    same = [x, x.clone(), x.clone(), x.clone()]
    g = torch.Generator().manual_seed(0)
    assert torch.equal(mt.linear(same, [0.25] * 4), x)
    torch.testing.assert_close(mt.linear(same[:3], [0.2, 0.3, 0.5]), x, rtol=1e-6, atol=1e-6)
    assert torch.equal(mt.slerp(x, x.clone(), 0.37), x)
    # identical models and base: every task vector is 0
    for lam in (0.3, 1.0):
        assert torch.equal(mt.task_arithmetic(x, same, [0.25] * 4, lam), x)
        assert torch.equal(mt.ties(x, same, [1.0] * 4, lam, 0.2), x)
        assert torch.equal(mt.dare(x, same, [0.25] * 4, lam, 0.2, g), x)
        assert torch.equal(mt.dare(x, same, [1.0] * 4, lam, 0.2, g, then="ties"), x)
    # identical fine-tunes of a different base: TIES's disjoint mean (count) of equal vectors
    # is that vector, so λ = 1 and weights 1 give the model back
    torch.testing.assert_close(mt.ties(base, same, [1.0] * 4, 1.0, 1.0), x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_is_preserved(dtype):
    base, xs = _models(2, shape=(8, 8))
    b16, x16 = base.to(dtype), [x.to(dtype) for x in xs]
    b32, x32 = b16.float(), [x.float() for x in x16]
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    pairs = [
        (mt.linear(x16, [0.5, 0.5]), mt.linear(x32, [0.5, 0.5])),
        (mt.task_arithmetic(b16, x16, [0.5, 0.5], 0.7),
         mt.task_arithmetic(b32, x32, [0.5, 0.5], 0.7)),
        (mt.ties(b16, x16, [1.0, 1.0], 1.0, 0.3), mt.ties(b32, x32, [1.0, 1.0], 1.0, 0.3)),
        (mt.dare(b16, x16, [0.5, 0.5], 1.0, 0.5, g()),
         mt.dare(b32, x32, [0.5, 0.5], 1.0, 0.5, g())),
        (mt.dare(b16, x16, [1.0, 1.0], 1.0, 0.5, g(), then="ties"),
         mt.dare(b32, x32, [1.0, 1.0], 1.0, 0.5, g(), then="ties")),
        (mt.slerp(x16[0], x16[1], 0.3), mt.slerp(x32[0], x32[1], 0.3)),
    ]
    for low, high in pairs:
        assert low.dtype == dtype
        assert torch.equal(low, high.to(dtype))  # float32 math, one rounding at the end


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan"), "0.5", True])
def test_bad_density_is_rejected(density):
    base, xs = _models(2)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="density"):
        mt.ties(base, xs, [1, 1], 1.0, density)
    with pytest.raises(ValueError, match="density"):
        mt.dare(base, xs, [1, 1], 1.0, density, g)
    with pytest.raises(ValueError, match="density"):
        mt.magnitude_threshold([xs[0]], density)


@pytest.mark.parametrize("t", [-0.01, 1.01, float("inf")])
def test_bad_t_is_rejected(t):
    a, b = _rand((3,), 0), _rand((3,), 1)
    with pytest.raises(ValueError, match="t must"):
        mt.slerp(a, b, t)


def test_bad_weights_shapes_and_options_are_rejected():
    base, xs = _models(2)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="2 models"):
        mt.linear(xs, [1.0])
    with pytest.raises(ValueError, match="3 weights for 2 models"):
        mt.task_arithmetic(base, xs, [1, 1, 1], 1.0)
    with pytest.raises(ValueError, match="3 weights"):
        mt.ties(base, xs, [1, 1, 1], 1.0, 0.5)
    with pytest.raises(ValueError, match="1 weights"):
        mt.dare(base, xs, [1], 1.0, 0.5, g)
    with pytest.raises(ValueError, match=r"shapes differ: tensor 1 has shape \(2, 2\)"):
        mt.linear([xs[0], torch.zeros(2, 2)], [0.5, 0.5])
    with pytest.raises(ValueError, match="shapes differ"):
        mt.task_arithmetic(base[:2], xs, [1, 1], 1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        mt.slerp(xs[0], xs[1][:2], 0.5)
    with pytest.raises(ValueError, match="empty"):
        mt.linear([], [])
    with pytest.raises(ValueError, match="floating-point"):
        mt.linear([torch.ones(3, dtype=torch.int64)], [1.0])
    with pytest.raises(ValueError, match="sign"):
        mt.ties(base, xs, [1, 1], 1.0, 0.5, sign="majority")
    with pytest.raises(ValueError, match="threshold"):
        mt.ties(base, xs, [1, 1], 1.0, 0.5, trim_scope="model")
    with pytest.raises(ValueError, match="one number per model"):
        mt.ties(base, xs, [1, 1], 1.0, 0.5, trim_scope="model", threshold=[0.1])
    with pytest.raises(ValueError, match="only used with trim_scope='model'"):
        mt.ties(base, xs, [1, 1], 1.0, 0.5, threshold=[0.1, 0.1])
    with pytest.raises(ValueError, match="unknown option"):
        mt.dare(base, xs, [1, 1], 1.0, 0.5, g, then="ties", trim_scope="model")
    with pytest.raises(ValueError, match="only apply with then='ties'"):
        mt.dare(base, xs, [1, 1], 1.0, 0.5, g, sign="weighted")
    with pytest.raises(ValueError, match="rescale"):
        mt.dare(base, xs, [1, 1], 1.0, 0.5, g, rescale="l2")
    with pytest.raises(ValueError, match="generator"):
        mt.dare(base, xs, [1, 1], 1.0, 0.5, 0)
