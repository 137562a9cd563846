"""The minilm sentiment classifier the quantize and prune benchmarks start from: fully
fine-tuned on 2,000 tweets for one epoch, trained once and kept in the mmkit cache."""

from __future__ import annotations

import os
from pathlib import Path


def trained_classifier(samples: int = 2000) -> str:
    """The artifact's path, training it on first use."""
    from mmkit.core.recipe import run_recipe

    cache = Path(os.environ.get("MMKIT_CACHE", Path.home() / ".cache" / "mmkit"))
    out = cache / "bench" / f"minilm-tweets-full-{samples}"
    if not (out / "mmkit.json").is_file():
        run_recipe({"model": "minilm", "data": "tweets-sentiment", "max_samples": samples,
                    "steps": [{"step": "finetune", "method": "full", "epochs": 1}]}, out,
                   overwrite=True)
    return str(out)
