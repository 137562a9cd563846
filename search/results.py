"""What a search leaves behind: the Pareto front (JSON, CSV, PNG, HTML, a table), and the
exported model(s)."""

from __future__ import annotations

import csv
import json
import logging
import os
from numbers import Real
from pathlib import Path

from pydantic import ValidationError

from ..core.errors import InputError, RuntimeFailure, shown
from .objective import OBJECTIVES, QUALITY
from .settings import SearchJob, SearchSettings

log = logging.getLogger("mmkit")

EXPORT_LOCK_WAIT_S = 600.0  # two searches on one study may finish together: wait, not fail


def trial_rows(study, objectives: list[str]) -> list[dict]:
    """Every completed trial as a plain dict."""
    import optuna

    rows = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        a = t.user_attrs
        rows.append({"trial": t.number, "params": t.params,
                     "values": dict(zip(objectives, t.values)),
                     "latency_ms": a.get("latency_ms"), "latency_p90_ms": a.get("latency_p90_ms"),
                     # the unmodified model's latency, timed interleaved with the candidate's,
                     # and their ratio (None in a study of an earlier mmkit)
                     "reference_latency_ms": a.get("reference_latency_ms"),
                     "latency_ratio": a.get("latency_ratio"),
                     "size_mb": a.get("size_mb"), "evaluated": a.get("evaluated", False),
                     "feasible": a.get("constraint", [0.0])[0] <= 0, "metrics": a.get("metrics"),
                     "steps": a.get("steps", []), "seconds": a.get("seconds"),
                     "latency_steady": a.get("latency_steady"), "threads": a.get("threads"),
                     "load_per_cpu": a.get("load_per_cpu")})
    return rows


REMEASURE_ROUNDS = 20  # twice a trial's: this figure checks the search's


def remeasure(artifact: str, job: SearchJob) -> dict:
    """The exported model's latency measured again at the end, interleaved with the
    unmodified model (loaded as the search loads it): the figures the search's own (taken
    between other trials) are checked against. Milliseconds of both, and their ratio."""
    from ..core.loading import load_model
    from ..core.profile import profile_pair
    from .run import load_base

    s = job.settings
    if s.runtime == "onnxruntime":
        return _remeasure_onnx(artifact, job)
    loaded = load_model(artifact, s.task, device=s.device, **job.loading.model_dump())
    base = load_base(job, labels=loaded.labels)
    prof = profile_pair(loaded, base, s.device, batch_size=s.batch_size, seq_len=s.seq_len,
                        warmup=3, rounds=REMEASURE_ROUNDS, threads=s.threads)
    return _remeasured(prof)


def _remeasure_onnx(folder: str, job: SearchJob) -> dict:
    """`remeasure` under ONNX Runtime: the exported graph against the unmodified model's
    float32 export, and the graph's test-split metrics (ONNX Runtime's int8 changes them)."""
    import tempfile

    from ..compression.onnx_export import export_model_
    from ..core.evaluate import evaluate
    from ..core.ort_model import as_onnx
    from ..core.profile import profile_pair
    from .objective import QUALITY
    from .run import load_base, load_dataset

    s = job.settings
    dataset = load_dataset(s)
    base = load_base(job, dataset)
    candidate = as_onnx(base, folder, s.threads)
    metrics = evaluate(candidate, dataset, "test")
    with tempfile.TemporaryDirectory(prefix="mmkit-onnx-reference-") as tmp:
        export_model_(base, tmp, threads=s.threads)
        reference = as_onnx(base, tmp, s.threads)
        prof = profile_pair(candidate, reference, s.device, batch_size=s.batch_size,
                            seq_len=s.seq_len, warmup=3, rounds=REMEASURE_ROUNDS,
                            threads=s.threads)
    return {**_remeasured(prof), "runtime": "onnxruntime",
            "test_metrics": {k: metrics[k] for k in QUALITY if k in metrics}}


def _remeasured(prof: dict) -> dict:
    return {"median_ms": prof["candidate_ms"]["median"], "p90_ms": prof["candidate_ms"]["p90"],
            "reference_median_ms": prof["reference_ms"]["median"], "ratio": prof["ratio"],
            "ratio_p10": prof["ratio_p10"], "ratio_p90": prof["ratio_p90"],
            "steady": prof["stable"], "threads": prof["environment"]["threads"],
            "load_per_cpu": prof["environment"]["load_per_cpu"]}


