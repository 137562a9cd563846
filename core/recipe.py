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
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InputError, shown

log = logging.getLogger("mmkit")

MAX_RECIPE_BYTES = 1 << 20
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
        raise InputError(f"Recipe file '{shown(path)}' does not exist.")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise InputError(f"{shown(path)} is {path.stat().st_size:,} bytes; a recipe is a short "
                         f"YAML file (at most {MAX_RECIPE_BYTES:,} bytes). Pass the right file.")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_LineLoader)
    except UnicodeDecodeError as exc:
        raise InputError(f"{shown(path)} is not UTF-8 text (byte {exc.start}); save the recipe "
                         "as UTF-8.") from None
    except RecursionError:
        raise InputError(f"{shown(path)} nests brackets or blocks too deeply to be a recipe; "
                         "fix the file.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InputError(f"{shown(path)} is not valid YAML{where}: "
                         f"{shown(getattr(exc, 'problem', exc))}. Fix the file and run "
                         "again.") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must be a YAML mapping with keys such as model, data, steps.")
    return data


def parse_recipe(data: dict, where: str = "recipe", cli: bool = False) -> Recipe:
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
        build_config(method, params, where if cli else at, cli)
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


UNMERGEABLE = ("prompt", "prefix", "adaptformer", "vpt")  # adapters that are not weight changes


def _start_state(source, config) -> dict:
    """What the recipe's model is before its first step: an adapter (which, QLoRA or not)
    and whether its weights are quantized."""
    manifest = (source.adapter or source).manifest
    adapter = qlora = None
    if source.adapter is not None:
        made = [s for s in manifest.get("steps") or [] if s.get("step") == "finetune"]
        adapter = made[-1].get("method") if made else "an"
        qlora = bool(made and (made[-1].get("params") or {}).get("bits"))
    quantized = manifest.get("format") in ("mmkit-quantized", "mmkit-ptq") or getattr(
        config, "quantization_config", None) is not None
    return {"adapter": adapter, "qlora": qlora, "quantized": quantized, "by": "the input model"}


def _check_chain(source, config, steps) -> None:
    """Check, before any step runs, that each step can take what the steps before it (and
    the model itself) leave: no compression of an adapter that cannot be merged, no adapter
    on an adapter, no pruning or training of quantized weights, no quantizing twice."""
    state = _start_state(source, config)
    for i, (method, cfg, _) in enumerate(steps, 1):
        at = f"step {i} ({method.step} {method.name})"
        if method.step == "finetune":
            if state["adapter"]:
                raise InputError(f"{at} would train a second adapter on the {state['adapter']} "
                                 f"adapter left by {state['by']}; merge that one first "
                                 "(`merge: true` on its step, --merge on the command line).")
            if state["quantized"] and not getattr(cfg, "bits", None):
                raise InputError(f"{at} cannot train weights that are quantized already (by "
                                 f"{state['by']}); fine-tune before quantizing.")
            merged = cfg.merge or method.name == "full"
            state.update(adapter=None if merged else method.name, qlora=bool(
                getattr(cfg, "bits", None)), by=f"step {i}")
        elif method.step in ("prune", "quantize"):
            adapter = state["adapter"]
            if adapter and (adapter in UNMERGEABLE or state["qlora"]):
                why = "is on a 4/8-bit base" if state["qlora"] else "is not a weight change"
                raise InputError(f"{at} needs plain weights, but the {adapter} adapter left by "
                                 f"{state['by']} {why} and cannot be merged. Use a mergeable "
                                 "method (lora, svfit, ...) with `merge: true` / --merge.")
            if state["quantized"]:
                raise InputError(f"{at} would {method.step} weights that are quantized already "
                                 f"(by {state['by']}); {method.step} the floating-point model, "
                                 "and quantize last.")
            state.update(adapter=None, quantized=method.step == "quantize", by=f"step {i}")


