"""search: an end-to-end search on a tiny model, the budget, resume after a kill, workers and
searches sharing one study without repeating a point, interruption, the Pareto front against
brute force, determinism, adapters, pick, and bad input (nothing written)."""

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mmkit.cli.main import cli
from mmkit.core.loading import load_model
from mmkit.core.recipe import run_recipe
from mmkit.search import results
from mmkit.search.settings import SearchJob

BASE = ["tiny:bert", "--max-samples", "24", "--seq-len", "16"]
GRACE_S = 3  # the heartbeat grace the subprocess searches run with


# Tiny models gain nothing from a second thread, and a shared machine loses much by it.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cli(*args):
    return CliRunner().invoke(cli, ["search", *[str(a) for a in args]])


def _query(db, sql, *args):
    """Rows of a query on a study database, read-only (the search may be creating it)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return con.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # the database or its tables are not created yet
        return []


def _trials_in(db, state):
    return _query(db, "select number from trials where state = ?", state)


def _study(out):
    import optuna

    return optuna.load_study(study_name="mmkit-search", storage=f"sqlite:///{out}/study.db")


def _completed_points(out):
    return [t.user_attrs["point"] for t in _study(out).trials if t.state.name == "COMPLETE"]


def _wait_for(condition, proc=None, limit=300):
    """Poll `condition` until it holds; the search process must still be running meanwhile."""
    deadline = time.time() + limit
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode()[-3000:])
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def test_search_end_to_end_respects_the_budget_and_exports(tmp_path):
    out = tmp_path / "s"
    result = _cli(*BASE, "--trials", "5", "--sampler", "random", "--latency-budget", "1000ms",
                  "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["trials_completed"] == 5 and not row["space_exhausted"]
    summary = json.loads((out / "pareto.json").read_text())
    first = _study(out).trials[0]
    assert first.params == {"layers": 0, "heads": 0.0, "ffn": 0.0, "quant": "none"}  # trial 0
    assert all(r["latency_ms"] <= 1000 for r in summary["front"])
    for name in ("pareto.csv", "pareto.png", "pareto.html"):
        assert (out / name).stat().st_size > 0
    html = (out / "pareto.html").read_text()
    assert "<script src=\"https://cdn.plot.ly" not in html and len(html) > 1_000_000  # embedded
    with open(out / "pareto.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 5  # every completed trial, not the front only
    assert summary["measured_at"]["seq_len"] == 16 and summary["measured_at"]["threads"]
    best = json.loads((out / "best" / "mmkit.json").read_text())
    assert [s["method"] for s in best["steps"]] == [s["method"] for s in row["best"]["steps"]]
    again = row["best_remeasured"]  # the exported model, measured again on its own
    assert again["median_ms"] > 0 and again["threads"] >= 1
    # a budget no candidate meets: exit 1, naming the fastest point, without evaluations
    tight = _cli(*BASE, "--trials", "3", "--sampler", "random", "--latency-budget", "0.001ms",
                 "-o", tmp_path / "t")
    assert tight.exit_code == 1 and "fastest point" in tight.stderr
    trials = _study(tmp_path / "t").trials
    assert all(t.user_attrs["evaluated"] is False for t in trials if t.state.name == "COMPLETE")
    assert all("metrics" not in t.user_attrs for t in trials)  # accuracy never paid for


def _brute_force_front(points):
    """Non-dominated (accuracy up, latency down, size down) points, written out longhand."""
    front = []
    for i, (acc, lat, size) in points.items():
        dominated = False
        for j, (acc2, lat2, size2) in points.items():
            if j != i and acc2 >= acc and lat2 <= lat and size2 <= size and (
                    acc2 > acc or lat2 < lat or size2 < size):
                dominated = True
        if not dominated:
            front.append(i)
    return sorted(front)


def test_pareto_front_equals_brute_force_on_a_grid(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("knobs:\n  layers: [0, 1]\n  ffn: [0, 0.5]\n  heads: [0, 0.5]\n")
    out = tmp_path / "g"
    result = _cli(*BASE, "--space", space, "--sampler", "grid", "--trials", "8",
                  "--export", "none", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    trials = [t for t in _study(out).trials if t.values]
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 8  # every grid point once
    points = {t.number: tuple(t.values) for t in trials}
    front = sorted(r["trial"] for r in json.loads((out / "pareto.json").read_text())["front"])
    assert front == _brute_force_front(points)


def test_same_seed_same_trials(tmp_path):
    runs = []
    for name in ("a", "b"):
        result = _cli(*BASE, "--trials", "4", "--sampler", "tpe", "--seed", "3", "--export",
                      "none", "-o", tmp_path / name)
        assert result.exit_code == 0, result.stderr
        runs.append([t.params for t in _study(tmp_path / name).trials])
    assert runs[0] == runs[1] and len({json.dumps(p, sort_keys=True) for p in runs[0]}) > 1


def test_a_small_space_is_searched_once_and_an_all_invalid_one_is_an_error(tmp_path):
    small = tmp_path / "small.yaml"
    small.write_text("knobs:\n  layers: [0, 1]\n  heads: [0, 0.0, 0.25, 0.5]\n")  # 0 == 0.0
    args = [*BASE, "--space", small, "--sampler", "random", "--export", "none", "-o",
            tmp_path / "s"]
    assert _cli(*args, "--trials", 3).exit_code == 0
    result = _cli(*args, "--trials", 10)  # resumed: adds only new points, then stops
    assert result.exit_code == 0, result.stderr
    assert "every one of the 6 points of the space has been tried" in result.stdout
    points = _completed_points(tmp_path / "s")
    assert len(points) == 6 == len(set(points)) and "layers=1 heads=0" in points
    # tiny:bert has 2 layers: removing both is no candidate, so only the baseline is measured
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("knobs:\n  layers: [0, 2]\n")
    result = _cli(*BASE, "--space", invalid, "--trials", "4", "--sampler", "random",
                  "--export", "none", "-o", tmp_path / "i")
    assert result.exit_code == 1, result.stderr
    assert "Every candidate the search tried" in result.stderr and "was invalid" in result.stderr


def _search_process(out, *args):
    env = {**os.environ, "MMKIT_SEARCH_GRACE": str(GRACE_S), "MMKIT_SEARCH_HEARTBEAT": "1",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "mmkit.cli.main", "search", *BASE,
                             "--sampler", "random", "-o", str(out), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def _result(proc, limit=300):
    """Wait for a search process (reading its output, so that a full pipe cannot stall it):
    (exit code, the end of its stderr)."""
    _, err = proc.communicate(timeout=limit)
    return proc.returncode, err.decode()[-3000:]


def _stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_resume_after_the_search_is_killed_mid_trial(tmp_path):
    from mmkit.search.study import STUDY_NAME, HeartbeatStorage

    out = tmp_path / "r"
    db = out / "study.db"
    proc = _search_process(out, "--trials", 100, "--export", "none")
    try:  # kill it inside a trial that has started its heartbeat and chosen its point
        _wait_for(lambda: len(_trials_in(db, "COMPLETE")) >= 2 and _query(
            db, "select t.number from trials t join trial_heartbeats h using (trial_id) "
                "where t.state = 'RUNNING' and (select count(*) from trial_params p "
                "where p.trial_id = t.trial_id) = 4"), proc)
    finally:
        _stop(proc)
    before = {t.number: t.values for t in _study(out).trials if t.values}
    cut = [t.number for t in _study(out).trials if t.state.name == "RUNNING"]
    assert len(before) >= 2 and cut
    # wait until the search will find it stale (by the grace the searches run with)
    storage = HeartbeatStorage(f"sqlite:///{db}", heartbeat_interval=1, grace_period=GRACE_S)
    study_id = storage.get_study_id_from_name(STUDY_NAME)
    ids = {t.number: t._trial_id for t in _study(out).trials}
    _wait_for(lambda: {ids[n] for n in cut} <= set(storage._get_stale_trial_ids(study_id)))
    again = _search_process(out, "--trials", len(before) + 3, "--export", "none")
    code, err = _result(again)
    assert code == 0, err
    trials = _study(out).trials
    done = {t.number: t.values for t in trials if t.values}
    assert all(done[n] == v for n, v in before.items())  # none lost
    assert len({t.number for t in trials}) == len(trials)  # none duplicated
    assert all(t.state.name == "FAIL" for t in trials if t.number in cut)
    retried = [t for t in trials if t.system_attrs.get("failed_trial") in cut]
    assert retried and retried[0].params == trials[cut[0]].params  # with its parameters
    assert retried[0].state.name in ("COMPLETE", "PRUNED")  # and run to its end
    points = _completed_points(out)
    assert len(points) == len(set(points))  # the restart added only new points


def test_two_workers_share_one_sqlite_study_without_repeating_a_point(tmp_path):
    out = tmp_path / "w"
    # a space small enough to exhaust, large enough that the helper (which loads the model
    # after the main worker started) gets trials: the search ends when every point is taken,
    # so how many trials run does not depend on how fast this machine is today
    space = tmp_path / "small.yaml"
    points = {"heads": [0.0, 0.25, 0.5, 0.75], "ffn": [0.0, 0.2, 0.4, 0.6, 0.8]}
    space.write_text(json.dumps({"knobs": points}))
    proc = _search_process(out, "--trials", 1000, "--workers", 2, "--space", space,
                           "--export", "none")
    try:
        code, err = _result(proc)
        assert code == 0, err
    finally:
        _stop(proc)
    trials = [t for t in _study(out).trials if t.state.name == "COMPLETE"]
    assert len({t.user_attrs["worker_pid"] for t in trials}) == 2
    done = [t.user_attrs["point"] for t in trials]
    assert len(done) == len(set(done)) == 20  # every point once, none twice
    for t in _study(out).trials:  # a skipped repeat names its twin and never counts
        if "duplicate_of" in t.user_attrs:
            assert t.state.name == "PRUNED"


def test_two_searches_started_together_on_a_new_output_share_it(tmp_path):
    out = tmp_path / "c"
    procs = [_search_process(out, "--trials", 4, "--export", "best") for _ in range(2)]
    try:
        for proc in procs:
            code, err = _result(proc)
            assert code == 0, err
    finally:
        for proc in procs:
            _stop(proc)
    trials = _study(out).trials
    assert len({t.number for t in trials}) == len(trials)
    points = _completed_points(out)
    assert len(points) >= 4 and len(points) == len(set(points))
    assert (out / "best" / "mmkit.json").is_file()
    assert json.loads((out / "search.json").read_text())["settings"]["model"] == "tiny:bert"


def test_stopping_the_search_stops_its_workers(tmp_path):
    out = tmp_path / "k"
    space = tmp_path / "large.yaml"  # so large that the workers are far from done when stopped
    fractions = [round(i / 20, 2) for i in range(19)]
    space.write_text(json.dumps({"knobs": {"heads": fractions, "ffn": fractions}}))
    proc = _search_process(out, "--trials", 300, "--workers", 2, "--space", space, "--export",
                           "none")
    pids = "select value_json from trial_user_attributes where key = 'worker_pid'"
    try:
        _wait_for(lambda: {int(p) for (p,) in _query(out / "study.db", pids)} - {proc.pid}, proc)
        helper = ({int(p) for (p,) in _query(out / "study.db", pids)} - {proc.pid}).pop()
        os.kill(proc.pid, signal.SIGTERM)  # the main process only
        code, err = _result(proc, limit=120)
        assert code == 143, err
    finally:
        _stop(proc)
    assert not os.path.exists(f"/proc/{helper}")  # stopped and reaped, not left running
    assert not _trials_in(out / "study.db", "RUNNING")  # their trials ended as failed


def test_a_trial_killed_before_its_first_heartbeat_is_found_stale(tmp_path):
    import optuna

    from mmkit.search.study import open_storage

    db = tmp_path / "h.db"
    study = optuna.create_study(study_name="h", storage=open_storage(f"sqlite:///{db}"),
                                directions=["maximize", "minimize"])
    study.enqueue_trial({})
    study.ask(), study.ask()  # a queued trial and a new one start
    heartbeats = "select trial_id from trial_heartbeats order by trial_id"
    assert _query(db, heartbeats) == [(1,), (2,)]  # at once, before any heartbeat thread
    # a process killed between a trial's start and its first heartbeat; one trial just started
    with sqlite3.connect(db) as con:
        con.execute("delete from trial_heartbeats")
        old = (datetime.now() - timedelta(minutes=5)).isoformat(sep=" ")
        con.execute("update trials set datetime_start = ? where trial_id = 1", (old,))
    optuna.storages.fail_stale_trials(study)
    assert [t.state.name for t in study.get_trials()[:2]] == ["FAIL", "RUNNING"]


def test_a_trial_names_its_process_as_it_starts(tmp_path):
    """fail_orphans finds a stopped worker's RUNNING trials by this pid: it must be there
    from the trial's first moment, not only once the objective runs."""
    import optuna

    from mmkit.search.study import open_storage

    study = optuna.create_study(study_name="p", storage=open_storage(
        f"sqlite:///{tmp_path / 'p.db'}"), directions=["maximize", "minimize"])
    study.enqueue_trial({})
    queued, new = study.ask(), study.ask()
    assert queued.user_attrs["worker_pid"] == new.user_attrs["worker_pid"] == os.getpid()