def dominates(a: dict, b: dict, objectives: list[str]) -> bool:
    """True when `a` is at least as good as `b` on every objective and better on one."""
    better = False
    for name in objectives:
        x, y = a["values"][name], b["values"][name]
        if OBJECTIVES[name][0] == "minimize":
            x, y = -x, -y
        if x < y:
            return False
        better = better or x > y
    return better


def pareto_front(rows: list[dict], objectives: list[str]) -> list[dict]:
    """The non-dominated rows among the feasible, evaluated ones, fastest first."""
    pool = [r for r in rows if r["feasible"] and r["evaluated"]]
    front = [r for r in pool if not any(dominates(o, r, objectives) for o in pool if o is not r)]
    return sorted(front, key=lambda r: (r["latency_ms"], r["trial"]))


def within_budget(row: dict, budget_ms: float | None, budget_ratio: float | None) -> bool:
    """True when a trial meets the budget: its latency in ms, or its ratio to the unmodified
    model's (a row without one, of an earlier mmkit, meets no ratio)."""
    if budget_ratio is not None:
        ratio = row.get("latency_ratio")
        return ratio is not None and ratio <= budget_ratio
    return budget_ms is None or row["latency_ms"] <= budget_ms


def ranked_under(rows: list[dict], objectives: list[str], budget_ms: float | None,
                 budget_ratio: float | None = None) -> list[dict]:
    """The evaluated trials within the budget, in ms or (`budget_ratio`) as a ratio to the
    unmodified model's latency, most accurate first (ties: the faster first)."""
    quality = next(n for n in objectives if n in QUALITY)
    sign = 1 if OBJECTIVES[quality][0] == "maximize" else -1
    pool = [r for r in rows if r["evaluated"] and within_budget(r, budget_ms, budget_ratio)]
    return sorted(pool, key=lambda r: (-sign * r["values"][quality], r["latency_ms"]))


def best_under(rows: list[dict], objectives: list[str], budget_ms: float | None,
               budget_ratio: float | None = None):
    """The most accurate evaluated trial within the budget (`ranked_under`'s first), or
    None."""
    ranked = ranked_under(rows, objectives, budget_ms, budget_ratio)
    return ranked[0] if ranked else None


CONFIRM_CANDIDATES = 4  # the most accurate points within the budget measured again, at most


def _holds(again: dict, budget_ms: float | None, budget_ratio: float | None) -> bool:
    """True when a latency measured again (`remeasure`) is within the budget."""
    if budget_ratio is not None:
        return again["ratio"] <= budget_ratio
    return budget_ms is None or again["median_ms"] <= budget_ms


def export_confirmed(rows: list[dict], objectives: list[str], job: SearchJob, dest: Path,
                     budget_ms: float | None, budget_ratio: float | None,
                     overwrite: bool = True) -> dict:
    """Export the most accurate point within the budget whose latency, measured again at
    the end (interleaved with the unmodified model, twice a trial's rounds), is within the
    budget too. A trial timed between others can land under the budget by noise, most often
    the points at its edge; such a point is passed over for the next most accurate, up to
    CONFIRM_CANDIDATES of them. When none holds, the one measured fastest again is exported
    and a warning says so.

    Returns the exported `best` row, its `artifact`, its figures measured again
    (`remeasured`) and what each point tried measured (`confirmation`)."""
    ranked = ranked_under(rows, objectives, budget_ms, budget_ratio)
    if not ranked:
        raise no_candidate(rows, budget_ms, budget_ratio)
    tried, kept = [], None
    for row in ranked[:CONFIRM_CANDIDATES]:
        artifact = export(row, job, dest, overwrite=overwrite or bool(tried))
        again = remeasure(artifact, job)
        holds = _holds(again, budget_ms, budget_ratio)
        tried.append({"trial": row["trial"], "params": row["params"],
                      "search_ms": row["latency_ms"], "search_ratio": row.get("latency_ratio"),
                      "remeasured_ms": again["median_ms"], "remeasured_ratio": again["ratio"],
                      "within_budget": holds})
        kept = (row, artifact, again)
        if holds:
            break
    else:  # none held: the fastest measured again is the likeliest to meet the budget
        fastest = min(range(len(tried)), key=lambda i: (tried[i]["remeasured_ratio"]
                                                        if budget_ratio is not None
                                                        else tried[i]["remeasured_ms"]))
        row = ranked[fastest]
        if row is not kept[0]:
            artifact = export(row, job, dest, overwrite=True)
            kept = (row, artifact, remeasure(artifact, job))
        log.warning("none of the %d most accurate points within the %s budget stayed within it "
                    "when measured again (the machine's speed moves more than the budget's "
                    "margin); exported trial %d, the fastest measured again (%s). Measure on a "
                    "quieter machine, or loosen the budget.", len(tried),
                    budget_text(budget_ms, budget_ratio), row["trial"],
                    _again_text(kept[2], budget_ratio))
    return {"best": kept[0], "artifact": kept[1], "remeasured": kept[2], "confirmation": tried}


