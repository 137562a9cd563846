"""`mmkit search` end to end: check everything, then create (or resume) the study, run the
trials in one or more processes, write the front and export the best model under the budget."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import InputError, RuntimeFailure, shown
from . import results, space as spaces
from .objective import OBJECTIVES, Trial, check_objectives
from .settings import LoadingFlags, SearchJob, SearchRequest, SearchSettings

log = logging.getLogger("mmkit")
SETTINGS_FILE = "search.json"
SEARCH_FILES = (SETTINGS_FILE, "study.db")  # a folder holding one of these is a search folder
LOCK_WAIT_S = 600.0  # how long a search waits for another one writing the same folder
WORKERS_PER_CPU = 4


@dataclass
class Prepared:
    """A checked search: what search.json holds (`job`), plus the model and data this process
    loaded while checking them, which its own worker reuses."""

    job: SearchJob  # settings, loading flags, storage, out
    run: int  # how many runs started on the study before this one
    loaded: object
    dataset: object


TIME_FORMS = "a positive time such as 20ms, 0.5s or 20 (milliseconds)"
BUDGET_FORMS = f"{TIME_FORMS}, or a ratio to the unmodified model's latency such as 0.5x"
MAX_RATIO = 10.0  # a budget ratio above this is a typo, not a budget


def parse_duration_ms(text: str | None, what: str = "--latency-budget",
                      forms: str = TIME_FORMS) -> float | None:
    """'20ms', '0.02s', '1.5 s' or a bare number of milliseconds; `forms` is what the error
    says may be written instead."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|us)?\s*", str(text))
    value = float(m.group(1)) * {"ms": 1.0, None: 1.0, "s": 1000.0, "us": 0.001}[m.group(2)] \
        if m else math.nan
    if not 0 < value < math.inf:
        raise InputError(f"{what} '{shown(text, 60)}' cannot be parsed: write {forms}.")
    return value


def parse_budget(text: str | None, what: str = "--latency-budget") \
        -> tuple[float | None, float | None]:
    """A latency budget as (milliseconds, ratio), one of them set: '20ms' / '0.5s' / '20' is
    absolute, '0.5x' relative (the candidate's latency over the unmodified model's, the two
    measured interleaved); (None, None) when there is no budget."""
    if text is None:
        return None, None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*[xX]\s*", str(text))
    if m is None:
        return parse_duration_ms(text, what, BUDGET_FORMS), None
    ratio = float(m.group(1))
    if not 0 < ratio <= MAX_RATIO:
        raise InputError(f"{what} '{shown(text, 60)}' is out of range: a ratio to the unmodified "
                         f"model's latency must be above 0 and at most {MAX_RATIO:g}, such as "
                         "0.5x (half its latency); or write a time such as 20ms.")
    return None, ratio


def parse_seconds(text: str | None) -> float | None:
    """'600', '600s', '10m' or '1h' -> seconds."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|h)?\s*", str(text))
    value = float(m.group(1)) * {None: 1, "s": 1, "m": 60, "h": 3600}[m.group(2)] \
        if m else math.nan
    if not 0 < value < math.inf:
        raise InputError(f"--timeout '{shown(text, 60)}' cannot be parsed: write a positive time "
                         "such as 600, 600s, 10m or 1h.")
    return value


def check_workers(workers: int) -> None:
    """More worker processes than the machine can run only slow each other down."""
    cpus = os.cpu_count() or 1
    if workers > WORKERS_PER_CPU * cpus:
        raise InputError(f"--workers {workers} is more than this machine can run usefully: at "
                         f"most {WORKERS_PER_CPU * cpus} ({WORKERS_PER_CPU} per CPU core; it has "
                         f"{cpus}), each loading its own copy of the model. Use fewer workers, "
                         "or start more searches on other machines with the same --storage.")


# ---------------------------------------------------------------- checks
def _is_search_folder(path: Path) -> bool:
    """True for an empty folder or one a search wrote."""
    try:
        names = {p.name for p in path.iterdir()}
    except OSError:
        return False
    return not names or bool(names & set(SEARCH_FILES))


def _check_output(out: Path, overwrite: bool) -> None:
    """OUT must be a search folder, or not exist yet under a folder this process can write."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise InputError(f"The output '{out}' is a file or a link; -o names the search's folder. "
                         "Choose another -o path.")
    if out.exists() and not _is_search_folder(out):
        what = "--overwrite deletes only search folders" if overwrite else "a search writes " \
            "only into its own folder"
        raise InputError(f"The output '{out}' is a folder that holds no search (no "
                         f"{' or '.join(SEARCH_FILES)}), and {what}. Choose another -o path, or "
                         "an empty folder.")
    for folder in (out.parent, out):  # OUT's lock file goes beside it, the search into it
        probe = folder
        while not probe.exists() and not probe.is_symlink():
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            raise InputError(f"Cannot write the output '{out}': {probe} is not a writable "
                             "folder. Choose an -o path in a folder you can write to.")


