"""search on PostgreSQL (the `distributed` extra): four workers in two process groups share one
study, processes are killed with SIGKILL mid-trial and the search is run again; nothing
completed is lost or done twice, nothing stays RUNNING, and the database never holds more
connections than there are workers. Also stale-trial detection under other time zones,
orphans, and a server that cannot be reached or a driver that is not installed.

A throwaway PostgreSQL cluster is started on 127.0.0.1 for the module (Debian's postgresql
package; .ci/run installs it); without its binaries or psycopg the server tests are skipped.
"""

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from mmkit.cli.main import cli

BASE = ["tiny:bert", "--max-samples", "24", "--seq-len", "16"]
GRACE_S = 5  # the heartbeat grace the subprocess searches run with (heartbeat every second)
OBSERVER = "mmkit-test-observer"  # this test's own connections, not counted
BASELINE = {"layers": 0, "heads": 0.0, "ffn": 0.0, "quant": "none"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bin_dir() -> str | None:
    """The folder of PostgreSQL's initdb / pg_ctl: Debian's newest, or on the PATH."""
    def version(path):
        name = Path(path).parent.parent.name
        return int(name) if name.isdigit() else 0

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if found:
        return str(Path(found[-1]).parent)
    initdb = shutil.which("initdb")
    return str(Path(initdb).parent) if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running throwaway cluster: superuser `mmkit`, trust authentication on 127.0.0.1."""

    port: int

    def connect(self, dbname="postgres"):
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user="mmkit", dbname=dbname,
                               application_name=OBSERVER, autocommit=True)

    def database(self, name: str) -> str:
        """A new, empty database: its URL as a user writes it."""
        with self.connect() as con:
            con.execute(f'create database "{name}"')
        return f"postgresql://mmkit@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster for this module, stopped and removed at its end."""
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install "
                        "'mmkit[distributed]'", exc_type=ImportError)
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) are installed: on Debian "
                    "`apt-get install postgresql` (.ci/run does)")
    as_user = []
    root = Path(tempfile.mkdtemp(prefix="mmkit-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root
        account = next((a for a in ("postgres", "nobody") if _account(a)), None)
        if account is None or shutil.which("runuser") is None:
            shutil.rmtree(root)
            pytest.skip("running as root, and there is no 'postgres' or 'nobody' account (or "
                        "no runuser) to run the PostgreSQL cluster as")
        entry = pwd.getpwnam(account)
        os.chown(root, entry.pw_uid, entry.pw_gid)
        as_user = ["runuser", "-u", account, "--"]
    port = _free_port()
    data = root / "data"
    try:
        subprocess.run([*as_user, f"{bin_dir}/initdb", "-D", str(data), "-U", "mmkit",
                        "--auth=trust", "--no-sync", "-E", "UTF8", "--no-locale"],
                       check=True, capture_output=True, cwd=root)
        options = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c max_connections=40")
        subprocess.run([*as_user, f"{bin_dir}/pg_ctl", "-D", str(data), "-o", options,
                        "-l", str(root / "log"), "-w", "-t", "60", "start"],
                       check=True, capture_output=True, cwd=root)
    except subprocess.CalledProcessError as exc:
        log = (root / "log").read_text() if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"the PostgreSQL cluster did not start: {exc.stderr.decode()} {log}")
    try:
        yield Server(port)
    finally:
        subprocess.run([*as_user, f"{bin_dir}/pg_ctl", "-D", str(data), "-m", "immediate",
                        "-w", "stop"], capture_output=True, cwd=root)
        shutil.rmtree(root, ignore_errors=True)


def _account(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


class ConnectionPeak:
    """Samples pg_stat_activity in a thread: the most connections to one database at once,
    leaving out this test's own."""

    def __init__(self, server: Server, dbname: str):
        self.server, self.dbname, self.peak, self.samples = server, dbname, 0, 0
        self.at_peak = []  # (pid, application_name) of the connections at the peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with self.server.connect() as con:
            while not self._stop.is_set():
                rows = con.execute(
                    "select pid, application_name from pg_stat_activity where datname = %s "
                    "and backend_type = 'client backend' and application_name <> %s",
                    (self.dbname, OBSERVER)).fetchall()
                if len(rows) > self.peak:
                    self.peak, self.at_peak = len(rows), rows
                self.samples += 1
                self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _search_group(out: Path, url: str, trials: int) -> subprocess.Popen:
    """`mmkit search --workers 2` on the shared study, in its own process group (a machine);
    its output goes to files beside OUT."""
    env = {**os.environ, "MMKIT_SEARCH_GRACE": str(GRACE_S), "MMKIT_SEARCH_HEARTBEAT": "1",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    logs = out.parent / f"{out.name}-{time.monotonic_ns()}"
    with open(f"{logs}.out", "w") as stdout, open(f"{logs}.err", "w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "mmkit.cli.main", "search", *BASE,
                                 "--sampler", "random", "--workers", "2", "--trials",
                                 str(trials), "--export", "none", "--storage", url, "-o",
                                 str(out)], env=env, stdout=stdout, stderr=stderr,
                                start_new_session=True)


def _finished(proc: subprocess.Popen, limit: float = 240) -> tuple[int, str]:
    """(exit code, the end of its stderr) once it has ended."""
    proc.wait(timeout=limit)
    err = Path(proc.args[-1]).parent.glob(f"{Path(proc.args[-1]).name}-*.err")
    return proc.returncode, "\n".join(p.read_text()[-2000:] for p in sorted(err))


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _trials(con) -> list[tuple]:
    """(number, state, worker pid or None, heartbeat or None) of every trial; none before
    the search has created its tables."""
    if con.execute("select to_regclass('trial_heartbeats')").fetchone()[0] is None:
        return []
    return con.execute(
        "select t.number, t.state::text, (select value_json from trial_user_attributes u "
        "where u.trial_id = t.trial_id and u.key = 'worker_pid'), "
        "(select heartbeat from trial_heartbeats h where h.trial_id = t.trial_id) "
        "from trials t order by t.number").fetchall()


def _workers(con) -> int:
    """How many processes have run trials."""
    return len({p for _, _, p, _ in _trials(con) if p})


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _wait_for(condition, procs, limit=240):
    """Poll `condition` (returns a true value when it holds) while `procs` keep running."""
    deadline = time.time() + limit
    while True:
        found = condition()
        if found:
            return found
        for proc in procs:
            assert proc.poll() is None, f"a search ended early: {_finished(proc)}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _running_in_group(con, group: int, not_pid: int | None = None):
    """A RUNNING trial with its heartbeat and point, of a worker in process group `group`:
    (number, pid), or None."""
    for number, state, pid, heartbeat in _trials(con):
        if state == "RUNNING" and pid and heartbeat and int(pid) != not_pid \
                and _group_of(int(pid)) == group:
            return number, int(pid)
    return None


def _load(url: str):
    import optuna

    from mmkit.search.study import STUDY_NAME, open_storage

    # as this test's connection, which the count of the searches' connections leaves out
    return optuna.load_study(study_name=STUDY_NAME,
                             storage=open_storage(f"{url}?application_name={OBSERVER}"))


def test_four_workers_on_postgres_survive_sigkill_without_loss_or_repeats(postgres, tmp_path):
    url = postgres.database("shared")
    a, b = tmp_path / "machine-a", tmp_path / "machine-b"  # each "machine" has its own -o
    endless = 1000  # the first runs never reach it: they are killed or stopped
    with ConnectionPeak(postgres, "shared") as connections, postgres.connect("shared") as con:
        procs = [_search_group(a, url, endless), _search_group(b, url, endless)]
        try:
            # all four workers at work; then SIGKILL the whole of machine A (its main process
            # and helper) with one of its trials running
            _wait_for(lambda: sum(s == "COMPLETE" for _, s, _, _ in _trials(con)) >= 2
                      and _workers(con) == 4 and _running_in_group(con, procs[0].pid), procs)
            dead = {int(p) for _, _, p, _ in _trials(con)
                    if p and _group_of(int(p)) == procs[0].pid}
            _kill_group(procs[0])
            stale = [n for n, s, p, _ in _trials(con) if s == "RUNNING" and p and int(p) in dead]
            # SIGKILL machine B's helper worker alone inside a trial, then stop B (SIGTERM: it
            # marks its own and its dead helper's running trials failed)
            _, helper = _wait_for(lambda: _running_in_group(con, procs[1].pid, procs[1].pid),
                                  procs[1:])
            os.kill(helper, signal.SIGKILL)
            orphans = [n for n, s, p, _ in _trials(con) if s == "RUNNING" and p == str(helper)]
            os.kill(procs[1].pid, signal.SIGTERM)
            code, err = _finished(procs[1])
            assert code == 143, err
            before = {t.number: t.values for t in _load(url).trials if t.state.name == "COMPLETE"}
            # machine A runs the same command again, for 4 more completed trials, once its
            # killed trials' heartbeats are older than the grace (by the server's clock)
            _wait_for(lambda: not con.execute(
                "select count(*) from trials t join trial_heartbeats h using (trial_id) where "
                "t.number = any(%s) and localtimestamp - h.heartbeat <= make_interval(secs => "
                "%s)", (stale, GRACE_S)).fetchone()[0], [], limit=60)
            target = len(before) + 4
            procs.append(_search_group(a, url, target))
            code, err = _finished(procs[2])
            assert code == 0, err
        finally:
            for proc in procs:
                _kill_group(proc)
        # every connection is closed once the processes have ended (their server processes
        # leave within moments)
        _wait_for(lambda: not con.execute(
            "select count(*) from pg_stat_activity where datname = 'shared' and "
            "application_name <> %s", (OBSERVER,)).fetchone()[0], [], limit=30)
    study = _load(url)
    trials = study.trials
    done = {t.number: t.values for t in trials if t.state.name == "COMPLETE"}
    lost = [n for n, v in before.items() if done.get(n) != v]
    numbers = [t.number for t in trials]
    points = [t.user_attrs["point"] for t in trials if t.state.name == "COMPLETE"]
    stuck = [t.number for t in trials if t.state.name == "RUNNING"]
    retried = {t.system_attrs["failed_trial"]: t for t in trials
               if "failed_trial" in t.system_attrs}
    print(f"\npostgres: {len(done)} completed, {len(trials)} trials, killed mid-trial "
          f"{stale} (machine A) and {orphans} (B's helper), "
          f"completed before the kills {len(before)}, lost {len(lost)}, duplicated numbers "
          f"{len(numbers) - len(set(numbers))}, points completed twice "
          f"{len(points) - len(set(points))}, stuck RUNNING {len(stuck)}, peak connections "
          f"{connections.peak} ({connections.samples} samples: {connections.at_peak}) "
          "for 4 workers")
    assert len(before) >= 2 and stale + orphans  # the kills landed inside trials
    assert not lost  # every trial completed before the kills, with its values
    assert len(numbers) == len(set(numbers))  # no trial number twice
    assert len(points) == len(set(points)) and len(done) >= target  # no point twice
    assert not stuck and all(trials[n].state.name == "FAIL" for n in stale + orphans)
    for n in stale:  # found stale by their heartbeat, and retried with their parameters
        # (a trial killed before it chose its point has none to keep: its retry samples one)
        assert n in retried and retried[n].params == (trials[n].params or retried[n].params), n
        assert retried[n].state.name in ("COMPLETE", "PRUNED")
    # the unmodified model was queued once, though two machines created the study together;
    # three runs were counted (each seeds its samplers differently)
    queued = [t for t in trials if t.system_attrs.get("fixed_params") == BASELINE
              and "failed_trial" not in t.system_attrs]
    assert len(queued) == 1 and study.user_attrs["mmkit_runs"] == 3
    # one connection per worker process: never more than the 4 workers at once
    assert 0 < connections.peak <= 4, connections.at_peak


def test_stale_trials_and_orphans_on_postgres_in_any_time_zone(postgres, monkeypatch):
    import optuna

    from mmkit.search.study import STUDY_NAME, fail_orphans, open_storage

    url = postgres.database("clock")
    with postgres.connect("clock") as con:
        for zone in ("America/Los_Angeles", "Asia/Kolkata"):  # behind and ahead of UTC
            monkeypatch.setenv("TZ", zone)
            time.tzset()
            study = optuna.create_study(study_name=f"h-{zone}", storage=open_storage(url),
                                        directions=["maximize", "minimize"])
            study.enqueue_trial({})
            study.ask(), study.ask()  # a queued trial and a new one start: heartbeats at once
            ids = [t._trial_id for t in study.get_trials()]
            assert con.execute("select count(*) from trial_heartbeats where trial_id = any(%s)",
                               (ids,)).fetchone()[0] == 2
            # a process killed before its first heartbeat, 5 minutes ago; one just started
            con.execute("delete from trial_heartbeats where trial_id = any(%s)", (ids,))
            con.execute("update trials set datetime_start = (now() at time zone 'utc') - "
                        "interval '5 minutes' where trial_id = %s", (ids[0],))
            optuna.storages.fail_stale_trials(study)
            assert [t.state.name for t in study.get_trials()[:2]] == ["FAIL", "RUNNING"], zone
    monkeypatch.delenv("TZ")
    time.tzset()
    # a stopped search's RUNNING trials are marked failed by their workers' pids
    study = optuna.create_study(study_name=STUDY_NAME, storage=open_storage(url),
                                directions=["maximize"])
    for pid in (111, 222):
        study.ask().set_user_attr("worker_pid", pid)
    assert fail_orphans(url, {111, 333}) == 1
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "RUNNING"]


def test_postgres_storage_bad_input(tmp_path, monkeypatch):
    def search(url, out):
        return CliRunner().invoke(cli, ["search", *BASE, "--trials", "2", "--storage", url,
                                        "-o", str(out)])

    # no driver installed: the message names the extra
    for module in ("psycopg", "psycopg2"):
        monkeypatch.setitem(sys.modules, module, None)
    result = search("postgresql://u@db.example/mmkit-missing-driver", tmp_path / "a")
    assert result.exit_code == 2, result.stderr
    assert "pip install 'mmkit[distributed]'" in result.stderr and "Traceback" not in \
        result.stderr and not (tmp_path / "a").exists()
    monkeypatch.undo()
    pytest.importorskip("psycopg", reason="psycopg is not installed", exc_type=ImportError)
    # nothing listens on the port: a clear message at once, the password not echoed
    url = f"postgresql://mmkit:s3cret@127.0.0.1:{_free_port()}/mmkit"
    result = search(url, tmp_path / "b")
    assert result.exit_code == 2, result.stderr
    assert "did not accept the connection" in result.stderr and "refused" in result.stderr
    assert "s3cret" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "b").exists() and len(result.stderr) < 3000
