"""Linear-probe evaluation: a logistic regression on a frozen model's image features.

The features are CLIP's image embeddings (projected, as zero-shot uses them; a model with
learned vision prompts, MaPLe, gives its prompted ones) or, for an image classifier (ViT), what
its classification head reads. They are standardized with the training split's mean and
deviation; scikit-learn's LogisticRegression (lbfgs, multinomial) is fitted on the training
split for each C of a log grid (from the smallest up, each fit warm-started from the one
before), the C with the best validation accuracy is kept (the smaller C on ties: more
regularization), and that fit scores the test split.
"""

from __future__ import annotations

import time

from .errors import InputError

C_GRID = tuple(10.0 ** (k / 2) for k in range(-6, 9))  # 1e-3 .. 1e4, two values a decade
MAX_ITER = 1000


def image_features(loaded, split, batch_size: int = 32):
    """Frozen features of every image of a split, as a float64 numpy array (examples, dim)."""
    import numpy as np
    import torch

    from .tasks.common import as_rgb, batches, model_device
    from .tasks.zero_shot import image_features as clip_features

    model = loaded.model
    device, dtype = model_device(model), next(model.parameters()).dtype
    head = _head_input(loaded)
    rows = []
    for idx in batches(len(split), batch_size):
        pixels = loaded.image_processor(images=[as_rgb(split.inputs[i]) for i in idx],
                                        return_tensors="pt")["pixel_values"].to(device, dtype)
        with torch.inference_mode():
            if head is None:
                rows.append(clip_features(model, pixels).float().cpu())
            else:
                rows.append(head(pixels))
    return np.concatenate([r.numpy() for r in rows]).astype(np.float64)


def _head_input(loaded):
    """For an image classifier: a function pixels -> what its head reads. None for CLIP."""
    import torch

    if loaded.kind == "clip":
        return None
    if loaded.kind != "vision":
        raise InputError(f"--linear-probe fits a classifier on image features; "
                         f"'{loaded.source.ref}' is a {loaded.kind} model. Use a CLIP or a "
                         "vision model (ViT).")
    head = getattr(loaded.model, "classifier", None)
    if not isinstance(head, torch.nn.Module):
        raise InputError(f"--linear-probe reads the input of the model's `classifier` head; "
                         f"this {type(loaded.model).__name__} has none.")
    seen = []

    def grab(module, args):
        seen.append(args[0].detach().float().cpu())

    def run(pixels):
        seen.clear()
        handle = head.register_forward_pre_hook(grab)
        try:
            loaded.model(pixel_values=pixels)
        finally:
            handle.remove()
        return seen[0]

    return run


def fit_probe(train_x, train_y, val_x, val_y, grid=C_GRID, seed: int = 0):
    """Standardize, fit a logistic regression for each C (smallest first, warm-started) on the
    training features, keep the C with the best validation accuracy. Returns (scaler,
    classifier, C, validation accuracy, [(C, validation accuracy)])."""
    import copy
    import warnings

    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    tx, vx = scaler.transform(train_x), scaler.transform(val_x)
    # one regression refitted along the grid, each fit starting from the last one's weights:
    # the path costs a fraction of cold fits (large C converges slowly from zero)
    clf = LogisticRegression(max_iter=MAX_ITER, random_state=seed, warm_start=True)
    best, scores = None, []
    for c in sorted(grid):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.set_params(C=c).fit(tx, train_y)
        acc = float(np.mean(clf.predict(vx) == np.asarray(val_y)))
        scores.append((c, acc))
        if best is None or acc > best[2]:
            best = (copy.deepcopy(clf), c, acc)
    return scaler, best[0], best[1], best[2], scores


def linear_probe(loaded, dataset, split: str = "test", batch_size: int = 32) -> dict:
    """Fit a linear probe on `dataset`'s training split (C chosen on its validation split)
    and score it on `split`: accuracy, macro-F1, the chosen C and the validation scores."""
    from .evaluate import majority_baseline
    from .tasks.common import classification_metrics
    from .versions import environment

    if split != "test":
        raise InputError(f"--linear-probe trains on the training split and chooses C on the "
                         f"validation split, so it scores the test split only (got --split "
                         f"{split}).")
    parts = {name: dataset.split(name) for name in ("train", "validation", "test")}
    for name, part in parts.items():
        if len(part) == 0 or part.labels is None:
            raise InputError(f"--linear-probe needs labelled train, validation and test splits; "
                             f"the {name} split of '{dataset.name}' is empty or unlabelled. Use "
                             "more data (--max-samples).")
    if len(set(parts["train"].labels)) < 2:
        raise InputError("--linear-probe: the training split has a single class; use more "
                         "data.")
    start = time.perf_counter()
    feats = {name: image_features(loaded, part, batch_size) for name, part in parts.items()}
    scaler, clf, c, val_acc, scores = fit_probe(feats["train"], parts["train"].labels,
                                                feats["validation"], parts["validation"].labels,
                                                seed=dataset.info.get("seed", 0))
    preds = clf.predict(scaler.transform(feats["test"])).tolist()
    metrics = classification_metrics(parts["test"].labels, preds)
    device = str(next(loaded.model.parameters()).device)
    return {"task": loaded.task, "data": dataset.name, "split": split, **metrics,
            "majority": majority_baseline(dataset, parts["test"]),
            "linear_probe": {"C": c, "validation_accuracy": val_acc,
                             "grid": [{"C": k, "validation_accuracy": a} for k, a in scores],
                             "train_examples": len(parts["train"]),
                             "feature_dim": int(feats["train"].shape[1]),
                             "features": "clip image embedding" if loaded.kind == "clip"
                             else "classifier input"},
            "seconds": round(time.perf_counter() - start, 3), "device": device,
            "environment": environment(device)}
