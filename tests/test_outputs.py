"""Outputs: never an input, one writer at a time, replaced in one step, and whatever a killed
run leaves is cleaned up (or restored) by the next run; checkpoints belong to their run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import read_manifest, run_cli
from mmkit.core import outputs
from mmkit.core.errors import InputError
from mmkit.core.loading import load_model
from mmkit.core.recipe import run_recipe

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
CAST = {"model": "tiny:gpt2", "steps": [{"step": "cast", "dtype": "float32"}]}


def _valid(path) -> bool:
    """An artifact that loads with every file matching its manifest."""
    try:
        load_model(str(path))
        return True
    except InputError:
        return False


def _hidden(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- an output is never an input
def test_output_that_is_contains_or_lies_inside_the_model_is_refused(tmp_path, tiny_artifacts):
    model = tmp_path / "m"
    run_recipe(CAST, model)
    before = (model / "mmkit.json").read_text()
    for out, how in ((model, "is the model"), (tmp_path, "contains the model"),
                     (model / "sub", "lies inside the model")):
        result = run_cli("finetune", model, "--full", "--max-steps", "1", "-o", out, "--overwrite")
        assert result.exit_code == 2 and how in result.stderr, result.stderr
    assert (model / "mmkit.json").read_text() == before and not (model / "sub").exists()
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "\n".join(f"t {i},{i % 2}" for i in range(20)))
    result = run_cli("quantize", tiny_artifacts["tiny:bert"], "--bits", "8", "--data", data,
                  "--eval", "-o", data, "--overwrite")
    assert result.exit_code == 2 and "is the data" in result.stderr
    assert data.read_text().startswith("text,label")


def test_overwrite_replaces_only_what_mmkit_wrote(tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    result = run_cli("run", _recipe_file(tmp_path), "-o", mine, "--overwrite")
    assert result.exit_code == 2 and "did not write" in result.stderr
    assert (mine / "todo.txt").read_text() == "keep me"


def _recipe_file(tmp_path):
    path = tmp_path / "cast.yaml"
    path.write_text("model: tiny:gpt2\nsteps:\n  - step: cast\n    dtype: float32\n")
    return path


# ---------------------------------------------------------------- one writer at a time
def test_a_second_writer_fails_fast_naming_the_first(tmp_path):
    out = tmp_path / "o"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom mmkit.core.outputs import output_lock\n"
         f"with output_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        result = run_cli("run", _recipe_file(tmp_path), "-o", out)
        assert result.exit_code == 2 and time.monotonic() - start < 60
        assert "Another mmkit process" in result.stderr
        assert f"pid {holder.pid}" in result.stderr
    finally:
        holder.kill()  # kill -9: the lock dies with its holder
        holder.wait()
    assert run_cli("run", _recipe_file(tmp_path), "-o", out).exit_code == 0
    assert _hidden(tmp_path) == []  # the stale lock file is gone with the next holder


def test_two_real_processes_on_one_output_one_wins_one_is_told(tmp_path):
    recipe = tmp_path / "slow.yaml"  # long enough that the two runs overlap
    recipe.write_text("model: tiny:llama\ndata: bbc-text\nmax_samples: 64\nsteps: []\n"
                      "eval: {split: train, max_length: 256}\n")
    out = tmp_path / "o"
    procs = [subprocess.Popen(["mmkit", "run", recipe, "-o", out], env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "Another mmkit process" in loser or "already exists" in loser
    assert _valid(out) and _hidden(tmp_path) == []


# ---------------------------------------------------------------- killed runs
def _die_at(real, call: int, after: bool):
    """A stand-in for `real` (os.rename or outputs._exchange) that kills the process as kill -9
    would (no cleanup runs) at its `call`-th use on an output's hidden siblings, before or
    after doing it."""
    count = {"n": 0}

    def fake(a, b, *args, **kwargs):
        if ".mmkit-" not in f"{a}{b}":  # someone else's rename
            return real(a, b, *args, **kwargs)
        count["n"] += 1
        if count["n"] == call and not after:
            os._exit(9)
        result = real(a, b, *args, **kwargs)
        if count["n"] == call and after:
            os._exit(9)
        return result

    return fake


def _killed_write(out, overwrite, target, call, after, atomic=True):
    """Fork a child that writes an artifact to `out` and dies at the given point."""
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        try:
            import torch

            torch.set_num_threads(1)  # no OpenMP team in a forked child
            if not atomic:  # a file system that cannot swap two folders
                outputs._exchange = lambda a, b: False
            if target == "rename":
                os.rename = _die_at(os.rename, call, after)
            else:
                outputs._exchange = _die_at(outputs._exchange, call, after)
            run_recipe({**CAST, "seed": 7}, out, overwrite=overwrite)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


# every step of a replacement: (what dies, at which call, after doing it, atomic swap available)
KILL_POINTS = [
    ("exchange", 1, False, True),  # before the swap: OUT untouched, the new one half-made
    ("exchange", 1, True, True),  # after the swap: the new OUT in place, the old one beside it
    ("rename", 1, False, False),  # no atomic swap: before moving the old version aside
    ("rename", 1, True, False),  # ... after moving it aside, before the new one is in place
    ("rename", 2, True, False),  # ... the new one in place, the old one not yet removed
]


@pytest.mark.parametrize("target,call,after,atomic", KILL_POINTS)
def test_a_kill_at_any_point_of_a_replacement_leaves_a_valid_output(tmp_path, target, call,
                                                                    after, atomic):
    out = tmp_path / "o"
    run_recipe(CAST, out)
    assert _killed_write(out, True, target, call, after, atomic) == 9
    # OUT is the old or the new version, or (between two renames) restorable
    assert _valid(out) or not out.exists()
    result = run_cli("run", _recipe_file(tmp_path), "-o", out, "--overwrite")  # the next run
    assert result.exit_code == 0, result.stderr
    assert _valid(out) and _hidden(tmp_path) == [], _hidden(tmp_path)


def test_the_next_run_restores_an_output_moved_aside_and_says_so(tmp_path):
    out = tmp_path / "o"
    run_recipe(CAST, out)
    seed = read_manifest(out)["parent"]["seed"]
    assert _killed_write(out, True, "rename", 1, after=True, atomic=False) == 9
    assert not out.exists() and _hidden(tmp_path)  # moved aside, the new one not in place
    result = run_cli("run", _recipe_file(tmp_path), "-o", tmp_path / "other")  # another output
    assert result.exit_code == 0 and not out.exists()  # leaves it alone
    again = run_cli("eval", out, "--max-samples", "4")
    assert again.exit_code == 2 and "interrupted" in again.stderr  # points at the leftover
    with outputs.output_lock(out):  # any run on OUT restores it first
        pass
    assert _valid(out) and read_manifest(out)["parent"]["seed"] == seed
    assert _hidden(tmp_path) == []


def test_a_killed_fresh_write_leaves_nothing_the_next_run_keeps(tmp_path):
    out = tmp_path / "o"
    assert _killed_write(out, False, "rename", 1, after=False) == 9
    assert not out.exists() and _hidden(tmp_path)  # the unfinished folder and the lock file
    assert run_cli("run", _recipe_file(tmp_path), "-o", out).exit_code == 0
    assert _valid(out) and _hidden(tmp_path) == []


def test_sigterm_exits_143_and_leaves_nothing(tmp_path):
    recipe = tmp_path / "slow.yaml"
    recipe.write_text("model: tiny:llama\ndata: bbc-text\nsteps: []\neval: {split: train}\n")
    out = tmp_path / "out"
    proc = subprocess.Popen(["mmkit", "run", recipe, "-o", out], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    for line in proc.stderr:
        if "evaluating" in line:
            break
    while proc.poll() is None:  # a signal landing inside a __del__ is ignored: repeat it
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slow.yaml"]


def test_published_files_have_the_usual_modes(tmp_path):
    out = run_recipe(CAST, tmp_path / "o")["artifact"]
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(out).iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name
    assert Path(out).stat().st_mode & 0o777 == 0o777 & ~umask


# ---------------------------------------------------------------- checkpoints belong to a run
def test_commands_without_training_never_touch_a_checkpoint_folder(tmp_path):
    ckpt = tmp_path / "q.checkpoints"
    ckpt.mkdir()
    (ckpt / "precious.txt").write_text("not mmkit's")
    result = run_cli("quantize", "tiny:llama", "--bits", "8", "-o", tmp_path / "q")
    assert result.exit_code == 0, result.stderr
    assert (ckpt / "precious.txt").read_text() == "not mmkit's"


def test_training_refuses_checkpoint_folders_it_does_not_own(tmp_path):
    args = ["finetune", "tiny:bert", "--max-samples", "8", "--max-steps", "1"]
    foreign = tmp_path / "a.checkpoints"
    foreign.mkdir()
    (foreign / "x.txt").write_text("someone's")
    result = run_cli(*args, "-o", tmp_path / "a", "--overwrite")
    assert result.exit_code == 2 and "not an mmkit checkpoint folder" in result.stderr
    assert (foreign / "x.txt").exists() and not (tmp_path / "a").exists()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "y.txt").write_text("keep")
    (tmp_path / "b.checkpoints").symlink_to(target)
    result = run_cli(*args, "-o", tmp_path / "b")
    assert result.exit_code == 2 and "symbolic link" in result.stderr
    assert [p.name for p in target.iterdir()] == ["y.txt"]


def test_an_interrupted_runs_checkpoints_are_kept_until_resumed_or_overwritten(tmp_path):
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            if state.epoch >= 2:
                raise KeyboardInterrupt

    recipe = {"model": "tiny:bert", "max_samples": 16, "steps": [
        {"step": "finetune", "method": "lora", "epochs": 3, "batch_size": 8}]}
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, out, callbacks=[Stop()])
    with pytest.raises(InputError, match="--resume to continue"):  # not silently discarded
        run_recipe(recipe, out)
    other = {**recipe, "seed": 3}
    with pytest.raises(InputError, match="other settings"):
        run_recipe(other, out)
    run_recipe(other, out, overwrite=True)  # discarded on request
    assert _valid(out) and not (tmp_path / "o.checkpoints").exists()


def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            if state.epoch >= 3:
                raise KeyboardInterrupt

    recipe = {"model": "tiny:bert", "max_samples": 16, "steps": [
        {"step": "finetune", "method": "lora", "epochs": 4, "batch_size": 8}]}
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, out, callbacks=[Stop()])
    step = tmp_path / "o.checkpoints" / "step-1"
    saved = sorted(step.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    newest = saved[-1]
    state = newest / "trainer_state.json"
    state.write_text(state.read_text()[:40])  # killed while writing its last file
    torn = step / "checkpoint-99"  # and a later one barely begun
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"\0" * 10)
    result = run_recipe(recipe, out, resume=True)
    assert result["steps"][0]["report"]["resumed_from"] == str(saved[-2])
    assert _valid(out) and not (tmp_path / "o.checkpoints").exists()


def test_pid_and_command_are_in_the_lock(tmp_path):
    out = tmp_path / "o"
    with outputs.output_lock(out):
        info = json.loads((tmp_path / ".o.mmkit-lock").read_text())
        assert info["pid"] == os.getpid() and Path(sys.argv[0]).name in info["command"]