def _input_paths(source, dataset, space_file) -> list[tuple[str, str]]:
    """The local files and folders the search reads: the output must not touch them."""
    paths = [("model folder", src.path) for src in (source, source.adapter)
             if src is not None and src.kind in ("artifact", "folder", "embedded")]
    if not dataset.info["source"].startswith(("bundled:", "hf:")):
        paths.append(("data", dataset.info["source"]))
    if space_file:
        paths.append(("space file", str(space_file)))
    return paths


def _check_classes(dataset, task: str) -> None:
    """Classification needs two classes, and every search needs a validation split."""
    if task.endswith("classification") and len(dataset.label_names or []) < 2:
        raise InputError(f"{task} needs at least two classes in the data; '{dataset.name}' has "
                         f"{len(dataset.label_names or [])} ({shown(dataset.label_names, 80)}). "
                         "Pass --data with examples of two or more classes.")
    if not dataset.split("validation").inputs:
        raise InputError(f"The data '{dataset.name}' has too few examples to hold out a "
                         "validation split, which the search scores trials on. Use more data.")


def load_dataset(settings: SearchSettings):
    """The search's data, as every worker loads it."""
    from ..core.data import load_data

    return load_data(settings.data, settings.task, seed=settings.seed,
                     max_samples=settings.max_samples, **settings.columns)


def load_base(job: SearchJob, dataset=None, labels: list[str] | None = None):
    """The model every trial starts from; an adapter is merged into its base first. Its class
    names are the dataset's, or `labels` when no dataset is at hand (re-measuring an exported
    model against it)."""
    from ..adapters.merging import merge_adapter_
    from ..core.loading import load_model

    s = job.settings
    if dataset is not None:
        labels = dataset.label_names
    if s.task not in ("text-classification", "image-classification"):
        labels = None
    loaded = load_model(s.model, s.task, labels, device=s.device, seed=s.seed,
                        **job.loading.model_dump())
    return merge_adapter_(loaded, "search")


def _check_options(request: SearchRequest, device: str):
    """The options that need no model: ((budget in ms, budget ratio), device, space)."""
    from ..core.loading import resolve_device
    from . import study as studies

    budget = parse_budget(request.budget)
    check_workers(request.workers)
    device = resolve_device(device)
    if request.sampler not in studies.SAMPLERS:
        raise InputError(f"Unknown sampler '{shown(request.sampler, 60)}'. Samplers: "
                         f"{', '.join(studies.SAMPLERS)}.")
    space = spaces.from_file(request.space_file) if request.space_file \
        else spaces.from_knob_names(request.knobs)
    if request.runtime not in spaces.RUNTIMES:
        raise InputError(f"Unknown runtime '{shown(request.runtime, 60)}'. Runtimes: "
                         f"{', '.join(spaces.RUNTIMES)}.")
    if request.runtime == "onnxruntime":
        from ..compression.onnx_export import require_exporter

        if device != "cpu":
            raise InputError(f"--runtime onnxruntime measures on the CPU (mmkit's ONNX Runtime "
                             f"sessions are CPU sessions); drop --device {device}.")
        require_exporter()
    space = spaces.for_runtime(space, request.runtime, bool(request.space_file))
    spaces.check_baseline(space)
    if "quant" in space and any(q in ("nf4", "int8") for q in space["quant"]) and device == "cpu":
        log.info("bitsandbytes quantization on CPU is slower than fp32; the search will see it")
    return budget, device, space


