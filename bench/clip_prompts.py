"""CLIP prompt learning: CoOp and MaPLe against zero-shot (one template, and the `photos`
ensemble) and a linear probe, on a tiny CLIP.

    HF_HUB_OFFLINE=1 python bench/clip_prompts.py [--epochs 10] [--quick]

No pretrained CLIP weights can be fetched here, so the numbers are about a tiny CLIP
(tiny:clip: two layers per tower, width 32, 32 px images) and say nothing about CLIP ViT-B/16.
Two bases are measured:
- random: tiny:clip as built (random towers);
- pretrained here: tiny:clip fully fine-tuned (`finetune --full`, both towers) as a classifier
  of the bundled digits 0-4 ("base" classes, named zero .. four) through the prompts
  "a photo of {}.".
Each is then adapted to the digits 5-9 ("novel" classes, five .. nine, never seen in the
pretraining) with the novel classes' own 80/10/10 split: zero-shot, CoOp (16 context vectors,
shared, and one context per class), MaPLe (2 context vectors, J = 2: both layers), each with its
default learning rate for 10 epochs, and a logistic-regression linear probe on the frozen image
features; every figure is test accuracy on the novel classes' test split (90 images).

Writes bench/results/clip_prompts.json. Not a test; run it alone.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from results_io import RESULTS, write_result  # noqa: E402  (bench/ is on sys.path as a script)

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _folders(root: Path) -> dict:
    """The bundled digits as two image folders: classes 0-4 and 5-9, named in words."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    out = {"base": root / "base", "novel": root / "novel"}
    for i, (img, target) in enumerate(zip(bunch.images, bunch.target)):
        folder = out["base" if target < 5 else "novel"] / NAMES[target]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 15.9375).astype(np.uint8)).convert("RGB").save(folder / f"{i}.png")
    return out


def _score(ref: str, data, how: str, **options) -> dict:
    """Test accuracy and macro-F1 of `ref` on `data`: zero-shot (its prompts or templates) or
    a linear probe."""
    from mmkit.core.evaluate import evaluate
    from mmkit.core.linear_probe import linear_probe
    from mmkit.core.loading import load_model

    loaded = load_model(ref, "zero-shot-image-classification")
    start = time.perf_counter()
    result = linear_probe(loaded, data) if how == "probe" else evaluate(loaded, data, **options)
    row = {"accuracy": round(result["accuracy"], 4), "macro_f1": round(result["macro_f1"], 4),
           "eval_seconds": round(time.perf_counter() - start, 2)}
    if how == "probe":
        row["C"] = result["linear_probe"]["C"]
    return row


def _adapt(base: str, folder: Path, method: str, out: Path, epochs: float, **settings) -> dict:
    """Train `method` on the novel classes; its artifact and training figures."""
    from mmkit.core.recipe import run_recipe

    result = run_recipe({"model": base, "data": str(folder), "seed": 0, "steps": [
        {"step": "finetune", "method": method, "epochs": epochs, **settings}]}, out,
        overwrite=True)
    rep = result["steps"][0]["report"]
    return {"artifact": str(out), "trainable_parameters": rep["trainable_parameters"],
            "total_parameters": rep["total_parameters"], "train_seconds":
            round(rep["train_seconds"], 1), "steps": rep["steps"],
            "train_loss": round(rep["train_loss"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--pretrain-epochs", type=float, default=15)
    parser.add_argument("--quick", action="store_true", help="2 epochs each (a smoke run)")
    parser.add_argument("--out", default=str(RESULTS / "clip_prompts.json"))
    args = parser.parse_args()
    import torch

    from mmkit.core.data import load_data
    from mmkit.core.evaluate import evaluate
    from mmkit.core.loading import load_model
    from mmkit.core.recipe import run_recipe

    torch.set_num_threads(2)
    epochs = 2 if args.quick else args.epochs
    work = Path(tempfile.mkdtemp(prefix="mmkit-clip-prompts-"))
    folders = _folders(work / "data")
    task = "zero-shot-image-classification"
    novel = load_data(str(folders["novel"]), task, seed=0)
    base_data = load_data(str(folders["base"]), task, seed=0)
    pretrained = work / "pretrained"
    start = time.perf_counter()
    run_recipe({"model": "tiny:clip", "data": str(folders["base"]), "seed": 0, "steps": [
        {"step": "finetune", "method": "full", "lr": 1e-3,
         "epochs": 2 if args.quick else args.pretrain_epochs}]}, pretrained, overwrite=True)
    pretrain = {"seconds": round(time.perf_counter() - start, 1),
                "base_test_accuracy": round(evaluate(load_model(str(pretrained), task), base_data)
                                            ["accuracy"], 4)}
    rows = {}
    for name, base in (("random", "tiny:clip"), ("pretrained-here", str(pretrained))):
        row = {"zero-shot 'a photo of {}.'": _score(base, novel, "zero-shot"),
               "zero-shot photos ensemble (7)": _score(base, novel, "zero-shot",
                                                       templates=["photos"]),
               "linear probe": _score(base, novel, "probe")}
        for label, method, settings in (("coop", "coop", {}),
                                        ("coop class-specific", "coop", {"class_specific": True}),
                                        ("maple", "maple", {})):
            trained = _adapt(base, folders["novel"], method,
                             work / f"{name}-{label.replace(' ', '-')}", epochs, **settings)
            row[label] = {**_score(trained.pop("artifact"), novel, "zero-shot"), **trained}
        rows[name] = row
    write_result({
        "what": "test accuracy on the novel digit classes 5-9 (tiny:clip, no pretrained CLIP "
                "offline)",
        "novel_split_sizes": novel.info["sizes"], "epochs": epochs,
        "pretraining": {"classes": list(NAMES[:5]), "method": "finetune --full", **pretrain},
        "results": rows, "torch_threads": 2}, args.out)


if __name__ == "__main__":
    main()
