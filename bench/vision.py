"""Token merging (ToMe, Token Transforming): images/s and the accuracy it costs.

    HF_HUB_OFFLINE=1 python bench/vision.py [--parts speed,accuracy] [--model REF] [--quick]

- speed: a ViT-B/16-sized classifier (224 px, 197 tokens, 12 blocks; random weights: speed
  needs no trained ones) at r = 0, 8, 13, 16 (ToMe) and Token Transforming at r = 13, on 2
  threads, timed interleaved (A, B, C ... rotating each round, after warm-up); images/s and
  the ratio to r = 0 at batch 1 and 8. ToMe's paper setting for ViT-B is r = 13 (goal: >= 1.5x).
- accuracy: no pretrained ViT can be fetched here, so a small ViT (6 blocks, 64 px images of
  the bundled `digits`, 65 tokens) is trained from scratch with `mmkit finetune --full`, then
  merged at the same fractions of tokens left as r = 8 / 13 / 16 leave on ViT-B, and scored on
  the test split. `--model REF` (a hub id where the hub is reachable, or a fine-tuned folder)
  scores that model instead, on `--data`.

Writes bench/results/vision.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from results_io import RESULTS, write_result  # noqa: E402  (bench/ is on sys.path as a script)

R_VALUES = (0, 8, 13, 16)
VIT_B_TOKENS, VIT_B_BLOCKS = 197, 12


def _kept_fraction(r: int, tokens: int = VIT_B_TOKENS, blocks: int = VIT_B_BLOCKS) -> float:
    """The fraction of tokens a constant r leaves after the last block (as ToMe cuts r in a
    block that has too few tokens)."""
    left = tokens
    for _ in range(blocks):
        left -= min(r, (left + 1) // 2 - 1)
    return left / tokens


def _merged(loaded, method: str, **settings):
    """A copy of `loaded` that merges tokens: the `tokens` step's own apply."""
    from mmkit.core.registry import Context, build_config, get_method

    m = get_method("tokens", method)
    return m.apply(copy.deepcopy(loaded), build_config(m, settings, "bench"), Context())


