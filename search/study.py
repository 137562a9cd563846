"""The Optuna study behind `mmkit search`: storage, sampler, resume and workers.

Storage is SQLite inside the output folder unless `--storage` names another Optuna storage
(any SQLAlchemy URL, e.g. PostgreSQL for workers on several machines, or `journal:PATH` for a
journal file). RDB storages keep a heartbeat: a trial whose process died is marked failed once
its heartbeat is stale and is retried with the same parameters. The search's settings are
stored in the study; running the same command again resumes it, another command is refused
(unless the study holds no finished or running trial, which nothing would lose).
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import TrialState
from sqlalchemy.orm import selectinload

from ..core.errors import InputError, shown
from .settings import SearchSettings

log = logging.getLogger("mmkit")
STUDY_NAME = "mmkit-search"
HEARTBEAT_S = int(os.environ.get("MMKIT_SEARCH_HEARTBEAT", "2"))
GRACE_S = int(os.environ.get("MMKIT_SEARCH_GRACE", "10"))
NO_HEARTBEAT_GRACE_S = 60  # a RUNNING trial still without a heartbeat this long is stale
SAMPLERS = ("tpe", "nsga2", "nsga3", "random", "grid", "qmc")
RUNS_ATTR = "mmkit_runs"  # how many `mmkit search` runs have started on the study


def storage_url(out: Path, storage: str | None) -> str:
    """The storage the search uses."""
    return storage or f"sqlite:///{(out / 'study.db').resolve()}"


def _quiet_optuna() -> None:
    """Optuna's per-trial lines (with a traceback for a failed or interrupted trial) and its
    experimental-feature warnings: our log and error messages say enough."""
    import warnings

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class HeartbeatStorage(RDBStorage):
    """An RDBStorage whose trials carry a heartbeat from the moment they run.

    Optuna writes a trial's first heartbeat from a thread started after the trial turned
    RUNNING, and never fails a RUNNING trial that has no heartbeat: a process killed in that
    window left its trial RUNNING for ever, and it was never retried. Here the heartbeat is
    written as the trial starts, and a RUNNING trial that still has none after
    max(grace period, NO_HEARTBEAT_GRACE_S) counts as stale too.
    """

    def _create_new_trial(self, study_id, template_trial=None):
        trial = super()._create_new_trial(study_id, template_trial)
        if trial.state == TrialState.RUNNING:
            self.record_heartbeat(trial._trial_id)
        return trial

    def set_trial_state_values(self, trial_id, state, values=None) -> bool:
        changed = super().set_trial_state_values(trial_id, state, values)
        if changed and state == TrialState.RUNNING:  # a queued trial starts
            self.record_heartbeat(trial_id)
        return changed

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        wait = max(self.grace_period or 0, NO_HEARTBEAT_GRACE_S)
        cutoff = datetime.now() - timedelta(seconds=wait)  # datetime_start is local time
        with _create_scoped_session(self.scoped_session) as session:
            running = (session.query(models.TrialModel)
                       .options(selectinload(models.TrialModel.heartbeats))
                       .filter(models.TrialModel.state == TrialState.RUNNING,
                               models.TrialModel.study_id == study_id).all())
            stale += [t.trial_id for t in running if not t.heartbeats
                      and t.datetime_start is not None and t.datetime_start < cutoff]
        return stale


def _storage(url: str):
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url.split(":", 1)[1]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return HeartbeatStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                            grace_period=GRACE_S,
                            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                                max_retry=2))


def open_storage(url: str):
    """An Optuna storage for a URL, or a clear error."""
    _quiet_optuna()
    for attempt in (1, 2):
        try:
            return _storage(url)
        except sqlalchemy.exc.IntegrityError as exc:
            # two processes set up a new database at once: the other one's tables are there now
            if attempt == 2:
                raise InputError(f"--storage {shown(url)} cannot be opened: {shown(exc)}.") \
                    from None
        except (ImportError, ValueError, OSError, sqlalchemy.exc.SQLAlchemyError,
                optuna.exceptions.StorageInternalError,
                RuntimeError) as exc:  # RuntimeError: a schema of another optuna version
            raise InputError(f"--storage {shown(url)} cannot be opened: {shown(exc)}. Use "
                             "sqlite:///PATH, an SQLAlchemy URL such as "
                             "postgresql://user@host/db (with its driver installed), or "
                             "journal:PATH.") from None


def sampler_seed(seed: int, worker: int, run: int) -> int:
    """The sampler's seed for one worker of one run: a fresh single-process search keeps
    --seed itself; other workers and later runs of the same study draw other points."""
    return (seed + 1000 * worker + run) % 2**32


def make_sampler(name: str, seed: int, space: dict):
    """An Optuna sampler that respects the latency constraint where it can."""
    def constraints(trial):
        return trial.user_attrs.get("constraint", [0.0])

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constraints_func=constraints,
                                          n_startup_trials=8)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints,
                                             population_size=10)
    if name == "nsga3":
        return optuna.samplers.NSGAIIISampler(seed=seed, constraints_func=constraints,
                                              population_size=10)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(space, seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    raise InputError(f"Unknown sampler '{shown(name, 60)}'. Samplers: {', '.join(SAMPLERS)}.")


def _differences(stored: dict, settings: SearchSettings) -> list[str]:
    """The keys whose values differ between a study's stored settings (a plain dict, maybe of
    an earlier version) and `settings`; a key one side lacks counts as None."""
    plain = settings.plain()
    return sorted(k for k in set(stored) | set(plain) if stored.get(k) != plain.get(k))


def _trial_counts(study) -> tuple[int, int]:
    """(completed, running) trials of a study."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    done = sum(1 for t in trials if t.state == TrialState.COMPLETE)
    return done, len(trials) - done


