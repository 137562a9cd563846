"""Foundation figures: `mmkit --help` wall time and `mmkit bench minilm` at batch 1 and 32.

    HF_HUB_OFFLINE=1 python bench/foundation.py [--out bench/results/foundation.json]

Writes one JSON file; prints it too. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

from results_io import RESULTS, write_result  # bench/ is on sys.path when run as a script


def help_wall_time(runs: int = 7) -> dict:
    """Median / min wall time of `mmkit --help` as a fresh process."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(["mmkit", "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return {"runs": runs, "median_s": statistics.median(times), "min_s": min(times)}


def bench_minilm(batch_sizes=(1, 32), seq_len: int = 128, repeats: int = 20) -> list[dict]:
    """The shared profile of minilm (bare encoder) on CPU, one entry per batch size."""
    from mmkit.core.loading import load_model
    from mmkit.core.profile import profile

    loaded = load_model("minilm", task_head=False)
    out = []
    for bs in batch_sizes:
        r = profile(loaded, "cpu", bs, seq_len, warmup=3, repeats=repeats)
        out.append({k: r[k] for k in ("batch_size", "seq_len", "latency_ms", "throughput_per_s",
                                      "peak_memory_mb", "parameters", "weights_mb", "disk_mb",
                                      "environment")})
    return out


def main() -> None:
    """Measure and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(RESULTS / "foundation.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = {"help": help_wall_time(), "bench_minilm": bench_minilm()}
    write_result(result, args.out)


if __name__ == "__main__":
    main()