def _again_text(again: dict, budget_ratio: float | None) -> str:
    return f"{again['ratio']:.3g}x" if budget_ratio is not None else f"{again['median_ms']:.2f} ms"


def write_outputs(out: Path, study, rows, front, settings: SearchSettings, stats) -> dict:
    """pareto.json, pareto.csv, pareto.png, pareto.html; returns the JSON's content."""
    objectives = settings.objectives
    summary = {"objectives": objectives,
               "directions": [OBJECTIVES[n][0] for n in objectives],
               "latency_budget_ms": settings.budget_ms,
               "latency_budget_ratio": settings.budget_ratio, "device": settings.device,
               "model": settings.model, "data": settings.data,
               "measured_at": {"batch_size": settings.batch_size,
                               "seq_len": settings.seq_len,
                               "threads": sorted({r["threads"] for r in rows
                                                  if r.get("threads")}),
                               "unsteady_trials": [r["trial"] for r in rows
                                                   if r.get("latency_steady") is False]},
               **stats, "front": front, "evaluated": [r for r in rows if r["evaluated"]]}
    tmp = out / f".pareto.json.tmp-{os.getpid()}"  # `search pick` may read it meanwhile
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, out / "pareto.json")
    _csv(out / "pareto.csv", rows, front, objectives)
    _plots(out, study, rows, front, objectives, _budget_line(rows, settings))
    return summary


def _csv(path: Path, rows, front, objectives) -> None:
    """Every completed trial, one row each, marked on the front or not."""
    on_front = {r["trial"] for r in front}
    knobs = sorted({k for r in rows for k in r["params"]})
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["trial", *knobs, *objectives, "latency_p90_ms", "latency_ratio",
                         "reference_latency_ms", "evaluated", "within_budget", "on_front",
                         "steps"])
        for r in rows:
            writer.writerow([r["trial"], *[r["params"].get(k) for k in knobs],
                             *[_rounded(r["values"][n]) for n in objectives],
                             _rounded(r["latency_p90_ms"]), _rounded(r.get("latency_ratio")),
                             _rounded(r.get("reference_latency_ms")), r["evaluated"],
                             r["feasible"], r["trial"] in on_front, json.dumps(r["steps"])])


def _rounded(value):
    return round(value, 4) if isinstance(value, float) else value


