"""Peak memory of QLoRA (4-bit and 8-bit base) against fp32 LoRA on smollm2.

    HF_HUB_OFFLINE=1 python bench/qlora_memory.py [--steps 5]

Each variant runs in its own process (so one's memory cannot hide another's): load smollm2,
train LoRA r16 on bbc-text windows of 128 tokens, batch 4, for a few steps. On CPU it records
the process RSS after loading and its peak while training (sampled every 10 ms), and the
process high-water mark; on CUDA, torch's peak allocated memory. Writes
bench/results/qlora_memory.json. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from results_io import RESULTS, write_result  # bench/ is on sys.path when run as a script


def child(bits: int | None, steps: int, device: str) -> dict:
    """One variant, in this process."""
    import resource

    import psutil
    import torch

    from mmkit.core.data import load_data
    from mmkit.core.loading import load_model
    from mmkit.core.registry import Context, build_config, get_method

    proc = psutil.Process()
    loaded = load_model("smollm2", "causal-lm", device=device, bits=bits)
    after_load = proc.memory_info().rss
    peak = [after_load]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    method = get_method("finetune", "lora")
    cfg = build_config(method, {"max_steps": steps, "batch_size": 4, "max_length": 128,
                                **({"bits": bits} if bits else {})}, "bench")
    ds = load_data("bbc-text", "causal-lm", max_samples=16)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(device=device, dataset=ds, workdir=tmp + "/ckpt", fingerprint="bench")
        start = time.perf_counter()
        method.apply(loaded, cfg, ctx)
        seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    out = {"bits": bits or 32, "rss_after_load_mb": after_load / 2**20,
           "rss_peak_training_mb": peak[0] / 2**20,
           "process_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "train_seconds": seconds, "train_loss": ctx.report["train_loss"], "steps": steps}
    if device.startswith("cuda"):
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    """Run fp32, 8-bit and 4-bit in separate processes and compare."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "qlora_memory.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child is not None:
        print(json.dumps(child(args.child or None, args.steps, args.device)))
        return
    runs = []
    for bits in (0, 8, 4):
        proc = subprocess.run([sys.executable, __file__, "--child", str(bits), "--steps",
                               str(args.steps), "--device", args.device],
                              capture_output=True, text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    fp32 = runs[0]
    key = "cuda_peak_allocated_mb" if args.device.startswith("cuda") else "rss_peak_training_mb"
    write_result({"device": args.device, "measure": key, "runs": runs,
                  "ratio_to_fp32": {str(r["bits"]): r[key] / fp32[key] for r in runs}}, args.out)


if __name__ == "__main__":
    main()
