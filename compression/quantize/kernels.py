"""Fast paths for QuantLinear: byte-level unpacking, torch's fused weight-only CPU kernels, and
a packed bf16 copy of the weight for oneDNN (AMX where the CPU has it).

Three ways to run a weight-only layer:
- dequantize (every device, every grid): rebuild the fp32 weight and use a float matmul. The
  unpacking reads the int32 words as bytes (2, 4 and 8 bits need no shifts of int64 codes) and
  applies contiguous groups by broadcasting instead of gathering: about 10x faster than the
  generic path, same numbers.
- fused (CPU, 8-bit per-channel and 4-bit grids that fit): torch's `_weight_int8pack_mm` and
  `_weight_int4pack_mm_for_cpu` read int8 / packed int4 weights straight from memory. Their
  fast code paths take bf16 activations only (fp32 runs a scalar reference loop that is 5-50x
  slower than a float matmul), so the activations are rounded to bf16 on the way in and the
  output comes back in bf16: results agree with the dequantizing kernel to bf16 rounding
  (about 3 significant digits), not bit for bit. 8-bit scales stay fp32 (applied after the
  kernel); 4-bit scales and zero points go to the kernel in bf16.
- bf16 (CPU, every grid, where oneDNN computes in bf16): the weight as bf16, reordered once
  into oneDNN's blocked layout and multiplied with bf16 activations (`mkldnn._linear_pointwise`,
  AMX tiles on Xeons that have them), fp32 scales and bias applied after. Per-channel grids
  pack their integer codes (exact in bf16), grouped grids the dequantized weight rounded to
  bf16 (2^-9 relative, far below their own step): the same bf16 rounding of activations and
  outputs as the fused kernels. Its cost is memory: the packed copy takes 2 bytes per weight
  beside the codes, built only for layers whose shape measured it fastest, and in all at most
  MMKIT_QUANT_BF16_MB (default: an eighth of the machine's memory); layers past the budget
  run their next-fastest kernel, so a large 4-bit LLM grows by at most the budget, not by 2
  bytes per weight. Why it exists: the weight-only kernels win where the matmul is
  memory-bound (few rows, decoding); with tens of rows it is compute-bound, and on an AMX Xeon
  fp32 matmuls beat both integer kernels there (MiniLM at batch 1 = 64 rows ran 0.58x as fast
  as fp32 with rtn-8), while a packed bf16 matmul takes 0.3-1.0x fp32's time.

The fused kernels are vectorised for AVX2 and AVX-512 only; on other CPUs (torch's DEFAULT
capability, ARM) they are 5-20x slower than dequantizing, so they are not used there. oneDNN
emulates bf16 on CPUs without it (slowly); `torch.ops.mkldnn._is_mkldnn_bf16_supported()`
says where it runs at all. Which kernel is faster depends on the CPU model, not only on its
capability, so it is measured: the first call of a layer shape with a number of input rows
(rounded up to a power of two) times every allowed kernel on that shape and keeps the fastest
for the rest of the process (`fastest_kernel`). Measured (fused / fp32 matmul on a 1536 x 384
or 384 x 1536 layer, 2 threads, lower is better): on an AMD EPYC (AVX-512) int8 0.65 at 16
rows, 0.8 at 256, 1.5 at 2,048, int4 0.5 / 0.75 / 0.65; on an Intel Xeon with AMX (also
"AVX512" to torch) int8 0.7-1.3 at 16 rows, 1.6-2.4 at 64 (dequantizing: 1.9-2.0) and 2.0-2.9
at 256 (dequantizing: 1.2-1.4). A fixed row limit per capability picked the slower kernel on
one. MMKIT_QUANT_KERNEL chooses by hand: =dequant turns the other kernels off (to compare, or
to get results identical to the float path); =fused forces the fused kernels wherever the grid
fits and never builds bf16 copies (memory stays at the quantized size); =bf16 forces the
packed bf16 kernel wherever oneDNN has bf16.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass

INT4_GROUPS = (256, 128, 64, 32)  # the group sizes torch's CPU int4 kernel accepts
VECTORISED = ("AVX2", "AVX512")  # torch.backends.cpu.get_cpu_capability()s the kernels use
MODES = ("auto", "fused", "bf16", "dequant")
_RANKING: dict[tuple, tuple] = {}  # (candidates, grid, layer shape, rows bucket) -> kernels
_BF16_HELD = [0]  # bytes of packed bf16 copies alive in this process
_COLLECTED_AT = [-1]  # what was held after the last collection made for a refused copy
_BF16_LOCK = threading.Lock()


def kernel_mode() -> str:
    """'auto' (default), 'fused', 'bf16' or 'dequant', from MMKIT_QUANT_KERNEL."""
    mode = os.environ.get("MMKIT_QUANT_KERNEL", "auto").strip().lower() or "auto"
    return mode if mode in MODES else "auto"


def fused_allowed() -> bool:
    """Whether the fused CPU kernels may run here at all (see the module docstring)."""
    mode = kernel_mode()
    return mode == "fused" if mode != "auto" else _capability() in VECTORISED


def bf16_allowed() -> bool:
    """Whether the packed bf16 kernel may run here at all (see the module docstring)."""
    return kernel_mode() in ("auto", "bf16") and _bf16_supported()


def fastest_kernel(layer, rows: int) -> str:
    """'fused', 'bf16' or 'dequant': the kernel `layer` runs for `rows` input rows on CPU
    without autograd. A forced mode takes its kernel wherever it applies; 'auto' ranks the
    allowed kernels by a measurement once per layer shape and power-of-two bucket of rows,
    then takes the first this layer can run (bf16 only where its copy fits the budget)."""
    plan = layer.fused_plan() if fused_allowed() else None
    candidates = (("fused",) if plan is not None else ()) + (("bf16",) if bf16_allowed() else ())
    if not candidates:
        return "dequant"
    if kernel_mode() != "auto":
        return candidates[0]  # a forced mode allows one kernel
    bucket = 1 << max(0, min(rows, 1 << 14) - 1).bit_length()
    grid_key = (plan.kind, plan.group_size, plan.perm is not None) if plan else layer.bits
    key = (candidates, grid_key, layer.out_features, layer.in_features, bucket)
    if key not in _RANKING:
        seconds = time_kernels(layer, candidates, bucket)
        _RANKING[key] = tuple(sorted(seconds, key=seconds.get))
    for kernel in _RANKING[key]:
        if kernel != "bf16" or layer.packed_bf16(budgeted=True) is not None:
            return kernel
    return "dequant"


def time_kernels(layer, candidates, rows: int, repeats: int = 3) -> dict[str, float]:
    """Seconds of one call of `layer` on `rows` random rows with each kernel in `candidates`
    and with the dequantizing one: the best of `repeats` calls of each in turns, after one
    warm-up round. A bf16 copy built to be timed is not kept."""
    import torch

    # a private generator: timing must not move the caller's random state
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(0))
    runs = {"dequant": lambda: torch.nn.functional.linear(x, layer.weight_float(), layer.bias)}
    if "fused" in candidates:
        plan = layer.fused_plan()
        runs["fused"] = lambda: run_fused(plan, x, layer.bias)
    if "bf16" in candidates:
        packed = layer._bf16 or bf16_plan(layer, budgeted=False)  # not kept
        runs["bf16"] = lambda: run_bf16(packed, x, layer.bias)
    best = dict.fromkeys(runs, float("inf"))
    with torch.inference_mode():
        for i in range(repeats + 1):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                if i:  # the first round warms up
                    best[name] = min(best[name], time.perf_counter() - start)
    return best


@functools.cache
def _capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


@functools.cache
def _bf16_supported() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


# ---------------------------------------------------------------- dequantize, fast
def unpack_bytes(qweight, bits: int, n: int):
    """Codes (rows, n) as uint8 from `grid.pack`'s int32 words, reading the words as bytes;
    None where that does not apply (other widths, a big-endian machine)."""
    import torch

    if bits not in (2, 4, 8) or sys.byteorder != "little":
        return None
    raw = qweight.contiguous().view(torch.uint8)  # the words' bytes, lowest first
    if bits == 8:
        return raw[:, :n]
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=raw.device)
    codes = (raw.unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    return codes.reshape(raw.shape[0], raw.shape[1] * per)[:, :n]


def contiguous_group_size(g_idx) -> int | None:
    """The group size when column j belongs to group j // size (no act-order; the last group
    may be shorter), else None."""
    import torch

    size = int((g_idx == 0).sum())
    expected = torch.arange(g_idx.numel(), device=g_idx.device) // max(size, 1)
    return size if size and torch.equal(g_idx.long(), expected) else None


def dequantize(codes, scales, zeros, g_idx, group_size: int | None):
    """fp32 weight from codes (out, in) and fp16 grid (out, n_groups); broadcasting over
    contiguous groups of `group_size` where they tile the row, gathering by g_idx otherwise."""
    s, z = scales.float(), zeros.float()
    out_f, in_f = codes.shape
    if group_size is None or in_f % group_size:
        idx = g_idx.long()
        return (codes.float() - z[:, idx]) * s[:, idx]
    w = codes.float().view(out_f, -1, group_size)
    return ((w - z.unsqueeze(-1)) * s.unsqueeze(-1)).view(out_f, in_f)


# ---------------------------------------------------------------- fused CPU kernels
@dataclass
class FusedPlan:
    """What one fused call needs, built once per layer from its buffers."""
    kind: str                 # "int8" or "int4"
    weight: object            # int8 (out, in) | int4-packed uint8
    scales: object            # int8: fp32 (out,) ; int4: bf16 scales_and_zeros
    offset: object = None     # int8 asymmetric: fp32 (out,) = (zero - 128) * scale
    group_size: int = 0       # int4
    perm: object = None       # act-order: the input columns in group order


def fused_plan(layer) -> FusedPlan | None:
    """A fused kernel plan for QuantLinear `layer`, or None when its grid does not fit one."""
    import torch

    if layer.bits == 8 and layer.scales.shape[1] == 1:
        # torch 2.13's AVX-512 int8 kernel reads 16 columns at a time: other widths give
        # NaN, garbage or a segfault (seen at 8, 24, 40 and 56 input columns)
        return _int8_plan(layer) if layer.in_features % 16 == 0 else None
    if layer.bits != 4 or layer.out_features % 16:
        return None
    g_idx, perm = layer.g_idx.long(), None
    size = contiguous_group_size(g_idx)
    if size is None:  # act-order: groups become contiguous once the columns are permuted
        perm = torch.sort(g_idx, stable=True).indices
        g_idx = g_idx[perm]
        size = contiguous_group_size(g_idx)
        if size is None:
            return None
    # a group may be split into equal kernel groups that repeat its scale and zero point
    kernel_group = next((g for g in INT4_GROUPS
                         if size % g == 0 and layer.in_features % g == 0), None)
    if kernel_group is None:
        return None
    return _int4_plan(layer, g_idx[::kernel_group], kernel_group, perm)


def _int8_plan(layer):
    import torch

    codes = unpack_bytes(layer.qweight, 8, layer.in_features)
    weight = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
    scale = layer.scales[:, 0].float()
    zero = layer.zeros[:, 0].float()
    offset = None if bool((zero == 128).all()) else (zero - 128) * scale
    return FusedPlan("int8", weight, scale, offset)


def _int4_plan(layer, groups, kernel_group, perm):
    """`groups`: the grid group of each kernel group (of `kernel_group` permuted columns)."""
    import torch

    codes = unpack_bytes(layer.qweight, 4, layer.in_features).to(torch.int32)
    if perm is not None:
        codes = codes[:, perm]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)
    scale = layer.scales.float()[:, groups]  # (out, kernel groups)
    zero = layer.zeros.float()[:, groups]
    # the kernel computes (code - 8) * scale + bias per group: bias = (8 - zero) * scale
    table = torch.stack([scale.t(), ((8 - zero) * scale).t()], dim=-1)
    return FusedPlan("int4", packed, table.to(torch.bfloat16).contiguous(),
                     group_size=kernel_group, perm=perm)


def run_fused(plan: FusedPlan, x, bias):
    """y = x W^T + b with a fused kernel; x of any leading shape, returned in x's dtype."""
    import torch

    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    if plan.perm is not None:
        flat = flat.index_select(1, plan.perm)
    xb = flat.to(torch.bfloat16).contiguous()
    if plan.kind == "int8":
        ones = torch.ones(plan.weight.shape[0], dtype=torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(xb, plan.weight, ones).float() * plan.scales
        if plan.offset is not None:  # w = (q - (zero - 128)) * scale: a rank-1 correction
            y = y - flat.float().sum(-1, keepdim=True) * plan.offset
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, plan.weight, plan.group_size,
                                                         plan.scales).float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])


