"""Decoding speed of a causal LM: prefill latency and tokens per second while generating.

`profile_generation` feeds a prompt of `prompt_len` random tokens (batch `batch_size`), then
decodes `new_tokens` tokens greedily, one forward per token on the KV cache the prefill made
(what `generate` does, without its sampling machinery, so the two phases can be timed apart).
Warm-up runs first; each figure is the median of `repeats` runs.
"""

from __future__ import annotations

import statistics
import time

from .errors import InputError
from .families import check_length
from .layers import own_memory_
from .loading import LoadedModel, resolve_device
from .versions import environment


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def greedy_decode(model, input_ids, new_tokens: int, device: str = "cpu"):
    """Greedy decoding on the KV cache: (generated token ids, prefill seconds, decode
    seconds). The prefill is the prompt's forward; each decode step feeds one token."""
    import torch

    batch = input_ids.shape[0]
    mask = torch.ones_like(input_ids)
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=input_ids, attention_mask=mask, use_cache=True)
        _sync(device)
        prefill = time.perf_counter() - start
        tokens = []
        start = time.perf_counter()
        for _ in range(new_tokens):
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            tokens.append(nxt)
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=mask.device)],
                             dim=1)
            out = model(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values,
                        use_cache=True)
        _sync(device)
        decode = time.perf_counter() - start
    return torch.cat(tokens, dim=1), prefill, decode


def profile_generation(loaded: LoadedModel, device: str = "cpu", batch_size: int = 1,
                       prompt_len: int = 128, new_tokens: int = 32, *, warmup: int = 1,
                       repeats: int = 5, threads: int | None = None) -> dict:
    """Prefill latency (ms) and decode speed (tokens/s, ms per token) of a causal LM."""
    import torch

    if loaded.task != "causal-lm":
        raise InputError(f"--generate measures text generation, which needs a causal LM; "
                         f"'{loaded.source.ref}' is a {loaded.task} model. Drop --generate to "
                         "measure its forward pass.")
    for name, value, low in (("--generate", new_tokens, 1), ("--batch-size", batch_size, 1),
                             ("--seq-len", prompt_len, 1), ("--repeats", repeats, 1),
                             ("--warmup", warmup, 0)):
        if value < low:
            raise InputError(f"{name} must be at least {low} (got {value}).")
    check_length(loaded.model.config, prompt_len + new_tokens, "--seq-len + --generate",
                 loaded.source.ref)
    device = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    model = loaded.model.to(device) if device != "cpu" else loaded.model
    own_memory_(model)  # not timed as mapped from its file: see own_memory_
    vocab = loaded.model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (batch_size, prompt_len), generator=generator).to(device)
    for _ in range(warmup):
        greedy_decode(model, prompt, new_tokens, device)
    prefills, decodes = [], []
    for _ in range(repeats):
        _, prefill, decode = greedy_decode(model, prompt, new_tokens, device)
        prefills.append(prefill)
        decodes.append(decode)
    decode = statistics.median(decodes)
    return {
        "device": device, "runtime": "torch", "batch_size": batch_size,
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens, "warmup": warmup, "repeats": repeats,
        "decoding": "greedy, KV cache",
        "prefill_ms": {"median": statistics.median(prefills) * 1e3, "min": min(prefills) * 1e3},
        "decode_ms_per_token": decode / new_tokens * 1e3,
        "decode_tokens_per_s": batch_size * new_tokens / decode,
        "decode_seconds": decodes, "environment": environment(device),
    }
