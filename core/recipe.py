"""Recipes: a base model plus ordered steps, in YAML; and the engine that runs them.

Every command that produces a model builds a one-step recipe and calls `run_recipe`, so
`mmkit run recipe.yaml` and the single commands share one path.

    model: minilm
    task: text-classification      # optional: the model's default task
    data: tweets-sentiment         # optional: the task's bundled default
    seed: 0
    max_samples: 256               # optional cap on every split
    steps:
      - step: cast
        dtype: float16
    eval: {split: test}            # optional: evaluate and record metrics
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InputError

log = logging.getLogger("mmkit")

RECIPE_KEYS = ("model", "task", "data", "seed", "max_samples", "text_column", "image_column",
               "label_column", "steps", "eval")


class EvalSpec(BaseModel):
    """Which split to score after the steps, and how."""

    model_config = ConfigDict(extra="forbid")
    split: str = "test"
    batch_size: int = Field(32, ge=1)
    max_length: int | None = Field(None, ge=2)


class Recipe(BaseModel):
    """A validated recipe; `steps` keep their raw parameters until each method checks them."""

    model_config = ConfigDict(extra="forbid")
    model: str = "minilm"
    task: str | None = None
    data: str | None = None
    seed: int = 0
    max_samples: int | None = Field(None, ge=1)
    text_column: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    steps: list[dict] = Field(default_factory=list)
    eval: EvalSpec | None = None


class _LineDict(dict):
    """A mapping that remembers the YAML line it started on."""

    line = None


class _LineLoader(yaml.SafeLoader):
    """yaml's safe loader, recording each mapping's line for error messages."""


def _construct_mapping(loader, node):
    data = _LineDict(loader.construct_mapping(node, deep=True))
    data.line = node.start_mark.line + 1
    return data


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_recipe(path: str | Path) -> dict:
    """Read a recipe file (safe YAML), with errors that name the line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Recipe file '{path}' does not exist.")
    try:
        data = yaml.load(path.read_text(), Loader=_LineLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InputError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}. "
                         "Fix the file and run again.") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must be a YAML mapping with keys such as model, data, steps.")
    return data


