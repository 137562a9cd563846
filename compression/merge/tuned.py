"""Merges that choose or learn on data: `lambda: auto`, greedy soup and aTLAS.

Choices are scored on the validation split and never on test; aTLAS learns from a few
labelled training examples per class. Each dataset is scored with the head whose labels fit
it: the model's own head, or an extra head a merge of several tasks keeps (`core.heads`).
Classification is scored by accuracy, a causal LM by minus its perplexity; the score of
several datasets is their mean.
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import ExitStack

from ...core.errors import InputError
from ...core.heads import fits, set_head
from ...core.layers import is_task_head, new_heads
from ...core.sparsity import zero_masks
from .apply import _plan_tensors, finish_, merge_heads, open_inputs

log = logging.getLogger("mmkit")
GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5)  # lambda: auto's values
BATCH = 32  # few-shot examples per forward pass


# ------------------------------------------------------------------ data and heads


def task_datasets(loaded, cfg, ctx) -> list:
    """The datasets a step chooses or learns on: `cfg.data` (loaded with the recipe's seed
    and cap), else the recipe's data."""
    from ...core.data import load_data, resolve_data

    if not cfg.data:
        if ctx.dataset is None:
            raise InputError(f"merge {cfg.__class__.__name__}: this merge chooses on data; give "
                             "--data (one dataset per task, comma-separated).")
        return [ctx.dataset]
    found = []
    for spec in cfg.data:
        if ctx.dataset is not None and spec == ctx.dataset.name:
            found.append(ctx.dataset)
            continue
        request = resolve_data(None, loaded.task, spec, ctx.seed)
        found.append(load_data(request.pop("spec"), loaded.task, max_samples=ctx.max_samples,
                               **request))
    return found


class Heads:
    """The task heads a merged model carries (its own, and the extra ones of other tasks),
    put in place one at a time for the dataset at hand."""

    def __init__(self, loaded):
        state = loaded.model.state_dict()
        names = [n for n in state if is_task_head(n.rsplit(".", 1)[0], new_heads())]
        self.loaded = loaded
        self.main = loaded.labels
        self.options = [(loaded.labels, {n: state[n].detach().clone() for n in names})]
        self.options += [(h["labels"], h["tensors"])
                         for h in (loaded.extra.get("heads") or {}).values()]
        self.current = loaded.labels

    def use(self, dataset) -> None:
        """Put the head that fits the dataset's labels in place (a causal LM has one)."""
        if dataset.label_names is None:
            return
        for labels, tensors in self.options:
            if fits(dataset.label_names, labels):
                self._put(labels, tensors)
                return
        known = "; ".join(", ".join(labels or []) for labels, _ in self.options)
        raise InputError(f"No head of the merged models fits the data '{dataset.name}' (labels "
                         f"{', '.join(dataset.label_names[:5])}); the heads know: {known}. Give "
                         "data of the tasks the models were fine-tuned on.")

    def restore(self) -> None:
        """Put the model's own head back."""
        self._put(*self.options[0])

    def _put(self, labels, tensors) -> None:
        if labels != self.current and tensors:
            set_head(self.loaded, tensors, list(labels))
        self.current = labels


def scores(loaded, datasets, heads: Heads, split: str = "validation") -> list[float]:
    """The model's score on each dataset's split, each with its head."""
    from ...core.evaluate import evaluate

    out = []
    for dataset in datasets:
        heads.use(dataset)
        result = evaluate(loaded, dataset, split)
        out.append(result["accuracy"] if "accuracy" in result else -result["perplexity"])
    return out


def _mean(values) -> float:
    return sum(values) / len(values)


# ------------------------------------------------------------------ lambda: auto


def choose_lambda(loaded, before: dict, cfg, ctx) -> dict:
    """The scale of the merged task vector that scores best on the validation data. The
    model holds the merge at lambda 1 and `before` the base's tensors; since every task-vector
    method is base + lambda x (its merged vector), each value is one add away. The model is
    left at the chosen value."""
    import torch

    datasets = task_datasets(loaded, cfg, ctx)
    heads = Heads(loaded)
    state = loaded.model.state_dict()
    merged = {n: state[n].detach().clone() for n in before}
    grid = []
    for lam in GRID:
        _scale(state, before, merged, lam)
        values = scores(loaded, datasets, heads)
        grid.append({"lambda": lam, "scores": [round(v, 5) for v in values],
                     "mean": round(_mean(values), 5)})
    best = max(grid, key=lambda row: row["mean"])  # the first (smallest) of equals
    with torch.no_grad():
        _scale(state, before, merged, best["lambda"])
    heads.restore()
    log.info("merge: lambda auto chose %s (validation score %.4f)", best["lambda"],
             best["mean"])
    return {"chosen": best["lambda"], "split": "validation",
            "data": [d.name for d in datasets], "grid": grid}


