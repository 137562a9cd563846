"""The merge itself: which tokens merge (bipartite soft matching on attention keys) and how
(size-weighted means, one-to-one as in ToMe or shared by similarity as in Token
Transforming). Pure tensor functions, tested against longhand references.

Tokens are split alternately into two sets, A (even positions) and B (odd). Each A token's
most similar B token (cosine of the head-averaged keys) is its partner; the `r` A tokens with
the most similar partners merge away, the rest of A stays. A token carries a size (how many
patches it holds); a merge is the size-weighted mean, so merging two identical tokens changes
nothing but the size. The class token (position 0, in A) never merges, and the kept A tokens
keep their order, so it stays first.
"""

from __future__ import annotations

import torch


def match(metric: torch.Tensor, r: int, protect_first: bool = True):
    """Bipartite soft matching. `metric` (batch, tokens, dim): the similarity features.

    Returns (kept A positions in order, merged A positions, their partners in B, the
    similarity of every A token to every B token)."""
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)  # (batch, |A|, |B|)
    if protect_first:
        scores[:, 0, :] = -torch.inf
    best, partner = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged = order[:, :r]
    kept = order[:, r:].sort(dim=-1).values
    return kept, merged, partner.gather(-1, merged), scores


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int,
          temperature: float | None = None, protect_first: bool = True):
    """Merge `r` tokens of `x` (batch, tokens, dim), whose sizes are `size` (batch, tokens,
    1). `temperature` None: each merged token joins its partner (ToMe); else it is shared
    among all B tokens by softmax(similarity / temperature) (Token Transforming), which
    approaches ToMe as the temperature goes to 0. Returns (x, size) with r tokens fewer: the
    kept A tokens, then B."""
    if r <= 0:
        return x, size
    kept, merged, partner, scores = match(metric, r, protect_first)
    weighted = x * size
    xa, xb = weighted[:, ::2], weighted[:, 1::2]
    sa, sb = size[:, ::2], size[:, 1::2]
    src_x, src_s = _take(xa, merged), _take(sa, merged)
    if temperature is None:
        index = partner.unsqueeze(-1)
        xb = xb.scatter_reduce(1, index.expand(-1, -1, xb.shape[-1]), src_x, reduce="sum")
        sb = sb.scatter_reduce(1, index, src_s, reduce="sum")
    else:
        share = torch.softmax(_take(scores, merged) / temperature, dim=-1)  # (batch, r, |B|)
        share = share.to(x.dtype)
        xb = xb + share.transpose(1, 2) @ src_x
        sb = sb + share.transpose(1, 2) @ src_s
    out_x = torch.cat([_take(xa, kept), xb], dim=1)
    out_s = torch.cat([_take(sa, kept), sb], dim=1)
    return out_x / out_s, out_s
