"""causal-lm: perplexity over a corpus cut into fixed windows."""

from __future__ import annotations

import math

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


def evaluate(loaded, split, batch_size: int = 8, max_length: int = DEFAULT_SEQ_LEN) -> dict:
    """Perplexity: exp of the mean next-token negative log-likelihood over all windows."""
    import torch
    import torch.nn.functional as F

    model, device = loaded.model, model_device(loaded.model)
    seq_len = min(max_length, max_positions(model.config))
    wins = windows(token_stream(loaded, split.inputs), seq_len)
    if not wins:
        from ..errors import InputError

        raise InputError("The corpus is too short to measure perplexity (fewer than 2 tokens).")
    nll, count = 0.0, 0
    for start in range(0, len(wins), batch_size):
        group = wins[start:start + batch_size]
        width = max(len(w) for w in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, w in enumerate(group):
            ids[row, :len(w)] = torch.tensor(w)
            mask[row, :len(w)] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logits = logits[:, -ids.size(1):]  # prompt tuning prepends virtual-token positions
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), target.reshape(-1),
                               ignore_index=-100, reduction="sum")
        nll += loss.item()
        count += int((target != -100).sum())
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count,
            "windows": len(wins), "seq_len": seq_len}


def dummy_batch(loaded, batch_size: int, seq_len: int) -> dict:
    """Random token ids of shape (batch, seq_len) for latency measurements."""
    import torch

    vocab = loaded.model.config.vocab_size
    ids = torch.randint(5, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
