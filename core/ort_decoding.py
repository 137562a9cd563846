"""Greedy decoding on an exported causal LM's KV cache in ONNX Runtime, and its timing
(`mmkit bench EXPORT --runtime onnxruntime --generate N`): prefill latency and decode speed
with the same fields, prompts and forwards as `core.decoding.profile_generation` in PyTorch.
The graph's layout is described in `compression/onnx_kv.py`.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from .errors import InputError

PAST, PRESENT = "past_key_values", "present"


def graph_inputs(sess) -> tuple[list[str], dict, bool]:
    """(past input names, {name: (kv_heads, head_dim)}, takes position_ids) of a session."""
    pasts = [i for i in sess.get_inputs() if i.name.startswith(PAST)]
    shapes = {i.name: (int(i.shape[1]), int(i.shape[3])) for i in pasts}
    return [i.name for i in pasts], shapes, any(
        i.name == "position_ids" for i in sess.get_inputs())


def ort_greedy_decode(sess, input_ids: np.ndarray, new_tokens: int, forced=None):
    """Greedy decoding with the graph's KV cache, as `core.decoding.greedy_decode` does in
    PyTorch (the same forwards: the prompt's, then one per new token): (generated token ids
    (batch, new_tokens), prefill seconds, decode seconds, last-position logits of every
    forward). `forced` (batch, new_tokens) feeds those tokens instead of the argmax
    (teacher forcing, for comparing step by step with another runtime)."""
    pasts, shapes, with_positions = graph_inputs(sess)
    outputs = ["logits"] + [PRESENT + n[len(PAST):] for n in pasts]
    batch, length = input_ids.shape
    feeds = {"input_ids": input_ids.astype(np.int64),
             "attention_mask": np.ones((batch, length), np.int64)}
    if with_positions:
        feeds["position_ids"] = np.tile(np.arange(length, dtype=np.int64), (batch, 1))
    for name in pasts:
        heads, dim = shapes[name]
        feeds[name] = np.zeros((batch, heads, 0, dim), np.float32)
    start = time.perf_counter()
    values = sess.run(outputs, feeds)
    prefill = time.perf_counter() - start
    tokens, steps = [], [values[0][:, -1]]
    start = time.perf_counter()
    for step in range(new_tokens):
        nxt = values[0][:, -1].argmax(-1)[:, None].astype(np.int64) if forced is None \
            else np.asarray(forced[:, step:step + 1], np.int64)
        tokens.append(nxt)
        seen = length + step
        feeds = {"input_ids": nxt, "attention_mask": np.ones((batch, seen + 1), np.int64),
                 **dict(zip(pasts, values[1:]))}
        if with_positions:
            feeds["position_ids"] = np.full((batch, 1), seen, np.int64)
        values = sess.run(outputs, feeds)
        steps.append(values[0][:, -1])
    decode = time.perf_counter() - start
    return np.concatenate(tokens, axis=1), prefill, decode, steps


def profile_onnx_generation(folder, batch_size: int = 1, prompt_len: int = 128,
                            new_tokens: int = 32, *, warmup: int = 1, repeats: int = 5,
                            threads: int | None = None) -> dict:
    """Prefill latency (ms) and decode speed (tokens/s, ms per token) of an exported causal
    LM in ONNX Runtime: random prompt tokens (seed 0), greedy decoding on the graph's cache,
    warm-up runs first, the median of `repeats`."""
    from transformers import AutoConfig

    from .families import check_length
    from .ort_runtime import MODEL_FILE, default_threads, read_export, session
    from .versions import environment

    info = read_export(folder)
    if info["task"] != "causal-lm":
        raise InputError(f"--generate measures text generation, which needs a causal LM; "
                         f"'{folder}' is an export of a {info['task']} model. Drop --generate "
                         "to measure its forward pass.")
    if not info.get("kv_cache"):
        raise InputError(f"'{folder}' was exported without a KV cache (by an earlier mmkit), "
                         "so generating with it would recompute every prefix. Export the model "
                         "again (`mmkit export MODEL --onnx`), or use "
                         "--runtime torch.")
    for name, value, low in (("--generate", new_tokens, 1), ("--batch-size", batch_size, 1),
                             ("--seq-len", prompt_len, 1), ("--repeats", repeats, 1),
                             ("--warmup", warmup, 0)):
        if value < low:
            raise InputError(f"{name} must be at least {low} (got {value}).")
    config = AutoConfig.from_pretrained(folder)
    check_length(config, prompt_len + new_tokens, "--seq-len + --generate", str(folder))
    threads = threads or default_threads()
    sess = session(Path(folder) / MODEL_FILE, threads)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, config.vocab_size, (batch_size, prompt_len), dtype=np.int64)
    for _ in range(warmup):
        ort_greedy_decode(sess, prompt, new_tokens)
    prefills, decodes = [], []
    for _ in range(repeats):
        _, prefill, decode, _ = ort_greedy_decode(sess, prompt, new_tokens)
        prefills.append(prefill)
        decodes.append(decode)
    decode = statistics.median(decodes)
    env = environment("cpu")
    env["threads"] = threads
    return {
        "device": "cpu", "runtime": "onnxruntime", "batch_size": batch_size,
        "prompt_tokens": prompt_len, "new_tokens": new_tokens, "warmup": warmup,
        "repeats": repeats, "decoding": "greedy, KV cache",
        "prefill_ms": {"median": statistics.median(prefills) * 1e3, "min": min(prefills) * 1e3},
        "decode_ms_per_token": decode / new_tokens * 1e3,
        "decode_tokens_per_s": batch_size * new_tokens / decode,
        "decode_seconds": decodes, "environment": env,
        "dtype": "int8" if info["int8"] else "float32",
    }
