"""The shipped recipes on their default real models: what each measures and how long it takes.

    HF_HUB_OFFLINE=1 python bench/recipes.py [--only NAME,...] [--work DIR] [--search-trials 20]

Runs every `recipes/*.yaml` as its header comment says (`mmkit run RECIPE -o OUT`, each in its
own process, `--no-cache`, so no run reuses another's steps), after the fine-tunes some recipes
start from (the commands their comments give), plus the reference scores the recipes are
compared with (the input model evaluated the way the recipe evaluates) and the search that
follows the elastic recipe (`recipes/spaces/elastic.yaml`). Records per run: the command, wall
seconds, the machine's load, the metrics, and each step's report (sizes, bits, seconds).
Writes bench/results/recipes.json. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from results_io import RESULTS, write_result  # bench/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
MMKIT = [sys.executable, "-m", "mmkit.cli.main"]

# the models recipes start from, made as their comments say
INPUTS = {
    "minilm-tweets": ["finetune", "minilm", "--lora", "--merge", "--max-samples", "1000",
                      "--epochs", "2", "--lr", "2e-3"],
    "minilm-tweets-b": ["finetune", "minilm", "--lora", "--merge", "--max-samples", "1000",
                        "--epochs", "2", "--lr", "1e-3"],
}
# scores to compare a recipe's result with: the model it started from, evaluated alike
REFERENCES = {
    "minilm-tweets": ["eval", "{work}/minilm-tweets", "--max-samples", "1000"],
    "minilm-tweets-b": ["eval", "{work}/minilm-tweets-b", "--max-samples", "1000"],
    "smollm2": ["eval", "smollm2", "--task", "causal-lm", "--data", "bbc-text",
                "--max-samples", "60", "--max-length", "256"],
}
# where a recipe's inputs live here (its comment's paths are relative to the user's folder)
SETTINGS = {
    "prune-distill-int8": ["--model", "{work}/minilm-tweets"],
    "merge-int8": ["--set", "merge.models=[{work}/minilm-tweets, {work}/minilm-tweets-b]"],
}
# further runs of a recipe on another model: name -> (recipe, arguments)
VARIANTS = {
    # MiniLM has no sentiment head (a new one scores chance): the cast on a fine-tune
    "fp16-eval-on-minilm-tweets": ("fp16-eval", ["--model", "{work}/minilm-tweets"]),
}


def _child_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes: on a machine shared with
    other jobs, wall time grows with the load while this stays near the work done."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def mmkit(args: list[str], out: Path | None) -> dict:
    """Run one mmkit command with --json; its result, wall seconds and the load around it."""
    argv = [*MMKIT, *args, *(["-o", str(out), "--overwrite"] if out else []), "--json", "-q"]
    before, start, cpu = _load(), time.perf_counter(), _child_cpu()
    proc = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True)
    row = {"command": " ".join(argv[2:]), "rc": proc.returncode,
           "wall_seconds": round(time.perf_counter() - start, 1),
           "cpu_seconds": round(_child_cpu() - cpu, 1),
           "load_before": before, "load_after": _load()}
    if proc.returncode:
        row["stderr"] = proc.stderr[-3000:]
        return row
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    row["result"] = lines[-1] if lines else None
    return row


def _summary(row: dict) -> dict:
    """The figures a recipe's comment quotes: metrics, and each step's size / time report."""
    result = row.get("result") or {}
    out = {"wall_seconds": row["wall_seconds"], "cpu_seconds": row["cpu_seconds"],
           "rc": row["rc"],
           "load": row["load_before"] + row["load_after"]}
    if "metrics" in result:
        out["metrics"] = {k: v for m in result["metrics"] for k, v in m.items()
                          if k in ("accuracy", "macro_f1", "perplexity", "examples", "windows")}
    elif result:
        out["metrics"] = {k: v for k, v in result.items()
                          if k in ("accuracy", "macro_f1", "perplexity", "examples")}
    for step in result.get("steps", []):
        rep = step.get("report", {})
        keep = {k: v for k, v in rep.items() if not isinstance(v, (dict, list))
                and k in ("weights_mb_before", "weights_mb_after", "bits_per_weight",
                          "train_seconds", "steps", "seconds", "format", "trainable_percent",
                          "layers_quantized", "merged_adapter_first", "chosen", "best_single")}
        out.setdefault("steps", []).append({"step": step["step"], "method": step["method"],
                                            **keep})
    return out


def main() -> None:
    """Run the inputs, the references, every recipe and the elastic search; write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/mmkit-bench-recipes")
    parser.add_argument("--only", help="comma-separated recipe names (default: all)")
    parser.add_argument("--search-trials", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS / "recipes.json"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.update(machine={"cpus": os.cpu_count()}, recipes=results.get("recipes", {}),
                   inputs=results.get("inputs", {}), references=results.get("references", {}))
    names = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    needs = {"prune-distill-int8": ["minilm-tweets"], "fp16-eval": ["minilm-tweets"],
             "merge-int8": ["minilm-tweets", "minilm-tweets-b"]}
    for name in sorted({i for n in names for i in needs.get(n, [])}):
        if not (work / name / "mmkit.json").is_file():
            results["inputs"][name] = _summary(mmkit(INPUTS[name], work / name))
        ref = REFERENCES[name]
        results["references"][name] = _summary(mmkit([a.format(work=work) for a in ref], None))
        write_result(results, out)
    if any("smollm2" in n for n in names):
        results["references"]["smollm2"] = _summary(mmkit(REFERENCES["smollm2"], None))
    for name in names:
        extra = [a.format(work=work) for a in SETTINGS.get(name, [])]
        row = mmkit(["run", f"recipes/{name}.yaml", "--no-cache", *extra], work / name)
        results["recipes"][name] = {"command": row["command"], **_summary(row),
                                    **({"stderr": row["stderr"]} if "stderr" in row else {})}
        write_result(results, out)
    for variant, (name, extra) in VARIANTS.items():
        if name in names:
            row = mmkit(["run", f"recipes/{name}.yaml", "--no-cache",
                         *[a.format(work=work) for a in extra]], work / variant)
            results["recipes"][variant] = {"command": row["command"], **_summary(row)}
            write_result(results, out)
    if "elastic-minilm" in names and results["recipes"]["elastic-minilm"]["rc"] == 0:
        row = mmkit(["search", str(work / "elastic-minilm"), "--space",
                     "recipes/spaces/elastic.yaml", "--latency-budget", "0.5x",
                     "--max-samples", "500", "--trials", str(args.search_trials),
                     "--export", "best"], work / "elastic-search")
        result = row.get("result") or {}
        results["elastic_search"] = {
            "command": row["command"], "rc": row["rc"], "wall_seconds": row["wall_seconds"],
            "cpu_seconds": row["cpu_seconds"],
            "load": row["load_before"] + row["load_after"],
            "best": result.get("best"), "best_remeasured": result.get("best_remeasured"),
            **({"stderr": row["stderr"]} if "stderr" in row else {})}
    write_result(results, out)


if __name__ == "__main__":
    main()