def _data_settings(source, task: str, spec) -> dict:
    """data, seed and columns (core.data.DataSpec) as the search uses them: by default, the
    model's own. Columns are stored only when set (SearchSettings), so that studies of
    earlier versions resume."""
    from ..core.data import resolve_data

    request = resolve_data(source, task, spec.data, spec.seed, **spec.columns)
    return {"data": request.pop("spec"), "seed": request.pop("seed"),
            "columns": {k: v for k, v in request.items() if v is not None}}


def _check_study(url: str, out: Path, outside: bool, settings: SearchSettings,
                 overwrite: bool) -> None:
    """An outside storage must open; a study of other settings is refused now rather than
    after loading the model (in OUT only once search.json says the study is complete:
    another search may be creating it)."""
    from . import study as studies

    if outside:
        studies.open_storage(url)
    if overwrite or not (outside or (out / SETTINGS_FILE).is_file()):
        return
    existing = studies.find_study(url)
    if existing is not None:
        studies.check_settings(existing, url, settings)


def prepare(request: SearchRequest, run) -> Prepared:
    """Check every input of `request` (options, space, output, model, data; the model is
    loaded with `run`, a core.recipe.RunOptions), and only then create OUT, the study and
    search.json."""
    from ..core.elastic_space import read_elastic
    from ..core.families import check_length
    from ..core.loading import peek
    from ..core.outputs import check_not_an_input, output_path
    from . import study as studies

    (budget_ms, budget_ratio), device, space = _check_options(request, run.device)
    out = output_path(request.out)
    _check_output(out, run.overwrite)
    model, spec = request.model, request.data
    source, config, kind, task = peek(model, spec.task, run.trust_remote_code)
    objectives = check_objectives([o.strip() for o in request.objectives.split(",")
                                   if o.strip()], task)
    if kind in ("text-encoder", "causal-lm"):
        check_length(config, request.seq_len, "--seq-len", model)
    if "tokens" in space and kind not in spaces.TOKEN_KINDS:
        raise InputError(f"The tokens knob merges image tokens (ViT, CLIP); "
                         f"'{shown(model, 200)}' is a {kind} model. Drop the knob from --knobs / "
                         "the space file.")
    elastic = read_elastic(source.path) if source.adapter is None else None
    if elastic is not None:  # a super-network: its trained sub-networks are the cuts
        space = spaces.for_elastic(space, elastic, from_file=bool(request.space_file))
    settings = SearchSettings(model=model, task=task, max_samples=spec.max_samples,
                              **_data_settings(source, task, spec), space=space,
                              objectives=objectives, budget_ms=budget_ms,
                              budget_ratio=budget_ratio, device=device,
                              batch_size=request.batch_size, seq_len=request.seq_len,
                              sampler=request.sampler, threads=request.threads,
                              runtime=None if request.runtime == "torch" else request.runtime)
    url = studies.storage_url(out, request.storage)
    outside = bool(request.storage)
    _check_study(url, out, outside, settings, run.overwrite)
    dataset = load_dataset(settings)
    _check_classes(dataset, task)
    check_not_an_input(out, _input_paths(source, dataset, request.space_file))
    job = SearchJob(settings=settings, storage=url, out=str(out),
                    loading=LoadingFlags(allow_pickle=run.allow_pickle,
                                         trust_remote_code=run.trust_remote_code))
    loaded = load_base(job, dataset)
    return Prepared(job, _create(job, run.overwrite, outside), loaded, dataset)


# ---------------------------------------------------------------- creating
def _remove_made(made: list[Path]) -> None:
    if made and made[0].exists():
        shutil.rmtree(made[0], ignore_errors=True)


def _clear(out: Path) -> None:
    """Empty a search folder (--overwrite): it was checked to be one."""
    for p in out.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def write_json(path: Path, data: dict) -> None:
    """Write a JSON file in one step: a reader sees the old file or the new one, whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _create(job: SearchJob, overwrite: bool, outside_storage: bool) -> int:
    """Create OUT, the study (or open it to resume) and search.json, with OUT locked so that
    two searches started together create them once; returns the run's number."""
    from ..core.outputs import make_folders, output_lock
    from . import study as studies

    out, s = Path(job.out), job.settings
    made = make_folders(out)
    try:
        with output_lock(out, LOCK_WAIT_S):
            if overwrite:
                _clear(out)
                if outside_storage:
                    studies.delete(job.storage)
            baseline = None if s.sampler == "grid" else spaces.baseline(s.space)
            _, run = studies.open_study(job.storage, s, [OBJECTIVES[o][0]
                                                         for o in s.objectives], baseline)
            write_json(out / SETTINGS_FILE, job.model_dump())
    except BaseException:
        _remove_made(made)
        raise
    return run


