"""profile(model, device, shape): latency, throughput, memory, size and parameter count."""

from __future__ import annotations

import logging
import math
import os
import resource
import statistics
import time
from pathlib import Path

from .errors import InputError
from .families import check_length
from .layers import own_memory_, weight_bytes
from .loading import LoadedModel, resolve_device
from .tasks import get_task
from .tasks.common import to_device
from .versions import environment

log = logging.getLogger("mmkit")



def megabytes(n_bytes: int | float | None) -> float | None:
    """Bytes in MB (10^6 bytes), the unit every mmkit figure uses."""
    return None if n_bytes is None else n_bytes / 1e6


def count_parameters(model) -> int:
    """Parameters of a model, counting packed (quantized) weights by their logical size:
    mmkit's QuantLinear keeps its codes in buffers, bitsandbytes packs two 4-bit values a
    byte."""
    total, seen = 0, set()
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        for name, p in module.named_parameters(recurse=False):
            if p.data_ptr() in seen:  # tied weights count once
                continue
            seen.add(p.data_ptr())
            logical = state is not None and name == "weight"
            total += math.prod(state.shape) if logical else p.numel()
        codes = getattr(module, "qweight", None)  # QuantLinear / QuantEmbedding
        if codes is not None and codes.data_ptr() not in seen:  # a tied head's codes: once
            seen.add(codes.data_ptr())
            total += (module.num_embeddings * module.embedding_dim
                      if hasattr(module, "num_embeddings") else
                      module.in_features * module.out_features)
        if codes is not None and getattr(module, "bias", None) is not None:
            total += module.bias.numel()
    return total


