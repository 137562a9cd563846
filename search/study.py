"""The Optuna study behind `mmkit search`: storage, sampler, resume and workers.

Storage is SQLite inside the output folder unless `--storage` names another Optuna storage
(any SQLAlchemy URL, e.g. PostgreSQL for workers on several machines, or `journal:PATH` for a
journal file). RDB storages keep a heartbeat: a trial whose process died is marked failed once
its heartbeat is stale and is retried with the same parameters. The search's settings are
stored in the study; running the same command again resumes it, another command is refused
(unless the study holds no finished or running trial, which nothing would lose).

On a database server (PostgreSQL with psycopg 3, the `distributed` extra) each process keeps
one connection, so a search holds as many connections as it has workers.
"""

from __future__ import annotations

import importlib
import json
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

from ..core.errors import ECHO_LIMIT, InputError, shown, signals_held
from .settings import SearchSettings

log = logging.getLogger("mmkit")
STUDY_NAME = "mmkit-search"
HEARTBEAT_S = int(os.environ.get("MMKIT_SEARCH_HEARTBEAT", "2"))
GRACE_S = int(os.environ.get("MMKIT_SEARCH_GRACE", "10"))
NO_HEARTBEAT_GRACE_S = 60  # a RUNNING trial still without a heartbeat this long is stale
SAMPLERS = ("tpe", "nsga2", "nsga3", "random", "grid", "qmc")
RUNS_ATTR = "mmkit_runs"  # how many `mmkit search` runs have started on the study
DISTRIBUTED = "pip install 'mmkit[distributed]'"
# a PostgreSQL URL's driver: SQLAlchemy 2.0 reads a plain postgresql:// as psycopg2, 2.1 as
# psycopg (3); mmkit takes whichever is installed, psycopg first
POSTGRES_DRIVERS = {"postgresql+psycopg": "psycopg", "postgresql+psycopg2": "psycopg2"}
CONNECT_TIMEOUT_S = 10  # an unreachable server is an error after this, not a long hang
_SERVER_STORAGES: dict = {}  # URL -> its storage: one engine (and connection) per process


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
        with signals_held():  # the trial and its process id land together, or neither
            trial = super()._create_new_trial(study_id, template_trial)
            if trial.state == TrialState.RUNNING:
                self._started(trial._trial_id)
        return trial

    def set_trial_state_values(self, trial_id, state, values=None) -> bool:
        with signals_held():
            changed = super().set_trial_state_values(trial_id, state, values)
            if changed and state == TrialState.RUNNING:  # a queued trial starts
                self._started(trial_id)
        return changed

    def _started(self, trial_id: int) -> None:
        """A trial this process starts: its first heartbeat, and its process id, by which
        `fail_orphans` finds it. Set later, by the objective, a signal landing in between
        left the trial RUNNING and unclaimed; set here, but with the signal handled between
        the writes, the same (a heartbeat and no process id, under load): the callers hold
        signals until both are written."""
        self.record_heartbeat(trial_id)
        self.set_trial_user_attr(trial_id, "worker_pid", os.getpid())

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


def shown_url(url: str, limit: int | None = ECHO_LIMIT) -> str:
    """A storage URL as a message (cut to `limit` characters) or a result (`limit` None)
    shows it: without its password."""
    cut = (lambda text: text) if limit is None else (lambda text: shown(text, limit))
    if "://" not in url or "@" not in url:
        return cut(url)
    try:
        from sqlalchemy.engine import make_url

        return cut(make_url(url).render_as_string(hide_password=True))
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL: say so later, not here
        return cut(url.split("://", 1)[0] + "://...")


def engine_url(url: str) -> str:
    """The URL the engine opens: a plain postgresql:// URL names the PostgreSQL driver that is
    installed (users type it, optuna-dashboard takes it); a missing driver is an InputError."""
    scheme, _, rest = url.partition("://")
    if not scheme.startswith("postgresql"):
        return url
    drivers = POSTGRES_DRIVERS if scheme == "postgresql" else \
        {scheme: POSTGRES_DRIVERS.get(scheme)}
    for driver, module in drivers.items():
        if module is None:  # another driver (asyncpg, pg8000, ...): SQLAlchemy's business
            return url
        try:
            importlib.import_module(module)
            return f"{driver}://{rest}"
        except ImportError:
            continue
    fix = f"install it with {DISTRIBUTED} (psycopg 3)" if scheme != "postgresql+psycopg2" \
        else f"install psycopg2, or write postgresql:// and {DISTRIBUTED} (psycopg 3)"
    raise InputError(f"--storage {shown_url(url)} needs a PostgreSQL driver, and "
                     f"{' / '.join(drivers.values())} is not installed here: {fix}, on every "
                     "machine that runs the search.")


