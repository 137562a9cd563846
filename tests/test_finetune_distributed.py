"""finetune as several processes: `accelerate launch` on CPU (gloo), checked against one process.

Two processes with 4 examples each per step see, step by step, the same two batches as one
process with 4 examples and 2 batches accumulated (the Trainer's sampler gives every process
the same order, and accelerate deals the batches out in turn), and DDP averages the two
gradients as accumulation does: the weights must agree. Only the main process may write.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmkit.core import distributed
from mmkit.core.errors import InputError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as the launched processes: 1 thread

# Same data, same order, gradients averaged the same way: the float32 results agreed exactly
# when measured (0.0). 1e-5 leaves room for another summation order (threads, gloo's reduction)
# over 4 AdamW steps; the weights move about 4e-3 (lr 1e-3 x 4 steps), 400 times more.
TOLERANCE = 1e-5
TRAIN = ["--full", "--batch-size", "4", "--epochs", "1", "--lr", "1e-3", "--scheduler",
         "constant", "--warmup", "0", "--weight-decay", "0", "--max-length", "32"]


# ---------------------------------------------------------------- which process, which device
def test_ranks_come_from_the_launchers_environment():
    torchrun = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}
    assert (distributed.world_size(torchrun), distributed.rank(torchrun),
            distributed.local_rank(torchrun)) == (4, 3, 1)
    assert distributed.active(torchrun) and not distributed.is_main(torchrun)
    open_mpi = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0",
                "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    assert distributed.active(open_mpi) and distributed.is_main(open_mpi)
    for alone in ({}, {"WORLD_SIZE": "1", "RANK": "0"}, {"RANK": "5"}):  # no launch: main
        assert not distributed.active(alone) and distributed.is_main(alone)
        assert distributed.rank(alone) == 0


def test_each_process_uses_the_gpu_of_its_local_rank():
    second = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}
    assert distributed.process_device("cuda", second) == "cuda:1"  # QLoRA's device_map {"": 1}
    assert distributed.process_device("cuda:1", second) == "cuda:1"
    assert distributed.process_device("cpu", second) == "cpu"
    with pytest.raises(InputError, match="each trains on the GPU of its local rank"):
        distributed.process_device("cuda:0", second)  # every copy on GPU 0: refused
    for device in ("cuda", "cuda:3", "cpu"):  # one process: as asked
        assert distributed.process_device(device, {}) == device


def test_a_recipe_that_does_not_train_is_refused_under_a_launch(monkeypatch):
    distributed.check_trains(False)  # one process: anything runs
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    distributed.check_trains(True)
    with pytest.raises(InputError, match="only fine-tuning is spread over processes"):
        distributed.check_trains(False)


def _hand_over(rank: int, init: str, folder: str) -> None:
    """One of two gloo processes: from_main once with a main process that succeeds, once with
    one that fails; what each process got is written to folder/RANK.json."""
    import torch.distributed as dist

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    got = []
    for fail in (False, True):
        def make():
            if fail:
                raise InputError("the data is wrong")
            return {"artifact": "out", "written_by": rank}
        try:
            got.append(distributed.from_main(make))
        except InputError as exc:
            got.append({"error": str(exc)})
    dist.destroy_process_group()
    Path(folder, f"{rank}.json").write_text(json.dumps(got))


def test_the_other_processes_take_the_main_ones_result_or_failure(tmp_path):
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [spawn.Process(target=_hand_over, args=(r, init, str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung and all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    main, other = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert main[0] == other[0] == {"artifact": "out", "written_by": 0}  # made once, by rank 0
    assert main[1] == {"error": "the data is wrong"}
    assert other[1]["error"].startswith("The main process (rank 0) failed")
    assert other[1]["error"].endswith("the data is wrong")


# ---------------------------------------------------------------- real launches
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A tiny BERT without dropout (so that the runs can agree) and 40 labelled texts."""
    from transformers import BertConfig, BertModel

    from mmkit.core.tiny import byte_tokenizer

    root = tmp_path_factory.mktemp("distributed")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=260, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
                        pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(root / "model")
    byte_tokenizer("bert").save_pretrained(root / "model")
    rows = ["text,label"] + [f"\"a fine good day {i}\",pos" if i % 2 else
                             f"\"an awful bad day number {i}\",neg" for i in range(40)]
    (root / "data.csv").write_text("\n".join(rows) + "\n")  # 32 train, 4 validation, 4 test
    return {"model": root / "model", "data": root / "data.csv", "root": root}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, tmp_path, timeout=240) -> subprocess.CompletedProcess:
    """`accelerate launch` of `mmkit finetune ARGS` as 2 processes on CPU. accelerate's --cpu
    starts one process unless MPI is set up; --multi_gpu starts them through torchrun, and
    mmkit's --device cpu (the default) keeps them on the CPU, where the Trainer uses gloo."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MMKIT_PROGRESS": "0",
           "HF_HOME": str(tmp_path / "hf")}  # no user accelerate config
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "mmkit.cli.main", "finetune", *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the processes it started
        out, err = proc.communicate()
        pytest.fail(f"the launch hung (over {timeout} s):\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _exit_codes(stderr: str) -> tuple[dict[int, int], int]:
    """From torchrun's failure summary: {rank: exit code} and the rank of the root cause."""
    codes = {int(r): int(c) for r, c in
             re.findall(r"rank\s*:\s*(\d+) \(local_rank.*?\n\s*exitcode\s*:\s*(-?\d+)", stderr)}
    root = re.search(r"Root Cause.*?rank\s*:\s*(\d+)", stderr, re.S)
    assert codes and root, f"no failure summary:\n{stderr[-3000:]}"
    return codes, int(root.group(1))


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_two_processes_train_as_one_and_only_the_main_one_writes(base, tmp_path):
    from mmkit.core.recipe import run_recipe

    one, two = tmp_path / "one", tmp_path / "two"
    params = {"epochs": 1, "batch_size": 4, "lr": 1e-3, "scheduler": "constant", "warmup": 0,
              "weight_decay": 0, "max_length": 32}
    ref = run_recipe({"model": str(base["model"]), "data": str(base["data"]),
                      "steps": [{"step": "finetune", "method": "full", "grad_accum": 2,
                                 **params}], "eval": {}}, one)
    done = _launch([base["model"], "--data", base["data"], *TRAIN, "--json", "-o", two],
                   tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout  # one result, from the main process
    result = json.loads(lines[0])
    assert result["artifact"] == str(two)
    # one artifact, nothing else beside it: no second copy, no lock, staging or checkpoints
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "hf") == ["one", "two"]
    assert done.stderr.count("writing ") == 1  # the other process logs its warnings only

    report, ref_report = result["steps"][0]["report"], ref["steps"][0]["report"]
    assert report["steps"] == ref_report["steps"] == 4  # 32 examples, 8 a step either way
    a, b, start = _weights(one), _weights(two), _weights(base["model"])
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[f"bert.{k}"] - start[k]).abs().max().item() for k in start)
    assert diff <= TOLERANCE, f"2 processes vs 1: weights differ by {diff:.3g}"
    assert moved > 100 * TOLERANCE, f"training moved the weights by only {moved:.3g}"
    assert report["train_loss"] == pytest.approx(ref_report["train_loss"], abs=1e-5)
    assert result["metrics"][0]["accuracy"] == ref["metrics"][0]["accuracy"]


