"""The step cache of `mmkit run`: reruns skip finished steps and give the same model, a
changed step, data file or version misses, a kill -9 resumes at the first unfinished step,
concurrent runs share it, and `mmkit cache` reports and clears it."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import read_manifest, run_cli
from safetensors.torch import load_file

from mmkit.core import run_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPE = """model: tiny:bert
data: {data}
max_samples: 32
steps:
  - {{step: finetune, method: lora, max_steps: 2, max_length: 32, merge: true}}
  - {{step: prune, method: magnitude, sparsity: 0.5}}
  - {{step: quantize, method: rtn, bits: {bits}}}
eval: {{split: test}}
"""


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test its own step cache."""
    monkeypatch.setenv(run_cache.CACHE_ENV, str(tmp_path / "cache"))


def _recipe(tmp_path, bits=4, data="tweets-sentiment", name="r.yaml"):
    path = tmp_path / name
    path.write_text(RECIPE.format(bits=bits, data=data))
    return path


def _weights(folder) -> dict:
    found = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        found.update(load_file(f))
    return found


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _run(*args):
    result = run_cli("run", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def _cached(result) -> list[bool]:
    return [bool(s.get("cached")) for s in result["steps"]]


def test_a_rerun_skips_every_step_and_writes_the_same_model(tmp_path):
    first, _ = _run(_recipe(tmp_path), "-o", tmp_path / "a")
    assert _cached(first) == [False, False, False]
    assert run_cache.usage()["entries"] == 3  # one result per step
    again, err = _run(_recipe(tmp_path), "-o", tmp_path / "b")
    assert _cached(again) == [True, True, True] and "steps 1-3 cached" in err
    assert "step finetune:lora" not in err  # nothing trained
    assert _same_weights(tmp_path / "a", tmp_path / "b")
    scores = [{k: m[k] for k in ("accuracy", "macro_f1")} for m in (first, again)
              for m in m["metrics"]]
    assert scores[0] == scores[1]
    manifest = read_manifest(tmp_path / "b")
    assert manifest["parent"]["ref"] == "tiny:bert"  # the model, not the cache entry
    assert [s["step"] for s in manifest["steps"]] == ["finetune", "prune", "quantize"]


def test_a_changed_step_reruns_from_there_and_equals_a_run_without_the_cache(tmp_path):
    _run(_recipe(tmp_path), "-o", tmp_path / "a")
    changed, err = _run(_recipe(tmp_path, bits=8), "-o", tmp_path / "b")
    assert _cached(changed) == [True, True, False] and "steps 1-2 cached" in err
    plain, _ = _run(_recipe(tmp_path, bits=8), "-o", tmp_path / "c", "--no-cache")
    assert _cached(plain) == [False, False, False]
    assert _same_weights(tmp_path / "b", tmp_path / "c")  # resuming computes the same model
    assert not _same_weights(tmp_path / "a", tmp_path / "b")  # ... and a different one


def test_no_cache_neither_reads_nor_writes_it(tmp_path):
    _run(_recipe(tmp_path), "-o", tmp_path / "a", "--no-cache")
    assert run_cache.usage()["entries"] == 0


def test_the_key_follows_the_data_content_the_model_and_the_version(tmp_path, text_csv,
                                                                    monkeypatch):
    data = tmp_path / "data.csv"
    data.write_text(text_csv.read_text())
    first, _ = _run(_recipe(tmp_path, data=data), "-o", tmp_path / "a")
    assert _cached(first) == [False] * 3
    data.write_text(text_csv.read_text().replace("great", "fine"))  # same path, new content
    edited, _ = _run(_recipe(tmp_path, data=data), "-o", tmp_path / "b")
    assert _cached(edited) == [False] * 3
    other, _ = _run(_recipe(tmp_path, data=data), "-o", tmp_path / "c", "--model", "tiny:gpt2")
    assert _cached(other) == [False] * 3 and other["model"] == "tiny:gpt2"
    from mmkit.core import versions

    real = versions._versions
    monkeypatch.setattr(versions, "_versions", lambda: {**real(), "mmkit": "0.0.0-other"})
    newer, _ = _run(_recipe(tmp_path, data=data), "-o", tmp_path / "d")
    assert _cached(newer) == [False] * 3


def test_a_damaged_entry_is_run_again(tmp_path):
    _run(_recipe(tmp_path), "-o", tmp_path / "a")
    root = Path(run_cache.usage()["path"])
    for entry in root.iterdir():  # every weights file truncated
        for f in entry.glob("*.safetensors"):
            f.write_bytes(f.read_bytes()[:100])
    again, err = _run(_recipe(tmp_path), "-o", tmp_path / "b")
    assert "cannot be loaded" in err and _cached(again) == [False] * 3
    assert _same_weights(tmp_path / "a", tmp_path / "b")
    third, err = _run(_recipe(tmp_path), "-o", tmp_path / "c")  # the damaged entry was replaced
    assert "cannot be loaded" not in err and _cached(third) == [True] * 3


SLOW = """model: tiny:bert
data: tweets-sentiment
max_samples: 64
steps:
  - {step: finetune, method: lora, max_steps: 2, max_length: 32, merge: true}
  - {step: finetune, method: full, max_steps: 400, max_length: 32, batch_size: 4}
"""


def _mmkit(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "mmkit.cli.main", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_run_killed_mid_step_resumes_at_its_first_unfinished_step(tmp_path):
    recipe = tmp_path / "slow.yaml"
    recipe.write_text(SLOW)
    proc = _mmkit("run", recipe, "-o", tmp_path / "a")
    deadline = time.monotonic() + 300
    try:  # kill -9 once step 1 is in the cache, while step 2 trains
        while run_cache.usage()["entries"] < 1:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "a").exists() and run_cache.usage()["entries"] == 1
    again, err = _run(recipe, "-o", tmp_path / "a")
    assert "step 1 cached" in err and _cached(again) == [True, False]
    plain, _ = _run(recipe, "-o", tmp_path / "b", "--no-cache")
    assert _same_weights(tmp_path / "a", tmp_path / "b")


def test_two_runs_at_once_share_the_cache(tmp_path):
    recipe = _recipe(tmp_path)
    procs = [_mmkit("run", recipe, "-o", tmp_path / name, "--json") for name in "ab"]
    results = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert _same_weights(tmp_path / "a", tmp_path / "b")
    assert run_cache.usage()["entries"] == 3
    assert all(len(r["steps"]) == 3 for r in results)


def test_cache_info_and_clear(tmp_path):
    _run(_recipe(tmp_path), "-o", tmp_path / "a")
    info = json.loads(run_cli("cache", "info", "--json").stdout)
    assert info["entries"] == 3 and info["bytes"] > 0
    root = Path(info["path"])
    # what the cache did not make (MMKIT_RUN_CACHE pointed at a folder in use) is never
    # counted or removed
    (root / "thesis").mkdir()
    (root / "thesis" / "draft.txt").write_text("months of work")
    (root / "notes.txt").write_text("x")
    assert json.loads(run_cli("cache", "info", "--json").stdout) == info
    held = sorted(p for p in root.iterdir() if p.is_dir())[0]
    leftover = root / f".{held.name}.mmkit-tmp-abcdefgh"  # what a killed writer leaves
    leftover.mkdir()
    # another process is writing one entry: its lock is held
    with open(root / f".{held.name}.mmkit-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = run_cli("cache", "clear", "--json")
    assert result.exit_code == 0, result.stderr
    cleared = json.loads(result.stdout)
    assert cleared["removed"] == 2 and cleared["busy"] == 1 and cleared["freed_bytes"] > 0
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(
        [held.name, leftover.name, "thesis"])
    cleared = json.loads(run_cli("cache", "clear", "--json").stdout)
    assert cleared["removed"] == 1 and run_cache.usage() == {**info, "entries": 0, "bytes": 0}
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "thesis"]
    assert (root / "thesis" / "draft.txt").read_text() == "months of work"
    human = run_cli("cache", "info")
    assert human.exit_code == 0 and "0 step result(s)" in human.stdout