def _server_engine_kwargs(url: str, pooled: bool = True) -> dict:
    """A database server's engine: one pooled connection per process (a worker's heartbeat
    thread waits its turn on it), checked before use (a trial can outlast the server's or a
    firewall's idle limit), named in pg_stat_activity, and a bounded wait for the server.
    Unpooled: a connection per use, closed after it."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    kwargs = {"pool_size": 1, "max_overflow": 0, "pool_pre_ping": True} if pooled \
        else {"poolclass": NullPool}
    if url.startswith("postgresql+psycopg"):
        query = make_url(url).query
        kwargs["connect_args"] = {k: v for k, v in (("connect_timeout", CONNECT_TIMEOUT_S),
                                                    ("application_name", "mmkit-search"))
                                  if k not in query}
    return kwargs


def _server_storage(url: str):
    """The storage of a database server, one per process and URL."""
    if url not in _SERVER_STORAGES:
        target = engine_url(url)
        # optuna sets up a new database (tables, schema version) with a connection opened
        # inside another one's session, which a pool of one would wait on for ever: that is
        # done first, unpooled (two connections for a moment, on a new database only)
        RDBStorage(target, engine_kwargs=_server_engine_kwargs(target, pooled=False),
                   skip_compatibility_check=True).engine.dispose()
        storage = HeartbeatStorage(target, engine_kwargs=_server_engine_kwargs(target),
                                   skip_table_creation=True, skip_compatibility_check=True,
                                   **_heartbeat())
        _check_schema(storage)
        _SERVER_STORAGES[url] = storage
    return _SERVER_STORAGES[url]


def _check_schema(storage) -> None:
    """optuna's schema check, without its second connection inside a session."""
    manager = storage._version_manager
    current, head = manager.get_current_version(), manager.get_head_version()
    if current != head:
        raise RuntimeError(f"the database holds optuna's schema {current} and this optuna "
                           f"uses {head}: upgrade the database with `optuna storage upgrade "
                           "--storage URL`, or optuna itself")


def _heartbeat() -> dict:
    return {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S,
            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=2)}


def _storage(url: str):
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url.split(":", 1)[1]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite"):
        return HeartbeatStorage(url, engine_kwargs={"connect_args": {"timeout": 60}},
                                **_heartbeat())
    return _server_storage(url)


def _created_meanwhile(exc: Exception) -> bool:
    """True for the error of a table (or row) another process created at the same moment:
    two searches setting up a new database at once."""
    if isinstance(exc, sqlalchemy.exc.IntegrityError):
        return True
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return isinstance(exc, sqlalchemy.exc.ProgrammingError) and code in ("42P07", "42710")


def _unreachable(url: str, exc: sqlalchemy.exc.OperationalError) -> InputError:
    reason = " ".join(str(exc.orig).split())
    return InputError(f"--storage {shown_url(url)} cannot be opened: the database server did "
                      f"not accept the connection ({shown(reason)}). Check that it runs at that "
                      "host and port and accepts connections from this machine, and the user, "
                      "password (better kept in ~/.pgpass or PGPASSWORD than in the URL) and "
                      "database name.")


def _not_opened(url: str, exc: Exception) -> InputError:
    reason = shown(" ".join(str(exc).split()).rstrip("."))
    return InputError(f"--storage {shown_url(url)} cannot be opened: {reason}. Use "
                      "sqlite:///PATH, an SQLAlchemy URL such as postgresql://user@host/db "
                      f"(PostgreSQL needs {DISTRIBUTED}), or journal:PATH.")


def open_storage(url: str):
    """An Optuna storage for a URL, or a clear error."""
    _quiet_optuna()
    attempts = 3
    for attempt in range(1, attempts + 1):
        try:
            return _storage(url)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            # two processes set up a new database at once: the other one's tables are there now
            if not _created_meanwhile(exc) or attempt == attempts:
                raise _not_opened(url, exc) from None
        except sqlalchemy.exc.OperationalError as exc:
            if not url.startswith("sqlite"):
                raise _unreachable(url, exc) from None
            raise _not_opened(url, exc) from None
        except (ImportError, ValueError, OSError, sqlalchemy.exc.SQLAlchemyError,
                optuna.exceptions.StorageInternalError,
                RuntimeError) as exc:  # RuntimeError: a schema of another optuna version
            raise _not_opened(url, exc) from None


def sampler_seed(seed: int, worker: int, run: int) -> int:
    """The sampler's seed for one worker of one run: a fresh single-process search keeps
    --seed itself; other workers and later runs of the same study draw other points."""
    return (seed + 1000 * worker + run) % 2**32


