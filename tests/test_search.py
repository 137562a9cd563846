"""search: an end-to-end search on a tiny model, the budget, resume after a kill, two workers,
the Pareto front against brute force, determinism, pick, and bad input."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

from click.testing import CliRunner

from mmkit.cli.main import cli

BASE = ["tiny:bert", "--max-samples", "24", "--seq-len", "16"]


def _cli(*args):
    return CliRunner().invoke(cli, ["search", *[str(a) for a in args]])


def _trials_in(db, state):
    try:
        with sqlite3.connect(db) as con:
            return con.execute("select number from trials where state = ?", (state,)).fetchall()
    except sqlite3.OperationalError:  # the tables are not created yet
        return []


def _study(out):
    import optuna

    return optuna.load_study(study_name="mmkit-search", storage=f"sqlite:///{out}/study.db")


def test_search_end_to_end_respects_the_budget_and_exports(tmp_path):
    out = tmp_path / "s"
    result = _cli(*BASE, "--trials", "5", "--sampler", "random", "--latency-budget", "1000ms",
                  "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["trials_completed"] == 5
    summary = json.loads((out / "pareto.json").read_text())
    first = _study(out).trials[0]
    assert first.params == {"layers": 0, "heads": 0.0, "ffn": 0.0, "quant": "none"}  # trial 0
    assert all(r["latency_ms"] <= 1000 for r in summary["front"])
    for name in ("pareto.csv", "pareto.png", "pareto.html"):
        assert (out / name).stat().st_size > 0
    best = json.loads((out / "best" / "mmkit.json").read_text())
    assert [s["method"] for s in best["steps"]] == [s["method"] for s in row["best"]["steps"]]
    # a budget no candidate meets: exit 1, naming the fastest point, without evaluations
    tight = _cli(*BASE, "--trials", "3", "--sampler", "random", "--latency-budget", "0.001ms",
                 "-o", tmp_path / "t")
    assert tight.exit_code == 1 and "fastest point" in tight.stderr
    trials = _study(tmp_path / "t").trials
    assert all(t.user_attrs["evaluated"] is False for t in trials)
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


def _search_process(out, trials, *extra):
    env = {**os.environ, "MMKIT_SEARCH_GRACE": "3", "MMKIT_SEARCH_HEARTBEAT": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mmkit.cli.main", "search", *BASE,
                             "--trials", str(trials), "--sampler", "random", "--export", "none",
                             "-o", str(out), *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def test_resume_after_the_search_is_killed_mid_trial(tmp_path):
    out = tmp_path / "r"
    proc = _search_process(out, 6)
    deadline = time.time() + 240
    db = out / "study.db"
    while time.time() < deadline and not (len(_trials_in(db, "COMPLETE")) >= 2
                                          and _trials_in(db, "RUNNING")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # inside a trial
    proc.wait()
    before = {t.number: t.values for t in _study(out).trials if t.values}
    assert len(before) >= 2
    time.sleep(4)  # the cut-off trial's heartbeat goes stale
    again = _search_process(out, 6)
    assert again.wait(timeout=300) == 0, again.stderr.read().decode()[-2000:]
    trials = _study(out).trials
    done = {t.number: t.values for t in trials if t.values}
    assert len(done) == 6 and all(done[n] == v for n, v in before.items())  # none lost
    assert len({t.number for t in trials}) == len(trials)  # none duplicated
    cut = [t for t in trials if t.state.name == "FAIL"]
    assert cut, "the trial that was cut off is marked failed"
    retried = [t for t in trials if t.system_attrs.get("failed_trial") in {c.number for c in cut}]
    assert retried and retried[0].params == cut[0].params  # and retried with its parameters


def test_two_workers_share_one_sqlite_study(tmp_path):
    out = tmp_path / "w"
    proc = _search_process(out, 10, "--workers", "2")
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    trials = [t for t in _study(out).trials if t.values]
    assert len(trials) >= 10
    assert len({t.user_attrs["worker_pid"] for t in trials}) == 2


def test_pick_exports_another_point_later(tmp_path):
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


def test_search_bad_input(tmp_path):
    bad_space = tmp_path / "bad.yaml"
    bad_space.write_text("knobs:\n  layers: [0, 1]\n  widths: [1, 2]\n")
    bad_value = tmp_path / "value.yaml"
    bad_value.write_text("knobs:\n  heads: [0, 2]\n")
    cases = {
        "unknown knob": (["--knobs", "layers,depthwise"], "Unknown knob 'depthwise'"),
        "unknown sampler": (["--sampler", "annealing"], "Unknown sampler"),
        "space: unknown key": (["--space", bad_space], "line 3, knob 'widths'"),
        "space: bad value": (["--space", bad_value], "line 2, knob 'heads'"),
        "storage": (["--storage", "nosuchdb://x/y"], "cannot be opened"),
        "objective": (["--objectives", "perplexity,latency"], "cannot be measured"),
        "budget": (["--latency-budget", "fast"], "cannot be parsed"),
    }
    for name, (args, needle) in cases.items():
        result = _cli(*BASE, *args, "-o", tmp_path / "out")
        assert result.exit_code == 2, f"{name}: {result.exit_code} {result.stderr}"
        assert needle in result.stderr, f"{name}: {result.stderr}"
        assert not (tmp_path / "out").exists(), name
    # a settled study is not corrupted by a different command pointed at it
    good = tmp_path / "good"
    assert _cli(*BASE, "--trials", "2", "--sampler", "random", "--export", "none",
                "-o", good).exit_code == 0
    before = len(_study(good).trials)
    other = _cli(*BASE, "--trials", "2", "--knobs", "layers", "--export", "none", "-o", good)
    assert other.exit_code == 2 and "other settings" in other.stderr
    assert len(_study(good).trials) == before
