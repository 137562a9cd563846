"""Elastic super-network figures: MiniLM on tweets-sentiment, on this machine's CPU.

    HF_HUB_OFFLINE=1 python bench/elastic.py [--parts train,cost,cuts,search,table] [--space S] [--quick]

- train: a dense full fine-tune and an elastic one (--elastic sampled, same epochs, data and
  learning rate); test accuracy of each full network, and the training-time ratio of the two
  runs.
- cost: the training-time ratio measured interleaved: short runs (--cost-steps) of dense,
  sampled and nested elastic training, in turn, repeated; ratio of the medians.
- cuts: FFN 50%, heads 50%, depth 4 of 6 and all three together, made three ways: extracted
  from the elastic model; pruned from the dense fine-tune (no recovery); pruned, then
  distilled from the uncut model for a fixed number of steps (`finetune distill`). Test
  accuracy and parameters of each.
- table (not in the default parts): every trained sub-network (FFN 25% left out) extracted,
  quantized as --table-quant says: validation and test accuracy, latency ratio to the dense
  fine-tune (batch 1, seq 64, interleaved). A run with --space is kept under its own key.
- search: `mmkit search` on the elastic model (TPE, 30 trials, budget 0.5x, --knobs: layers,
  heads, ffn, quant; `--knobs layers,heads,ffn,quant,recovery` adds the short distillation
  from the uncut model, its figures kept under its own key); the exported model timed
  interleaved against the dense fine-tune
  (batch 1, seq 64) and scored on test; hypervolume (validation accuracy x latency ratio, up
  to the budget) of the 30 TPE trials against 100 random ones on the same space.

Data as bench/search.py: training on --train-samples tweets, every score on --samples per
split (seed 0). The search runs on --samples per split too, so its recovery trains on that many
tweets: MiniLM's depth-4 cut (75% heads, int8) distilled on 500 stayed 1.0 point below the dense
model on all 2,314 test tweets (50 or 150 steps), on 2,000 it came within 0.5 point (50 steps)
and level (100 steps), at 5e-5. Fine-tunes are cached in --work. Writes bench/results/elastic.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from results_io import RESULTS, write_result  # bench/ is on sys.path when run as a script

SAMPLES = 500  # tweets per split, as bench/search.py
KNOBS = "layers,heads,ffn,quant"  # the search's default knobs: sub-networks x quantization
CUTS = {"ffn-50": {"ffn": 0.5}, "heads-50": {"heads": 0.5}, "depth-4": {"depth": 4},
        "all-three": {"ffn": 0.5, "heads": 0.5, "depth": 4}}


def _prune_steps(cut: dict) -> list[dict]:
    """The structured prune steps of a cut (weights importance, as bench/prune.py)."""
    steps = []
    if "depth" in cut:
        steps.append({"step": "prune", "method": "layers", "sparsity": (6 - cut["depth"]) / 6})
    if "heads" in cut:
        steps.append({"step": "prune", "method": "heads", "sparsity": 1 - cut["heads"]})
    if "ffn" in cut:
        steps.append({"step": "prune", "method": "neurons", "sparsity": 1 - cut["ffn"]})
    return steps


def _finetune(work: Path, name: str, step: dict, args) -> dict:
    """A cached fine-tune of minilm: its artifact and training report."""
    from mmkit.core.recipe import run_recipe

    out = work / name
    if not (out / "mmkit.json").is_file():
        run_recipe({"model": "minilm", "data": "tweets-sentiment", "seed": 0,
                    "max_samples": args.train_samples, "steps": [step]}, out, overwrite=True)
    report = json.loads((out / "mmkit.json").read_text())["steps"][0]["report"]
    return {"artifact": str(out), "train_seconds": report["train_seconds"],
            "steps": report["steps"], "passes_per_step": report.get("elastic", {}).get(
                "passes_per_step", 1)}


def _score(model, data, split="test") -> float:
    from mmkit.core.evaluate import evaluate
    from mmkit.core.loading import load_model

    loaded = model if not isinstance(model, str) else load_model(model)
    return evaluate(loaded, data, split)["accuracy"]


def parse_space(text: str) -> dict:
    """--space 'ffn=0.5,0.75,1;depth=3,4,5,6' -> {"ffn": [...], "depth": [...]} (empty: the
    elastic method's defaults)."""
    space = {}
    for part in filter(None, (text or "").split(";")):
        key, _, values = part.partition("=")
        space[key.strip()] = [int(v) if key.strip() == "depth" else float(v)
                              for v in values.split(",")]
    return space


def train(args, work: Path, data) -> dict:
    """Dense and elastic fine-tunes: full-network accuracy and training time."""
    common = {"step": "finetune", "epochs": args.epochs, "lr": args.lr}
    dense = _finetune(work, f"dense-n{args.train_samples}-e{args.epochs}",
                      {**common, "method": "full"}, args)
    space = parse_space(args.space)
    tag = "".join(f"-{k}{'_'.join(f'{x:g}' for x in v)}" for k, v in space.items())
    elastic = _finetune(work, f"elastic-n{args.train_samples}-e{args.epochs}-s{args.samples_k}"
                        f"{tag}", {**common, "method": "elastic", "mode": "sampled",
                                   "samples": args.samples_k, **space}, args)
    for row in (dense, elastic):
        row["test_accuracy"] = _score(row["artifact"], data)
    return {"dense": dense, "elastic": elastic,
            "elastic_minus_dense_points": 100 * (elastic["test_accuracy"]
                                                 - dense["test_accuracy"]),
            "goal_le_0.5_points_lower": elastic["test_accuracy"] >= dense["test_accuracy"]
            - 0.005,
            "training_time_ratio": elastic["train_seconds"] / dense["train_seconds"],
            "goal_time_ratio_le_2": elastic["train_seconds"] / dense["train_seconds"] <= 2}


def cost(args, work: Path) -> dict:
    """Training time per step, dense against elastic, interleaved (A, B, A, B ...): short
    runs of --cost-steps steps on the same data, so that a machine whose speed drifts
    shifts both alike. The ratio of medians of each run's training time (its validation
    passes subtracted)."""
    import statistics

    from mmkit.core.recipe import run_recipe

    runs = {"dense": [], "elastic-sampled": [], "elastic-nested": []}
    space = parse_space(args.space)
    steps = {"dense": {"method": "full"},
             "elastic-sampled": {"method": "elastic", "mode": "sampled",
                                 "samples": args.samples_k, **space},
             "elastic-nested": {"method": "elastic", "mode": "nested",
                                "samples": args.samples_k,
                                **{k: v for k, v in space.items() if k != "depth"}}}
    for _ in range(args.cost_repeats):
        for name, step in steps.items():
            out = work / "cost" / name
            result = run_recipe({"model": "minilm", "data": "tweets-sentiment", "seed": 0,
                                 "max_samples": args.train_samples, "steps": [
                                     {"step": "finetune", "max_steps": args.cost_steps,
                                      "lr": args.lr, **step}]}, out, overwrite=True)
            report = result["steps"][0]["report"]  # training steps only: less evaluation
            runs[name].append(report["train_seconds"] - sum(
                h.get("eval_runtime", 0) for h in report["validation_history"]))
            shutil.rmtree(out, ignore_errors=True)
    median = {name: statistics.median(t) for name, t in runs.items()}
    return {"steps_per_run": args.cost_steps, "repeats": args.cost_repeats,
            "train_seconds": runs, "median_seconds": median,
            "sampled_over_dense": median["elastic-sampled"] / median["dense"],
            "nested_over_dense": median["elastic-nested"] / median["dense"],
            "goal_le_2": median["elastic-sampled"] / median["dense"] <= 2}


def cuts(args, work: Path, data, trained: dict) -> dict:
    """Each cut extracted from the elastic model, pruned from the dense one, and pruned then
    distilled (recovery)."""
    from mmkit.core.recipe import run_recipe

    dense, elastic = trained["dense"]["artifact"], trained["elastic"]["artifact"]
    rows = {}
    for name, cut in CUTS.items():
        made = {
            "elastic-extract": (elastic, [{"step": "extract", **cut}]),
            "prune": (dense, _prune_steps(cut)),
            "prune+distill": (dense, _prune_steps(cut) + [
                {"step": "finetune", "method": "distill", "max_steps": args.recovery_steps,
                 "lr": args.lr}]),
        }
        row = {}
        for how, (model, steps) in made.items():
            out = work / "cuts" / f"{name}-{how}"
            start = time.perf_counter()
            result = run_recipe({"model": model, "data": "tweets-sentiment", "seed": 0,
                                 "max_samples": args.train_samples, "steps": steps}, out,
                                overwrite=True)
            seconds = time.perf_counter() - start
            acc = _score(result["artifact"], data)
            row[how] = {"test_accuracy": acc, "seconds": round(seconds, 1),
                        "points_below_full": 100 * (trained[
                            "elastic" if how == "elastic-extract" else "dense"]["test_accuracy"]
                            - acc)}
            shutil.rmtree(out, ignore_errors=True)
        rows[name] = row
    ffn = rows["ffn-50"]["elastic-extract"]["points_below_full"]
    return {"recovery_steps": args.recovery_steps, "cuts": rows,
            "goal_elastic_ffn50_within_1_point": ffn <= 1.0}


def table(args, work: Path, data, trained: dict) -> dict:
    """Every sub-network of the trained space (FFN 25% left out: the default space's
    narrowest, never worth its accuracy), extracted and quantized per --table-quant: test and
    validation accuracy and latency relative to the dense fine-tune (batch 1, seq 64,
    interleaved) -- which cuts buy time on this CPU, and at what accuracy."""
    import itertools

    from mmkit.core.evaluate import evaluate
    from mmkit.core.loading import load_model
    from mmkit.core.profile import profile_pair
    from mmkit.core.recipe import run_recipe

    elastic = trained["elastic"]["artifact"]
    space = json.loads((Path(elastic) / "mmkit_elastic.json").read_text())["space"]
    dense = load_model(trained["dense"]["artifact"])
    rows = []
    for ffn, heads, depth, quant in itertools.product(
            [f for f in space["ffn"] if f > 0.25], space["heads"], space["depth"],
            args.table_quant.split(",")):
        steps = [{"step": "extract", "ffn": ffn, "heads": heads, "depth": depth}]
        steps += [{"step": "quantize", "method": quant}] if quant != "none" else []
        out = work / "table" / f"{ffn:g}-{heads:g}-{depth}-{quant}"
        run_recipe({"model": elastic, "data": "tweets-sentiment", "seed": 0, "steps": steps},
                   out, overwrite=True)
        cut = load_model(out)
        pair = profile_pair(cut, dense, "cpu", batch_size=1, seq_len=64, warmup=3,
                            rounds=args.rounds)
        rows.append({"ffn": ffn, "heads": heads, "depth": depth, "quant": quant,
                     "validation_accuracy": evaluate(cut, data, "validation")["accuracy"],
                     "test_accuracy": evaluate(cut, data, "test")["accuracy"],
                     "latency_ratio": pair["ratio"]})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return {"space": space, "dense_test_accuracy": trained["dense"]["test_accuracy"],
            "rows": rows}


def _hypervolume(rows: list[dict], budget: float) -> float:
    """bench/search.py's hypervolume over (validation accuracy, latency ratio), up to the
    budget ratio."""
    from search import hypervolume  # bench/search.py

    return hypervolume([(r["values"]["accuracy"], r["latency_ratio"]) for r in rows
                        if r.get("latency_ratio") is not None], budget)


def _search(model: str, sampler: str, trials: int, args, out: Path, export: str) -> dict:
    from mmkit.core.data import DataSpec
    from mmkit.core.errors import RuntimeFailure
    from mmkit.core.recipe import RunOptions
    from mmkit.search.run import prepare, search
    from mmkit.search.settings import SearchRequest

    request = SearchRequest(model=model, data=DataSpec(data="tweets-sentiment",
                                                       max_samples=args.samples, seed=0),
                            budget=f"{args.budget}x", knobs=args.knobs,
                            sampler=sampler, seq_len=64, out=out)
    try:
        result = search(prepare(request, RunOptions(overwrite=True)), trials, None, 1, export)
    except RuntimeFailure as exc:  # no point met the budget: say so, keep the trials' figures
        result = {"trials_completed": None, "rejected_without_evaluation": None,
                  "seconds_this_run": None, "best": None, "best_remeasured": None,
                  "exported": [], "failure": str(exc)}
    evaluated = json.loads((out / "pareto.json").read_text())["evaluated"]
    return {"sampler": sampler, "trials": result["trials_completed"],
            "failure": result.get("failure"),
            "rejected_without_evaluation": result["rejected_without_evaluation"],
            "seconds": result["seconds_this_run"], "best": result["best"],
            "best_remeasured": result["best_remeasured"],
            "confirmation": result.get("confirmation"), "exported": result["exported"],
            "hypervolume": _hypervolume(evaluated, args.budget)}


def search_part(args, work: Path, data, trained: dict) -> dict:
    """TPE on the elastic model; its export against the dense fine-tune; HV vs random."""
    from mmkit.core.loading import load_model
    from mmkit.core.profile import profile_pair

    elastic, dense = trained["elastic"]["artifact"], trained["dense"]["artifact"]
    tpe = _search(elastic, "tpe", args.tpe, args, work / "search-tpe", "best")
    result = {"budget": f"{args.budget}x", "tpe": tpe}
    if tpe["exported"]:
        best = load_model(tpe["exported"][0])
        pair = profile_pair(best, load_model(dense), "cpu", batch_size=1, seq_len=64,
                            rounds=args.rounds)
        acc = _score(best, data)
        result["exported_vs_dense"] = {
            "speedup": 1 / pair["ratio"], "ratio": pair["ratio"],
            "ratio_p10_p90": [pair["ratio_p10"], pair["ratio_p90"]],
            "exported_ms": pair["candidate_ms"], "dense_ms": pair["reference_ms"],
            "test_accuracy": acc,
            "points_below_dense": 100 * (trained["dense"]["test_accuracy"] - acc),
            "goal_2x_at_le_1_point": 1 / pair["ratio"] >= 2.0
            and trained["dense"]["test_accuracy"] - acc <= 0.01}
    rand = _search(elastic, "random", args.random, args, work / "search-random", "none")
    result["random"] = rand
    result["hv_tpe_over_random"] = tpe["hypervolume"] / rand["hypervolume"] \
        if rand["hypervolume"] else None
    return result


def main() -> None:
    """Run the parts asked for and write the JSON (parts not run keep their old figures)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="train,cost,cuts,search")
    parser.add_argument("--work", default="/tmp/mmkit-bench-elastic")
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=SAMPLES,
                        help="tweets per split: the search's data (its recovery trains on them) "
                             "and every score; another number than the default keeps a search "
                             "under its own key")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--samples-k", type=int, default=1,
                        help="elastic: random sub-networks per step")
    parser.add_argument("--space", default="",
                        help="the elastic space trained ('' for the method's defaults)")
    parser.add_argument("--knobs", default=KNOBS,
                        help="the search's knobs (on the elastic model); with recovery, each "
                             "point within the budget is distilled from the uncut model")
    parser.add_argument("--recovery-steps", type=int, default=60)
    parser.add_argument("--table-quant", default="dynamic-int8",
                        help="table: the quantizations of each sub-network (none for fp32)")
    parser.add_argument("--cost-steps", type=int, default=20)
    parser.add_argument("--cost-repeats", type=int, default=3)
    parser.add_argument("--tpe", type=int, default=30)
    parser.add_argument("--random", type=int, default=100)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=40, help="interleaved timing rounds")
    parser.add_argument("--quick", action="store_true", help="tiny settings to try the bench")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.train_samples, args.samples, args.epochs = 200, 100, 1
        args.recovery_steps, args.tpe, args.random, args.rounds = 5, 4, 6, 6
        args.cost_steps, args.cost_repeats = 3, 1
        args.work += "-quick"
    out = Path(args.out or (Path(args.work) / "elastic-quick.json" if args.quick
                            else RESULTS / "elastic.json"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mmkit.core.data import load_data

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = load_data("tweets-sentiment", "text-classification", max_samples=args.samples,
                     seed=0)
    result = json.loads(out.read_text()) if out.exists() else {}
    parts = args.parts.split(",")
    trained = train(args, work, data)  # cached: every part needs the two fine-tunes
    if "train" in parts:
        result["train"] = trained
    if "cost" in parts:
        result["cost"] = cost(args, work)
    if "cuts" in parts:
        result["cuts"] = cuts(args, work, data, trained)
    if "table" in parts:
        result["table" + (f" (space {args.space})" if args.space else "")] = table(
            args, work, data, trained)
    if "search" in parts:  # another knob set or trained space is kept beside the default's
        key = "search" + (f" ({args.knobs})" if args.knobs != KNOBS else "") + (
            f" (space {args.space})" if args.space else "") + (
            f" (samples {args.samples})" if args.samples != SAMPLES else "")
        result[key] = {**search_part(args, work, data, trained), "knobs": args.knobs,
                       "space": args.space or "the elastic method's default",
                       "elastic_test_accuracy": trained["elastic"]["test_accuracy"],
                       "dense_test_accuracy": trained["dense"]["test_accuracy"],
                       "training_time_ratio": trained["training_time_ratio"]}
    import torch

    result["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    result["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                         "load_average": os.getloadavg()}
    write_result(result, out)


if __name__ == "__main__":
    main()
