"""The command line: through click's CliRunner, and as real subprocesses."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mmkit.cli.main import cli
from mmkit.cli.reference import readme_reference, reference_markdown

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def invoke(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def json_lines(result):
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


@pytest.fixture()
def recipe_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: tiny:bert\nmax_samples: 8\nsteps:\n  - step: cast\n    dtype: fp16\n"
                    "eval: {split: test}\n")
    return path


# ---------------------------------------------------------------- docs and start-up
def test_help_does_not_import_torch():
    code = ("import sys; from mmkit.cli.main import cli\n"
            "try: cli(['--help'])\nexcept SystemExit: pass\n"
            "print('HEAVY' if {'torch', 'transformers'} & set(sys.modules) else 'LIGHT')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert out.stdout.strip().endswith("LIGHT")


def test_readme_reference_matches_help():
    readme = (ROOT / "README.md").read_text()
    assert readme_reference(readme) == reference_markdown(), \
        "README is out of date: run `python -m mmkit.cli.reference README.md`"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line)
    assert command in (ROOT / "README.md").read_text()


# ---------------------------------------------------------------- commands
def test_eval_json_on_tiny_vit():
    result = invoke("eval", "tiny:vit", "--max-samples", 12, "--json")
    assert result.exit_code == 0, result.stderr
    [row] = json_lines(result)
    assert row["task"] == "image-classification" and row["examples"] == 12 and row["fresh_head"]
    assert "new one was created" in result.stderr  # the warning goes to stderr, not stdout


def test_eval_human_output_for_causal_lm():
    result = invoke("eval", "tiny:gpt2", "--max-samples", 2, "--max-length", 32)
    assert result.exit_code == 0, result.stderr
    assert "perplexity" in result.stdout and result.stdout.count("\n") == 1


def test_eval_user_csv_with_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("body,y\n" + "\n".join(f"text {i},{i % 2}" for i in range(20)))
    result = invoke("eval", "tiny:bert", "--data", path, "--text-column", "body",
                    "--label-column", "y", "--split", "train", "--json")
    assert result.exit_code == 0, result.stderr
    assert json_lines(result)[0]["examples"] == 16


def test_bench_several_batch_sizes():
    result = invoke("bench", "tiny:llama", "--batch-size", 1, "--batch-size", 4, "--seq-len", 16,
                    "--repeats", 3, "--json")
    assert result.exit_code == 0, result.stderr
    rows = json_lines(result)
    assert [r["batch_size"] for r in rows] == [1, 4]
    assert all(r["latency_ms"]["median"] > 0 and r["environment"]["versions"]["torch"] for r in rows)


def test_inspect_human_and_json():
    human = invoke("inspect", "tiny:clip")
    assert human.exit_code == 0 and "kind clip" in human.stdout and "q_proj" in human.stdout
    [row] = json_lines(invoke("inspect", "tiny:gpt2", "--json"))
    assert row["family"] == "gpt2" and row["linear_layers"][0]["type"] == "Conv1D"
    assert "cast:dtype" in row["methods"]


def test_run_then_chain_through_stdin(recipe_file, tmp_path):
    out = tmp_path / "out"
    result = invoke("run", recipe_file, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    [row] = json_lines(result)
    assert row["artifact"] == str(out) and row["metrics"][0]["examples"] == 8
    chained = invoke("eval", "-", "--max-samples", 8, "--json", input=result.stdout)
    assert chained.exit_code == 0, chained.stderr
    assert json_lines(chained)[0]["accuracy"] == row["metrics"][0]["accuracy"]
    plain = invoke("inspect", "-", input=f"{out}\n\n")
    assert plain.exit_code == 0 and "made from tiny:bert by cast:dtype" in plain.stdout
    human = invoke("run", recipe_file, "-o", tmp_path / "again")  # its human lines pipe too
    assert human.exit_code == 0 and "\n  test: accuracy" in human.stdout
    piped = invoke("eval", "-", "--max-samples", 8, "--json", input=human.stdout)
    assert piped.exit_code == 0, piped.stderr
    assert json_lines(piped)[0]["accuracy"] == row["metrics"][0]["accuracy"]


# ---------------------------------------------------------------- bad input: exit 2, no output
def _bad_inputs(tmp, artifact):
    (tmp / "empty.csv").write_text("text,label\n")
    (tmp / "nocols.csv").write_text("a,b\n1,2\n")
    (tmp / "step.yaml").write_text("model: tiny:bert\nsteps:\n  - step: distill\n")
    (tmp / "key.yaml").write_text("model: tiny:bert\nsteps:\n  - step: cast\n    dtpye: fp16\n")
    (tmp / "ok.yaml").write_text("model: tiny:gpt2\nsteps: []\n")
    (tmp / "exists").mkdir()
    (tmp / "a-file").write_text("x")
    (tmp / "noconfig").mkdir()
    broken = tmp / "broken"
    shutil.copytree(artifact, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:100])
    return {
        "missing model": (["inspect", "./no/such/model"], "does not exist"),
        "offline hub id": (["inspect", "someone/unknown-model"], "cannot be reached"),
        "folder without config": (["inspect", tmp / "noconfig"], "no config.json"),
        "truncated weights": (["eval", broken], "truncated or corrupted"),
        "missing data": (["eval", "tiny:bert", "--data", tmp / "none.csv"], "does not exist"),
        "empty data": (["eval", "tiny:bert", "--data", tmp / "empty.csv"], "empty"),
        "missing columns": (["eval", "tiny:bert", "--data", tmp / "nocols.csv"], "--text-column"),
        "labels head cannot take": (["eval", artifact, "--data", "bbc-news"], "cannot take"),
        "unknown task": (["eval", "tiny:bert", "--task", "translation"], "translation"),
        "unknown dataset": (["eval", "tiny:bert", "--data", "imagenet-21k"], "bundled"),
        "unknown recipe step": (["run", tmp / "step.yaml", "-o", tmp / "o1"], "distill"),
        "unknown recipe key": (["run", tmp / "key.yaml", "-o", tmp / "o2"], "dtpye"),
        "output exists": (["run", tmp / "ok.yaml", "-o", tmp / "exists"], "--overwrite"),
        "output unwritable": (["run", tmp / "ok.yaml", "-o", tmp / "a-file" / "o"], "writable"),
        "batch size 0": (["bench", "tiny:bert", "--batch-size", "0"], "batch-size"),
        "eval batch size 0": (["eval", "tiny:bert", "--batch-size", "0"], "batch-size"),
        "seq len 0": (["bench", "tiny:bert", "--seq-len", "0"], "seq-len"),
        "max samples 0": (["eval", "tiny:bert", "--max-samples", "0"], "max-samples"),
        "empty stdin": (["eval", "-"], "stdin"),
        "task misfit": (["eval", "tiny:vit", "--task", "causal-lm"], "does not fit"),
    }


def test_every_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path, tiny_artifacts):
    cases = _bad_inputs(tmp_path, tiny_artifacts["tiny:bert"])
    before = sorted(p.name for p in tmp_path.iterdir())
    for name, (args, needle) in cases.items():
        result = invoke(*args, input="")
        assert result.exit_code == 2, f"{name}: exit {result.exit_code}\n{result.stderr}"
        assert needle in result.stderr, f"{name}: {result.stderr}"
        assert "Traceback" not in result.stderr and result.stdout == "", name
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temp dirs
    assert sorted(p.name for p in (tmp_path / "exists").iterdir()) == []


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_bad_input():
    result = invoke("bench", "tiny:bert", "--device", "cuda")
    assert result.exit_code == 2 and "no CUDA" in result.stderr


# ---------------------------------------------------------------- real subprocesses
def test_real_pipeline_and_debug_traceback(recipe_file, tmp_path):
    out = tmp_path / "piped"
    shell = (f"mmkit run {recipe_file} -o {out} --json | mmkit bench - --json --repeats 2 "
             "--seq-len 8")
    proc = subprocess.run(shell, shell=True, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["model"] == str(out) and row["dtype"] == "float16"
    bad = subprocess.run(["mmkit", "inspect", "./nope"], capture_output=True, text=True, env=ENV)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    debug = subprocess.run(["mmkit", "--debug", "inspect", "./nope"], capture_output=True,
                           text=True, env=ENV)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "InputError" in debug.stderr


def test_interrupt_exits_130_and_leaves_nothing(tmp_path):
    recipe = tmp_path / "slow.yaml"
    recipe.write_text("model: tiny:llama\ndata: bbc-text\nsteps: []\neval: {split: train}\n")
    out = tmp_path / "out"
    # Ctrl-C as a terminal delivers it: a shell runs background jobs with SIGINT ignored,
    # and a child inherits that, so a test run started with `&` must not pass it on
    proc = subprocess.Popen(["mmkit", "run", recipe, "-o", out], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stderr:  # interrupt once the evaluation is under way
        if "evaluating" in line:
            break
    # Ctrl-C at once (the evaluation of a tiny model can end within a second), repeated: a
    # signal that lands inside a __del__ is ignored by Python by design
    while proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slow.yaml"]


@pytest.mark.parametrize("signal_error,code", [("Terminated", 143), ("KeyboardInterrupt", 130)])
def test_a_cleanup_failing_after_a_signal_still_exits_as_interrupted(signal_error, code):
    import click

    from mmkit.cli.main import MmkitGroup
    from mmkit.core import errors

    interruption = getattr(errors, signal_error, KeyboardInterrupt)

    @click.group(cls=MmkitGroup)
    def group():
        pass

    @group.command()
    def work():
        try:
            raise interruption()
        finally:  # e.g. a database session closed mid-commit
            raise RuntimeError("cannot close the session")

    @group.command()
    def fail():
        raise RuntimeError("a plain failure")

    result = CliRunner().invoke(group, ["work"])
    assert result.exit_code == code and "Interrupted" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    result = CliRunner().invoke(group, ["fail"])  # an error without a signal stays an error
    assert result.exit_code == 1 and "RuntimeError: a plain failure" in result.stderr


def test_progress_goes_to_stderr_only_and_quiet_silences_it(tmp_path):
    env = {**ENV, "MMKIT_PROGRESS": "1"}  # as on a terminal
    args = ["mmkit", "finetune", "tiny:bert", "--max-samples", "16", "--max-steps", "3",
            "--batch-size", "4", "--json", "-o"]
    shown = subprocess.run([*args, tmp_path / "a"], capture_output=True, text=True, env=env)
    assert shown.returncode == 0, shown.stderr
    json.loads(shown.stdout)  # stdout: the result alone
    assert "3/3" in shown.stderr and "evaluating" in shown.stderr  # training and scoring bars
    quiet = subprocess.run([*args, tmp_path / "b", "--quiet"], capture_output=True, text=True,
                           env=env)
    assert quiet.returncode == 0, quiet.stderr
    json.loads(quiet.stdout)
    assert "3/3" not in quiet.stderr and "loading" not in quiet.stderr
    piped = subprocess.run([*args, tmp_path / "c"], capture_output=True, text=True, env=ENV)
    assert "3/3" not in piped.stderr  # stderr is not a terminal: no bars


def test_an_interrupted_command_gives_ctrl_c_back_to_its_host_program(tmp_path, monkeypatch):
    """In-process (a notebook, a test run) an interrupted command exits 130 and leaves SIGINT
    and SIGTERM as it found them: it ignores them only while it reports the interruption (a
    host left ignoring Ctrl-C, and every child it starts, could not be stopped)."""
    import mmkit.core.recipe as recipe_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe_module, "run_recipe", interrupted)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny:bert\nsteps: []\n")
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 130, result.output
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
