"""Shared fixtures: offline hub, a private mmkit cache, tiny models and small data files."""

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = ["tiny:bert", "tiny:vit", "tiny:clip", "tiny:llama", "tiny:gpt2"]
TINY_DATA = {"tiny:bert": "tweets-sentiment", "tiny:vit": "digits", "tiny:clip": "digits",
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


def read_manifest(path) -> dict:
    """The mmkit.json of an artifact."""
    return json.loads((Path(path) / "mmkit.json").read_text())


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
