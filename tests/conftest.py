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
