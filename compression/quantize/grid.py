"""The integer grid of weight-only quantization, and packing codes into int32 words.

A weight W (out x in) is split along its input dimension into groups of `group_size` columns
(or one group per row: per-channel). Each (row, group) has a scale and a zero point:
code = clamp(round(w / scale) + zero, 0, 2^bits - 1), w ~ (code - zero) * scale. Symmetric
grids fix zero at the middle of the range (2^(bits-1)); asymmetric grids fit min and max.
Scales are rounded to fp16, the precision they are stored in, before codes are chosen.
"""

from __future__ import annotations


def fit_grid(w, bits: int, symmetric: bool):
    """Scale and zero point per row of `w` (rows x columns of one group): (rows, 1) each."""
    import torch

    maxq = 2 ** bits - 1
    lo = torch.clamp(w.min(dim=1, keepdim=True).values, max=0)
    hi = torch.clamp(w.max(dim=1, keepdim=True).values, min=0)
    if symmetric:
        amax = torch.maximum(lo.abs(), hi)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        scale = (hi - lo) / maxq
        zero = torch.round(-lo / torch.where(scale == 0, torch.ones_like(scale), scale))
    scale = scale.to(torch.float16).to(w.dtype)  # what is stored: codes fit the fp16 scale
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row
    return scale, zero


def to_codes(w, scale, zero, bits: int):
    """Integer codes of `w` on the grid (same shape, int64)."""
    import torch

    return torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1).long()


def from_codes(codes, scale, zero):
    """Back to floating point."""
    return (codes.to(scale.dtype) - zero) * scale


def quantize_rows(w, bits: int, group_size: int | None, symmetric: bool):
    """Round-to-nearest of a whole matrix: (codes, scales, zeros) with scales and zeros of
    shape (out, n_groups)."""
    import torch

    out_f, in_f = w.shape
    g = group_size or in_f
    codes = torch.empty_like(w, dtype=torch.long)
    scales, zeros = [], []
    for start in range(0, in_f, g):
        block = w[:, start:start + g]
        scale, zero = fit_grid(block, bits, symmetric)
        codes[:, start:start + g] = to_codes(block, scale, zero, bits)
        scales.append(scale)
        zeros.append(zero)
    return codes, torch.cat(scales, 1), torch.cat(zeros, 1)


def group_index(in_features: int, group_size: int | None, perm=None):
    """The group of every input column; with act-order `perm` (the order the columns were
    quantized in), groups follow that order."""
    import torch

    g = group_size or in_features
    order = torch.arange(in_features) // g
    if perm is None:
        return order
    idx = torch.empty(in_features, dtype=torch.long)
    idx[perm] = order
    return idx


def dequantize(codes, scales, zeros, g_idx):
    """W from codes (out, in) and per-group scales / zeros (out, n_groups)."""
    return (codes.to(scales.dtype) - zeros[:, g_idx]) * scales[:, g_idx]


# ---------------------------------------------------------------- packing
def pack(codes, bits: int):
    """Pack codes (rows x n, values < 2^bits) into int32 words, row by row, `bits` bits each,
    lowest bits first. Any width from 1 to 8 bits."""
    import torch

    rows, n = codes.shape
    if 32 % bits == 0:  # fast path (2, 4, 8 bits): whole codes per word, same layout
        per = 32 // bits
        padded = torch.nn.functional.pad(codes.long(), (0, -n % per)).reshape(rows, -1, per)
        value = (padded << (torch.arange(per) * bits)).sum(-1)
        return torch.where(value >= 2**31, value - 2**32, value).to(torch.int32)
    shifts = torch.arange(bits)
    stream = ((codes.long().unsqueeze(-1) >> shifts) & 1).reshape(rows, n * bits)
    words = -(-n * bits // 32)
    stream = torch.nn.functional.pad(stream, (0, words * 32 - n * bits))
    value = (stream.reshape(rows, words, 32) << torch.arange(32)).sum(-1)  # 0 .. 2^32-1
    return torch.where(value >= 2**31, value - 2**32, value).to(torch.int32)


def unpack(packed, bits: int, n: int):
    """Inverse of `pack`: int64 codes of shape (rows, n)."""
    import torch

    rows = packed.shape[0]
    value = packed.long() & 0xFFFFFFFF
    if 32 % bits == 0:
        per = 32 // bits
        codes = (value.unsqueeze(-1) >> (torch.arange(per) * bits)) & (2**bits - 1)
        return codes.reshape(rows, -1)[:, :n]
    stream = ((value.unsqueeze(-1) >> torch.arange(32)) & 1).reshape(rows, -1)[:, :n * bits]
    return (stream.reshape(rows, n, bits) << torch.arange(bits)).sum(-1)
