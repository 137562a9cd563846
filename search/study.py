"""The Optuna study behind `mmkit search`: storage, sampler, resume and workers.

Storage is SQLite inside the output folder unless `--storage` names another Optuna storage
(any SQLAlchemy URL, e.g. PostgreSQL for workers on several machines, or `journal:PATH` for a
journal file). RDB storages keep a heartbeat: a trial whose process died is marked failed once
its heartbeat is stale and is retried with the same parameters. The search's settings are
stored in the study; running the same command again resumes it, another command is refused.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..core.errors import InputError

log = logging.getLogger("mmkit")
STUDY_NAME = "mmkit-search"
HEARTBEAT_S = int(os.environ.get("MMKIT_SEARCH_HEARTBEAT", "2"))
GRACE_S = int(os.environ.get("MMKIT_SEARCH_GRACE", "10"))
SAMPLERS = ("tpe", "nsga2", "nsga3", "random", "grid", "qmc")


def storage_url(out: Path, storage: str | None) -> str:
    """The storage the search uses."""
    return storage or f"sqlite:///{(out / 'study.db').resolve()}"


def _quiet_optuna() -> None:
    """Optuna's per-trial INFO lines and experimental-feature warnings: our log says enough."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def open_storage(url: str):
    """An Optuna storage for a URL, or a clear error."""
    import optuna

    _quiet_optuna()
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            path = Path(url.split(":", 1)[1]).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                          grace_period=GRACE_S,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                              max_retry=2))
    except (ImportError, ValueError, OSError, optuna.exceptions.StorageInternalError) as exc:
        raise InputError(f"--storage {url} cannot be opened: {exc}. Use sqlite:///PATH, an "
                         "SQLAlchemy URL such as postgresql://user@host/db (with its driver "
                         "installed), or journal:PATH.") from None
    except Exception as exc:  # sqlalchemy's own errors (bad URL, unreachable server)
        if type(exc).__module__.startswith("sqlalchemy"):
            raise InputError(f"--storage {url} cannot be opened: {exc}.") from None
        raise


def make_sampler(name: str, seed: int, space: dict):
    """An Optuna sampler that respects the latency constraint where it can."""
    import optuna

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
    raise InputError(f"Unknown sampler '{name}'. Samplers: {', '.join(SAMPLERS)}.")


def open_study(url: str, settings: dict, directions: list[str], sampler):
    """Create the study, or resume it when it was made by the same settings."""
    import optuna

    storage = open_storage(url)
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, directions=directions,
                                sampler=sampler, load_if_exists=True)
    stored = study.user_attrs.get("settings")
    if stored is None:
        study.set_user_attr("settings", settings)
    elif stored != json.loads(json.dumps(settings)):
        changed = sorted(k for k in set(stored) | set(settings)
                         if stored.get(k) != json.loads(json.dumps(settings)).get(k))
        raise InputError(f"The storage {url} holds a search with other settings ({', '.join(changed)} "
                         "differ). Run the same command to resume it, use another -o / "
                         "--storage, or pass --overwrite to start afresh.")
    return study


def completed(study) -> int:
    """Trials that finished (feasible or not)."""
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def run(study, objective, trials: int, timeout: float | None, baseline: dict) -> None:
    """Optimize until `trials` trials have completed in the study (all workers together)."""
    import optuna

    grid = isinstance(study.sampler, optuna.samplers.GridSampler)  # it visits every point
    if not study.get_trials(deepcopy=False) and not grid:
        study.enqueue_trial(baseline)  # trial 0: the unmodified model
    if completed(study) >= trials:
        log.info("the study already has %d completed trials", completed(study))
        return
    study.optimize(objective, timeout=timeout, catch=(),
                   callbacks=[optuna.study.MaxTrialsCallback(
                       trials, states=(optuna.trial.TrialState.COMPLETE,))])
