"""Quantization figures, on this machine's CPU (or a GPU with --device cuda).

    HF_HUB_OFFLINE=1 python bench/quantize.py [--part lm|classifier|all]

- lm: smollm2 perplexity on held-out bbc-text (test split) for fp32, rtn-4 g128, gptq-4 g128
  (calibrated on bbc-text's train split), nf4, int8 and dynamic-int8; size and latency of each.
- classifier: minilm fully fine-tuned on tweets-sentiment (1 epoch, 2,000 tweets), then the
  same variants at 4 and 8 bits: test accuracy, latency at batch 1 and 32, size.

Variants run one after another in one process, so their latencies compare side by side.
Writes bench/results/quantize.json. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from results_io import RESULTS, write_result  # bench/ is on sys.path when run as a script

LM_VARIANTS = {
    "fp32": None,
    "rtn-4-g128": {"method": "rtn", "bits": 4, "group_size": 128},
    "gptq-4-g128": {"method": "gptq", "bits": 4, "group_size": 128, "calib": "bbc-text",
                    "calib_samples": 64, "calib_length": 256},
    "gptq-4-g128-act-order": {"method": "gptq", "bits": 4, "group_size": 128, "act_order": True,
                              "calib": "bbc-text", "calib_samples": 128, "calib_length": 256},
    "nf4": {"method": "nf4"},
    "int8": {"method": "int8"},
    "dynamic-int8": {"method": "dynamic-int8"},
}
CLS_VARIANTS = {
    "fp32": None,
    "rtn-8-g128": {"method": "rtn", "bits": 8, "group_size": 128},
    "dynamic-int8": {"method": "dynamic-int8"},
    "int8": {"method": "int8"},
    "rtn-4-g128": {"method": "rtn", "bits": 4, "group_size": 128},
    "gptq-4-g128": {"method": "gptq", "bits": 4, "group_size": 128, "calib": "tweets-sentiment",
                    "calib_samples": 256, "calib_length": 64},
    "nf4": {"method": "nf4"},
}


def variant(ref, task, step, dataset, workdir: Path, device: str, seq_len: int,
            eval_length: int | None, batches=(1, 32), repeats: int = 10) -> dict:
    """Quantize `ref` one way, score it, time it and write it to disk."""
    from mmkit.core.artifacts import write_artifact
    from mmkit.core.evaluate import evaluate
    from mmkit.core.loading import load_model
    from mmkit.core.profile import disk_bytes, profile
    from mmkit.core.registry import Context, build_config, get_method

    loaded = load_model(ref, task, dataset.label_names if task != "causal-lm" else None,
                        device=device)
    report, seconds = {}, 0.0
    if step:
        method = get_method("quantize", step["method"])
        cfg = build_config(method, {k: v for k, v in step.items() if k != "method"}, "bench")
        ctx = Context(device=device, dataset=dataset)
        start = time.perf_counter()
        loaded = method.apply(loaded, cfg, ctx)
        seconds = time.perf_counter() - start
        report = {k: v for k, v in ctx.report.items() if k != "layers"}
        errors = [v.get("output_rel_error") for v in ctx.report.get("layers", {}).values()]
        errors = [e for e in errors if e is not None]
        if errors:
            report["mean_layer_output_rel_error"] = sum(errors) / len(errors)
    metrics = evaluate(loaded, dataset, "test", batch_size=8 if task == "causal-lm" else 32,
                       max_length=eval_length)
    timing = {}
    for b in batches:
        p = profile(loaded, device, batch_size=b, seq_len=seq_len, warmup=2, repeats=repeats)
        timing[f"batch_{b}_median_ms"] = p["latency_ms"]["median"]
    out = write_artifact(loaded, workdir / "m", recipe={"model": str(ref)}, steps=[], metrics=[],
                         overwrite=True, fmt=loaded.extra.get("format", "hf-model"))
    return {**{k: v for k, v in metrics.items() if k in ("accuracy", "macro_f1", "perplexity",
                                                         "examples")},
            **timing, "disk_mb": disk_bytes(str(out)) / 2**20, "quantize_seconds": seconds,
            "report": report}


def lm_part(workdir: Path, device: str, docs: int, only=None, rows=None) -> dict:
    """smollm2 on bbc-text: perplexity, latency and size per variant (`only` some of them,
    added to `rows` measured before)."""
    from mmkit.core.data import load_data

    data = load_data("bbc-text", "causal-lm", max_samples=docs)
    rows = dict(rows or {})
    for name, step in LM_VARIANTS.items():
        if only and name not in only:
            continue
        rows[name] = variant("smollm2", "causal-lm", step, data, workdir, device, seq_len=128,
                             eval_length=256, batches=(1,), repeats=5)
        print(name, rows[name], flush=True)
    fp, rtn, gptq = (rows[k]["perplexity"] for k in ("fp32", "rtn-4-g128", "gptq-4-g128"))
    return {"model": "smollm2", "data": f"bbc-text, {docs} documents per split, windows of 256",
            "variants": rows, "gptq_share_of_rtn_gap_closed": (rtn - gptq) / (rtn - fp),
            "gptq_act_order_share_of_rtn_gap_closed":
                (rtn - rows["gptq-4-g128-act-order"]["perplexity"]) / (rtn - fp)
                if "gptq-4-g128-act-order" in rows else None}


def classifier_part(workdir: Path, device: str, samples: int) -> dict:
    """A minilm sentiment classifier: accuracy drop, latency and size per variant."""
    from classifier import trained_classifier
    from mmkit.core.data import load_data

    trained = trained_classifier(samples)
    data = load_data("tweets-sentiment", "text-classification", max_samples=samples)
    rows = {}
    for name, step in CLS_VARIANTS.items():
        rows[name] = variant(trained, "text-classification", step, data, workdir, device,
                             seq_len=64, eval_length=128)
        print(name, rows[name], flush=True)
    base = rows["fp32"]
    for row in rows.values():
        row["accuracy_drop_points"] = 100 * (base["accuracy"] - row["accuracy"])
        row["batch_1_speedup"] = base["batch_1_median_ms"] / row["batch_1_median_ms"]
        row["batch_32_speedup"] = base["batch_32_median_ms"] / row["batch_32_median_ms"]
    return {"model": "minilm fine-tuned on tweets-sentiment (full, 1 epoch)",
            "data": f"{samples} tweets per split; latency at seq 64", "variants": rows}


def main() -> None:
    """Run the parts asked for and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=["lm", "classifier", "all"], default="all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--docs", type=int, default=60, help="bbc-text documents per split")
    parser.add_argument("--samples", type=int, default=2000, help="tweets per split")
    parser.add_argument("--only", nargs="*", help="lm variants to (re)measure; the others are "
                                                   "kept from --out")
    parser.add_argument("--out", default=str(RESULTS / "quantize.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.manual_seed(0)
    workdir = Path(tempfile.mkdtemp(prefix="mmkit-bench-q-"))
    result = {"device": args.device}
    if args.only:  # add to an earlier run's figures
        result = json.loads(Path(args.out).read_text())
    try:
        if args.part in ("classifier", "all") and not args.only:
            result["classifier"] = classifier_part(workdir, args.device, args.samples)
        if args.part in ("lm", "all"):
            earlier = (result.get("lm") or {}).get("variants")
            result["lm"] = lm_part(workdir, args.device, args.docs, args.only, earlier)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_result(result, args.out)


if __name__ == "__main__":
    main()
