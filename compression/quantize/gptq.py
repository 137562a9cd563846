"""GPTQ (Frantar et al. 2022), written for mmkit in torch.

For a layer with weight W and calibration inputs X, GPTQ minimises ||W X - Q X||^2 over the
grid one column at a time: after rounding column i, the error it made is spread over the
columns not yet rounded, weighted by the inverse Hessian H^-1 (H = 2 X X^T / n). Columns are
processed in blocks with lazy updates; with act-order, columns with the largest H diagonal go
first. Blocks of transformer layers are quantized in order, each on the outputs of the already
quantized blocks before it.
"""

from __future__ import annotations

import torch

from . import grid


class HessianCollector:
    """Accumulates H = 2/n sum x x^T over the inputs a Linear layer sees."""

    def __init__(self, in_features: int):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        total = self.n + x.shape[0]
        self.h *= self.n / total
        self.h += (2 / total) * x.T @ x
        self.n = total


def gptq_quantize(w, h, bits: int, group_size: int | None, symmetric: bool,
                  act_order: bool = False, damp: float = 0.01, block: int = 128):
    """Quantize W (out x in) with Hessian H (in x in).

    Returns (codes, scales, zeros, g_idx) in the layout of `grid.dequantize`.
    """
    w = w.detach().double().clone()
    h = h.clone()
    out_f, in_f = w.shape
    dead = torch.diag(h) == 0  # inputs that were always zero carry no information
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(in_f, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    g = group_size or in_f
    if group_size:  # groups never straddle a block, so each group's grid sees updated columns
        block = max(g, block // g * g)
    codes = torch.zeros(out_f, in_f, dtype=torch.long)
    scales, zeros = [], []
    scale = zero = None
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                span = w1[:, i:i + g] if group_size else w  # per-channel: the whole row
                scale, zero = grid.fit_grid(span, bits, symmetric)
                scales.append(scale)
                zeros.append(zero)
            q = grid.to_codes(w1[:, i:i + 1], scale, zero, bits)
            codes[:, col] = q[:, 0]
            err = (w1[:, i] - grid.from_codes(q, scale, zero)[:, 0]) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    g_idx = grid.group_index(in_f, group_size, perm)
    if perm is not None:
        inverse = torch.argsort(perm)
        codes = codes[:, inverse]
    return codes, torch.cat(scales, 1), torch.cat(zeros, 1), g_idx