def _vit_b(work: Path, labels: list[str]):
    """A ViT-B/16-sized classifier with random weights, saved once and loaded through mmkit."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from mmkit.core.loading import load_model

    folder = work / "vit-b16-random"
    if not (folder / "config.json").is_file():
        config = ViTConfig(image_size=224, patch_size=16, num_labels=len(labels),
                           id2label=dict(enumerate(labels)),
                           label2id={k: i for i, k in enumerate(labels)})
        ViTForImageClassification(config).save_pretrained(folder)
        ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return load_model(str(folder), "image-classification")


def _interleaved(models: dict, batch: int, rounds: int) -> dict:
    """Median seconds per forward pass of each model on one random batch, rotating order."""
    import torch

    pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def runner(model):
        def run():
            with torch.inference_mode():
                model(pixel_values=pixels)
        return run

    runs = {k: runner(m.model) for k, m in models.items()}
    for run in runs.values():  # warm-up
        run()
        run()
    times = {k: [] for k in runs}
    names = list(runs)
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return {k: {"median_s": statistics.median(v), "p10_s": sorted(v)[len(v) // 10],
                "p90_s": sorted(v)[(9 * len(v)) // 10]} for k, v in times.items()}


def speed(args, work: Path) -> dict:
    """Images/s of ViT-B/16 at each r, interleaved."""
    import torch

    torch.set_num_threads(args.threads)
    base = _vit_b(work, [str(i) for i in range(10)])
    models = {f"tome-r{r}": _merged(base, "tome", r=[r]) for r in R_VALUES}
    models["transform-r13"] = _merged(base, "transform", r=[13])
    rows = {}
    for batch, rounds in ((1, args.rounds), (8, max(3, args.rounds // 4))):
        timing = _interleaved(models, batch, rounds)
        ref = timing["tome-r0"]["median_s"]
        for name, t in timing.items():
            rows.setdefault(name, {})[f"batch_{batch}"] = {
                **{k: round(v * 1e3, 2) for k, v in
                   (("median_ms", t["median_s"]), ("p10_ms", t["p10_s"]),
                    ("p90_ms", t["p90_s"]))},
                "images_per_s": round(batch / t["median_s"], 2),
                "speedup_vs_r0": round(ref / t["median_s"], 3)}
    for name, row in rows.items():  # a late block merges what it can (r = 16: not 16 each)
        row["r_per_block"] = models[name].extra["settings"]["tokens"]["r"]
        row["tokens_left"] = VIT_B_TOKENS - sum(row["r_per_block"])
    goal = rows["tome-r13"]["batch_8"]["speedup_vs_r0"]
    return {"model": "ViT-B/16 config, random weights, 224 px", "threads": args.threads,
            "rows": rows, "goal_r13_ge_1.5x_at_batch_8": goal >= 1.5}


def _small_vit(work: Path, args):
    """A 6-block ViT on 64 px digits, trained from scratch with mmkit finetune --full."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from mmkit.core.recipe import run_recipe

    init, trained = work / "vit-small-init", work / f"vit-small-digits-e{args.epochs:g}"
    if not (trained / "mmkit.json").is_file():
        labels = [str(i) for i in range(10)]
        config = ViTConfig(hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                           intermediate_size=256, image_size=64, patch_size=8,
                           id2label=dict(enumerate(labels)),
                           label2id={k: i for i, k in enumerate(labels)})
        ViTForImageClassification(config).save_pretrained(init)
        ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(init)
        start = time.perf_counter()
        run_recipe({"model": str(init), "data": "digits", "steps": [
            {"step": "finetune", "method": "full", "epochs": args.epochs, "lr": 1e-3,
             "batch_size": 32}]}, trained, overwrite=True)
        print(f"trained in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return str(trained)


def accuracy(args, work: Path) -> dict:
    """Test accuracy at the same fractions of tokens left as ToMe's r on ViT-B."""
    from mmkit.core.data import load_data
    from mmkit.core.evaluate import evaluate
    from mmkit.core.loading import load_model

    ref = args.model or _small_vit(work, args)
    base = load_model(ref, "image-classification")
    data = load_data(args.data, "image-classification", seed=0)
    rows = {}
    for r in R_VALUES:
        keep = _kept_fraction(r)
        model = base if r == 0 else _merged(base, "tome", keep=keep)
        rows[f"tome-keep{keep:.2f}"] = {"like_vit_b_r": r, "keep": round(keep, 3),
                                        "test_accuracy": evaluate(model, data, "test")["accuracy"]}
    keep = _kept_fraction(13)
    model = _merged(base, "transform", keep=keep)
    rows[f"transform-keep{keep:.2f}"] = {"like_vit_b_r": 13, "keep": round(keep, 3),
                                         "test_accuracy": evaluate(model, data, "test")["accuracy"]}
    full = rows["tome-keep1.00"]["test_accuracy"]
    for row in rows.values():
        row["points_below_r0"] = round(100 * (full - row["test_accuracy"]), 2)
    return {"model": ref, "data": args.data, "test_examples": len(data.split("test")),
            "rows": rows,
            "caveat": "a ViT trained from scratch here on 8x8 digits upsampled to 64 px: the "
                      "patches are far more alike than a photo's, so merging costs less than on "
                      "natural images; this shows the merge works end to end and how accuracy "
                      "falls with fewer tokens, not ImageNet-level accuracy costs"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="speed,accuracy")
    parser.add_argument("--work", default="/tmp/mmkit-bench-vision")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds at batch 1")
    parser.add_argument("--epochs", type=float, default=15)
    parser.add_argument("--model", default=None, help="score this model instead of training one")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "vision.json"))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.epochs = 4, 1
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result = {"settings": vars(args), "machine": {"cpus": os.cpu_count(),
                                                  "load_average": os.getloadavg()}}
    for part in args.parts.split(","):
        result[part] = {"speed": speed, "accuracy": accuracy}[part](args, work)
    write_result(result, args.out)


if __name__ == "__main__":
    main()
