"""mmkit bench: latency, throughput, memory, size and parameter count on a device."""

from __future__ import annotations

import click

from ..core.errors import InputError
from . import options

RUNTIMES = ("torch", "onnxruntime")  # the names `mmkit search --runtime` takes


def _human(r: dict) -> str:
    lat, env = r["latency_ms"], r["environment"]
    disk = f"  disk {r['disk_mb']:.1f} MB" if r.get("disk_mb") is not None else ""
    steady = "" if r["stable"] else "  UNSTEADY (machine busy?)"
    runtime = f"  onnxruntime {r['dtype']}" if r["runtime"] == "onnxruntime" else ""
    return (f"{r['model']}  {r['device']}{runtime}  batch {r['batch_size']} x {r['seq_len']}  "
            f"median {lat['median']:.2f} ms  p90 {lat['p90']:.2f} ms  "
            f"{r['throughput_per_s']:.1f}/s  params {r['parameters'] / 1e6:.2f}M  "
            f"weights {r['weights_mb']:.1f} MB{disk}  peak {r['peak_memory_mb']:.0f} MB  "
            f"[{env['threads']} threads, load {env['load_per_cpu']} per CPU]{steady}")


def _human_generation(r: dict) -> str:
    env = r["environment"]
    runtime = f"  onnxruntime {r['dtype']}" if r.get("runtime") == "onnxruntime" else ""
    return (f"{r['model']}  {r['device']}{runtime}  batch {r['batch_size']}  prompt "
            f"{r['prompt_tokens']} "
            f"tokens: prefill {r['prefill_ms']['median']:.1f} ms; {r['new_tokens']} new tokens: "
            f"{r['decode_tokens_per_s']:.1f} tokens/s ({r['decode_ms_per_token']:.2f} ms/token, "
            f"greedy, KV cache)  [{env['threads']} threads, load {env['load_per_cpu']} per CPU]")


@click.command("bench", cls=options.Command)
@options.model_argument
@options.task_option
@click.option("--batch-size", type=click.IntRange(min=1), multiple=True, default=(1,),
              show_default=True, help="Batch size; repeat the option to measure several.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--generate", type=click.IntRange(min=1), default=None, metavar="N",
              help="Causal LMs: measure generation instead of one forward: the prefill of a "
                   "--seq-len prompt and N greedy decode steps on the KV cache (tokens/s).")
@click.option("--runtime", type=click.Choice(RUNTIMES), default="torch", show_default=True,
              help="What runs the model: PyTorch, or ONNX Runtime on the CPU (MODEL an "
                   "`mmkit export --onnx` folder, or any model, exported to a temporary "
                   "folder first). --threads sets ONNX Runtime's intra-op threads.")
@options.measuring
@options.device()
@options.loading
@options.common
@options.with_models
def bench_command(ref, task, batch_size, seq_len, warmup, repeats, generate, runtime, threads,
                  device, allow_pickle, trust_remote_code, as_json):
    """Measure MODEL's forward latency (median, p90), throughput, memory and size; or, with
    --generate, a causal LM's prefill latency and decoding speed."""
    from ..core.loading import load_model
    from ..core.ort_runtime import is_onnx_export
    from ..core.profile import profile

    if runtime == "onnxruntime":
        _bench_onnx(ref, task, batch_size, seq_len, warmup, repeats, generate, threads, device,
                    allow_pickle, trust_remote_code, as_json)
        return
    if is_onnx_export(ref):
        raise InputError(f"'{ref}' is an ONNX export (model.onnx), which PyTorch cannot run; "
                         "pass --runtime onnxruntime, or bench the model it was exported from.")
    loaded = load_model(ref, task, device=device, allow_pickle=allow_pickle,
                        trust_remote_code=trust_remote_code, task_head=False)
    if generate:
        from ..core.decoding import profile_generation

        for bs in batch_size:
            result = profile_generation(loaded, device, bs, seq_len, generate, warmup=warmup,
                                        repeats=repeats, threads=threads)
            options.emit({"model": ref, "task": loaded.task, **result}, as_json,
                         _human_generation)
        return
    for bs in batch_size:
        result = profile(loaded, device, bs, seq_len, warmup=warmup, repeats=repeats,
                         threads=threads)
        options.emit({"model": ref, "task": loaded.task, "runtime": "torch", **result},
                     as_json, _human)


def _bench_onnx(ref, task, batch_size, seq_len, warmup, repeats, generate, threads, device,
                allow_pickle, trust_remote_code, as_json):
    """`bench --runtime onnxruntime`: an export folder as it is, any other model exported to
    a temporary folder first (float32, checked against PyTorch)."""
    import contextlib

    from ..core.ort_decoding import profile_onnx_generation
    from ..core.ort_runtime import is_onnx_export, profile_onnx, read_export, \
        require_onnxruntime

    if device != "cpu":
        raise InputError(f"--runtime onnxruntime runs on the CPU (mmkit uses ONNX Runtime's "
                         f"CPU provider), not on --device {device}; use --device cpu.")
    require_onnxruntime()
    with contextlib.ExitStack() as stack:
        if is_onnx_export(ref):
            folder = ref
            exported = read_export(folder)["task"]
            if task and task != exported:
                raise InputError(f"'{ref}' was exported for {exported}, not --task {task}; "
                                 "drop --task, or export the model again with it.")
        else:
            from ..compression.onnx_export import temporary_export
            from ..core.loading import load_model

            loaded = load_model(ref, task, allow_pickle=allow_pickle,
                                trust_remote_code=trust_remote_code, task_head=False)
            folder = stack.enter_context(temporary_export(loaded, threads=threads))
            del loaded
        info = read_export(folder)
        for bs in batch_size:
            if generate:
                result = profile_onnx_generation(folder, bs, seq_len, generate, warmup=warmup,
                                                 repeats=repeats, threads=threads)
            else:
                result = profile_onnx(folder, bs, seq_len, warmup=warmup, repeats=repeats,
                                      threads=threads)
            options.emit({"model": ref, "task": info["task"], **result}, as_json,
                         _human_generation if generate else _human)