def _scale(state, before, merged, lam) -> None:
    import torch

    with torch.no_grad():
        for name, base in before.items():
            wide = base.float()
            state[name].copy_((wide + lam * (merged[name].float() - wide)).to(base.dtype))


# ------------------------------------------------------------------ greedy soup


def greedy_soup(loaded, cfg, ctx):
    """Greedy soup (Wortsman et al. 2022): rank the models by validation score; starting from
    the best, add each next model to the uniform soup only when the soup's validation score
    does not drop. The result never scores below the best single model on validation."""
    import torch

    start = time.perf_counter()
    datasets = task_datasets(loaded, cfg, ctx)
    with ExitStack() as stack, torch.no_grad():
        inputs, requantize = open_inputs("greedy-soup", loaded, cfg, ctx, stack)
        if len({tuple(inp.labels or ()) for inp in inputs}) > 1:
            said = "; ".join(f"{inp.ref}: {', '.join(inp.labels or ['no head'])}"
                             for inp in inputs)
            raise InputError(f"greedy-soup averages fine-tunes of one task, but the models' "
                             f"heads differ ({said}). Merge models of different tasks with "
                             "task-arithmetic, ties or atlas.")
        masks = zero_masks(loaded.model) if requantize is None else []  # see finish_
        names = _soup_names(loaded, inputs)
        state = loaded.model.state_dict()
        heads = Heads(loaded)

        def put(tensors):
            for n in names:
                state[n].copy_(tensors[n].to(state[n].dtype))

        def read(inp):
            return {n: inp.tensor(n, state[n]).float() for n in names}

        single = []
        for inp in inputs:
            put(read(inp))
            single.append(_mean(scores(loaded, datasets, heads)))
        order = sorted(range(len(inputs)), key=lambda i: -single[i])
        soup, count, best = read(inputs[order[0]]), 1, single[order[0]]
        trail = []
        for i in order[1:]:
            x = read(inputs[i])
            put({n: (soup[n] + x[n]) / (count + 1) for n in names})
            value = _mean(scores(loaded, datasets, heads))
            kept = value >= best
            trail.append({"model": inputs[i].ref, "soup_score": round(value, 5), "added": kept})
            if kept:
                for n in names:
                    soup[n] += x[n]
                count, best = count + 1, value
        put({n: soup[n] / count for n in names})
    finish_(loaded, masks, requantize, ctx)
    ctx.report.update({
        "method": "greedy-soup", "models": list(cfg.models),
        "inputs": {inp.ref: inp.kind for inp in inputs},
        "data": [d.name for d in datasets], "split": "validation",
        "single": {inputs[i].ref: round(single[i], 5) for i in order},
        "trail": trail, "ingredients": [inputs[order[0]].ref] + [
            t["model"] for t in trail if t["added"]],
        "soup_score": round(best, 5), "tensors_merged": len(names), "heads": "merged",
        "seconds": round(time.perf_counter() - start, 3)})
    return loaded


def _soup_names(loaded, inputs) -> list[str]:
    """The tensors a soup averages: the body and the head (the first model's head shape and
    labels when the base's head is of another task or untrained)."""
    names, grouped = _plan_tensors(loaded, inputs)
    if isinstance(grouped, tuple):
        head_names, groups = grouped
        if not groups:
            return names
        (labels, members), = groups.items()
        state = loaded.model.state_dict()
        set_head(loaded, {n: members[0].tensor(n, state[n]) for n in head_names}, list(labels))
        names = names + head_names
    return names


# ------------------------------------------------------------------ aTLAS


def few_shot(dataset, shots: int, seed: int) -> list[int]:
    """Indices of `shots` training examples per class (all of a class that has fewer), drawn
    with `seed`; for unlabelled text (a causal LM), `shots` documents."""
    train = dataset.split("train")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    if train.labels is None:
        return sorted(order[:shots])
    taken, per_class = [], {}
    for i in order:
        label = train.labels[i]
        if per_class.get(label, 0) < shots:
            per_class[label] = per_class.get(label, 0) + 1
            taken.append(i)
    return sorted(taken)


def _batches(loaded, dataset, indices, max_length) -> list[dict]:
    from ...core.data import Split, align_labels
    from ...core.tasks.batches import Collator, build_items

    if dataset.label_names is not None:
        align_labels(dataset, loaded.labels)
    train = dataset.split("train")
    part = Split([train.inputs[i] for i in indices],
                 [train.labels[i] for i in indices] if train.labels is not None else None)
    items = build_items(loaded, part, max_length)
    collate = Collator(loaded)
    return [collate([items[j] for j in range(i, min(i + BATCH, len(items)))])
            for i in range(0, len(items), BATCH)]


