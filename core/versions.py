"""The device and library versions that every measurement records."""

from __future__ import annotations

import functools
import importlib.metadata
import platform

LIBRARIES = ("mmkit", "torch", "transformers", "peft", "bitsandbytes", "optuna")


@functools.lru_cache(maxsize=None)
def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_name(device: str) -> str:
    """A human name for the device: the CPU model or the GPU name."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device: str) -> dict:
    """Device name, torch's thread count, the machine's load (1-minute load average over
    its CPU count: above 1, other work competed) and library versions."""
    import os

    import torch

    try:
        load = round(os.getloadavg()[0] / (os.cpu_count() or 1), 2)
    except OSError:
        load = None
    return {"device_name": device_name(device), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_per_cpu": load, "versions": _versions()}