# ---------------------------------------------------------------- packed bf16 (oneDNN)
@dataclass(eq=False)
class PackedBF16:
    """A weight packed for `run_bf16`: oneDNN's blocked bf16 layout (an opaque tensor: it
    cannot be copied or saved, only multiplied), and fp32 per-output scales applied after the
    matmul when the packed values are codes rather than weights."""
    weight: object
    scales: object = None


def pack_bf16(weight, scales=None) -> PackedBF16:
    """`weight` (out, in), float, packed as bf16; `scales` (out,): the true weight is
    weight * scales[:, None]."""
    import torch

    packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16).contiguous())
    return PackedBF16(packed, None if scales is None else scales.float())


def bf16_budget() -> int:
    """Bytes all packed bf16 copies of a process may hold in 'auto' mode: MMKIT_QUANT_BF16_MB,
    else an eighth of the machine's memory (1 GiB where that cannot be read)."""
    value = os.environ.get("MMKIT_QUANT_BF16_MB", "").strip()
    try:
        if value:
            return max(0, int(float(value) * 1e6))
    except ValueError:
        pass  # unreadable: the default, as for an unknown MMKIT_QUANT_KERNEL
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8
    except (AttributeError, ValueError, OSError):
        return 1 << 30


def bf16_held() -> int:
    """Bytes of packed bf16 copies alive in this process."""
    return _BF16_HELD[0]