def atlas(loaded, cfg, ctx):
    """aTLAS (Zhang et al. 2024): the merged weights are base + sum_i sum_b c_ib x tau_ib,
    one coefficient c per task vector i and parameter block b (each weight tensor), learned
    by Adam on `shots` labelled training examples per class of each task (each task's loss
    with its own head), the backbone frozen. The coefficients start at lambda x weight_i
    (task arithmetic), and the report gives them with the few-shot loss before and after."""
    import torch

    start = time.perf_counter()
    datasets = task_datasets(loaded, cfg, ctx)
    weights = list(cfg.weights) if cfg.weights is not None else [1.0] * len(cfg.models)
    with ExitStack() as stack:
        inputs, requantize = open_inputs("atlas", loaded, cfg, ctx, stack)
        masks = zero_masks(loaded.model) if requantize is None else []  # see finish_
        names, grouped = _plan_tensors(loaded, inputs)
        state = loaded.model.state_dict()
        with torch.no_grad():
            taus = [{n: (inp.tensor(n, state[n]).float() - state[n].float()) for n in names}
                    for inp in inputs]
            heads_said = merge_heads(loaded, grouped, cfg, ctx)
    heads = Heads(loaded)
    tasks = []
    for dataset in datasets:
        heads.use(dataset)
        picked = few_shot(dataset, cfg.shots, ctx.seed)
        tasks.append((dataset, _batches(loaded, dataset, picked, cfg.max_length)))
    coef = torch.tensor([[cfg.lam * w] * len(names) for w in weights], requires_grad=True)
    history = _learn(loaded, names, taus, coef, tasks, heads, cfg)
    with torch.no_grad():
        for b, n in enumerate(names):
            merged = state[n].float() + sum(coef[i, b] * tau[n] for i, tau in enumerate(taus))
            state[n].copy_(merged.to(state[n].dtype))
    heads.restore()
    finish_(loaded, masks, requantize, ctx)
    values = coef.detach()
    table = {inp.ref: {n: round(float(values[i, b]), 5) for b, n in enumerate(names)}
             for i, inp in enumerate(inputs)}
    ctx.report.update({
        "method": "atlas", "models": list(cfg.models), "weights": weights,
        "lambda": cfg.lam, "inputs": {inp.ref: inp.kind for inp in inputs},
        "data": [d.name for d in datasets], "shots_per_class": cfg.shots,
        "examples": {d.name: sum(len(b["labels"]) for b in batches) for d, batches in tasks},
        "steps": cfg.steps, "lr": cfg.lr, "few_shot_loss": history,
        "coefficients": {ref: _summary(values.values()) for ref, values in table.items()},
        "coefficients_per_block": table, "tensors_merged": len(names), "heads": heads_said,
        "seconds": round(time.perf_counter() - start, 3)})
    return loaded


def _summary(values) -> dict:
    values = list(values)
    return {"mean": round(_mean(values), 4), "min": min(values), "max": max(values)}


def few_shot_loss(loaded, params, tasks, heads, backward: bool = False) -> float:
    """The mean over tasks of the loss on their few-shot batches, with `params()` in place of
    the model's own tensors (torch.func.functional_call). With `backward`, each batch's share
    is back-propagated at once (one batch's graph in memory at a time)."""
    import torch
    from torch.func import functional_call

    total = 0.0
    for dataset, batches in tasks:
        heads.use(dataset)
        examples = sum(len(b["labels"]) for b in batches)
        for batch in batches:
            kwargs = dict(batch)
            labels = kwargs.pop("labels")
            if loaded.task == "causal-lm":
                kwargs["labels"] = labels
            out = functional_call(loaded.model, params(), args=(), kwargs=kwargs)
            loss = out.loss if loaded.task == "causal-lm" else torch.nn.functional.cross_entropy(
                out.logits, labels)
            share = loss * len(labels) / examples / len(tasks)
            if backward:
                share.backward()
            total += float(share.detach())
    return total


def _learn(loaded, names, taus, coef, tasks, heads, cfg) -> dict:
    """Adam on the coefficients; returns the few-shot loss at the start and the end."""
    import torch

    model = loaded.model
    model.eval()  # no dropout: the loss is a function of the coefficients alone
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    base = {n: model.state_dict()[n].detach().float() for n in names}

    def params():
        return {n: base[n] + sum(coef[i, b] * tau[n] for i, tau in enumerate(taus))
                for b, n in enumerate(names)}

    optimizer = torch.optim.Adam([coef], lr=cfg.lr)
    try:
        with torch.no_grad():
            first = few_shot_loss(loaded, params, tasks, heads)
        for _ in range(cfg.steps):
            optimizer.zero_grad()
            few_shot_loss(loaded, params, tasks, heads, backward=True)
            optimizer.step()
        with torch.no_grad():
            last = few_shot_loss(loaded, params, tasks, heads)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    log.info("merge atlas: few-shot loss %.4f -> %.4f over %d steps", first, last, cfg.steps)
    return {"start": round(first, 5), "end": round(last, 5)}
