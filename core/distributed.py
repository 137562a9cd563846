"""Runs launched as several processes (`accelerate launch --multi_gpu`, `torchrun`): which
process this is, which device it owns, and how the main process hands its result to the others.

The launcher sets the environment (RANK, LOCAL_RANK, WORLD_SIZE, or MPI's names); the HF
Trainer then trains with DDP. Process 0 is the main one: it alone locks OUT, claims and removes
the checkpoint folder, evaluates, writes the artifact and prints the result. The others train
beside it, take their result from it and write nothing. Nothing here imports torch at import
time (the CLI reads `is_main()` before any command runs).
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

from .errors import InputError, MmkitError, RuntimeFailure

# the names accelerate reads too: torchrun's, then MPI's (Intel MPI / MPICH, Open MPI, MVAPICH)
_WORLD = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_LOCAL_RANK = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK",
               "MV2_COMM_WORLD_LOCAL_RANK")


def _first_int(names, env: Mapping[str, str] | None, default: int) -> int:
    env = os.environ if env is None else env
    for name in names:
        value = env.get(name, "").strip()
        if value.lstrip("-").isdigit():
            return int(value)
    return default


def world_size(env: Mapping[str, str] | None = None) -> int:
    """How many processes the launcher started (1 when run directly)."""
    return max(1, _first_int(_WORLD, env, 1))


def rank(env: Mapping[str, str] | None = None) -> int:
    """This process's index among all processes (0: the main one)."""
    return _first_int(_RANK, env, 0) if world_size(env) > 1 else 0


def local_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's index on its own machine: the GPU it owns."""
    return _first_int(_LOCAL_RANK, env, 0) if world_size(env) > 1 else 0


def active(env: Mapping[str, str] | None = None) -> bool:
    """True inside a multi-process launch."""
    return world_size(env) > 1


def is_main(env: Mapping[str, str] | None = None) -> bool:
    """True for the process that writes (the only one when run directly)."""
    return rank(env) == 0


def process_device(device: str, env: Mapping[str, str] | None = None) -> str:
    """The device this process works on, given the resolved --device (cpu, cuda, cuda:N).

    In a single process: unchanged. In a multi-process launch each process owns the GPU of its
    local rank, the one the Trainer trains on (accelerate's `local_process_index`), so `cuda`
    becomes `cuda:LOCAL_RANK`: a QLoRA base is then loaded there (`device_map={"":
    "cuda:LOCAL_RANK"}`), not every copy on GPU 0. Naming another GPU is refused: the Trainer
    would train on its own one anyway.
    """
    if not active(env) or not device.startswith("cuda"):
        return device
    own = f"cuda:{local_rank(env)}"
    if device in ("cuda", own):
        return own
    raise InputError(f"--device {device} names one GPU, but this is one of {world_size(env)} "
                     f"processes, and each trains on the GPU of its local rank (this one: "
                     f"{own}). Pass --device cuda, or run a single process to use {device}.")


def check_trains(trains: bool) -> None:
    """Refuse a multi-process launch of a recipe that does not train: only training is shared
    between processes, so the others would repeat the work for nothing."""
    if active() and not trains:
        raise InputError(f"This command runs as {world_size()} processes (launched by accelerate "
                         "or torchrun), but only fine-tuning is spread over processes. Run it as "
                         "one process (without accelerate launch / torchrun).")


def from_main(make: Callable[[], dict]) -> dict:
    """`make()` (evaluate and write the artifact) on the main process; every process returns
    its result. The others wait for it (the run's last meeting, so none exits before the
    artifact exists) and raise if it failed; they wait up to the process group's timeout (the
    Trainer's `ddp_timeout`, 30 minutes). Call after training: the Trainer has started the
    process group by then."""
    if not active():
        return make()
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeFailure("A multi-process run reached its end without a process group "
                             "(no training step started one); run it as one process.")
    if not is_main():
        box = [None]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0] or {}
        if "result" in outcome:
            return outcome["result"]
        error = InputError if outcome.get("exit_code") == 2 else RuntimeFailure
        raise error(f"The main process (rank 0) failed; its message says why: "
                    f"{outcome.get('message', 'it was interrupted')}")
    outcome: dict = {}
    try:
        result = make()
        outcome = {"result": result}
        return result
    except MmkitError as exc:
        outcome = {"exit_code": exc.exit_code, "message": str(exc)}
        raise
    except Exception as exc:
        outcome = {"exit_code": 1, "message": f"{type(exc).__name__}: {exc}"}
        raise
    finally:  # the others are waiting for this, whatever happened (an interruption too)
        dist.broadcast_object_list([outcome], src=0)