def _budget_line(rows: list[dict], settings: SearchSettings) -> tuple[float, str] | None:
    """Where pareto.png draws the budget on its latency axis (ms), and its legend: a ratio
    budget at that ratio of the unmodified model's median latency over the trials."""
    if settings.budget_ratio is None:
        return (settings.budget_ms, "latency budget") if settings.budget_ms else None
    refs = sorted(r["reference_latency_ms"] for r in rows if r.get("reference_latency_ms"))
    if not refs:
        return None
    return (settings.budget_ratio * refs[len(refs) // 2],
            f"latency budget ({settings.budget_ratio:g}x the unmodified model)")


def _plots(out, study, rows, front, objectives, budget: tuple[float, str] | None) -> None:
    """pareto.png: one panel per pair of objectives (quality against each cost), every
    evaluated trial, the front, the unmodified model (trial 0) and the budget (`budget`: ms
    and legend); pareto.html: optuna's interactive plot with plotly embedded (it opens
    offline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = next(n for n in objectives if n in QUALITY)
    costs = [n for n in objectives if n not in QUALITY]
    evaluated = [r for r in rows if r["evaluated"]]
    base = next((r for r in rows if r["trial"] == 0 and r["evaluated"]), None)
    fig, axes = plt.subplots(1, max(len(costs), 1), figsize=(5.5 * max(len(costs), 1), 4),
                             squeeze=False)
    for ax, cost in zip(axes[0], costs or ["latency"]):
        ax.scatter([r["values"][cost] for r in evaluated],
                   [r["values"][quality] for r in evaluated], c="#9ab", label="evaluated")
        ax.scatter([r["values"][cost] for r in front], [r["values"][quality] for r in front],
                   c="#c33", label=f"Pareto front ({', '.join(objectives)})", zorder=3)
        if base is not None:
            ax.scatter([base["values"][cost]], [base["values"][quality]], marker="*", s=160,
                       c="k", label="unmodified model", zorder=4)
        if budget and cost == "latency":
            ax.axvline(budget[0], ls="--", c="k", lw=1, label=budget[1])
        ax.set_xlabel({"latency": "latency (ms, median)", "size": "size (MB)"}.get(cost, cost))
        ax.set_ylabel(quality)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)
    import optuna

    if len(objectives) in (2, 3):
        figure = optuna.visualization.plot_pareto_front(study, target_names=objectives)
        figure.write_html(str(out / "pareto.html"), include_plotlyjs=True)


def table(front: list[dict], objectives: list[str]) -> str:
    """A short text table of the front."""
    lines = [f"{'trial':>5}  " + "  ".join(f"{n:>10}" for n in objectives) + "  point"]
    for r in front:
        vals = "  ".join(f"{r['values'][n]:>10.4g}" for n in objectives)
        lines.append(f"{r['trial']:>5}  {vals}  {point_text(r['params'])}")
    return "\n".join(lines)


def point_text(params: dict) -> str:
    """A point as `layers=1 heads=0.25 quant=none`."""
    return " ".join(f"{k}={v}" for k, v in params.items())


def export(row: dict, job: SearchJob, dest: Path, overwrite: bool = True) -> str:
    """Write one trial's model as an artifact by running its recipe; an adapter input is
    merged first, whatever the point's steps, as the trials measured it."""
    from ..core.recipe import run_recipe

    from ..core.refs import resolve

    s = job.settings
    steps = row["steps"]
    if resolve(s.model).is_adapter:  # the trials measured it merged (`load_base`), so is it
        steps = [{"step": "merge", "method": "adapter"}, *steps]
    recipe = {"model": s.model, "task": s.task, "data": s.data, "seed": s.seed,
              "max_samples": s.max_samples, **s.columns, "steps": steps,
              "eval": {"split": "test"}}
    recipe = {k: v for k, v in recipe.items() if v is not None}
    if s.runtime == "onnxruntime":
        return _export_onnx(recipe, row, job, dest, overwrite)
    return run_recipe(recipe, dest, overwrite=overwrite, device=s.device,
                      lock_wait=EXPORT_LOCK_WAIT_S, **job.loading.model_dump())["artifact"]


def _export_onnx(recipe: dict, row: dict, job: SearchJob, dest: Path, overwrite: bool) -> str:
    """Under ONNX Runtime the exported model is the graph the trial measured: the recipe's
    PyTorch artifact (kept in a scratch folder) exported to `dest`, with ONNX Runtime's int8
    when the point has it."""
    import tempfile

    from ..compression.onnx_export import export_onnx
    from ..core.recipe import run_recipe
    from .space import ort_int8

    recipe.pop("eval", None)  # the graph is scored by remeasure, in the runtime it runs in
    with tempfile.TemporaryDirectory(prefix="mmkit-search-export-") as tmp:
        artifact = run_recipe(recipe, Path(tmp) / "model", device=job.settings.device,
                              **job.loading.model_dump())["artifact"]
        return export_onnx(artifact, dest, task=job.settings.task, int8=ort_int8(row["params"]),
                           overwrite=overwrite, **job.loading.model_dump())["artifact"]


def budget_text(budget_ms: float | None, budget_ratio: float | None = None) -> str:
    """A budget as the user wrote it: '20 ms' or '0.5x'."""
    return f"{budget_ratio:g}x" if budget_ratio is not None else f"{budget_ms:g} ms"


def no_candidate(rows: list[dict], budget_ms: float | None,
                 budget_ratio: float | None = None) -> RuntimeFailure:
    """The error when nothing meets the budget, naming the fastest point seen."""
    budget = budget_text(budget_ms, budget_ratio)
    if not rows:
        return RuntimeFailure(f"No candidate met the {budget} latency budget: the search "
                              "evaluated no point. Run more trials, or raise the budget.")
    if budget_ratio is not None:
        rated = [r for r in rows if r.get("latency_ratio") is not None]
        if not rated:
            return RuntimeFailure(f"No candidate met the {budget} latency budget: this search "
                                  "measured no latency ratios (it was made by an earlier "
                                  "mmkit). Give the budget as a time, such as 20ms.")
        fastest = min(rated, key=lambda r: r["latency_ratio"])
        seen = (f"at {fastest['latency_ratio']:.3g}x the unmodified model's latency, "
                f"{fastest['latency_ms']:.2f} ms")
    else:
        fastest = min(rows, key=lambda r: r["latency_ms"])
        seen = f"in {fastest['latency_ms']:.2f} ms"
    return RuntimeFailure(f"No candidate met the {budget} latency budget. The fastest point "
                          f"seen ran {seen} (trial {fastest['trial']}: {fastest['params']}). "
                          "Raise the budget, add stronger cuts to the space, or run more "
                          "trials.")


# ---------------------------------------------------------------- reading a search back
def _number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_job(job) -> str | None:
    """What is wrong with search.json's content, or None."""
    settings = job.get("settings") if isinstance(job, dict) else None
    if not isinstance(settings, dict):
        return "it has no 'settings' object"
    for key in ("model", "task", "data", "device"):
        if not isinstance(settings.get(key), str):
            return f"settings.{key} is not a string"
    if not isinstance(settings.get("seed"), int):
        return "settings.seed is not a whole number"
    loading = job.get("loading", {})
    if not isinstance(loading, dict) or not all(
            k in ("allow_pickle", "trust_remote_code") and isinstance(v, bool)
            for k, v in loading.items()):
        return "'loading' is not an object of allow_pickle / trust_remote_code flags"
    try:  # the rest of its shape, as the search reads it back
        SearchJob.model_validate(job)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        return f"{shown(where, 80)}: {error['msg'][:1].lower()}{error['msg'][1:]}"
    return None


def _check_row(row, objectives: list[str]) -> str | None:
    if not isinstance(row, dict):
        return "a result row is not an object"
    values = row.get("values")
    if not isinstance(values, dict) or not all(_number(values.get(n)) for n in objectives):
        return f"trial {shown(row.get('trial'), 20)} lacks a number for each objective"
    shaped = (_number(row.get("latency_ms")) and isinstance(row.get("steps"), list)
              and isinstance(row.get("params"), dict) and isinstance(row.get("evaluated"), bool))
    if not shaped:
        return f"trial {shown(row.get('trial'), 20)} lacks latency_ms, steps, params or evaluated"
    for key in ("latency_ratio", "reference_latency_ms"):  # absent from earlier mmkits' rows
        if row.get(key) is not None and not _number(row[key]):
            return f"trial {shown(row.get('trial'), 20)}'s {key} is not a number"
    return None


def check_summary(summary) -> str | None:
    """What is wrong with pareto.json's content, or None."""
    if not isinstance(summary, dict):
        return "it is not a JSON object"
    objectives = summary.get("objectives")
    if not isinstance(objectives, list) or not objectives \
            or not all(isinstance(n, str) and n in OBJECTIVES for n in objectives) \
            or not any(n in QUALITY for n in objectives):
        return "'objectives' is not a list of known objectives with a quality measure"
    for key in ("latency_budget_ms", "latency_budget_ratio"):  # the ratio: absent before
        if summary.get(key) is not None and not _number(summary[key]):
            return f"'{key}' is not a number"
    for key in ("evaluated", "front"):
        if not isinstance(summary.get(key), list):
            return f"'{key}' is not a list"
        for row in summary[key]:
            problem = _check_row(row, objectives)
            if problem:
                return problem
    return None


def read_search_file(path: Path, what: str, check) -> dict:
    """A JSON file a search wrote, checked by `check`; a clear error when it is missing,
    damaged or of another shape."""
    again = (f"Run the search again with the same command and -o {path.parent} (it resumes "
             f"the study and rewrites {path.name}).")
    if not path.is_file():
        raise InputError(f"{path.parent} holds no {what} results ({path.name} is missing). Pass "
                         f"the -o folder of a finished `mmkit search`. {again}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(f"Cannot read {path}: {shown(exc)}. {again}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}): it is "
                         f"truncated or damaged. {again}") from None
    problem = check(data)
    if problem:
        raise InputError(f"{path} is not a file a search wrote: {problem}. {again}")
    return data
