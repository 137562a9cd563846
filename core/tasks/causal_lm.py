"""causal-lm: perplexity over a corpus cut into fixed windows."""

from __future__ import annotations

import math

from .. import progress
from .common import model_device

DEFAULT_SEQ_LEN = 512


def max_positions(config) -> int:
    """The longest sequence a causal config takes."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 1024)


def token_stream(loaded, texts: list[str]) -> list[int]:
    """All documents tokenized and joined, each ended by the EOS token."""
    tok = loaded.tokenizer
    eos = tok.eos_token_id
    stream = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        stream += ids + ([eos] if eos is not None else [])
    return stream


def windows(stream: list[int], seq_len: int) -> list[list[int]]:
    """Non-overlapping windows of seq_len tokens (the last one may be shorter, at least 2)."""
    out = [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]
    return [w for w in out if len(w) >= 2]


LOGIT_BUDGET = 1 << 25  # logits alive at once (128 MB in fp32), whatever the batch size


def evaluate(loaded, split, batch_size: int = 8, max_length: int = DEFAULT_SEQ_LEN) -> dict:
    """Perplexity: exp of the mean next-token negative log-likelihood over all windows.

    The windows run in micro-batches small enough that their logits (windows x tokens x
    vocabulary) stay under LOGIT_BUDGET: a 49k-token vocabulary at 512 tokens is 100 MB a
    window, so a batch of 32 would otherwise hold 3 GB of logits and several copies.
    """
    model, device = loaded.model, model_device(loaded.model)
    seq_len = min(max_length, max_positions(model.config))
    wins = windows(token_stream(loaded, split.inputs), seq_len)
    if not wins:
        from ..errors import InputError

        raise InputError("The corpus is too short to measure perplexity (fewer than 2 tokens).")
    step = windows_per_forward(batch_size, seq_len, model.config.vocab_size)
    nll, count = 0.0, 0
    for start in progress.bar(range(0, len(wins), step), desc="perplexity", unit="batch"):
        ids, mask = _pad(wins[start:start + step])
        loss, tokens = _window_nll(model, ids.to(device), mask.to(device))
        nll += loss
        count += tokens
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count,
            "windows": len(wins), "seq_len": seq_len}


def windows_per_forward(batch_size: int, seq_len: int, vocab: int) -> int:
    """How many windows one forward pass takes: the batch size, or fewer if their logits
    would pass LOGIT_BUDGET (never fewer than one)."""
    return max(1, min(batch_size, LOGIT_BUDGET // (seq_len * vocab)))


def _pad(group: list[list[int]]):
    """Token ids and attention mask of a group of windows, right-padded."""
    import torch

    width = max(len(w) for w in group)
    ids = torch.zeros(len(group), width, dtype=torch.long)
    mask = torch.zeros(len(group), width, dtype=torch.long)
    for row, w in enumerate(group):
        ids[row, :len(w)] = torch.tensor(w)
        mask[row, :len(w)] = 1
    return ids, mask


def _window_nll(model, ids, mask) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of a micro-batch, and its token count.

    The targets are laid out to match the logits rather than the logits sliced to match the
    targets, so the logits are never copied (beyond a cast when they are not fp32)."""
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits
        # prompt tuning prepends virtual-token positions; they and the last position get no target
        offset = logits.size(1) - ids.size(1)
        target = ids.new_full(logits.shape[:2], -100)
        target[:, offset:-1] = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.view(-1),
                               ignore_index=-100, reduction="sum")
    return loss.item(), int((target != -100).sum())


def dummy_batch(loaded, batch_size: int, seq_len: int) -> dict:
    """Random token ids of shape (batch, seq_len) for latency measurements."""
    import torch

    vocab = loaded.model.config.vocab_size
    ids = torch.randint(5, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
