"""mmkit bench: latency, throughput, memory, size and parameter count on a device."""

from __future__ import annotations

import click

from . import options


def _human(r: dict) -> str:
    lat, env = r["latency_ms"], r["environment"]
    disk = f"  disk {r['disk_mb']:.1f} MB" if r.get("disk_mb") is not None else ""
    steady = "" if r["stable"] else "  UNSTEADY (machine busy?)"
    return (f"{r['model']}  {r['device']}  batch {r['batch_size']} x {r['seq_len']}  "
            f"median {lat['median']:.2f} ms  p90 {lat['p90']:.2f} ms  "
            f"{r['throughput_per_s']:.1f}/s  params {r['parameters'] / 1e6:.2f}M  "
            f"weights {r['weights_mb']:.1f} MB{disk}  peak {r['peak_memory_mb']:.0f} MB  "
            f"[{env['threads']} threads, load {env['load_per_cpu']} per CPU]{steady}")


def _human_generation(r: dict) -> str:
    env = r["environment"]
    return (f"{r['model']}  {r['device']}  batch {r['batch_size']}  prompt {r['prompt_tokens']} "
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
@options.measuring
@options.device()
@options.loading
@options.common
@options.with_models
def bench_command(ref, task, batch_size, seq_len, warmup, repeats, generate, threads, device,
                  allow_pickle, trust_remote_code, as_json):
    """Measure MODEL's forward latency (median, p90), throughput, memory and size; or, with
    --generate, a causal LM's prefill latency and decoding speed."""
    from ..core.loading import load_model
    from ..core.profile import profile

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
        options.emit({"model": ref, "task": loaded.task, **result}, as_json, _human)