def parse_recipe(data: dict, where: str = "recipe") -> Recipe:
    """Validate a recipe mapping and every step's method and parameters (before any work)."""
    from .registry import build_config, get_method

    raw_steps = data.get("steps") if isinstance(data.get("steps"), list) else []
    lines = [getattr(step, "line", None) for step in raw_steps]  # before pydantic copies them
    try:
        recipe = Recipe(**data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            msg = f"unknown key '{key}'. Recipe keys: {', '.join(RECIPE_KEYS)}"
        else:
            msg = f"'{key}': {err['msg']}"
        raise InputError(f"{where}: {msg}.") from None
    for i, step in enumerate(recipe.steps, 1):
        line = lines[i - 1] if i - 1 < len(lines) else None
        at = f"{where}, step {i}" + (f" (line {line})" if line else "")
        if not isinstance(step, dict) or "step" not in step:
            raise InputError(f"{at}: each step needs a 'step' key (finetune, prune, quantize, "
                             "merge, extract, cast) and its parameters.")
        params = {k: v for k, v in step.items() if k not in ("step", "method")}
        method = get_method(step["step"], step.get("method"))
        build_config(method, params, at)
    return recipe


def resolved_steps(recipe: Recipe) -> list[tuple]:
    """(method, config, raw step) for each step, parameters validated."""
    from .registry import build_config, get_method

    out = []
    for i, step in enumerate(recipe.steps, 1):
        params = {k: v for k, v in step.items() if k not in ("step", "method")}
        method = get_method(step["step"], step.get("method"))
        out.append((method, build_config(method, params, f"step {i}"), step))
    return out


def checkpoint_dir(out) -> Path:
    """Where a run keeps its training checkpoints: `<OUT>.checkpoints` beside the output."""
    out = Path(out).expanduser()
    return out.parent / f"{out.name}.checkpoints"


def run_recipe(recipe: Recipe | dict, out, *, overwrite: bool = False, device: str = "cpu",
               trust_remote_code: bool = False, allow_pickle: bool = False,
               resume: bool = False, callbacks=None) -> dict:
    """Run a recipe's steps on its model and write one artifact to `out`.

    Everything that can be checked is checked before the model is loaded: the recipe, each
    step's parameters, the output path, the model reference, the task, the data. Training
    steps checkpoint into `<OUT>.checkpoints`; `resume` continues from the last checkpoint
    of the same run. The checkpoints are removed once the artifact is written.
    """
    import shutil

    from .artifacts import check_output, write_artifact
    from .data import DEFAULT_DATA, load_data
    from .evaluate import evaluate
    from .loading import load_model, peek, resolve_device
    from .registry import Context
    from .train import run_fingerprint

    if isinstance(recipe, dict):
        recipe = parse_recipe(recipe)
    check_output(out, overwrite)
    device = resolve_device(device)
    steps = resolved_steps(recipe)
    source, config, kind, task = peek(recipe.model, recipe.task, trust_remote_code)
    for method, _, _ in steps:
        if kind not in method.kinds:
            raise InputError(f"{method.step} {method.name} does not apply to '{recipe.model}', a "
                             f"{kind} model; it applies to {', '.join(method.kinds)}. "
                             f"{method.hint}".strip())
    workdir = checkpoint_dir(out)
    if resume and not workdir.is_dir():
        raise InputError(f"--resume: there are no checkpoints to resume at {workdir}. Run without "
                         "--resume to start afresh.")
    needs_data = (recipe.eval is not None or task.endswith("classification")
                  or any(m.needs_data for m, _, _ in steps))
    dataset = None
    if needs_data:
        dataset = load_data(recipe.data or DEFAULT_DATA[task], task, seed=recipe.seed,
                            max_samples=recipe.max_samples, text_column=recipe.text_column,
                            image_column=recipe.image_column, label_column=recipe.label_column)
    labels = dataset.label_names if dataset is not None else None
    if task == "zero-shot-image-classification":
        labels = None
    load_options = {}
    for i, (method, cfg, _) in enumerate(steps):
        wanted = method.load_options(cfg) if method.load_options else {}
        if wanted and i > 0:
            raise InputError(f"step {i + 1} ({method.step} {method.name}) changes how the base "
                             "model is loaded (a 4/8-bit QLoRA base); it must be the first step.")
        load_options.update(wanted)
    log.info("loading %s for %s", recipe.model, task)
    loaded = load_model(source, task, labels, device=device, seed=recipe.seed,
                        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                        **load_options)
    resolved = recipe.model_dump(mode="json", exclude_none=True)
    resolved["task"] = task
    ctx = Context(device=device, seed=recipe.seed, dataset=dataset, workdir=workdir,
                  fingerprint=run_fingerprint(resolved), resume=resume,
                  callbacks=list(callbacks or []))
    done = []
    for i, (method, cfg, _) in enumerate(steps, 1):
        ctx.report = {}
        ctx.workdir = workdir / f"step-{i}"  # each training step keeps its own checkpoints
        log.info("step %s:%s", method.step, method.name)
        start = time.perf_counter()
        loaded = method.apply(loaded, cfg, ctx)
        done.append({"step": method.step, "method": method.name,
                     "params": cfg.model_dump(mode="json"),
                     "seconds": round(time.perf_counter() - start, 3), "report": ctx.report})
    metrics = []
    if recipe.eval is not None:
        log.info("evaluating on the %s split", recipe.eval.split)
        metrics.append(evaluate(loaded, dataset, recipe.eval.split,
                                batch_size=recipe.eval.batch_size,
                                max_length=recipe.eval.max_length))
    resolved["steps"] = [{"step": d["step"], "method": d["method"], **d["params"]} for d in done]
    log.info("writing %s", out)
    path = write_artifact(loaded, out, recipe=resolved, steps=done, metrics=metrics,
                          data_info=dataset.info if dataset is not None else None,
                          overwrite=overwrite, fmt=loaded.extra.get("format", "hf-model"))
    shutil.rmtree(workdir, ignore_errors=True)
    return {"artifact": str(path), "model": recipe.model, "task": task, "steps": done,
            "metrics": metrics}