@pytest.mark.parametrize("queued", [False, True])
def test_a_signal_between_a_trial_start_writes_waits_for_both(tmp_path, monkeypatch, queued):
    """Seen under load: SIGTERM handled between a trial's first heartbeat and its process id
    left it RUNNING with no pid, so fail_orphans never ended it. The signal now waits until
    both are written; then the handler's exception comes, as before."""
    import optuna

    from mmkit.core.errors import Terminated
    from mmkit.search.study import HeartbeatStorage, open_storage

    study = optuna.create_study(study_name="s", storage=open_storage(
        f"sqlite:///{tmp_path / 's.db'}"), directions=["maximize", "minimize"])
    if queued:
        study.enqueue_trial({})
    heartbeat = HeartbeatStorage.record_heartbeat

    def record_then_signalled(self, trial_id):
        heartbeat(self, trial_id)
        os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode, unless held

    def terminate(signum, frame):
        raise Terminated()

    monkeypatch.setattr(HeartbeatStorage, "record_heartbeat", record_then_signalled)
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        with pytest.raises(Terminated):
            study.ask()
        assert signal.getsignal(signal.SIGTERM) is terminate  # put back as it was
    finally:
        signal.signal(signal.SIGTERM, previous)
    (trial,) = study.get_trials()
    assert trial.state.name == "RUNNING" and trial.user_attrs["worker_pid"] == os.getpid()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A LoRA adapter (mergeable) and a prompt-tuning one (not) on tiny:bert."""
    root = tmp_path_factory.mktemp("adapters")
    made = {}
    for method in ("lora", "prompt"):
        run_recipe({"model": "tiny:bert", "max_samples": 8, "steps": [
            {"step": "finetune", "method": method, "max_steps": 1, "max_length": 32}]},
            root / method)
        made[method] = root / method
    return made


def test_a_lora_adapter_is_merged_before_the_search(adapters, tmp_path):
    out = tmp_path / "a"
    result = _cli(adapters["lora"], "--max-samples", 24, "--seq-len", 16, "--knobs",
                  "layers,heads", "--trials", 3, "--sampler", "random", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert "search: merged the adapter" in result.stderr
    trials = _study(out).trials
    assert not [t for t in trials if "invalid" in t.user_attrs and "layers=2" not in
                t.user_attrs["point"]]  # the cuts apply to the merged model
    cut = [t for t in trials if t.state.name == "COMPLETE" and t.params != trials[0].params]
    assert cut and json.loads(result.stdout)["trials_completed"] == 3
    assert (out / "best" / "mmkit.json").is_file()
    # the unmodified point (no steps) too is exported as the trials measured it: merged
    job = SearchJob.model_validate_json((out / "search.json").read_text())
    plain = next(r for r in json.loads((out / "pareto.json").read_text())["evaluated"]
                 if not r["steps"])
    written = Path(results.export(plain, job, tmp_path / "unmodified"))
    assert (written / "config.json").is_file() and not (written / "adapter_config.json").exists()
    merged, adapter = (load_model(p, "text-classification") for p in (written, adapters["lora"]))
    batch = adapter.tokenizer(["a fine day", "not good at all"], return_tensors="pt",
                              padding=True)
    torch.testing.assert_close(merged.model(**batch).logits, adapter.model(**batch).logits,
                               rtol=1e-4, atol=1e-5)


def test_pick_exports_another_point_later_and_refuses_damaged_results(tmp_path):
    import shutil

    out = tmp_path / "p"
    assert _cli(*BASE, "--trials", "4", "--sampler", "random", "--export", "none",
                "-o", out).exit_code == 0
    evaluated = json.loads((out / "pareto.json").read_text())["evaluated"]
    budget = sorted(r["latency_ms"] for r in evaluated)[-1] + 1
    result = _cli("pick", out, "--latency-budget", f"{budget}ms", "--json")
    assert result.exit_code == 0, result.stderr
    picked = json.loads(result.stdout)
    assert picked["latency_ms"] <= budget and (out / f"pick-{budget:g}ms" / "mmkit.json").is_file()
    assert _cli("pick", out, "--latency-budget", "0.0001ms").exit_code == 1
    (tmp_path / "empty").mkdir()
    damaged = {
        "no search.json": ("search.json", None, "search.json is missing"),
        "truncated search.json": ("search.json", '{"settings": {"mod', "not valid JSON"),
        "search.json a list": ("search.json", "[1, 2]", "not a file a search wrote"),
        "truncated pareto.json": ("pareto.json", '{"objectives": ["acc', "not valid JSON"),
        "pareto.json not text": ("pareto.json", b"\xff\xfe\x00", "Cannot read"),
        "pareto.json rows": ("pareto.json", json.dumps({
            "objectives": ["accuracy", "latency"], "front": [],
            "evaluated": [{"trial": 1, "values": {"accuracy": "high"}}]}),
            "not a file a search wrote"),
    }
    for name, (file, content, needle) in damaged.items():
        copy = tmp_path / name.replace(" ", "-")
        shutil.copytree(out, copy, ignore=shutil.ignore_patterns("pick-*"))
        if content is None:
            (copy / file).unlink()
        elif isinstance(content, bytes):
            (copy / file).write_bytes(content)
        else:
            (copy / file).write_text(content)
        result = _cli("pick", copy, "--latency-budget", "1000ms")
        assert result.exit_code == 2, f"{name}: {result.exit_code} {result.stderr}"
        assert needle in result.stderr and file in result.stderr, f"{name}: {result.stderr}"
        assert "Traceback" not in result.stderr and not list(copy.glob("pick-*")), name
    missing = _cli("pick", tmp_path / "nothing", "--latency-budget", "1ms")
    assert missing.exit_code == 2 and "not a search folder" in missing.stderr


def _alias_bomb() -> str:
    """A 300-byte YAML file whose `layers` value prints as some 300 MB."""
    lines = ["knobs:", " layers:", " - 0", " - - &a [x,x,x,x,x,x,x,x,x]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"   - &{name} [{','.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + "\n"


def _listing(path):
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else None


def test_search_bad_input(adapters, tmp_path):
    import torch

    from mmkit.core.tiny import tiny_config

    files = {
        "bad.yaml": "knobs:\n  layers: [0, 1]\n  widths: [1, 2]\n",
        "value.yaml": "knobs:\n  heads: [0, 2]\n",
        "empty.yaml": "",
        "list.yaml": "- layers\n- heads\n",
        "deep.yaml": "knobs: " + "[" * 200_000 + "]" * 200_000 + "\n",
        "bomb.yaml": _alias_bomb(),
        "one.csv": "text,label\n" + "".join(f"t{i},pos\n" for i in range(12)),
        "labels.csv": "text,label\n" + "".join(f"t{i},{'abc'[i % 3]}\n" for i in range(12)),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert len(files["bomb.yaml"]) < 350
    (tmp_path / "latin1.yaml").write_bytes(b"knobs:\n  layers: [0, 1] # \xe9t\xe9\n")
    pickled = tmp_path / "pickled"
    tiny_config("bert").save_pretrained(pickled)
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    headed = tmp_path / "headed"  # a model whose head knows the classes a, b, c
    run_recipe({"model": "tiny:bert", "data": str(tmp_path / "labels.csv"), "steps": []}, headed)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    holder = tmp_path / "holder"  # a search folder someone put the data file into
    holder.mkdir()
    (holder / "search.json").write_text("{}")
    (holder / "one.csv").write_text(files["labels.csv"])
    cases = {
        "unknown knob": (["--knobs", "layers,depthwise"], "Unknown knob 'depthwise'"),
        "unknown sampler": (["--sampler", "annealing"], "Unknown sampler"),
        "space: unknown key": (["--space", tmp_path / "bad.yaml"], "line 3, knob 'widths'"),
        "space: bad value": (["--space", tmp_path / "value.yaml"], "line 2, knob 'heads'"),
        "space: empty": (["--space", tmp_path / "empty.yaml"], "must hold one mapping"),
        "space: a list": (["--space", tmp_path / "list.yaml"], "must hold one mapping"),
        "space: not UTF-8": (["--space", tmp_path / "latin1.yaml"], "not UTF-8"),
        "space: too deep": (["--space", tmp_path / "deep.yaml"], "too deeply"),
        "space: alias bomb": (["--space", tmp_path / "bomb.yaml"], "is not a whole number"),
        "space: missing": (["--space", tmp_path / "nope.yaml"], "Cannot read the space file"),
        "storage": (["--storage", "nosuchdb://x/y"], "cannot be opened"),
        "objective": (["--objectives", "perplexity,latency"], "cannot be measured"),
        "budget": (["--latency-budget", "fast"], "cannot be parsed"),
        "budget nan": (["--latency-budget", "nan"], "cannot be parsed"),
        "budget inf": (["--latency-budget", "inf"], "cannot be parsed"),
        "budget 0": (["--latency-budget", "0"], "cannot be parsed"),
        "budget negative": (["--latency-budget", "-5ms"], "cannot be parsed"),
        "budget overflows": (["--latency-budget", "9" * 400 + "s"], "cannot be parsed"),
        "timeout nan": (["--timeout", "nan"], "cannot be parsed"),
        "too many workers": (["--workers", 4 * os.cpu_count() + 1], "more than this machine"),
        "data missing": (["--data", tmp_path / "nope.csv"], "does not exist"),
        "one class": (["--data", tmp_path / "one.csv"], "at least two classes"),
    }
    model_cases = {  # (MODEL and options, needle, -o)
        "seq-len beyond positions": (["tiny:bert", "--seq-len", 4096], "128 positions",
                                     tmp_path / "out"),
        "pickle-only model": ([pickled], "--allow-pickle", tmp_path / "out"),
        "head cannot take the labels": ([headed, "--data", "tweets-sentiment"], "cannot take",
                                        tmp_path / "out"),
        "prompt adapter": ([adapters["prompt"]], "cannot be merged", tmp_path / "out"),
        "-o is a file": (["tiny:bert"], "is a file", tmp_path / "a-file"),
        "-o is another folder": (["tiny:bert"], "holds no search", tmp_path / "other"),
        "--overwrite another folder": (["tiny:bert", "--overwrite"], "deletes only search",
                                       tmp_path / "other"),
        "-o under a file": (["tiny:bert"], "not a writable folder", tmp_path / "a-file" / "s"),
        "-o under /proc": (["tiny:bert"], "Cannot create the folder",
                           Path(f"/proc/mmkit-{os.getpid()}/s")),
        "-o inside the model": ([headed, "--data", tmp_path / "labels.csv"], "lies inside the "
                                "model folder", headed / "search"),
        "-o holds the data": (["tiny:bert", "--data", holder / "one.csv"], "contains the data",
                              holder),
    }
    runs = {name: ([*BASE, *args], needle, tmp_path / "out") for name, (args, needle) in
            cases.items()}
    runs.update({name: ([*args, "--max-samples", 24] + (["--seq-len", 16] if "--seq-len" not in
                                                        args else []), needle, out)
                 for name, (args, needle, out) in model_cases.items()})
    for name, (args, needle, out) in runs.items():
        before = _listing(out)
        result = _cli(*args, "--trials", 2, "--export", "none", "-o", out)
        assert result.exit_code == 2, f"{name}: {result.exit_code} {result.stderr}"
        assert needle in result.stderr, f"{name}: {result.stderr}"
        assert "Traceback" not in result.stderr and len(result.stderr) < 3000, name
        assert _listing(out) == before and not (tmp_path / "out").exists(), name
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_a_study_is_resumed_only_by_its_own_settings(tmp_path):
    import optuna

    good = tmp_path / "good"
    assert _cli(*BASE, "--trials", "2", "--sampler", "random", "--export", "none",
                "-o", good).exit_code == 0
    before = len(_study(good).trials)
    other = _cli(*BASE, "--trials", "2", "--knobs", "layers", "--export", "none", "-o", good)
    assert other.exit_code == 2 and "other settings" in other.stderr
    assert len(_study(good).trials) == before
    # a study that never finished a trial (an older mmkit left it after a failed check)
    empty = tmp_path / "empty"
    empty.mkdir()
    study = optuna.create_study(study_name="mmkit-search", storage=f"sqlite:///{empty}/study.db",
                                directions=["maximize"])
    study.set_user_attr("settings", {"model": "tiny:bert", "data": "nope.csv"})
    result = _cli(*BASE, "--trials", "1", "--export", "none", "-o", empty)
    assert result.exit_code == 0, result.stderr
    assert "are replaced by this command's" in result.stderr
    assert len(_completed_points(empty)) == 1