@dataclass
class Plan:
    """A recipe checked and resolved against its model and data, ready to run."""

    recipe: Recipe
    out: Path
    source: object  # ModelSource
    task: str
    steps: list  # (method, config, raw step)
    dataset: object = None  # Dataset, when the task or a step needs data
    seed: int = 0
    load_options: dict = field(default_factory=dict)
    resolved: dict = field(default_factory=dict)  # the recipe as recipe.yaml records it
    inputs: list = field(default_factory=list)  # (what, path) the output must not touch
    fingerprint: str = ""  # names the run, so --resume refuses another run's checkpoints

    @property
    def trains(self) -> bool:
        """True when a step trains (and so owns `<OUT>.checkpoints`)."""
        return any(m.step == "finetune" for m, _, _ in self.steps)

    @property
    def labels(self) -> list[str] | None:
        """Class names a new classification head is made for."""
        if self.dataset is None or self.task == "zero-shot-image-classification":
            return None
        return self.dataset.label_names


def plan_recipe(recipe: Recipe | dict, out, *, overwrite: bool = False,
                trust_remote_code: bool = False) -> Plan:
    """Check everything that can be checked without loading the model: the recipe, each
    step's parameters and model kinds, the task, the data, and the output path."""
    from .data import load_data, resolve_data
    from .families import check_length
    from .loading import peek
    from .outputs import check_output, output_path
    from .train import run_fingerprint

    if isinstance(recipe, dict):
        recipe = parse_recipe(recipe)
    out = output_path(out)
    steps = resolved_steps(recipe)
    source, config, kind, task = peek(recipe.model, recipe.task, trust_remote_code)
    if kind in ("text-encoder", "causal-lm"):  # sequence lengths the model can take
        for method, cfg, _ in steps:
            reserved = cfg.virtual_tokens if method.name == "prompt" else 0
            check_length(config, getattr(cfg, "max_length", None), "--max-length",
                         recipe.model, reserved)
        check_length(config, recipe.eval.max_length if recipe.eval else None, "--max-length",
                     recipe.model)
    for method, _, _ in steps:
        if kind not in method.kinds:
            raise InputError(f"{method.step} {method.name} does not apply to '{recipe.model}', a "
                             f"{kind} model; it applies to {', '.join(method.kinds)}. "
                             f"{method.hint}".strip())
    _check_chain(source, config, steps)
    load_options = {}
    for i, (method, cfg, _) in enumerate(steps):
        wanted = method.load_options(cfg) if method.load_options else {}
        if wanted and i > 0:
            raise InputError(f"step {i + 1} ({method.step} {method.name}) changes how the base "
                             "model is loaded (a 4/8-bit QLoRA base); it must be the first step.")
        load_options.update(wanted)
    request = resolve_data(source, task, recipe.data, recipe.seed, recipe.text_column,
                           recipe.image_column, recipe.label_column)
    needs_data = (recipe.eval is not None or task.endswith("classification")
                  or any(m.needs_data for m, _, _ in steps))
    dataset = None
    resolved = recipe.model_dump(mode="json", exclude_none=True)
    resolved.update({"task": task, "seed": request["seed"]})
    if needs_data:
        spec = request.pop("spec")
        dataset = load_data(spec, task, max_samples=recipe.max_samples, **request)
        resolved.update({"data": spec, **{k: v for k, v in request.items() if v is not None}})
    for method, cfg, _ in steps:  # calibration data: readable and of the right kind, now
        if getattr(cfg, "calib", None):
            load_data(cfg.calib, task, max_samples=1)
    plan = Plan(recipe, out, source, task, steps, dataset, request["seed"], load_options,
                resolved, _input_paths(source, dataset, steps))
    check_output(out, overwrite, plan.inputs)
    plan.fingerprint = run_fingerprint(resolved)
    return plan


