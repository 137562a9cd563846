"""Weight-only kernels: byte unpacking and broadcast dequantization against the generic path,
torch's fused int8 / int4 CPU kernels against the dequantizing kernel (on this CPU's branch and
on the AVX2 and scalar branches in subprocesses), which grids take which kernel, training
through a quantized layer, and a quantized model's logits and save / load with either kernel."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import logits
from mmkit.compression.quantize import grid, kernels
from mmkit.compression.quantize.qlinear import QuantLinear
from mmkit.core.loading import load_model
from mmkit.core.recipe import run_recipe

# bf16 activations and outputs: ~3 significant digits of the largest output
BF16_TOL = 1.5e-2


def _layer(bits, group, symmetric, act_order=False, shape=(64, 96), seed=0):
    """A QuantLinear from a random weight, and the float weight its grid stands for."""
    gen = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    w = torch.randn(out_f, in_f, generator=gen)
    perm = torch.randperm(in_f, generator=gen) if act_order else None
    codes, scales, zeros = grid.quantize_rows(w if perm is None else w[:, perm], bits, group,
                                              symmetric)
    if perm is not None:  # codes back in the original column order, groups follow perm
        codes = codes[:, torch.argsort(perm)]
    g_idx = grid.group_index(in_f, group, perm)
    bias = torch.randn(out_f, generator=gen)
    layer = QuantLinear.from_codes(codes, scales, zeros, g_idx, bits, bias)
    reference = grid.dequantize(codes, scales.half().float(), zeros.half().float(), g_idx)
    return layer, reference, bias


def _with_kernel(mode, fn):
    old = os.environ.get("MMKIT_QUANT_KERNEL")
    os.environ["MMKIT_QUANT_KERNEL"] = mode
    try:
        with torch.no_grad():
            return fn()
    finally:
        os.environ.pop("MMKIT_QUANT_KERNEL") if old is None else os.environ.update(
            MMKIT_QUANT_KERNEL=old)


# ---------------------------------------------------------------- unpack and dequantize
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_byte_unpacking_equals_the_generic_unpacking(bits):
    codes = torch.randint(0, 2 ** bits, (7, 45), generator=torch.Generator().manual_seed(bits))
    packed = grid.pack(codes, bits)
    assert torch.equal(kernels.unpack_bytes(packed, bits, 45).long(), codes)
    assert torch.equal(grid.unpack(packed, bits, 45), codes)


def test_byte_unpacking_declines_widths_that_straddle_bytes():
    assert kernels.unpack_bytes(torch.zeros(2, 3, dtype=torch.int32), 3, 20) is None


@pytest.mark.parametrize("bits,group,symmetric,act_order", [
    (4, 32, False, False), (3, 16, True, False), (8, None, True, False), (4, 32, True, True),
    (4, 40, False, False)])  # 40 does not tile 96: the last group is short -> gathering
def test_fast_dequantize_is_exact(bits, group, symmetric, act_order):
    layer, reference, _ = _layer(bits, group, symmetric, act_order)
    assert torch.equal(layer.weight_float(), reference)


# ---------------------------------------------------------------- fused kernels
@pytest.mark.parametrize("bits,group,symmetric,act_order,shape,kind", [
    (8, None, True, False, (64, 96), "int8"),
    (8, None, False, False, (64, 96), "int8"),   # asymmetric: rank-1 zero-point correction
    (4, 32, False, False, (64, 96), "int4"),
    (4, 32, True, True, (64, 96), "int4"),       # act-order: columns permuted into groups
    (4, None, False, False, (64, 96), "int4"),   # per channel: 3 kernel groups of 32
    (4, 64, True, False, (32, 96), "int4"),      # a short last group: kernel groups of 32
    (4, 48, True, False, (64, 96), None),        # 48 is no multiple of 32: dequantize
    (4, 32, True, False, (40, 96), None),        # rows not a multiple of 16: dequantize
    (8, 32, True, False, (64, 96), None),        # grouped 8-bit: dequantize
    (8, None, True, False, (64, 40), None),      # int8 kernel needs 16-column multiples
    (3, 32, True, False, (64, 96), None),
])
def test_fused_kernels_agree_with_dequantizing(bits, group, symmetric, act_order, shape, kind):
    layer, reference, bias = _layer(bits, group, symmetric, act_order, shape)
    x = torch.randn(2, 5, shape[1], generator=torch.Generator().manual_seed(1))
    exact = x @ reference.t() + bias
    dequant = _with_kernel("dequant", lambda: layer(x))
    fused = _with_kernel("fused", lambda: layer(x))
    plan = layer.fused_plan()
    assert (plan.kind if plan else None) == kind
    assert torch.allclose(dequant, exact, atol=1e-4)
    assert fused.shape == exact.shape and fused.dtype == x.dtype
    if kind is None:
        assert torch.equal(fused, dequant)  # no plan: the same dequantizing kernel
    else:
        err = (fused - exact).abs().max() / exact.abs().max()
        assert 0 < err < BF16_TOL  # bf16 rounding: close, and not the float path in disguise


_BRANCH_SCRIPT = """
import json, torch
from mmkit.compression.quantize import grid, kernels
from mmkit.compression.quantize.qlinear import QuantLinear
out = {"capability": torch.backends.cpu.get_cpu_capability(), "allowed": kernels.fused_allowed()}
gen = torch.Generator().manual_seed(0)
w = torch.randn(64, 128, generator=gen)
x = torch.randn(3, 128, generator=gen)
for bits, group in ((8, None), (4, 32)):
    codes, scales, zeros = grid.quantize_rows(w, bits, group, False)
    layer = QuantLinear.from_codes(codes, scales, zeros, grid.group_index(128, group), bits)
    ref = x @ layer.weight_float().t()
    plan = kernels.fused_plan(layer)
    with torch.no_grad():
        y = kernels.run_fused(plan, x, None)
    out[str(bits)] = float((y - ref).abs().max() / ref.abs().max())
