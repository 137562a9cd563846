"""Weight-only kernels: byte unpacking and broadcast dequantization against the generic path,
torch's fused int8 / int4 CPU kernels and the packed bf16 (oneDNN) kernel against the
dequantizing kernel (on this CPU's branch and, in subprocesses, on the AVX2 and scalar branches
of torch and the AVX-512-without-bf16 and AVX2 branches of oneDNN), which grids take which
kernel and which kernel the measurement picks, training through a quantized layer, copies, and
a quantized model's logits and save / load with each kernel."""

import copy
import gc
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


needs_bf16 = pytest.mark.skipif(not kernels._bf16_supported(),
                                reason="oneDNN has no bf16 on this CPU")


@needs_bf16
@pytest.mark.parametrize("bits,group,symmetric,act_order,shape", [
    (8, None, True, False, (64, 96)), (8, None, False, False, (64, 96)),
    (4, 32, False, False, (64, 96)), (4, 32, True, True, (64, 96)),
    (3, 16, True, False, (40, 96)),   # grids no fused kernel takes: bf16 takes every grid
    (8, 32, True, False, (64, 40)), (2, 8, False, False, (24, 56))])
def test_bf16_kernel_agrees_with_dequantizing(bits, group, symmetric, act_order, shape):
    layer, reference, bias = _layer(bits, group, symmetric, act_order, shape)
    x = torch.randn(2, 5, shape[1], generator=torch.Generator().manual_seed(1))
    exact = x @ reference.t() + bias
    packed = _with_kernel("bf16", lambda: layer(x))
    assert layer._bf16 is not None and packed.shape == exact.shape and packed.dtype == x.dtype
    err = (packed - exact).abs().max() / exact.abs().max()
    assert 0 < err < BF16_TOL
    again = _with_kernel("bf16", lambda: copy.deepcopy(layer)(x))  # copies rebuild the kernel
    assert torch.equal(again, packed)


@needs_bf16
@pytest.mark.parametrize("symmetric", [True, False])
def test_bf16_kernel_keeps_per_channel_codes_exact(symmetric):
    """bf16 has 8 significant bits: an 8-bit weight rounded to it would move by up to half a
    code step. Per-channel grids pack code - zero point (exact) and scale afterwards."""
    layer, reference, _ = _layer(8, None, symmetric)
    plan = kernels.bf16_plan(layer)
    assert torch.equal(plan.weight.to_dense().float() * plan.scales[:, None], reference)
    grouped, _, _ = _layer(4, 32, symmetric)
    assert kernels.bf16_plan(grouped).scales is None  # grouped grids: the weight, in bf16


_BF16_BRANCH_SCRIPT = """
import json, os, torch
from mmkit.compression.quantize import grid, kernels
from mmkit.compression.quantize.qlinear import QuantLinear
gen = torch.Generator().manual_seed(0)
w, x = torch.randn(64, 96, generator=gen), torch.randn(3, 96, generator=gen)
codes, scales, zeros = grid.quantize_rows(w, 3, 16, True)
layer = QuantLinear.from_codes(codes, scales, zeros, grid.group_index(96, 16), 3)
ref = x @ layer.weight_float().t()
out = {"allowed": kernels.bf16_allowed()}
for mode in ("auto", "bf16") if out["allowed"] else ("auto",):
    os.environ["MMKIT_QUANT_KERNEL"] = mode
    with torch.no_grad():
        out[mode] = float((layer(x) - ref).abs().max() / ref.abs().max())
print(json.dumps(out))
"""


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return set()