def run_recipe(recipe: Recipe | dict, out, *, overwrite: bool = False, device: str = "cpu",
               trust_remote_code: bool = False, allow_pickle: bool = False,
               resume: bool = False, callbacks=None, lock_wait: float = 0.0) -> dict:
    """Run a recipe's steps on its model and write one artifact to `out`.

    Everything that can be checked is checked before the model is loaded (`plan_recipe`).
    Then OUT is locked for the rest of the run (another writer fails at once, or after
    `lock_wait` seconds). Training steps checkpoint into `<OUT>.checkpoints`; `resume`
    continues from the last complete checkpoint of the same run. The checkpoints are removed
    once the artifact is written, or when the run fails before saving one.
    """
    from . import checkpoints
    from .loading import resolve_device
    from .outputs import check_output, output_lock

    plan = plan_recipe(recipe, out, overwrite=overwrite, trust_remote_code=trust_remote_code)
    device = resolve_device(device)
    if resume and not plan.trains:
        raise InputError("--resume continues an interrupted training run; this recipe has no "
                         "training step. Run it without --resume.")
    fingerprint, workdir = plan.fingerprint, checkpoints.checkpoint_dir(plan.out)
    with output_lock(plan.out, lock_wait):
        check_output(plan.out, overwrite, plan.inputs)  # again: another writer may have finished
        if not plan.trains:
            return _execute(plan, device, trust_remote_code, allow_pickle, overwrite)
        checkpoints.claim(workdir, fingerprint, resume, overwrite)
        try:
            training = {"workdir": workdir, "fingerprint": fingerprint, "resume": resume,
                        "callbacks": list(callbacks or [])}
            result = _execute(plan, device, trust_remote_code, allow_pickle, overwrite, training)
        except BaseException:
            checkpoints.release(workdir, fingerprint, finished=False)  # keep what can resume
            raise
        checkpoints.release(workdir, fingerprint)
        return result


def _execute(plan: Plan, device: str, trust_remote_code: bool, allow_pickle: bool,
             overwrite: bool, training: dict | None = None) -> dict:
    """Load the model, apply the steps, evaluate, write the artifact (with OUT locked)."""
    from .artifacts import write_artifact
    from .evaluate import evaluate
    from .loading import load_model
    from .registry import Context

    recipe = plan.recipe
    log.info("loading %s for %s", recipe.model, plan.task)
    loaded = load_model(plan.source, plan.task, plan.labels, device=device, seed=plan.seed,
                        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                        **plan.load_options)
    ctx = Context(device=device, seed=plan.seed, dataset=plan.dataset, **(training or {}))
    workdir = ctx.workdir
    done = []
    for i, (method, cfg, _) in enumerate(plan.steps, 1):
        ctx.report = {}
        if workdir is not None:
            ctx.workdir = workdir / f"step-{i}"  # each training step keeps its own checkpoints
        log.info("step %s:%s", method.step, method.name)
        start = time.perf_counter()
        loaded = method.apply(loaded, cfg, ctx)
        if loaded.extra.pop("merged_adapter", None):  # a prune / quantize step merged it first
            ctx.report["merged_adapter_first"] = True
        done.append({"step": method.step, "method": method.name,
                     "params": cfg.model_dump(mode="json"),
                     "seconds": round(time.perf_counter() - start, 3), "report": ctx.report})
    metrics = []
    if recipe.eval is not None:
        log.info("evaluating on the %s split", recipe.eval.split)
        metrics.append(evaluate(loaded, plan.dataset, recipe.eval.split,
                                batch_size=recipe.eval.batch_size,
                                max_length=recipe.eval.max_length))
    plan.resolved["steps"] = [{"step": d["step"], "method": d["method"], **d["params"]}
                              for d in done]
    log.info("writing %s", plan.out)
    path = write_artifact(loaded, plan.out, recipe=plan.resolved, steps=done, metrics=metrics,
                          data_info=plan.dataset.info if plan.dataset is not None else None,
                          overwrite=overwrite, fmt=loaded.extra.get("format", "hf-model"))
    return {"artifact": str(path), "model": recipe.model, "task": plan.task, "steps": done,
            "metrics": metrics}
