"""Shared fixtures: offline hub, a private mmkit cache, tiny models and small data files; and
the helpers test files share (`from conftest import ...`): model logits, the CLI runner, and
the check that a test matrix has one row per registered method."""

import json
import os
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `mmkit run` keeps step results: in a folder of this test session, not the user's cache
os.environ["MMKIT_RUN_CACHE"] = tempfile.mkdtemp(prefix="mmkit-run-cache-")

TINY = ["tiny:bert", "tiny:vit", "tiny:clip", "tiny:llama", "tiny:gpt2"]
TINY_DATA = {"tiny:bert": "tweets-sentiment", "tiny:vit": "digits", "tiny:clip": "digits",
             "tiny:llama": "bbc-text", "tiny:gpt2": "bbc-text"}
# calibration data per tiny family (CLIP calibrates on captioned images)
CALIB = {"tiny:bert": "tweets-sentiment", "tiny:vit": "digits", "tiny:clip": "textile",
         "tiny:llama": "bbc-text", "tiny:gpt2": "bbc-text"}


@pytest.fixture(scope="session")
def text_csv(tmp_path_factory) -> Path:
    """A small labelled CSV: 30 rows, two classes, columns text / label."""
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    rows = ["text,label"]
    for i in range(30):
        rows.append(f"\"great product number {i}\",pos" if i % 2 else f"\"awful thing {i}\",neg")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """An image folder: 3 classes x 6 small PNGs of distinct colours."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    for c, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        folder = root / f"class{c}"
        folder.mkdir()
        for i in range(6):
            Image.new("RGB", (20 + i, 20), colour).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory) -> dict:
    """One saved artifact per tiny family (float32, evaluated on 16 examples)."""
    from mmkit.core.recipe import run_recipe

    root = tmp_path_factory.mktemp("artifacts")
    out = {}
    for ref in TINY:
        path = root / ref.split(":")[1]
        run_recipe({"model": ref, "data": TINY_DATA[ref], "max_samples": 16,
                    "steps": [{"step": "cast", "dtype": "float32"}], "eval": {}}, path)
        out[ref] = path
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a test module (`pytest.mark.usefixtures`): tiny models gain
    nothing from a second thread, and a shared machine loses much by it (subprocess
    searches run with OMP_NUM_THREADS=1 likewise)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def read_manifest(path) -> dict:
    """The mmkit.json of an artifact."""
    return json.loads((Path(path) / "mmkit.json").read_text())


def logits(loaded, batch=None):
    """A loaded model's logits on `batch` (default: the task's dummy batch, 2 x 12), without
    gradients; CLIP's `logits_per_image` where the output has no `logits`."""
    import torch

    from mmkit.core.tasks import get_task

    batch = batch or get_task(loaded.task).dummy_batch(loaded, 2, 12)
    with torch.no_grad():
        out = loaded.model(**batch)
    return out.logits if getattr(out, "logits", None) is not None else out.logits_per_image


def run_cli(*args):
    """`mmkit ARGS...` through click's CliRunner (paths and numbers are turned into strings)."""
    from click.testing import CliRunner

    from mmkit.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


# ---------------------------------------------------------------- test matrices from the registry
def registered(step: str) -> list:
    """The registered methods of one step, in registration order."""
    from mmkit.core.registry import all_methods

    return [m for m in all_methods() if m.step == step]


def with_rows(step: str, table: dict) -> list:
    """(method, row) for every registered method of `step` that has a row in `table` (keyed by
    (step, name)). A method without a row is left out here, so collection still works, and
    named by `row_problems`' test instead."""
    return [(m, table[(step, m.name)]) for m in registered(step) if (step, m.name) in table]


def row_problems(step: str, table: dict, where: str) -> list[str]:
    """What keeps `table` from having exactly one row per registered method of `step`: methods
    without a row and rows naming no registered method, each a sentence naming it."""
    names = {(step, m.name) for m in registered(step)}
    missing = [f"{s} method '{n}' is registered but has no row in {where}: add one"
               for s, n in sorted(names - set(table))]
    stale = [f"{where} has a row for {s} method '{n}', which is not registered: remove it"
             for s, n in sorted(set(table) - names)]
    return missing + stale


def _emulated_fused_gemv(real):
    """bitsandbytes' AVX512-BF16 CPU kernel in plain torch, for CPUs without those
    instructions: undo its weight repacking, dequantize, multiply in bf16 as it does."""
    import copy

    import bitsandbytes.functional as F
    import torch

    def gemv_4bit(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
        if not getattr(state, "packing_format_for_cpu", False):
            return real(A, B, out=out, transposed_A=transposed_A, transposed_B=transposed_B,
                        state=state)
        unpacked = copy.deepcopy(state)  # the inverse conversion edits the state it is given
        weight, unpacked = F._convert_weight_packed_for_cpu_inverse(B.clone(), unpacked)
        w = F.dequantize_4bit(weight, unpacked)
        return (A.to(torch.bfloat16) @ w.to(torch.bfloat16).T).to(A.dtype)

    return gemv_4bit


@pytest.fixture(params=["generic", "avx512bf16"])
def bnb_cpu_path(request, monkeypatch):
    """Run bitsandbytes' 4-bit CPU layers on each of the paths it picks by CPU, on any x86 CPU:
    its capability check is forced each way, and where the CPU lacks AVX512-BF16 the fused
    kernel is emulated (its weight repacking, the part that fails on narrow layers, is real).
    Parametrize it indirectly with None for the cases that do not use 4-bit layers."""
    import bitsandbytes.functional as F
    import bitsandbytes.nn.modules as modules

    if request.param is None:  # a test case that does not use bitsandbytes' 4-bit layers
        return None
    fused = request.param == "avx512bf16"
    monkeypatch.setattr(modules, "has_avx512bf16", lambda: fused)
    if fused and not F.has_avx512bf16():
        monkeypatch.setattr(F, "gemv_4bit", _emulated_fused_gemv(F.gemv_4bit))
    return request.param


def pytest_sessionfinish(session, exitstatus):
    """Remove the session's step cache."""
    import shutil

    shutil.rmtree(os.environ["MMKIT_RUN_CACHE"], ignore_errors=True)
