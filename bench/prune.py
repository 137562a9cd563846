"""Pruning figures, on this machine's CPU.

    HF_HUB_OFFLINE=1 python bench/prune.py [--part lm|classifier|all]

- lm: smollm2 perplexity on held-out bbc-text (test split, windows of 256) dense, at 50%
  magnitude, 50% Wanda, and 2:4 (magnitude and Wanda scores); Wanda calibrated on bbc-text's
  train split.
- classifier: the minilm sentiment classifier (bench/classifier.py) after removing 25% and 50%
  of FFN neurons, 25% and 50% of heads, and 2 of 6 layers (weights importance, no recovery
  training): test accuracy, parameters, CPU latency at batch 1 and 32 (seq 64), side by side in
  one process.
Writes bench/results/prune.json. Not a test.
"""

from __future__ import annotations

import argparse
import os

from results_io import RESULTS, write_result  # bench/ is on sys.path when run as a script

LM_VARIANTS = {
    "dense": None,
    "magnitude-50": {"method": "magnitude", "sparsity": 0.5},
    "wanda-50": {"method": "wanda", "sparsity": 0.5, "calib": "bbc-text", "calib_samples": 64,
                 "calib_length": 256},
    "nm-2:4-magnitude": {"method": "nm", "nm": "2:4"},
    "nm-2:4-wanda": {"method": "nm", "nm": "2:4", "score": "wanda", "calib": "bbc-text",
                     "calib_samples": 64, "calib_length": 256},
}
CLS_VARIANTS = {
    "dense": None,
    "neurons-25": {"method": "neurons", "sparsity": 0.25},
    "neurons-50": {"method": "neurons", "sparsity": 0.5},
    "heads-25": {"method": "heads", "sparsity": 0.25},
    "heads-50": {"method": "heads", "sparsity": 0.5},
    "layers-2-of-6": {"method": "layers", "sparsity": 2 / 6},
}


def variant(ref, task, step, dataset, seq_len, eval_length, batches, repeats) -> dict:
    """Prune `ref` one way, score it and time it."""
    import time

    from mmkit.core.evaluate import evaluate
    from mmkit.core.loading import load_model
    from mmkit.core.profile import profile
    from mmkit.core.registry import Context, build_config, get_method

    loaded = load_model(ref, task, dataset.label_names if task != "causal-lm" else None)
    report, seconds = {}, 0.0
    if step:
        method = get_method("prune", step["method"])
        cfg = build_config(method, {k: v for k, v in step.items() if k != "method"}, "bench")
        ctx = Context(dataset=dataset)
        start = time.perf_counter()
        loaded = method.apply(loaded, cfg, ctx)
        seconds = time.perf_counter() - start
        report = {k: v for k, v in ctx.report.items() if k not in ("layer_sparsity", "attention")}
    metrics = evaluate(loaded, dataset, "test", batch_size=8 if task == "causal-lm" else 32,
                       max_length=eval_length)
    timing = {}
    for b in batches:
        p = profile(loaded, "cpu", batch_size=b, seq_len=seq_len, warmup=2, repeats=repeats)
        timing[f"batch_{b}_median_ms"] = p["latency_ms"]["median"]
    return {**{k: v for k, v in metrics.items() if k in ("accuracy", "macro_f1", "perplexity",
                                                         "examples")},
            **timing, "parameters": sum(p.numel() for p in loaded.model.parameters()),
            "prune_seconds": seconds, "report": report}


def lm_part(docs: int) -> dict:
    """smollm2 on bbc-text: perplexity per variant."""
    from mmkit.core.data import load_data

    data = load_data("bbc-text", "causal-lm", max_samples=docs)
    rows = {}
    for name, step in LM_VARIANTS.items():
        rows[name] = variant("smollm2", "causal-lm", step, data, 128, 256, (1,), 3)
        print(name, rows[name], flush=True)
    dense = rows["dense"]["perplexity"]
    for row in rows.values():
        row["perplexity_vs_dense"] = row["perplexity"] / dense
    return {"model": "smollm2", "data": f"bbc-text, {docs} documents per split, windows of 256",
            "variants": rows}


def classifier_part(samples: int) -> dict:
    """The minilm classifier: accuracy, size and latency per structured variant."""
    from classifier import trained_classifier
    from mmkit.core.data import load_data

    trained = trained_classifier(samples)
    data = load_data("tweets-sentiment", "text-classification", max_samples=samples)
    rows = {}
    for name, step in CLS_VARIANTS.items():
        rows[name] = variant(trained, "text-classification", step, data, 64, 128, (1, 32), 20)
        print(name, rows[name], flush=True)
    base = rows["dense"]
    for row in rows.values():
        row["accuracy_drop_points"] = 100 * (base["accuracy"] - row["accuracy"])
        row["batch_1_speedup"] = base["batch_1_median_ms"] / row["batch_1_median_ms"]
        row["batch_32_speedup"] = base["batch_32_median_ms"] / row["batch_32_median_ms"]
    return {"model": "minilm fine-tuned on tweets-sentiment (full, 1 epoch)",
            "data": f"{samples} tweets per split; latency at seq 64; no recovery training",
            "variants": rows}


def main() -> None:
    """Run the parts asked for and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=["lm", "classifier", "all"], default="all")
    parser.add_argument("--docs", type=int, default=60, help="bbc-text documents per split")
    parser.add_argument("--samples", type=int, default=2000, help="tweets per split")
    parser.add_argument("--out", default=str(RESULTS / "prune.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = {"device": "cpu"}
    if args.part in ("classifier", "all"):
        result["classifier"] = classifier_part(args.samples)
    if args.part in ("lm", "all"):
        result["lm"] = lm_part(args.docs)
    write_result(result, args.out)


if __name__ == "__main__":
    main()