def test_bad_input_under_a_launch_exits_2(base, tmp_path):
    out = tmp_path / "bad"
    done = _launch([base["model"], "--data", base["data"], "--full", "--lr", "-1", "-o", out],
                   tmp_path, timeout=120)
    assert done.returncode != 0 and done.stdout == ""
    assert "Invalid value for '--lr'" in done.stderr and "Traceback" not in done.stderr
    codes, first = _exit_codes(done.stderr)
    # both processes refuse it, but the launcher stops the other one when the first fails:
    # it may end by SIGTERM first (143 once mmkit handles the signal, -15 while importing)
    assert codes[first] == 2 and set(codes.values()) <= {2, 143, -15}, codes
    assert not out.exists()


def test_a_failure_of_the_main_process_alone_ends_the_launch(base, tmp_path):
    """OUT locked by another writer: only the main process takes the lock, so it fails (exit
    2) while the other goes on to wait for it in training; the launcher must end that one
    instead of leaving it hanging."""
    from mmkit.core.outputs import output_lock

    out = tmp_path / "locked"
    with output_lock(out):
        done = _launch([base["model"], "--data", base["data"], *TRAIN, "-o", out], tmp_path,
                       timeout=180)
    assert done.returncode != 0 and done.stdout == ""
    assert "Another mmkit process is writing" in done.stderr
    codes, first = _exit_codes(done.stderr)
    assert first == 0 and codes[0] == 2, codes
    assert not out.exists() and not (tmp_path / "locked.checkpoints").exists()
