"""ONNX Runtime: what an exported folder holds, sessions on a set number of threads, and the
latency of an exported model timed the way `core.profile` times a PyTorch one (the same
fields, so the two runtimes compare line by line)."""

from __future__ import annotations

import importlib.metadata
import os
import resource
import statistics
from pathlib import Path

from .errors import InputError
from .families import check_length
from .profile import MAX_SPREAD, _percentile, _spread, _stable_times, _check_counts, megabytes
from .versions import environment

MODEL_FILE = "model.onnx"
INFO_FILE = "mmkit_onnx.json"  # what was exported: task, inputs, outputs, opset, checks
INSTALL_HINT = "Install it with: pip install 'mmkit[onnx]' (onnxruntime, onnx, onnxscript)."


def require_onnxruntime():
    """The onnxruntime module, or an InputError saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise InputError(f"ONNX Runtime is not installed. {INSTALL_HINT}") from None
    return onnxruntime


def is_onnx_export(path) -> bool:
    """True for a folder that `mmkit export --onnx` wrote."""
    folder = Path(path)
    return folder.is_dir() and (folder / MODEL_FILE).is_file() and (folder / INFO_FILE).is_file()


def read_export(folder) -> dict:
    """The description an export folder carries (its INFO_FILE), checked for the keys the
    runtime reads."""
    from .artifacts import read_json_file

    info = read_json_file(Path(folder) / INFO_FILE, "an mmkit ONNX export description",
                          {"task": str, "inputs": list, "outputs": list, "int8": bool})
    files = info.get("files") if isinstance(info.get("files"), dict) else {}
    for name, recorded in files.items():  # sizes only: hashing a large graph costs seconds
        path = Path(folder) / name
        size = path.stat().st_size if path.is_file() else None
        if isinstance(recorded, dict) and size != recorded.get("bytes"):
            what = "missing" if size is None else "not the size it was written at"
            raise InputError(f"{path} is {what}; the export is damaged (cut short, or edited). "
                             "Re-create it with `mmkit export MODEL --onnx`.")
    return info


def onnx_bytes(folder) -> int:
    """Bytes of the graph and its weights: model.onnx plus any external-data file beside it."""
    return sum(p.stat().st_size for p in Path(folder).glob(MODEL_FILE + "*") if p.is_file())


def default_threads() -> int:
    """The thread count a run gets when none is asked for: torch's (one per core), so a
    PyTorch and an ONNX Runtime figure taken without --threads use the same number."""
    import torch

    return torch.get_num_threads()


def session(path, threads: int | None = None, spin: bool = True):
    """An ONNX Runtime CPU session with all graph optimisations, running one call at a time
    on `threads` intra-op threads (default: `default_threads()`).

    `spin=False` lets its idle threads sleep at once instead of spinning (ONNX Runtime's
    default): for timing it interleaved with another session or with torch in one process,
    where the spinning threads of one slow the other's calls (measured on 2 cores, MiniLM at
    2 threads: torch's forward 30 ms beside a spinning session, 18 ms beside a sleeping one).
    """
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: its warnings are about fusions it skipped
    errors = ort.capi.onnxruntime_pybind11_state
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except (errors.InvalidProtobuf, errors.InvalidGraph, errors.NoSuchFile, errors.Fail) as exc:
        raise InputError(f"ONNX Runtime cannot load {path} ({str(exc)[:300]}); the graph is "
                         "damaged or not an ONNX model. Re-create it with `mmkit export MODEL "
                         "--onnx`.") from None


def dummy_feeds(folder, info: dict, batch_size: int, seq_len: int) -> dict:
    """The inputs a PyTorch bench of the same model feeds (the task's dummy batch, same seed),
    built from the folder's config.json, as numpy arrays named like the graph's inputs."""
    from types import SimpleNamespace

    import numpy as np
    from transformers import AutoConfig

    from .tasks import get_task

    config = AutoConfig.from_pretrained(folder)
    text = getattr(config, "text_config", config)
    if any(i["name"] == "input_ids" for i in info["inputs"]):
        check_length(text, seq_len, "--seq-len", str(folder))
    stand_in = SimpleNamespace(model=SimpleNamespace(config=config))  # what dummy_batch reads
    batch = {k: v.numpy() for k, v in get_task(info["task"]).dummy_batch(
        stand_in, batch_size, seq_len).items()}
    feeds = {}
    for spec in info["inputs"]:
        name = spec["name"]
        if name in batch:
            feeds[name] = batch[name].astype(np.dtype(spec["dtype"]))
        elif name == "token_type_ids":  # one segment, as the tokenizer makes for one text
            feeds[name] = np.zeros_like(batch["input_ids"]).astype(np.dtype(spec["dtype"]))
        elif name == "position_ids":  # a whole sequence: positions from 0
            ids = batch["input_ids"]
            feeds[name] = np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1)).astype(np.int64)
        elif name.startswith("past_key_values"):  # a whole sequence: an empty KV cache
            _, heads, _, dim = spec["shape"]
            feeds[name] = np.zeros((batch_size, heads, 0, dim), np.float32)
        else:
            raise InputError(f"{folder} has a graph input '{name}' that mmkit cannot make up "
                             "a value for; it was not exported by this version of mmkit. "
                             "Export the model again.")
    return feeds


def profile_onnx(folder, batch_size: int = 1, seq_len: int = 128, *, warmup: int = 3,
                 repeats: int = 20, threads: int | None = None) -> dict:
    """Time an exported model's forward pass in ONNX Runtime on random inputs of the given
    shape: the fields of `core.profile.profile` (median / p90 / mean latency, throughput, peak
    memory, size), with `runtime: onnxruntime` and the session's thread count."""
    _check_counts(batch_size, seq_len, ("--repeats", repeats, 1), ("--warmup", warmup, 0))
    info = read_export(folder)
    threads = threads or default_threads()
    sess = session(Path(folder) / MODEL_FILE, threads)
    feeds = dummy_feeds(folder, info, batch_size, seq_len)

    def run():
        sess.run(None, feeds)

    times, attempts = _stable_times(run, "cpu", warmup, repeats)
    median = statistics.median(times)
    size = onnx_bytes(folder)
    env = environment("cpu")
    env["threads"] = threads  # ONNX Runtime's intra-op threads, not torch's
    try:
        env["versions"] = {**env["versions"],
                           "onnxruntime": importlib.metadata.version("onnxruntime")}
    except importlib.metadata.PackageNotFoundError:
        pass
    return {
        "device": "cpu", "runtime": "onnxruntime", "batch_size": batch_size, "seq_len": seq_len,
        "input_shapes": {k: list(v.shape) for k, v in feeds.items()},
        "warmup": warmup, "repeats": repeats,
        "latency_ms": {"median": median * 1e3, "p90": _percentile(times, 0.9) * 1e3,
                       "mean": statistics.fmean(times) * 1e3, "min": min(times) * 1e3},
        "spread": _spread(times), "stable": _spread(times) <= MAX_SPREAD,
        "measurements": attempts, "throughput_per_s": batch_size / median,
        "peak_memory_mb": megabytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "peak_memory_kind": "process_max_rss",
        "parameters": info.get("parameters"), "weights_mb": megabytes(size),
        "disk_mb": megabytes(size), "dtype": "int8" if info["int8"] else "float32",
        "graph_optimization": "all", "environment": env,
        "onnx": {"opset": info.get("opset"), "int8": info["int8"],
                 "folder": os.path.abspath(folder)},
    }
