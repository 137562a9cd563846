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


@click.command("bench", cls=options.Command)
@options.model_argument
@options.task_option
@click.option("--batch-size", type=click.IntRange(min=1), multiple=True, default=(1,),
              show_default=True, help="Batch size; repeat the option to measure several.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True)
@options.measuring
@options.device()
@options.loading
@options.common
@options.with_models
def bench_command(ref, task, batch_size, seq_len, warmup, repeats, threads, device,
                  allow_pickle, trust_remote_code, as_json):
    """Measure MODEL's forward latency (median, p90), throughput, memory and size."""
    from ..core.loading import load_model
    from ..core.profile import profile

    loaded = load_model(ref, task, device=device, allow_pickle=allow_pickle,
                        trust_remote_code=trust_remote_code, task_head=False)
    for bs in batch_size:
        result = profile(loaded, device, bs, seq_len, warmup=warmup, repeats=repeats,
                         threads=threads)
        options.emit({"model": ref, "task": loaded.task, **result}, as_json, _human)