@pytest.mark.parametrize("isa", ["AVX512_CORE", "AVX2"])
def test_bf16_kernel_on_other_onednn_branches(isa):
    """oneDNN picks its bf16 code by CPU: AMX, AVX-512 with bf16, AVX-512 emulating it (a
    Skylake), none on AVX2. Cap it: the kernel is allowed only where oneDNN has bf16, computes
    the same numbers there, and a layer on a CPU without it still runs (another kernel)."""
    if isa == "AVX512_CORE" and not {"avx512bw", "avx512vl", "avx512dq"} <= _cpu_flags():
        pytest.skip("this CPU has no AVX-512 to cap oneDNN at")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
    env.pop("MMKIT_QUANT_KERNEL", None)
    done = subprocess.run([sys.executable, "-c", _BF16_BRANCH_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["allowed"] is (isa == "AVX512_CORE" or "avx_ne_convert" in _cpu_flags())
    assert out["auto"] < BF16_TOL
    if out["allowed"]:
        assert 0 < out["bf16"] < BF16_TOL


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


@pytest.mark.parametrize("capability,bf16,seconds,picked", [
    ("AVX512", True, {"fused": 1.0, "bf16": 3.0, "dequant": 2.0}, "fused"),
    ("AVX512", True, {"fused": 2.0, "bf16": 0.5, "dequant": 1.0}, "bf16"),
    ("AVX512", True, {"fused": 2.0, "bf16": 3.0, "dequant": 1.0}, "dequant"),
    ("AVX512", False, {"fused": 1.0, "dequant": 2.0}, "fused"),
    ("AVX2", False, {"fused": 1.0, "dequant": 2.0}, "fused"),
    ("DEFAULT", True, {"bf16": 1.0, "dequant": 2.0}, "bf16"),
    ("DEFAULT", False, None, "dequant")])
def test_the_kernel_measured_fastest_is_picked_once_per_shape_and_rows(
        monkeypatch, capability, bf16, seconds, picked):
    """The fastest kernel differs between CPUs of one capability (an EPYC and an AMX Xeon are
    both AVX512 to torch), so it is measured: once per layer shape and power-of-two bucket of
    rows, among the kernels this CPU allows (never fused without AVX2, never bf16 where oneDNN
    has none); a bf16 copy is kept only by a layer that runs it."""
    monkeypatch.delenv("MMKIT_QUANT_KERNEL", raising=False)
    monkeypatch.setattr(kernels, "_capability", lambda: capability)
    monkeypatch.setattr(kernels, "_bf16_supported", lambda: bf16)
    monkeypatch.setattr(kernels, "_RANKING", {})
    timed = []

    def timing(layer, candidates, rows, repeats=3):
        timed.append((rows, set(candidates)))
        return dict(seconds)

    monkeypatch.setattr(kernels, "time_kernels", timing)
    monkeypatch.setattr(kernels, "run_fused", lambda plan, x, bias: torch.full((1,), 1.0))
    monkeypatch.setattr(kernels, "run_bf16", lambda packed, x, bias: torch.full((1,), 2.0))
    monkeypatch.setattr(kernels, "bf16_plan", lambda layer, budgeted=True: "packed")
    layer, _, _ = _layer(8, None, True)
    for rows in (5, 7, 8, 9):
        with torch.no_grad():
            y = layer(torch.randn(rows, 96))
        ran = {1.0: "fused", 2.0: "bf16"}.get(float(y.flatten()[0]), "dequant")
        assert ran == picked and y.numel() == (1 if ran != "dequant" else rows * 64)
    expected = set(seconds or ()) - {"dequant"}
    assert timed == ([(8, expected), (16, expected)] if seconds else [])
    assert layer._bf16 == ("packed" if picked == "bf16" else None)


@needs_bf16
def test_bf16_copies_stay_within_their_budget(monkeypatch):
    """A packed bf16 copy costs 2 bytes per weight beside the codes: past the budget a layer
    runs the next kernel of its shape's ranking, and a copy's bytes return when it goes."""
    monkeypatch.delenv("MMKIT_QUANT_KERNEL", raising=False)
    monkeypatch.setattr(kernels, "_RANKING", {})
    monkeypatch.setattr(kernels, "time_kernels", lambda layer, candidates, rows, repeats=3: {
        "bf16": 1.0, "dequant": 2.0, "fused": 3.0})
    layers = [_layer(8, None, True, seed=i)[0] for i in range(3)]  # 64 x 96: 12,288 bytes
    gc.collect()  # copies of earlier tests' layers that only a collection frees go now
    held = kernels.bf16_held()
    monkeypatch.setenv("MMKIT_QUANT_BF16_MB", str((held + 2 * 12_288 + 100) / 1e6))
    x = torch.randn(4, 96)
    with torch.no_grad():
        outs = [layer(x) for layer in layers]
    assert [bool(layer._bf16) for layer in layers] == [True, True, False]
    assert kernels.bf16_held() == held + 2 * 12_288
    assert torch.equal(outs[2], _with_kernel("dequant", lambda: layers[2](x)))  # next: dequant
    layers[0].forget_kernels()  # its copy is gone: the next layer to ask may have one
    assert kernels.bf16_held() == held + 12_288
    layers[2].forget_kernels()  # (a layer once refused is not asked again until rebuilt)
    with torch.no_grad():
        layers[2](x)
    assert layers[2]._bf16
    _with_kernel("bf16", lambda: layers[0](x))  # forced: past the budget all the same
    assert layers[0]._bf16 and kernels.bf16_held() == held + 3 * 12_288
    monkeypatch.setenv("MMKIT_QUANT_BF16_MB", "0")
    collections = []
    monkeypatch.setattr(kernels.gc, "collect", lambda: collections.append(1))
    fresh = [_layer(8, None, True, seed=9 + i)[0] for i in range(3)]
    with torch.no_grad():
        for layer in fresh:
            layer(x)
    assert [layer._bf16 for layer in fresh] == [False] * 3
    assert len(collections) == 1  # one collection before refusing, not one per layer


def test_the_bf16_budget_defaults_to_an_eighth_of_the_memory(monkeypatch):
    monkeypatch.delenv("MMKIT_QUANT_BF16_MB", raising=False)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert kernels.bf16_budget() == memory // 8
    monkeypatch.setenv("MMKIT_QUANT_BF16_MB", "12.5")
    assert kernels.bf16_budget() == 12_500_000
    monkeypatch.setenv("MMKIT_QUANT_BF16_MB", "lots")  # unreadable: the default
    assert kernels.bf16_budget() == memory // 8


@pytest.mark.parametrize("mode,expected", [("fused", "fused"), ("bf16", "bf16"),
                                           ("dequant", "dequant")])
def test_a_forced_kernel_is_taken_without_timing(monkeypatch, mode, expected):
    monkeypatch.setenv("MMKIT_QUANT_KERNEL", mode)
    monkeypatch.setattr(kernels, "_capability", lambda: "AVX512")
    monkeypatch.setattr(kernels, "_bf16_supported", lambda: True)
    monkeypatch.setattr(kernels, "time_kernels", lambda *a, **k: pytest.fail("timed"))
    layer, _, _ = _layer(8, None, True)
    assert kernels.fastest_kernel(layer, 16) == expected


def test_timing_runs_each_kernel_and_leaves_the_random_state_alone():
    layer, _, _ = _layer(4, 32, True)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    candidates = ("fused", "bf16") if kernels._bf16_supported() else ("fused",)
    seconds = kernels.time_kernels(layer, candidates, 16, repeats=2)
    assert set(seconds) == {"dequant", *candidates}
    assert all(0 < s < 10 for s in seconds.values())
    assert torch.equal(torch.rand(4), expected)
    assert layer._bf16 is None  # the copy built to be timed is not kept


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
    if kernels._bf16_supported():
        before = _with_kernel("bf16", lambda: layer(x))
        layer.load_state_dict(_layer(4, 32, False, seed=6)[0].state_dict())
        assert not torch.allclose(before, _with_kernel("bf16", lambda: layer(x)))
    layer.double()  # changing the buffers' dtype also drops the cached kernels
    assert layer._plan is None and layer._bf16 is None


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
    if kernels._bf16_supported():
        packed = _with_kernel("bf16", lambda: logits(again))
        assert torch.allclose(packed, dequant, atol=BF16_TOL * dequant.abs().max())
        assert not torch.equal(packed, fused)