def disk_bytes(folder: str | None) -> int | None:
    """Bytes of the weight files in a model folder (None when the model has no folder)."""
    if not folder or not os.path.isdir(folder):
        return None
    files = list(Path(folder).glob("*.safetensors")) or list(Path(folder).glob("*.bin"))
    return sum(f.stat().st_size for f in files)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _time_one(run, device: str) -> float:
    """Seconds one call of `run` takes: CUDA events on a GPU (the device must be synchronized
    before the first call), perf_counter on CPU."""
    import torch

    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def _synchronize(device: str) -> None:
    """Let the warm-up's queued GPU work finish before timing starts."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _time_calls(run, device: str, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        run()
    _synchronize(device)
    return [_time_one(run, device) for _ in range(repeats)]


MAX_SPREAD = 1.5  # p90 / median above this: the machine was busy while timing
ATTEMPTS = 3


def _spread(times: list[float]) -> float:
    return _percentile(times, 0.9) / max(statistics.median(times), 1e-12)


def _stable_times(run, device: str, warmup: int, repeats: int) -> tuple[list[float], int]:
    """Timings whose p90 stays within MAX_SPREAD of their median: measured again (up to
    ATTEMPTS times, keeping the steadiest) when another process disturbed them; a warning
    when none was steady."""
    best, attempts = None, 0
    for attempts in range(1, ATTEMPTS + 1):
        times = _time_calls(run, device, warmup if attempts == 1 else 1, repeats)
        if best is None or _spread(times) < _spread(best):
            best = times
        if _spread(best) <= MAX_SPREAD or repeats < 5:
            break
    if _spread(best) > MAX_SPREAD and repeats >= 5:
        log.warning("latency is unsteady: p90 is %.1fx the median after %d measurements (load "
                    "average %s); the machine is busy, or --threads is more than it can give. "
                    "Treat this figure with care, or measure again with fewer --threads.",
                    _spread(best), attempts, _load())
    return best, attempts


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _check_counts(batch_size: int, seq_len: int, *more: tuple[str, int, int]) -> None:
    """The shape and the counts of calls, each (option, value, lowest allowed)."""
    for name, value, low in (("--batch-size", batch_size, 1), ("--seq-len", seq_len, 1), *more):
        if value < low:
            raise InputError(f"{name} must be at least {low} (got {value}).")


def _forward(loaded: LoadedModel, device: str, batch_size: int, seq_len: int):
    """(model on `device`, a random batch of the shape, a function running one forward pass
    on it without gradients): what every latency figure times."""
    import torch

    if loaded.kind in ("text-encoder", "causal-lm"):
        check_length(loaded.model.config, seq_len, "--seq-len", loaded.source.ref)
    model = loaded.model.to(device) if device != "cpu" else loaded.model
    own_memory_(model)  # not timed as mapped from its file: see own_memory_
    batch = to_device(get_task(loaded.task).dummy_batch(loaded, batch_size, seq_len), device)
    dtype = next(model.parameters()).dtype
    if "pixel_values" in batch and dtype.is_floating_point:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)

    def run():
        with torch.inference_mode():
            model(**batch)

    return model, batch, run


def profile(loaded: LoadedModel, device: str = "cpu", batch_size: int = 1, seq_len: int = 128,
            *, warmup: int = 3, repeats: int = 20, threads: int | None = None) -> dict:
    """Time the forward pass on random inputs of the given shape.

    Warm-up calls first, then `repeats` timed calls (CUDA events on a GPU, perf_counter on
    CPU); reports median / p90 / mean latency in ms, throughput in samples/s, peak memory,
    size in memory and on disk, and the parameter count.
    """
    import torch

    _check_counts(batch_size, seq_len, ("--repeats", repeats, 1), ("--warmup", warmup, 0))
    device = resolve_device(device)
    model, batch, run = _forward(loaded, device, batch_size, seq_len)
    if threads:
        torch.set_num_threads(threads)
    dtype = next(model.parameters()).dtype
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    times, attempts = _stable_times(run, device, warmup, repeats)
    if device.startswith("cuda"):
        peak, peak_kind = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    else:
        # ru_maxrss is the process high-water mark in KiB on Linux
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"
    median = statistics.median(times)
    shape = {k: list(v.shape) for k, v in batch.items()}
    return {
        "device": device, "batch_size": batch_size, "seq_len": seq_len, "input_shapes": shape,
        "warmup": warmup, "repeats": repeats,
        "latency_ms": {"median": median * 1e3, "p90": _percentile(times, 0.9) * 1e3,
                       "mean": statistics.fmean(times) * 1e3, "min": min(times) * 1e3},
        "spread": _spread(times), "stable": _spread(times) <= MAX_SPREAD,
        "measurements": attempts,
        "throughput_per_s": batch_size / median,
        "peak_memory_mb": megabytes(peak), "peak_memory_kind": peak_kind,
        "parameters": count_parameters(model), "weights_mb": megabytes(weight_bytes(model)),
        "disk_mb": megabytes(disk_bytes(loaded.source.path)),
        "dtype": str(dtype).replace("torch.", ""), "environment": environment(device),
    }


def _interleaved(runs, device: str, rounds: int) -> tuple[list[float], list[float]]:
    """One timed call of each of two runs per round, the one going first alternating from
    round to round (so that neither always runs on the caches the other warmed): the first
    run's times and the second's, paired by round."""
    times = ([], [])
    _synchronize(device)
    for i in range(rounds):
        for k in ((0, 1) if i % 2 == 0 else (1, 0)):
            times[k].append(_time_one(runs[k], device))
    return times


def _ratio_spread(ratios: list[float]) -> float:
    """How far paired ratios stray from their median either way: a disturbed call can make a
    ratio too high (the candidate's call) or too low (the reference's)."""
    median = statistics.median(ratios)
    return max(_percentile(ratios, 0.9) / median,
               median / max(_percentile(ratios, 0.1), 1e-12))


def _ms(times: list[float]) -> dict:
    return {"median": statistics.median(times) * 1e3, "p90": _percentile(times, 0.9) * 1e3}


def profile_pair(candidate: LoadedModel, reference: LoadedModel, device: str = "cpu",
                 batch_size: int = 1, seq_len: int = 128, *, warmup: int = 2, rounds: int = 10,
                 threads: int | None = None) -> dict:
    """Time two models' forward passes interleaved on random inputs of the same shape: the
    candidate's latency relative to the reference's, which holds when the machine's speed
    drifts (a latency measured alone on a shared machine can swing by a third).

    Warm-up calls of both, then `rounds` rounds of one timed call each (CUDA events on a
    GPU, perf_counter on CPU), alternating which model goes first. `ratio` is the median
    over rounds of candidate / reference, each round's pair timed moments apart; when those
    ratios stray more than MAX_SPREAD from their median the pair is measured again (up to
    ATTEMPTS times, keeping the steadiest) and flagged `stable: false` if it stays so.
    """
    import torch

    _check_counts(batch_size, seq_len, ("--rounds", rounds, 1), ("--warmup", warmup, 0))
    device = resolve_device(device)
    runs = [_forward(m, device, batch_size, seq_len)[2] for m in (candidate, reference)]
    if threads:
        torch.set_num_threads(threads)
    best, attempts = None, 0
    for attempts in range(1, ATTEMPTS + 1):
        for _ in range(warmup if attempts == 1 else 1):
            for run in runs:
                run()
        cand, ref = _interleaved(runs, device, rounds)
        ratios = [c / max(r, 1e-12) for c, r in zip(cand, ref)]
        if best is None or _ratio_spread(ratios) < _ratio_spread(best[2]):
            best = (cand, ref, ratios)
        if _ratio_spread(best[2]) <= MAX_SPREAD or rounds < 5:
            break
    cand, ref, ratios = best
    spread = _ratio_spread(ratios)
    if spread > MAX_SPREAD and rounds >= 5:
        log.warning("the latency ratio is unsteady: its rounds stray %.1fx from their median "
                    "after %d measurements (load average %s); the machine is busy, or --threads "
                    "is more than it can give. Treat this figure with care.", spread, attempts,
                    _load())
    return {
        "device": device, "batch_size": batch_size, "seq_len": seq_len, "warmup": warmup,
        "rounds": rounds, "candidate_ms": _ms(cand), "reference_ms": _ms(ref),
        "ratio": statistics.median(ratios), "ratio_p10": _percentile(ratios, 0.1),
        "ratio_p90": _percentile(ratios, 0.9), "spread": spread,
        "stable": spread <= MAX_SPREAD, "measurements": attempts,
        "environment": environment(device),
    }