# ---------------------------------------------------------------- running
def work(job: SearchJob, trials: int, timeout: float | None, worker: int = 0, run: int = 0,
         loaded=None, dataset=None) -> None:
    """One worker: run trials until the study has enough (the model and data are loaded
    unless given)."""
    from . import study as studies

    import torch

    s = job.settings
    if s.threads:  # every latency this worker measures runs on this many threads
        torch.set_num_threads(s.threads)
    if loaded is None:
        dataset = load_dataset(s)
        loaded = load_base(job, dataset)
    seed = studies.sampler_seed(s.seed, worker, run)
    study = studies.load(job.storage, studies.make_sampler(s.sampler, seed, s.space))
    try:
        studies.run(study, Trial(s, loaded, dataset, repeats=10), trials, timeout)
    except BaseException:  # interrupted or failed: no transaction left open for the cleanup
        studies.release(study)
        raise


def _start_worker(out: Path, trials: int, timeout: float | None, worker: int, run: int):
    return subprocess.Popen([sys.executable, "-m", "mmkit.search.worker", str(out), str(trials),
                             str(timeout or 0), str(worker), str(run)])


def _stop_workers(helpers: list) -> None:
    """Stop the helper workers (their running trials are marked failed) and reap them."""
    running = [p for p in helpers if p.poll() is None]
    if running:
        log.info("stopping %d search worker(s)", len(running))
    for p in running:
        p.terminate()
    for p in running:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def search(prep: Prepared, trials: int, timeout: float | None, workers: int,
           export: str) -> dict:
    """Run the search (with `workers` processes) and write its outputs."""
    from . import study as studies

    out = Path(prep.job.out)
    start = time.perf_counter()
    helpers = []
    try:
        helpers += [_start_worker(out, trials, timeout, i, prep.run) for i in range(1, workers)]
        work(prep.job, trials, timeout, 0, prep.run, prep.loaded, prep.dataset)
        for p in helpers:
            p.wait()
    except BaseException:  # interrupted, or failed: the helpers must not run on alone
        _stop_workers(helpers)
        try:  # best effort: the heartbeat grace fails what this leaves RUNNING on resume
            studies.fail_orphans(prep.job.storage, {os.getpid(), *(p.pid for p in helpers)})
        except Exception as exc:  # noqa: BLE001 - must not hide why the search stopped
            log.warning("could not mark the stopped trials failed (%s); the next run does",
                        exc)
        raise
    bad = [p.returncode for p in helpers if p.returncode]
    if bad:
        raise RuntimeFailure(f"{len(bad)} search worker(s) failed (exit {bad[0]}); the study in "
                             f"{studies.shown_url(prep.job.storage)} keeps every completed "
                             "trial — run the command again to resume.")
    return finish(prep.job, time.perf_counter() - start, export)


# ---------------------------------------------------------------- results
def _check_searched(study, rows: list[dict], settings: SearchSettings) -> None:
    """Refuse to pass the unmodified model off as a search result when every other point
    tried was invalid for this model."""
    import optuna

    space = settings.space
    base = spaces.point_key(spaces.baseline(space), space)
    invalid = [t for t in study.get_trials(deepcopy=False,
                                           states=(optuna.trial.TrialState.PRUNED,))
               if "invalid" in t.user_attrs]
    if invalid and all(spaces.point_key(r["params"], space) == base for r in rows):
        raise RuntimeFailure(
            f"Every candidate the search tried on '{settings.model}' was invalid "
            f"({len(invalid)} trials; e.g. trial {invalid[0].number}: "
            f"{shown(invalid[0].user_attrs['invalid'])}), so only the unmodified model was "
            "measured and nothing was searched. Choose knobs and values that fit this model "
            "(--knobs / --space).")


