"""Peak memory of perplexity on smollm2: mmkit's micro-batched loss against the loop it
replaced (full logits of a whole batch, then copies), one fresh process per run, interleaved.

    HF_HUB_OFFLINE=1 python bench/eval_memory.py [--max-samples 40] [--batch-sizes 8,32] \
        [--out bench/results/eval_memory.json]

Not a test: it measures. Peak RSS (MiB) is the process high-water mark (ru_maxrss) after the run;
`loaded_mib` is the mark before evaluating (libraries and the model; the weights are memory-mapped,
so they count in full only once the first forward pass has touched them). SmolLM2 is converted
from its GGUF before the first measured process, so no measurement carries the conversion.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

from results_io import RESULTS, write_result  # bench/ is on sys.path when run as a script


def full_logits_baseline(loaded, split, batch_size: int, max_length: int = 512) -> dict:
    """The loop mmkit used before (kept here only as the baseline): the logits of a whole
    batch at once, cast, sliced and reshaped (copies), then cross-entropy."""
    import torch
    import torch.nn.functional as F

    from mmkit.core.tasks.causal_lm import max_positions, token_stream, windows

    model = loaded.model
    seq_len = min(max_length, max_positions(model.config))
    wins = windows(token_stream(loaded, split.inputs), seq_len)
    nll, count = 0.0, 0
    for start in range(0, len(wins), batch_size):
        group = wins[start:start + batch_size]
        width = max(len(w) for w in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, w in enumerate(group):
            ids[row, :len(w)] = torch.tensor(w)
            mask[row, :len(w)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logits = logits[:, -ids.size(1):]
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), target.reshape(-1),
                               ignore_index=-100, reduction="sum")
        nll += loss.item()
        count += int((target != -100).sum())
    return {"perplexity": math.exp(nll / count), "tokens": count}


def one_run(variant: str, batch_size: int, max_samples: int) -> dict:
    """Load smollm2 and bbc-text, then time and measure one evaluation."""
    from mmkit.core.data import load_data
    from mmkit.core.loading import load_model
    from mmkit.core.tasks.causal_lm import evaluate, windows_per_forward

    loaded = load_model("smollm2")
    split = load_data("bbc-text", "causal-lm", max_samples=max_samples).split("test")
    loaded_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if variant == "mmkit":
        result = evaluate(loaded, split, batch_size=batch_size)
        micro = windows_per_forward(batch_size, result["seq_len"], loaded.model.config.vocab_size)
    else:
        micro = batch_size
        result = full_logits_baseline(loaded, split, batch_size)
    return {"variant": variant, "batch_size": batch_size, "seconds": time.perf_counter() - start,
            "windows_per_forward": micro, "loaded_mib": loaded_mib,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "perplexity": result["perplexity"], "tokens": result["tokens"]}


def summary(runs: list[dict]) -> dict:
    """Per batch size: peak RSS of the old loop over the new one, and how far apart their
    perplexities are."""
    out = {}
    for batch in sorted({r["batch_size"] for r in runs}):
        old, new = (next(r for r in runs if r["batch_size"] == batch and r["variant"] == v)
                    for v in ("full-logits", "mmkit"))
        out[f"batch_{batch}"] = {
            "peak_rss_ratio_old_over_new": old["peak_rss_mib"] / new["peak_rss_mib"],
            "perplexity_rel_diff": abs(old["perplexity"] / new["perplexity"] - 1),
            "seconds_old": old["seconds"], "seconds_new": new["seconds"]}
    return out


def environment() -> dict:
    """The machine and library versions the figures were taken with."""
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-samples", type=int, default=40)
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "eval_memory.json"))
    args = parser.parse_args()
    if args.one:  # a child process: one measurement, as JSON on stdout
        print(json.dumps(one_run(args.one[0], int(args.one[1]), args.max_samples)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # convert the GGUF now (once), so that no measured process carries the conversion's peak
    subprocess.run([sys.executable, "-c", "from mmkit.core.embedded import smollm2_path; "
                    "smollm2_path()"], check=True)
    runs = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for variant in ("full-logits", "mmkit"):  # interleaved, one process each
            proc = subprocess.run([sys.executable, __file__, "--one", variant, str(batch),
                                   "--max-samples", str(args.max_samples)],
                                  capture_output=True, text=True, check=True)
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    write_result({"model": "smollm2", "data": "bbc-text", "split": "test",
                  "max_samples": args.max_samples, "environment": environment(), "runs": runs,
                  "summary": summary(runs)}, args.out)


if __name__ == "__main__":
    main()