def make_sampler(name: str, seed: int, space: dict):
    """An Optuna sampler; TPE and NSGA steer by the latency constraint each trial sets
    (`Trial.set_constraint`, which they read without being told)."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=8)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=10)
    if name == "nsga3":
        return optuna.samplers.NSGAIIISampler(seed=seed, population_size=10)
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
        raise InputError(f"The storage {shown_url(url)} holds a search with other settings "
                         f"({', '.join(changed)} differ). Run the same command to resume it, "
                         "use another -o / --storage, or pass --overwrite to start afresh."
                         f"{pick}")


def _create(storage, directions: list[str]):
    """(the study, whether this process created it): of several searches creating it at once
    (on several machines), exactly one does."""
    try:
        return optuna.create_study(study_name=STUDY_NAME, storage=storage,
                                   directions=directions), True
    except optuna.exceptions.DuplicatedStudyError:
        return _load(storage), False


def _claim_run(storage, study) -> int:
    """This run's number (the runs counted before it), counted up at once: on a database
    server under the study row's lock, so that searches started together on several machines
    get different numbers and so their samplers different seeds. (The default SQLite storage
    is counted with OUT locked.)"""
    if not isinstance(storage, RDBStorage) or storage.engine.name == "sqlite":
        run = study.user_attrs.get(RUNS_ATTR, 0)
        study.set_user_attr(RUNS_ATTR, run + 1)
        return run
    with _create_scoped_session(storage.scoped_session) as session:
        row = models.StudyModel.find_or_raise_by_id(study._study_id, session, for_update=True)
        attr = models.StudyUserAttributeModel.find_by_study_and_key(row, RUNS_ATTR, session)
        if attr is None:
            run = 0
            session.add(models.StudyUserAttributeModel(study_id=row.study_id, key=RUNS_ATTR,
                                                       value_json=json.dumps(1)))
        else:
            run = json.loads(attr.value_json)
            attr.value_json = json.dumps(run + 1)
    return run


def open_study(url: str, settings: SearchSettings, directions: list[str],
               baseline: dict | None):
    """Create the study (trial 0 queued: `baseline`, the unmodified model), or resume it when
    it was made by the same settings; count this run. Call it with OUT locked, so that two
    searches started together do not both create it (searches on other machines, sharing a
    database, may: one of them does)."""
    storage = open_storage(url)
    study = _load(storage)
    if study is not None:
        check_settings(study, url, settings)
        stored = study.user_attrs.get("settings")
        if stored is not None and _differences(stored, settings):
            log.info("the study in %s had other settings (%s) and no finished trial: they are "
                     "replaced by this command's", shown_url(url),
                     ", ".join(_differences(stored, settings)))
            try:
                optuna.delete_study(study_name=STUDY_NAME, storage=storage)
            except KeyError:  # another search replaced it at the same moment
                pass
            study = None
    if study is None:
        study, created = _create(storage, directions)
        if created:
            study.set_user_attr("settings", settings.plain())  # as search.json holds them
            if baseline is not None:
                study.enqueue_trial(baseline)
        else:  # another machine's search created it just now
            check_settings(study, url, settings)
    return study, _claim_run(storage, study)


def load(url: str, sampler):
    """The search's study, for a worker."""
    study = _load(open_storage(url), sampler)
    if study is None:
        raise InputError(f"The storage {shown_url(url)} holds no search (it was deleted while "
                         "this worker started); run the search again.")
    return study


def release(study) -> None:
    """Give back a study's database connections after an interruption: a signal that lands
    inside a transaction can leave it open, and an SQLite database then stays locked to the
    cleanup that follows (fail_orphans waited out its 60 s timeout and gave up)."""
    import gc
    import sqlite3

    storage = getattr(study, "_storage", None)
    backend = getattr(storage, "_backend", storage)
    try:
        scoped = getattr(backend, "scoped_session", None)
        if scoped is not None:
            scoped.remove()  # this thread's session: rolled back, its connection returned
        engine = getattr(backend, "engine", None)
        if engine is not None:
            engine.dispose()
            if engine.url.get_backend_name() == "sqlite" and engine.url.database:
                # a connection to the study's file that the pool lost track of when the
                # signal landed: closing it rolls back and releases the lock
                path = os.path.realpath(engine.url.database)
                for obj in gc.get_objects():
                    if isinstance(obj, sqlite3.Connection) and _file_of(obj) == path:
                        try:
                            obj.close()
                        except sqlite3.Error:  # made by another thread: its own to close
                            pass
    except Exception as exc:  # noqa: BLE001 - best effort on the way out
        log.warning("could not close the study's database connections: %s", exc)


def _file_of(connection) -> str | None:
    """The file of an open SQLite connection's main database (None when closed)."""
    import sqlite3

    try:
        rows = connection.execute("PRAGMA database_list").fetchall()
    except sqlite3.Error:
        return None
    return next((os.path.realpath(f) for _, name, f in rows if name == "main" and f), None)


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