def finish(job: SearchJob, seconds: float, export: str) -> dict:
    """Front, files and exported model(s) from the study as it stands."""
    from ..core.outputs import output_lock
    from . import study as studies
    from .objective import taken_points

    s, out = job.settings, Path(job.out)
    study = studies.load(job.storage, None)
    rows = results.trial_rows(study, s.objectives)
    _check_searched(study, rows, s)
    front = results.pareto_front(rows, s.objectives)
    points = spaces.size(s.space)
    stats = {"trials_completed": len(rows),
             "rejected_without_evaluation": sum(1 for r in rows if not r["evaluated"]),
             # points never timed: they cut no more than one measured over the budget
             "skipped_over_budget": len({t.user_attrs.get("point") for t in study.trials
                                         if "slower_than" in t.user_attrs}),
             "space_points": points,
             "space_exhausted": len(taken_points(study, s.space)[0]) >= points,
             "seconds_this_run": seconds,
             "seconds_per_trial": (sum(r["seconds"] or 0 for r in rows) / len(rows))
             if rows else None}
    with output_lock(out, LOCK_WAIT_S):  # another search on OUT may be writing them too
        summary = results.write_outputs(out, study, rows, front, s, stats)
    best = results.best_under(rows, s.objectives, s.budget_ms, s.budget_ratio)
    exported = []
    if best is None and rows:
        raise results.no_candidate(rows, s.budget_ms, s.budget_ratio)
    remeasured, confirmation = None, []
    if export == "best" and best is not None:
        # measured again, and passed over for the next when noise had put it under the budget
        chosen = results.export_confirmed(rows, s.objectives, job, out / "best", s.budget_ms,
                                          s.budget_ratio)
        best, remeasured, confirmation = (chosen["best"], chosen["remeasured"],
                                          chosen["confirmation"])
        exported.append(chosen["artifact"])
    elif export == "pareto":
        for r in front:
            exported.append(results.export(r, job, out / "pareto" / f"trial-{r['trial']}"))
    return {"out": str(out), "storage": studies.shown_url(job.storage, None), **stats,
            "best": best, "best_remeasured": remeasured, "confirmation": confirmation,
            "front": front, "exported": exported,
            "table": results.table(front, s.objectives), "objectives": summary["objectives"]}


def _warn_unevaluated(summary: dict, budget_ms: float | None, ratio: float | None) -> None:
    """Picking under a looser (or another kind of) budget than the search's own cannot reach
    the trials that budget rejected: they were never evaluated."""
    old_ms, old_ratio = summary.get("latency_budget_ms"), summary.get("latency_budget_ratio")
    if (old_ms and (budget_ms is None or budget_ms > old_ms)) or \
            (old_ratio and (ratio is None or ratio > old_ratio)):
        log.warning("trials over the search's own %s budget were never evaluated, so they "
                    "cannot be picked", results.budget_text(old_ms, old_ratio))


def pick(out: str, budget: str, dest: str | None, overwrite: bool) -> dict:
    """Export the best evaluated point under a (new) budget, a time or a ratio to the
    unmodified model's latency, from a finished search: measured again, and passed over
    for the next when it is over the budget then (`results.export_confirmed`)."""
    budget_ms, ratio = parse_budget(budget)
    out = Path(out).expanduser()
    if not out.is_dir():
        raise InputError(f"'{shown(out)}' is not a search folder (it does not exist or is a "
                         "file). Pass the -o folder of a `mmkit search` run.")
    job = SearchJob.model_validate(results.read_search_file(out / SETTINGS_FILE, "search",
                                                            results.check_job))
    summary = results.read_search_file(out / "pareto.json", "pareto", results.check_summary)
    _warn_unevaluated(summary, budget_ms, ratio)
    if results.best_under(summary["evaluated"], summary["objectives"], budget_ms, ratio) is None:
        raise results.no_candidate(summary["evaluated"] or summary["front"], budget_ms, ratio)
    name = f"pick-{ratio:g}x" if ratio is not None else f"pick-{budget_ms:g}ms"
    chosen = results.export_confirmed(summary["evaluated"], summary["objectives"], job,
                                      Path(dest) if dest else out / name, budget_ms, ratio,
                                      overwrite=overwrite)
    best = chosen["best"]
    return {"artifact": chosen["artifact"], "trial": best["trial"], "params": best["params"],
            "values": best["values"], "latency_ms": best["latency_ms"],
            "latency_ratio": best.get("latency_ratio"), "remeasured": chosen["remeasured"],
            "confirmation": chosen["confirmation"]}
