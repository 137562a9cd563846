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
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
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


def _input_paths(source, dataset, steps) -> list[tuple[str, str]]:
    """The local files and folders a run reads: the output must not touch them."""
    paths = []
    for src in (source, source.adapter):
        if src is not None and src.kind in ("artifact", "folder", "embedded"):
            paths.append(("model folder", src.path))
    if dataset is not None and not dataset.info["source"].startswith(("bundled:", "hf:")):
        paths.append(("data", dataset.info["source"]))
    for method, cfg, _ in steps:
        calib = getattr(cfg, "calib", None)
        if calib and Path(calib).expanduser().exists():
            paths.append(("calibration data", str(Path(calib).expanduser())))
    return paths


def run_recipe(recipe: Recipe | dict, out, *, overwrite: bool = False, device: str = "cpu",
               trust_remote_code: bool = False, allow_pickle: bool = False,
               resume: bool = False, callbacks=None, lock_wait: float = 0.0) -> dict:
    """Run a recipe's steps on its model and write one artifact to `out`.

    Everything that can be checked is checked before the model is loaded: the recipe, each
    step's parameters, the output path (not an input, not held by another process), the
    model reference, the task, the data. Training steps checkpoint into `<OUT>.checkpoints`;
    `resume` continues from the last complete checkpoint of the same run. The checkpoints are
    removed once the artifact is written. `lock_wait` is how long to wait for another process
    writing the same output (default: fail at once).
    """
    from . import checkpoints
    from .artifacts import write_artifact
    from .data import load_data, resolve_data
    from .evaluate import evaluate
    from .loading import load_model, peek, resolve_device
    from .outputs import check_output, output_lock, output_path
    from .registry import Context
    from .train import run_fingerprint

    if isinstance(recipe, dict):
        recipe = parse_recipe(recipe)
    out = output_path(out)
    check_output(out, overwrite)
    device = resolve_device(device)
    steps = resolved_steps(recipe)
    source, config, kind, task = peek(recipe.model, recipe.task, trust_remote_code)
    for method, _, _ in steps:
        if kind not in method.kinds:
            raise InputError(f"{method.step} {method.name} does not apply to '{recipe.model}', a "
                             f"{kind} model; it applies to {', '.join(method.kinds)}. "
                             f"{method.hint}".strip())
    trains = any(m.step == "finetune" for m, _, _ in steps)
    if resume and not trains:
        raise InputError("--resume continues an interrupted training run; this recipe has no "
                         "training step. Run it without --resume.")
    needs_data = (recipe.eval is not None or task.endswith("classification")
                  or any(m.needs_data for m, _, _ in steps))
    request = resolve_data(source, task, recipe.data, recipe.seed, recipe.text_column,
                           recipe.image_column, recipe.label_column)
    dataset = None
    if needs_data:
        dataset = load_data(request["spec"], task, seed=request["seed"],
                            max_samples=recipe.max_samples, text_column=request["text_column"],
                            image_column=request["image_column"],
                            label_column=request["label_column"])
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
    inputs = _input_paths(source, dataset, steps)
    check_output(out, overwrite, inputs)
    resolved = recipe.model_dump(mode="json", exclude_none=True)
    resolved.update({"task": task, "seed": request["seed"]})
    if needs_data:
        resolved.update({k: v for k, v in request.items() if v is not None and k != "spec"})
        resolved["data"] = request["spec"]
    fingerprint = run_fingerprint(resolved)
    workdir = checkpoints.checkpoint_dir(out)
    with output_lock(out, lock_wait):
        check_output(out, overwrite, inputs)  # again: another writer may have finished
        if trains:
            checkpoints.claim(workdir, fingerprint, resume, overwrite)
        log.info("loading %s for %s", recipe.model, task)
        loaded = load_model(source, task, labels, device=device, seed=request["seed"],
                            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                            **load_options)
        ctx = Context(device=device, seed=request["seed"], dataset=dataset, workdir=workdir,
                      fingerprint=fingerprint, resume=resume, callbacks=list(callbacks or []))
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
        resolved["steps"] = [{"step": d["step"], "method": d["method"], **d["params"]}
                             for d in done]
        log.info("writing %s", out)
        path = write_artifact(loaded, out, recipe=resolved, steps=done, metrics=metrics,
                              data_info=dataset.info if dataset is not None else None,
                              overwrite=overwrite, fmt=loaded.extra.get("format", "hf-model"))
        if trains:
            checkpoints.release(workdir, fingerprint)
    return {"artifact": str(path), "model": recipe.model, "task": task, "steps": done,
            "metrics": metrics}
