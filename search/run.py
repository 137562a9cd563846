"""`mmkit search` end to end: check everything, open (or resume) the study, run the trials in
one or more processes, write the front and export the best model under the budget."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..core.errors import InputError, RuntimeFailure
from . import results, space as spaces, study as studies
from .objective import OBJECTIVES, Trial, check_objectives

log = logging.getLogger("mmkit")
SETTINGS_FILE = "search.json"


def parse_duration_ms(text: str | None, what: str = "--latency-budget") -> float | None:
    """'20ms', '0.02s', '1.5 s' or a bare number of milliseconds."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|us)?\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise InputError(f"{what} '{text}' cannot be parsed: write a positive time such as "
                         "20ms, 0.5s or 20 (milliseconds).")
    scale = {"ms": 1.0, None: 1.0, "s": 1000.0, "us": 0.001}[m.group(2)]
    return float(m.group(1)) * scale


def parse_seconds(text: str | None) -> float | None:
    """'600', '600s', '10m' or '1h' -> seconds."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|h)?\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise InputError(f"--timeout '{text}' cannot be parsed: write 600, 600s, 10m or 1h.")
    return float(m.group(1)) * {None: 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _settings(model, task, data, max_samples, seed, space, objectives, budget_ms, device,
              batch_size, seq_len, sampler) -> dict:
    return {"model": model, "task": task, "data": data, "max_samples": max_samples, "seed": seed,
            "space": space, "objectives": objectives, "budget_ms": budget_ms, "device": device,
            "batch_size": batch_size, "seq_len": seq_len, "sampler": sampler}


def prepare(model: str, *, data=None, task=None, max_samples=None, seed=0, budget=None,
            objectives="accuracy,latency,size", knobs=None, space_file=None, device="cpu",
            sampler="tpe", batch_size=1, seq_len=64, out, storage=None, overwrite=False) -> dict:
    """Check every input before any work; return the settings the workers share."""
    from ..core.data import DEFAULT_DATA
    from ..core.loading import peek, resolve_device

    budget_ms = parse_duration_ms(budget)
    device = resolve_device(device)
    if sampler not in studies.SAMPLERS:
        raise InputError(f"Unknown sampler '{sampler}'. Samplers: {', '.join(studies.SAMPLERS)}.")
    space = spaces.from_file(space_file) if space_file else spaces.from_knob_names(knobs)
    spaces.check_baseline(space)
    _, _, kind, task = peek(model, task)
    objectives = check_objectives([o.strip() for o in objectives.split(",") if o.strip()], task)
    if "quant" in space and any(q in ("nf4", "int8") for q in space["quant"]) and device == "cpu":
        log.info("bitsandbytes quantization on CPU is slower than fp32; the search will see it")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"The output '{out}' is a file; choose another -o path.")
    settings = _settings(model, task, data or DEFAULT_DATA[task], max_samples, seed, space,
                         objectives, budget_ms, device, batch_size, seq_len, sampler)
    url = studies.storage_url(out, storage)
    directions = [OBJECTIVES[o][0] for o in objectives]
    sampler_obj = studies.make_sampler(sampler, seed, space)
    if storage:  # an outside storage: check it opens before anything is written
        studies.open_storage(url)
    if overwrite and out.exists():
        shutil.rmtree(out)
        if storage:
            _delete_study(url)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        studies.open_study(url, settings, directions, sampler_obj)
    except InputError:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return {"settings": settings, "storage": url, "out": str(out)}


def _delete_study(url: str) -> None:
    import optuna

    try:
        optuna.delete_study(study_name=studies.STUDY_NAME, storage=studies.open_storage(url))
    except KeyError:
        pass


def work(job: dict, trials: int, timeout: float | None) -> None:
    """One worker: load the model and data, then run trials until the study has enough."""
    from ..core.data import load_data
    from ..core.loading import load_model

    s = job["settings"]
    study = studies.open_study(job["storage"], s, [OBJECTIVES[o][0] for o in s["objectives"]],
                               studies.make_sampler(s["sampler"], s["seed"], s["space"]))
    dataset = load_data(s["data"], s["task"], seed=s["seed"], max_samples=s["max_samples"])
    labels = dataset.label_names if s["task"].endswith("classification") and not \
        s["task"].startswith("zero-shot") else None
    base = load_model(s["model"], s["task"], labels, device=s["device"], seed=s["seed"])
    objective = Trial(base, dataset, s["space"], s["objectives"], s["budget_ms"], s["device"],
                      s["batch_size"], s["seq_len"], repeats=10, calib=s["data"])
    studies.run(study, objective, trials, timeout, spaces.baseline(s["space"]))


def search(job: dict, trials: int, timeout: float | None, workers: int, export: str) -> dict:
    """Run the search (with `workers` processes) and write its outputs."""
    out = Path(job["out"])
    (out / SETTINGS_FILE).write_text(json.dumps(job, indent=2))
    start = time.perf_counter()
    helpers = [subprocess.Popen([sys.executable, "-m", "mmkit.search.worker", str(out),
                                 str(trials), str(timeout or 0)]) for _ in range(workers - 1)]
    try:
        work(job, trials, timeout)
    finally:
        for p in helpers:
            p.wait()
    bad = [p.returncode for p in helpers if p.returncode]
    if bad:
        raise RuntimeFailure(f"{len(bad)} search worker(s) failed (exit {bad[0]}); the study in "
                             f"{job['storage']} keeps every completed trial — run the command "
                             "again to resume.")
    return finish(job, time.perf_counter() - start, export)


def finish(job: dict, seconds: float, export: str) -> dict:
    """Front, files and exported model(s) from the study as it stands."""
    s, out = job["settings"], Path(job["out"])
    study = studies.open_study(job["storage"], s, [OBJECTIVES[o][0] for o in s["objectives"]],
                               None)
    rows = results.trial_rows(study, s["objectives"])
    front = results.pareto_front(rows, s["objectives"])
    stats = {"trials_completed": len(rows),
             "rejected_without_evaluation": sum(1 for r in rows if not r["evaluated"]),
             "seconds_this_run": seconds,
             "seconds_per_trial": (sum(r["seconds"] or 0 for r in rows) / len(rows)) if rows else None}
    summary = results.write_outputs(out, study, rows, front, s, stats)
    best = results.best_under(rows, s["objectives"], s["budget_ms"])
    exported = []
    if best is None and rows:
        raise results.no_candidate(rows, s["budget_ms"])
    if export == "best" and best is not None:
        exported.append(results.export(best, s, out / "best", s["device"]))
    elif export == "pareto":
        for r in front:
            exported.append(results.export(r, s, out / "pareto" / f"trial-{r['trial']}",
                                           s["device"]))
    return {"out": str(out), "storage": job["storage"], **stats, "best": best,
            "front": front, "exported": exported, "table": results.table(front, s["objectives"]),
            "objectives": summary["objectives"]}


def pick(out: str, budget: str, dest: str | None, overwrite: bool) -> dict:
    """Export the best evaluated point under a (new) budget from a finished search."""
    out = Path(out).expanduser()
    path = out / "pareto.json"
    if not path.is_file():
        raise InputError(f"{out} holds no search results (no pareto.json). Run `mmkit search "
                         f"... -o {out}` first.")
    summary = json.loads(path.read_text())
    job = json.loads((out / SETTINGS_FILE).read_text())
    budget_ms = parse_duration_ms(budget)
    old = summary.get("latency_budget_ms")
    if old and budget_ms > old:
        log.warning("trials over the search's own %.3g ms budget were never evaluated, so they "
                    "cannot be picked", old)
    best = results.best_under(summary["evaluated"], summary["objectives"], budget_ms)
    if best is None:
        raise results.no_candidate(summary["evaluated"] or summary["front"], budget_ms)
    target = Path(dest) if dest else out / f"pick-{budget_ms:g}ms"
    artifact = results.export(best, job["settings"], target, job["settings"]["device"],
                              overwrite=overwrite)
    return {"artifact": artifact, "trial": best["trial"], "params": best["params"],
            "values": best["values"], "latency_ms": best["latency_ms"]}
