"""QuantEmbedding: a token-embedding table stored as packed integer codes with per-row scales.

The word-embedding table is half of a small encoder's weights (MiniLM: 11.7M of 22.7M) and
a fifth of SmolLM2's, so quantizing only the Linear layers leaves much of the size on the
table. Rows are quantized on their own grid (one scale and zero point per row, the same
`grid` as QuantLinear), stored as `qweight` int32 words; a lookup unpacks only the rows it
gathers, never the whole table. When the LM head is tied to the table, the head becomes a
QuantLinear over the same buffers (one copy of the codes) and runs the fused kernels where
they apply: decoding reads the head's weights once per token, so this is where it pays.
"""

from __future__ import annotations

import torch

from . import grid, kernels
from .qlinear import QuantLinear


class QuantEmbedding(torch.nn.Module):
    """A quantized replacement for nn.Embedding (lookups only)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int,
                 padding_idx: int | None = None, dtype=torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, bits
        self.padding_idx, self.dtype = padding_idx, dtype
        words = -(-embedding_dim * bits // 32)
        self.register_buffer("qweight", torch.zeros(num_embeddings, words, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(num_embeddings, 1, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(num_embeddings, 1, dtype=torch.float16))

    @classmethod
    def quantize(cls, embedding, bits: int, symmetric: bool = False):
        """Quantize an nn.Embedding row by row: (QuantEmbedding, relative weight error)."""
        w = embedding.weight.detach().float()
        codes, scales, zeros = grid.quantize_rows(w, bits, None, symmetric)
        layer = cls(w.shape[0], w.shape[1], bits, embedding.padding_idx,
                    embedding.weight.dtype)
        layer.qweight.copy_(grid.pack(codes, bits))
        layer.scales.copy_(scales)
        layer.zeros.copy_(zeros)
        error = (w - layer.weight_float()).norm() / w.norm().clamp_min(1e-12)
        return layer.to(w.device), float(error)

    def _rows(self, words):
        codes = kernels.unpack_bytes(words, self.bits, self.embedding_dim)
        return grid.unpack(words, self.bits, self.embedding_dim) if codes is None else codes

    def weight_float(self):
        """The whole dequantized table (num_embeddings, embedding_dim), fp32."""
        return (self._rows(self.qweight).float() - self.zeros.float()) * self.scales.float()

    def forward(self, input_ids):
        flat = input_ids.reshape(-1)
        codes = self._rows(self.qweight.index_select(0, flat)).float()
        rows = (codes - self.zeros.index_select(0, flat).float()) \
            * self.scales.index_select(0, flat).float()
        return rows.to(self.dtype).reshape(*input_ids.shape, self.embedding_dim)

    def tied_head(self, bias=None) -> QuantLinear:
        """An LM head (hidden -> vocabulary) over this table's own buffers: no second copy."""
        head = QuantLinear(self.embedding_dim, self.num_embeddings, self.bits, 1,
                           bias is not None, dtype=self.dtype)
        share_buffers(self, head)
        if bias is not None:
            head.bias.copy_(bias.detach())
        return head

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, per-row scales"


def share_buffers(table: QuantEmbedding, head: QuantLinear) -> None:
    """Point the head's codes and grid at the table's (after loading, to tie them again)."""
    for name in ("qweight", "scales", "zeros"):
        head._buffers[name] = getattr(table, name)
    head.forget_kernels()