print(json.dumps(out))
"""


@pytest.mark.parametrize("capability,allowed", [("avx2", True), ("default", False)])
def test_fused_kernels_on_other_cpu_branches(capability, allowed):
    """torch dispatches these kernels by CPU capability; users' CPUs differ from CI's. Force
    the AVX2 branch and the scalar one: both compute the same numbers, and mmkit only picks
    the fused kernels where they are vectorised."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    env.pop("MMKIT_QUANT_KERNEL", None)
    done = subprocess.run([sys.executable, "-c", _BRANCH_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["capability"] == capability.upper() and out["allowed"] is allowed
    assert 0 < out["8"] < BF16_TOL and 0 < out["4"] < BF16_TOL


@pytest.mark.parametrize("capability,fused_s,dequant_s,fused", [
    ("AVX512", 1.0, 2.0, True), ("AVX512", 2.0, 1.0, False), ("AVX2", 1.0, 2.0, True),
    ("DEFAULT", 1.0, 2.0, False)])
def test_the_kernel_measured_faster_is_picked_once_per_shape_and_rows(
        monkeypatch, capability, fused_s, dequant_s, fused):
    """The faster kernel differs between CPUs of one capability (an EPYC and an AMX Xeon are
    both AVX512 to torch), so it is measured: once per layer shape and power-of-two bucket of
    rows; never fused on a CPU without AVX2."""
    monkeypatch.delenv("MMKIT_QUANT_KERNEL", raising=False)
    monkeypatch.setattr(kernels, "_capability", lambda: capability)
    monkeypatch.setattr(kernels, "_FASTER", {})
    timed = []

    def timing(layer, plan, rows, repeats=3):
        timed.append(rows)
        return fused_s, dequant_s

    monkeypatch.setattr(kernels, "time_kernels", timing)
    layer, _, _ = _layer(8, None, True)
    for rows in (5, 7, 8, 9):
        x = torch.randn(rows, 96)
        with torch.no_grad():
            y = layer(x)
        dequant = _with_kernel("dequant", lambda: layer(x))
        assert torch.equal(y, dequant) is not fused
    assert timed == ([8, 16] if capability != "DEFAULT" else [])


def test_timing_the_two_kernels_runs_both_and_leaves_the_random_state_alone():
    layer, _, _ = _layer(4, 32, True)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    fused_s, dequant_s = kernels.time_kernels(layer, kernels.fused_plan(layer), 16, repeats=2)
    assert 0 < fused_s < 10 and 0 < dequant_s < 10
    assert torch.equal(torch.rand(4), expected)


def test_training_through_a_quantized_layer_uses_the_differentiable_kernel():
    layer, reference, bias = _layer(4, 32, False)
    x = torch.randn(3, 96, requires_grad=True)
    os.environ["MMKIT_QUANT_KERNEL"] = "fused"  # even forced: no autograd through it
    try:
        layer(x).sum().backward()
    finally:
        del os.environ["MMKIT_QUANT_KERNEL"]
    assert torch.allclose(x.grad, reference.sum(0).expand(3, -1), atol=1e-4)


def test_kernels_follow_the_buffers():
    layer, _, _ = _layer(4, 32, False)
    x = torch.randn(2, 96)
    before = _with_kernel("fused", lambda: layer(x))
    other, _, _ = _layer(4, 32, False, seed=5)
    layer.load_state_dict(other.state_dict())
    after = _with_kernel("fused", lambda: layer(x))
    assert torch.equal(after, _with_kernel("fused", lambda: other(x)))
    assert not torch.allclose(before, after)
    layer.double()  # changing the buffers' dtype also drops the cached plan
    assert layer._plan is None


# ---------------------------------------------------------------- whole models
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_quantized_model_logits_with_either_kernel_and_reload(family, tmp_path):
    out = tmp_path / "q"
    run_recipe({"model": f"tiny:{family}", "steps": [
        {"step": "quantize", "method": "rtn", "bits": 4, "group_size": 32}]}, out=out)
    loaded = load_model(str(out))
    fused_layers = [m for m in loaded.model.modules()
                    if isinstance(m, QuantLinear) and m.fused_plan() is not None]
    assert fused_layers  # the tiny models' grids fit the int4 kernel
    fused = _with_kernel("fused", lambda: logits(loaded))
    dequant = _with_kernel("dequant", lambda: logits(loaded))
    assert torch.allclose(fused, dequant, atol=BF16_TOL * dequant.abs().max())
    again = load_model(str(out))
    assert torch.equal(_with_kernel("fused", lambda: logits(again)), fused)
