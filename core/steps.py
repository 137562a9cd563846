"""Steps: a recipe's or a search trial's list of {step, method, parameters}, checked once and
applied by one runner.

`check_steps` validates every step's parameters against its method's config (before anything
loads); `resolve_steps` also replaces a chooser (`quantize auto`) by the method it picks for
the model kind and device; `apply_steps` runs them in order. `run_recipe` and the search's
trials both go through these three.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import NamedTuple

from .errors import InputError
from .registry import Method, MethodConfig, build_config, get_method

log = logging.getLogger("mmkit")

STEP_KEYS = ("step", "method")  # the keys of a step that are not the method's parameters


class Step(NamedTuple):
    """One checked step: its method, its validated config, and the raw mapping it came from."""

    method: Method
    config: MethodConfig
    raw: dict


def _where(where: str, i: int, raw) -> str:
    line = getattr(raw, "line", None)  # a recipe's YAML line, when it came from a file
    return f"{where}, step {i}" + (f" (line {line})" if line else "")


def check_steps(raw_steps: list, where: str = "recipe", cli: bool = False) -> list[Step]:
    """Each step's method looked up and its parameters validated; on the command line
    (`cli`) errors name flags and the command instead of recipe keys and step numbers."""
    out = []
    for i, raw in enumerate(raw_steps, 1):
        at = where if cli else _where(where, i, raw)
        if not isinstance(raw, dict) or "step" not in raw:
            raise InputError(f"{at}: each step needs a 'step' key (finetune, prune, quantize, "
                             "merge, extract, cast) and its parameters.")
        method = get_method(raw["step"], raw.get("method"))
        params = {k: v for k, v in raw.items() if k not in STEP_KEYS}
        out.append(Step(method, build_config(method, params, at, cli), raw))
    return out


def resolve_steps(steps: list[Step], kind: str, device: str, where: str = "recipe",
                  cli: bool = False) -> list[Step]:
    """Steps ready to apply to a model of `kind` on `device`: a chooser becomes the method it
    picks (said in the log, recorded in the artifact), checked with that method's config."""
    out = []
    for i, step in enumerate(steps, 1):
        if step.method.pick is None:
            out.append(step)
            continue
        params = {k: v for k, v in step.raw.items() if k not in STEP_KEYS}
        name, why = step.method.pick(params, kind, device)
        method = get_method(step.method.step, name)
        flag = "--method" if cli else "method"
        log.info("%s: using %s (%s); choose with %s", step.method.step, name, why, flag)
        at = where if cli else (f"{_where(where, i, step.raw)} ({step.method.step} {name}, "
                                f"picked for a {kind} model on {device})")
        config = build_config(method, params, at, cli)
        out.append(Step(method, config, {**step.raw, "method": name}))
    return out


def check_kinds(steps: list[Step], kind: str, ref: str) -> None:
    """Every step's method applies to the model's kind."""
    for step in steps:
        method = step.method
        if kind not in method.kinds:
            raise InputError(f"{method.step} {method.name} does not apply to '{ref}', a "
                             f"{kind} model; it applies to {', '.join(method.kinds)}. "
                             f"{method.hint}".strip())


def apply_steps(loaded, steps: list[Step], ctx, announce: bool = True, first: int = 1,
                on_done=None):
    """Apply checked steps in order, each to what the one before left.

    Returns the model and one record per step (method, parameters, seconds, report). When the
    context has a work folder, each step gets its own below it (`step-N`), so a training step
    keeps its checkpoints apart from another's. An elastic super-network stays one only
    through `extract` steps (or an elastic fine-tuning, which describes it anew): any other
    step drops its space.

    `first` is the recipe's number of the first of `steps` (a run that resumes after cached
    steps); every step after the recipe's first starts from the same random state whatever
    ran before it in this process, so a resumed run computes what a whole one does.
    `on_done(loaded, records)` is called after each step with the records so far.
    """
    workdir = ctx.workdir
    done = []
    try:
        for i, step in enumerate(steps, first):
            method = step.method
            if i > 1:
                from transformers import set_seed

                set_seed(ctx.seed + i - 1)
            ctx.report = {}
            if workdir is not None:
                ctx.workdir = Path(workdir) / f"step-{i}"
            if announce:
                log.info("step %s:%s", method.step, method.name)
            start = time.perf_counter()
            if method.step != "extract":  # any other step changes what the space describes
                loaded.extra.pop("elastic", None)
            loaded = method.apply(loaded, step.config, ctx)
            if loaded.extra.pop("merged_adapter", None):  # a prune / quantize merged it first
                ctx.report["merged_adapter_first"] = True
            done.append({"step": method.step, "method": method.name,
                         "params": step.config.model_dump(mode="json"),
                         "seconds": round(time.perf_counter() - start, 3),
                         "report": ctx.report})
            if on_done is not None:
                on_done(loaded, done)
    finally:
        ctx.workdir = workdir
    return loaded, done
