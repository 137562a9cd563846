"""evaluate(model, task, data): the one scoring path that eval, search and --eval share."""

from __future__ import annotations

import time

from .data import Dataset, align_labels
from .errors import InputError
from .families import check_length, length_limit, prompt_tokens
from .loading import LoadedModel
from .tasks import get_task
from .versions import environment


def evaluate(loaded: LoadedModel, dataset: Dataset, split: str = "test", *,
             batch_size: int = 32, max_length: int | None = None, **task_options) -> dict:
    """Score a loaded model on one split of a dataset.

    Returns accuracy / macro_f1 (classification) or perplexity (causal-lm), with the split,
    example count, seconds taken, device and library versions.
    """
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1 (got {batch_size}).")
    if loaded.kind in ("text-encoder", "causal-lm"):
        reserved = prompt_tokens(loaded.model)
        check_length(loaded.model.config, max_length, "--max-length", loaded.source.ref,
                     reserved)
        if max_length is None and reserved:  # the task's default length, less the prompt
            max_length = length_limit(loaded.model.config, reserved)
    task = get_task(loaded.task)
    part = dataset.split(split)
    if len(part) == 0:
        raise InputError(f"The {split} split of '{dataset.name}' is empty; use more data or "
                         "another split.")
    if loaded.task.endswith("classification") and loaded.task != "zero-shot-image-classification":
        align_labels(dataset, loaded.labels)
    if loaded.task == "zero-shot-image-classification":
        task_options.setdefault("label_names", dataset.label_names)
    kwargs = dict(batch_size=batch_size, **task_options)
    if max_length:
        kwargs["max_length"] = max_length
    start = time.perf_counter()
    metrics = task.evaluate(loaded, part, **kwargs)
    seconds = time.perf_counter() - start
    if part.labels is not None:
        metrics["majority"] = majority_baseline(dataset, part)
    device = str(next(loaded.model.parameters()).device)
    return {"task": loaded.task, "data": dataset.name, "split": split, **metrics,
            "seconds": round(seconds, 3), "device": device, "environment": environment(device)}


def majority_baseline(dataset: Dataset, part) -> dict:
    """What always answering the training split's most common class scores on `part`: the
    floor a trained classifier must clear."""
    from collections import Counter

    from .tasks.common import classification_metrics

    train = dataset.splits.get("train")
    pool = train.labels if train is not None and train.labels else part.labels
    top = Counter(pool).most_common(1)[0][0]
    scores = classification_metrics(part.labels, [top] * len(part.labels))
    return {"class": dataset.label_names[top], "accuracy": scores["accuracy"],
            "macro_f1": scores["macro_f1"]}