def _load(storage, sampler=None):
    try:
        return optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=sampler)
    except KeyError:
        return None


def find_study(url: str):
    """The search's study in the storage, or None; creates nothing (not even the database
    file of the default storage)."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return None
    return _load(open_storage(url))


def check_settings(study, url: str, settings: SearchSettings) -> None:
    """Refuse to resume a study made by other settings, unless it has no finished or running
    trial (then its settings can be replaced: nothing would be lost)."""
    stored = study.user_attrs.get("settings")
    if not isinstance(stored, dict) or not _differences(stored, settings):
        return
    if _trial_counts(study) != (0, 0):
        changed = _differences(stored, settings)
        budget = {"budget_ms", "budget_ratio"} & set(changed)
        pick = (" To export the best point under a new budget without searching again, use "
                "`mmkit search pick OUT --latency-budget ...`." if budget else "")
        raise InputError(f"The storage {shown(url)} holds a search with other settings "
                         f"({', '.join(changed)} differ). Run the same command to resume it, "
                         "use another -o / --storage, or pass --overwrite to start afresh."
                         f"{pick}")


def open_study(url: str, settings: SearchSettings, directions: list[str],
               baseline: dict | None):
    """Create the study (trial 0 queued: `baseline`, the unmodified model), or resume it when
    it was made by the same settings; count this run. Call it with OUT locked, so that two
    searches started together do not both create it."""
    storage = open_storage(url)
    study = _load(storage)
    if study is not None:
        check_settings(study, url, settings)
        stored = study.user_attrs.get("settings")
        if stored is not None and _differences(stored, settings):
            log.info("the study in %s had other settings (%s) and no finished trial: they are "
                     "replaced by this command's", url, ", ".join(_differences(stored, settings)))
            optuna.delete_study(study_name=STUDY_NAME, storage=storage)
            study = None
    if study is None:
        study = optuna.create_study(study_name=STUDY_NAME, storage=storage,
                                    directions=directions, load_if_exists=True)
        study.set_user_attr("settings", settings.plain())  # as search.json holds them
        if baseline is not None:
            study.enqueue_trial(baseline)
    run = study.user_attrs.get(RUNS_ATTR, 0)
    study.set_user_attr(RUNS_ATTR, run + 1)
    return study, run


def load(url: str, sampler):
    """The search's study, for a worker."""
    study = _load(open_storage(url), sampler)
    if study is None:
        raise InputError(f"The storage {shown(url)} holds no search (it was deleted while this "
                         "worker started); run the search again.")
    return study


def fail_orphans(url: str, pids: set[int]) -> int:
    """Mark failed the RUNNING trials of processes that have stopped (`pids`, reaped): a
    signal that lands while optuna records a trial's end, or between its start and its
    objective, leaves it RUNNING with no one to finish it. Returns how many."""
    study = find_study(url)
    if study is None:
        return 0
    orphans = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if t.user_attrs.get("worker_pid") in pids]
    for t in orphans:
        study.tell(t.number, state=TrialState.FAIL)
    return len(orphans)


def delete(url: str) -> None:
    """Delete the search's study from an outside storage (--overwrite)."""
    try:
        optuna.delete_study(study_name=STUDY_NAME, storage=open_storage(url))
    except KeyError:
        pass


def completed(study) -> int:
    """Trials that finished (feasible or not)."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def run(study, objective, trials: int, timeout: float | None) -> None:
    """Optimize until `trials` trials have completed in the study (all workers together), or
    no point of the space is left to try."""
    if completed(study) >= trials:
        log.info("the study already has %d completed trials", completed(study))
        return
    if objective.nothing_left(study):
        log.info("every point of the space has been tried already")
        return
    from ..core import progress

    with progress.bar(total=trials, desc="search", unit="trial") as shown_bar:
        study.optimize(objective, timeout=timeout, catch=(),
                       callbacks=[optuna.study.MaxTrialsCallback(
                           trials, states=(TrialState.COMPLETE,)),
                           _show_progress(shown_bar, objective.objectives)])


def _show_progress(shown_bar, objectives: list[str]):
    """An Optuna callback that moves the bar: trials completed, best so far, rejected."""
    from .objective import OBJECTIVES, QUALITY

    quality = next(n for n in objectives if n in QUALITY)
    better = max if OBJECTIVES[quality][0] == "maximize" else min

    def show(study, trial):
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        scores = [t.user_attrs["metrics"][quality] for t in done
                  if t.user_attrs.get("evaluated") and quality in t.user_attrs.get("metrics", {})]
        rejected = sum(1 for t in done if t.user_attrs.get("evaluated") is False)
        shown_bar.n = len(done)
        best = f"best {quality} {better(scores):.4g}, " if scores else ""
        shown_bar.set_postfix_str(f"{best}{rejected} over the budget")
        shown_bar.refresh()

    return show