def _reserve(nbytes: int, budgeted: bool) -> bool:
    """Count `nbytes` of a new copy against the budget; False if it does not fit."""
    for attempt in range(2):
        with _BF16_LOCK:
            if not budgeted or _BF16_HELD[0] + nbytes <= bf16_budget():
                _BF16_HELD[0] += nbytes
                return True
            # models dropped in reference cycles (a search's past trials) hold copies until a
            # collection: collect before refusing, once per change of what is held (the rest
            # of a large model's layers are then refused without collecting again)
            if attempt or _COLLECTED_AT[0] == _BF16_HELD[0]:
                return False
        gc.collect()
        with _BF16_LOCK:
            _COLLECTED_AT[0] = _BF16_HELD[0]
    return False


def _release(nbytes: int) -> None:
    with _BF16_LOCK:
        _BF16_HELD[0] -= nbytes


def bf16_plan(layer, budgeted: bool = True) -> PackedBF16 | None:
    """QuantLinear `layer` packed for `run_bf16`; None when `budgeted` and the copy would take
    the process past `bf16_budget()`. A per-channel grid packs code - zero point: integers
    within +-255, exact in bf16, with the fp16 scale applied in fp32 afterwards, so the weight
    is not rounded (8-bit grids would lose half a code step to bf16's 8 significant bits
    otherwise). Grouped grids pack the dequantized weight (rounded to bf16: 2^-9 relative, far
    below a grouped grid's own step)."""
    nbytes = 2 * layer.out_features * layer.in_features
    if not _reserve(nbytes, budgeted):
        return None
    try:
        zeros = layer.zeros.float()
        if layer.scales.shape[1] == 1 and bool((zeros == zeros.round()).all()):
            plan = pack_bf16(layer._unpacked().float() - zeros, layer.scales[:, 0])
        else:
            plan = pack_bf16(layer.weight_float())
    except BaseException:
        _release(nbytes)
        raise
    weakref.finalize(plan, _release, nbytes)  # the budget follows the copy's lifetime
    return plan


def run_bf16(plan: PackedBF16, x, bias):
    """y = x W^T + b with a packed bf16 weight; x of any leading shape, returned in x's dtype
    (scales and bias applied in fp32)."""
    import torch

    shape = x.shape
    xb = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()
    y = torch.ops.mkldnn._linear_pointwise(xb, plan.weight, None, "none", [], "").float()
    if plan.scales is not None:
        y = y * plan.scales
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])
