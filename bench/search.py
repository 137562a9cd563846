"""Search figures: a 30-trial TPE search against a 100-trial random search on the minilm
sentiment classifier (bench/classifier.py), on this machine's CPU.

    HF_HUB_OFFLINE=1 python bench/search.py [--tpe 30 --random 100 --samples 500]

The latency budget is half the fine-tuned model's batch-1 latency (seq 64), so the best point
under it is at least 2x faster. Reported: the best point's test accuracy against the
fine-tuned model's, the 2-D hypervolume (validation accuracy x latency, reference point:
accuracy 0 at the budget) of each search's feasible points, seconds per trial, and how many
trials the latency-first rejection spared an evaluation. Writes bench/results/search.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from results_io import RESULTS, write_result  # bench/ is on sys.path when run as a script

SPACE = "knobs:\n  layers: [0, 1, 2, 3]\n  heads: [0, 0.25, 0.5]\n  ffn: [0, 0.25, 0.5, 0.75]\n" \
        "  quant: [none, dynamic-int8]\n"


def hypervolume(points, budget_ms: float) -> float:
    """Area dominated by (accuracy up, latency down) points, up to accuracy 0 and the budget."""
    pts = sorted((lat, acc) for acc, lat in points if lat <= budget_ms)
    area, best = 0.0, 0.0
    edges = [lat for lat, _ in pts] + [budget_ms]
    for (lat, acc), nxt in zip(pts, edges[1:]):
        best = max(best, acc)
        area += best * (nxt - lat)
    return area


def run(sampler: str, trials: int, model: str, budget_ms: float, samples: int, out: Path,
        export: str) -> dict:
    """One search through mmkit's own entry points."""
    from mmkit.core.data import DataSpec
    from mmkit.core.recipe import RunOptions
    from mmkit.search.run import prepare, search
    from mmkit.search.settings import SearchRequest

    space = out.parent / "space.yaml"
    space.write_text(SPACE)
    request = SearchRequest(model=model, data=DataSpec(data="tweets-sentiment",
                                                       max_samples=samples, seed=0),
                            budget=f"{budget_ms}ms", objectives="accuracy,latency,size",
                            space_file=str(space), sampler=sampler, out=out)
    job = prepare(request, RunOptions(overwrite=True))
    result = search(job, trials, None, 1, export)
    points = [(r["values"]["accuracy"], r["latency_ms"]) for r in result["front"]]
    evaluated = [(r["values"]["accuracy"], r["latency_ms"])
                 for r in json.loads((out / "pareto.json").read_text())["evaluated"]]
    return {"sampler": sampler, "trials": result["trials_completed"],
            "rejected_without_evaluation": result["rejected_without_evaluation"],
            "seconds_per_trial": result["seconds_per_trial"],
            "seconds": result["seconds_this_run"],
            "hypervolume": hypervolume(evaluated, budget_ms), "front": points,
            "best": result["best"], "exported": result["exported"]}


def main() -> None:
    """Run both searches and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tpe", type=int, default=30)
    parser.add_argument("--random", type=int, default=100)
    parser.add_argument("--samples", type=int, default=500, help="tweets per split")
    parser.add_argument("--out", default=str(RESULTS / "search.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from classifier import trained_classifier
    from mmkit.core.data import load_data
    from mmkit.core.evaluate import evaluate
    from mmkit.core.loading import load_model
    from mmkit.core.profile import profile

    model = trained_classifier()
    loaded = load_model(model)
    base_ms = profile(loaded, "cpu", batch_size=1, seq_len=64, warmup=3,
                      repeats=20)["latency_ms"]["median"]
    data = load_data("tweets-sentiment", "text-classification", max_samples=args.samples)
    base_test = evaluate(loaded, data, "test")["accuracy"]
    budget = base_ms / 2
    work = Path(tempfile.mkdtemp(prefix="mmkit-bench-s-"))
    try:
        tpe = run("tpe", args.tpe, model, budget, args.samples, work / "tpe", "best")
        best_test = None
        if tpe["exported"]:
            best_test = evaluate(load_model(tpe["exported"][0]), data, "test")["accuracy"]
            best_ms = profile(load_model(tpe["exported"][0]), "cpu", batch_size=1, seq_len=64,
                              warmup=3, repeats=20)["latency_ms"]["median"]
        rand = run("random", args.random, model, budget, args.samples, work / "random", "none")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"model": "minilm fine-tuned on tweets-sentiment (full, 1 epoch, 2,000 tweets)",
              "data": f"{args.samples} tweets per split", "space": SPACE,
              "finetuned_batch1_ms": base_ms, "finetuned_test_accuracy": base_test,
              "latency_budget_ms": budget, "tpe": tpe, "random": rand,
              "best_test_accuracy": best_test,
              "best_batch1_ms_remeasured": best_ms if best_test is not None else None,
              "best_speedup": base_ms / best_ms if best_test is not None else None,
              "best_accuracy_drop_points": 100 * (base_test - best_test) if best_test else None,
              "tpe_hv_over_random_hv": tpe["hypervolume"] / rand["hypervolume"]
              if rand["hypervolume"] else None}
    write_result(result, args.out)


if __name__ == "__main__":
    main()
