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
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from .errors import InputError, shown

log = logging.getLogger("mmkit")

MAX_RECIPE_BYTES = 1 << 20
RECIPE_KEYS = ("model", "task", "data", "seed", "max_samples", "text_column", "image_column",
               "label_column", "steps", "eval")


class EvalSpec(BaseModel):
    """Which split to score after the steps, and how."""

    model_config = ConfigDict(extra="forbid")
    split: str = "test"
    batch_size: int = Field(32, ge=1, strict=True)  # strict: YAML's `true` is not 1
    max_length: int | None = Field(None, ge=2, strict=True)


class Recipe(BaseModel):
    """A validated recipe; `steps` keep their raw parameters until each method checks them."""

    model_config = ConfigDict(extra="forbid")
    model: str = "minilm"
    task: str | None = None
    data: str | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1, strict=True)  # YAML's `true` is not 1
    max_samples: int | None = Field(None, ge=1, strict=True)
    text_column: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    steps: list[dict] = Field(default_factory=list)
    eval: EvalSpec | None = None
    # where the recipe came from, for messages: ("recipe.yaml", False), or ("quantize", True)
    # for a command's one-step recipe (errors then name its flags)
    _origin: tuple = PrivateAttr(default=("recipe", False))
    _checked: list | None = PrivateAttr(default=None)  # core.steps.Step, once parsed


class _LineDict(dict):
    """A mapping that remembers the YAML line it started on."""

    line = None


class _LineLoader(yaml.SafeLoader):
    """yaml's safe loader, recording each mapping's line for error messages."""


def _construct_mapping(loader, node):
    seen = set()
    for key_node, _ in node.value:  # a repeated key would let the later value silently win
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)):
            continue  # a list or mapping as a key: the recipe's own checks refuse it
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key '{key}' is given twice in one mapping; keep one",
                key_node.start_mark)
        seen.add(key)
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
    from .steps import check_steps

    raw_steps = data.get("steps") if isinstance(data.get("steps"), list) else []
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
    recipe.steps = list(raw_steps)  # pydantic copies the mappings; keep their YAML lines
    recipe._origin = (where, cli)
    recipe._checked = check_steps(recipe.steps, where, cli)
    return recipe


def _input_paths(source, dataset, steps, others) -> list[tuple[str, str]]:
    """The local files and folders a run reads: the output must not touch them."""
    paths = []
    for src in (source, source.adapter, *others.values()):
        if src is not None and src.kind in ("artifact", "folder", "embedded"):
            paths.append(("model folder", src.path))
    if dataset is not None and not dataset.info["source"].startswith(("bundled:", "hf:")):
        paths.append(("data", dataset.info["source"]))
    for step in steps:
        calib = getattr(step.config, "calib", None)
        if calib and Path(calib).expanduser().exists():
            paths.append(("calibration data", str(Path(calib).expanduser())))
    return paths


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
    from .registry import is_mergeable

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
            # full, distill and elastic train every weight: they leave no adapter
            merged = cfg.merge or method.name in ("full", "distill", "elastic")
            state.update(adapter=None if merged else method.name, qlora=bool(
                getattr(cfg, "bits", None)), by=f"step {i}")
        elif method.step in ("prune", "quantize"):
            adapter = state["adapter"]
            if adapter and (not (adapter == "an" or is_mergeable(adapter)) or state["qlora"]):
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
    steps: list  # core.steps.Step, resolved for the model and device
    dataset: object = None  # Dataset, when the task or a step needs data
    seed: int = 0
    load_options: dict = field(default_factory=dict)
    resolved: dict = field(default_factory=dict)  # the recipe as recipe.yaml records it
    inputs: list = field(default_factory=list)  # (what, path) the output must not touch
    fingerprint: str = ""  # names the run, so --resume refuses another run's checkpoints
    models: dict = field(default_factory=dict)  # further models the steps name: ref -> source

    @property
    def trains(self) -> bool:
        """True when a step trains (and so owns `<OUT>.checkpoints`)."""
        return any(step.method.step == "finetune" for step in self.steps)

    @property
    def labels(self) -> list[str] | None:
        """Class names a new classification head is made for."""
        if self.dataset is None or self.task == "zero-shot-image-classification":
            return None
        return self.dataset.label_names


def plan_recipe(recipe: Recipe | dict, out, *, overwrite: bool = False, device: str = "cpu",
                trust_remote_code: bool = False) -> Plan:
    """Check everything that can be checked without loading the model: the recipe, each
    step's parameters and model kinds, the models steps name, the task, the data, and the
    output path."""
    from .loading import peek
    from .outputs import check_output, output_path
    from .steps import check_kinds, check_steps, resolve_steps
    from .train import run_fingerprint

    if isinstance(recipe, dict):
        recipe = parse_recipe(recipe)
    where, cli = recipe._origin
    out = output_path(out)
    source, config, kind, task = peek(recipe.model, recipe.task, trust_remote_code)
    checked = recipe._checked or check_steps(recipe.steps, where, cli)  # each step once
    if recipe.task is None and not _own_task(source, config):  # a bare base: the task of the
        named = _models_task(checked, trust_remote_code)          # models it merges
        if named and named != task:
            source, config, kind, task = peek(recipe.model, named, trust_remote_code)
    steps = resolve_steps(checked, kind, device, where, cli)
    check_kinds(steps, kind, recipe.model)
    _check_lengths(recipe, steps, config, kind)
    _check_chain(source, config, steps)
    models = _other_models(steps, task, kind, trust_remote_code)
    plan = Plan(recipe, out, source, task, steps, load_options=_load_options(steps, recipe),
                models=models)
    _plan_data(plan)
    plan.inputs = _input_paths(source, plan.dataset, steps, models)
    check_output(out, overwrite, plan.inputs)
    plan.fingerprint = run_fingerprint(plan.resolved)
    return plan


def _check_lengths(recipe: Recipe, steps, config, kind: str) -> None:
    """Sequence lengths the model can take (prompt tuning's virtual tokens reserved)."""
    from .families import check_length

    if kind not in ("text-encoder", "causal-lm"):
        return
    for method, cfg, _ in steps:
        reserved = cfg.virtual_tokens if method.name == "prompt" else 0
        check_length(config, getattr(cfg, "max_length", None), "--max-length", recipe.model,
                     reserved)
    check_length(config, recipe.eval.max_length if recipe.eval else None, "--max-length",
                 recipe.model)


def _load_options(steps, recipe: Recipe) -> dict:
    """How the base model is loaded (a QLoRA step's 4/8-bit base, a streaming merge's lazy
    base): the first step's say. A lazy base (its structure only) is for a recipe whose one
    step writes the weights itself: with more steps or an evaluation it is loaded whole."""
    options = {}
    for i, (method, cfg, _) in enumerate(steps):
        wanted = method.load_options(cfg) if method.load_options else {}
        if wanted.get("lazy") and (len(steps) > 1 or recipe.eval is not None):
            wanted = {k: v for k, v in wanted.items() if k != "lazy"}
        if wanted and i > 0:
            raise InputError(f"step {i + 1} ({method.step} {method.name}) changes how the base "
                             "model is loaded (a 4/8-bit QLoRA base); it must be the first step.")
        options.update(wanted)
    return options


def _own_task(source, config) -> str | None:
    """The task a model was made for: its artifact's, else its checkpoint head's."""
    from .families import head_task

    return ((source.adapter or source).manifest.get("task") or {}).get("name") or head_task(
        config)


def _models_task(steps, trust_remote_code: bool) -> str | None:
    """The task of the first further model a step names (the models a merge merges)."""
    from .loading import peek

    for method, cfg, _ in steps:
        for key in method.models:
            value = getattr(cfg, key, None)
            for ref in [value] if isinstance(value, str) else list(value or []):
                try:
                    source, config, _, _ = peek(ref, None, trust_remote_code)
                except InputError:
                    return None  # said with the step's name by _other_models
                return _own_task(source, config)
    return None


def _other_models(steps, task: str, base_kind: str, trust_remote_code: bool) -> dict:
    """The further models steps name (a teacher, models to merge): each resolved and its
    config read now, so a wrong reference fails before anything loads."""
    from .loading import peek

    found = {}
    for i, (method, cfg, _) in enumerate(steps, 1):
        for key in method.models:
            value = getattr(cfg, key, None)
            for ref in [value] if isinstance(value, str) else list(value or []):
                try:
                    _, config, kind, _ = peek(ref, None, trust_remote_code)
                    if kind != base_kind:  # say so, rather than that the task does not fit
                        raise InputError(f"'{ref}' is a {kind} model ({config.model_type}) and "
                                         f"the recipe's model a {base_kind} model: they are "
                                         "different architectures. Name models of one family.")
                    found[ref] = peek(ref, task, trust_remote_code)[0]
                except InputError as exc:
                    raise InputError(f"step {i} ({method.step} {method.name}), {key}: "
                                     f"{exc}") from None
    return found


def _plan_data(plan: Plan) -> None:
    """Resolve and load the data the task, the steps or the evaluation need; record the
    recipe as it will run (data, columns and seed filled in)."""
    from .data import load_data, resolve_data

    recipe, task = plan.recipe, plan.task
    request = resolve_data(plan.source, task, recipe.data, recipe.seed, recipe.text_column,
                           recipe.image_column, recipe.label_column)
    plan.seed = request["seed"]
    plan.resolved = recipe.model_dump(mode="json", exclude_none=True)
    plan.resolved.update({"task": task, "seed": plan.seed})
    if (recipe.eval is not None or task.endswith("classification")
            or any(step.method.needs_data for step in plan.steps)):
        spec = request.pop("spec")
        plan.dataset = load_data(spec, task, max_samples=recipe.max_samples, **request)
        plan.resolved.update({"data": spec, **{k: v for k, v in request.items()
                                               if v is not None}})
    for step in plan.steps:  # calibration data, a merge's datasets: readable and of the
        if getattr(step.config, "calib", None):  # right kind, now
            load_data(step.config.calib, task, max_samples=1)
        for spec in getattr(step.config, "data", None) or []:
            load_data(spec, task, max_samples=1)


def run_recipe(recipe: Recipe | dict, out, *, overwrite: bool = False, device: str = "cpu",
               trust_remote_code: bool = False, allow_pickle: bool = False,
               resume: bool = False, callbacks=None, lock_wait: float = 0.0,
               cache: bool = False) -> dict:
    """Run a recipe's steps on its model and write one artifact to `out`.

    Everything that can be checked is checked before the model is loaded (`plan_recipe`).
    Then OUT is locked for the rest of the run (another writer fails at once, or after
    `lock_wait` seconds). Training steps checkpoint into `<OUT>.checkpoints`; `resume`
    continues from the last complete checkpoint of the same run. The checkpoints are removed
    once the artifact is written, or when the run fails before saving one. With `cache`,
    each step's result is kept in the step cache (`core.run_cache`) and the steps found there
    are skipped.
    """
    from . import checkpoints
    from .distributed import active, check_trains, process_device
    from .loading import resolve_device
    from .outputs import check_output, output_lock

    device = process_device(resolve_device(device))  # several processes: each its own GPU
    plan = plan_recipe(recipe, out, overwrite=overwrite, device=device,
                       trust_remote_code=trust_remote_code)
    if resume and not plan.trains:
        raise InputError("--resume continues an interrupted training run; this recipe has no "
                         "training step. Run it without --resume.")
    check_trains(plan.trains)  # several processes share training only,
    cache = cache and not active()  # and every one would store the same steps
    run = RunOptions(device, trust_remote_code, allow_pickle, overwrite,
                     cache and not plan.load_options.get("lazy"))  # a lazy base: never whole
    fingerprint, workdir = plan.fingerprint, checkpoints.checkpoint_dir(plan.out)
    with output_lock(plan.out, lock_wait):
        check_output(plan.out, overwrite, plan.inputs)  # again: another writer may have finished
        if not plan.trains:
            return _execute(plan, run)
        if cache and not resume and checkpoints.same_run_to_resume(workdir, fingerprint):
            resume = True  # a rerun with the cache continues where this run stopped
            log.info("resuming the interrupted training step from its checkpoints in %s",
                     workdir)
        checkpoints.claim(workdir, fingerprint, resume, overwrite)
        try:
            result = _execute(plan, run, {"workdir": workdir, "fingerprint": fingerprint,
                                          "resume": resume, "callbacks": list(callbacks or [])})
        except BaseException:
            checkpoints.release(workdir, fingerprint, finished=False)  # keep what can resume
            raise
        checkpoints.release(workdir, fingerprint)
        return result


@dataclass(frozen=True)
class RunOptions:
    """How a planned recipe runs: where, what it may trust, and whether OUT may be replaced."""

    device: str = "cpu"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    overwrite: bool = False
    cache: bool = False  # keep each step's result in the step cache, and skip cached steps


def _resolved(plan: Plan, done: list) -> dict:
    """The recipe as recipe.yaml records it, with the steps done so far."""
    return {**plan.resolved, "steps": [{"step": d["step"], "method": d["method"], **d["params"]}
                                       for d in done]}


def _load_cached(plan: Plan, run: RunOptions, entry, cached: int):
    """The model as the first `cached` steps left it, from the step cache; None (and the
    steps run again) when the entry cannot be loaded."""
    from .errors import MmkitError
    from .loading import load_model, peek

    try:
        loaded = load_model(peek(str(entry), plan.task, run.trust_remote_code)[0], plan.task,
                            plan.labels, device=run.device, seed=plan.seed,
                            trust_remote_code=run.trust_remote_code)
    except (MmkitError, OSError) as exc:
        from .run_cache import discard

        log.warning("the cached result of step %d (%s) cannot be loaded (%s); removed it, "
                    "running every step again", cached, entry, exc)
        discard(entry)  # this run's result takes its place
        return None
    log.info("step%s %s cached: skipped (%s)", "s" * (cached > 1),
             "1" if cached == 1 else f"1-{cached}", entry)
    return loaded


def _execute(plan: Plan, run: RunOptions, training: dict | None = None) -> dict:
    """Load the model, apply the steps, evaluate, write the artifact (with OUT locked)."""
    from . import run_cache
    from .distributed import from_main
    from .loading import load_model
    from .registry import Context
    from .steps import apply_steps

    recipe = plan.recipe
    keys, cached, entry, records = [], 0, None, []
    if run.cache:
        keys = run_cache.step_keys(plan, run.device)
        cached, entry, records = run_cache.cached_prefix(keys)
    loaded = _load_cached(plan, run, entry, cached) if cached else None
    if loaded is None:
        cached, records = 0, []
        log.info("loading %s for %s", recipe.model, plan.task)
        loaded = load_model(plan.source, plan.task, plan.labels, device=run.device,
                            seed=plan.seed, trust_remote_code=run.trust_remote_code,
                            allow_pickle=run.allow_pickle, **plan.load_options)
    ctx = Context(device=run.device, seed=plan.seed, dataset=plan.dataset, models=plan.models,
                  allow_pickle=run.allow_pickle, trust_remote_code=run.trust_remote_code,
                  max_samples=recipe.max_samples, out=plan.out, origin=plan.source,
                  **(training or {}))
    data_info = plan.dataset.info if plan.dataset is not None else None
    records = [{**r, "cached": True} for r in records]

    def keep(model, new):  # each finished step goes to the cache as it ends
        done = records + new
        run_cache.store(model, keys[len(done) - 1], _resolved(plan, done), done, data_info,
                        plan.source)

    loaded, done = apply_steps(loaded, plan.steps[cached:], ctx, first=cached + 1,
                               on_done=keep if run.cache else None)
    done = records + done
    # several processes (accelerate launch): the main one evaluates and writes, all return it
    return from_main(lambda: _finish(plan, run, loaded, done, data_info, cached))


def _finish(plan: Plan, run: RunOptions, loaded, done: list, data_info, cached: int) -> dict:
    """Evaluate the model the steps made, and write the artifact."""
    from .artifacts import write_artifact
    from .evaluate import evaluate

    recipe = plan.recipe
    metrics = []
    if recipe.eval is not None:
        log.info("evaluating on the %s split", recipe.eval.split)
        metrics.append(evaluate(loaded, plan.dataset, recipe.eval.split,
                                batch_size=recipe.eval.batch_size,
                                max_length=recipe.eval.max_length))
    plan.resolved = _resolved(plan, done)
    lineage, parent = done, plan.source if cached else None  # not the cache entry
    if not done and loaded.source.is_adapter:  # the input adapter, copied as it came
        lineage, parent = _unchanged_adapter(loaded.source)
    log.info("writing %s", plan.out)
    path = write_artifact(loaded, plan.out, recipe=plan.resolved, steps=lineage,
                          metrics=metrics, data_info=data_info, overwrite=run.overwrite,
                          fmt=loaded.extra.get("format", "hf-model"), parent=parent)
    return {"artifact": str(path), "model": recipe.model, "task": plan.task, "steps": done,
            "metrics": metrics}


def _unchanged_adapter(adapter) -> tuple[list, object]:
    """The steps and parent an adapter written with no step records: its own, so that the copy
    sits on the adapter's base (an adapter on an adapter does not load) and keeps what its
    training recorded (the QLoRA bits, the seed)."""
    from .loading import _adapter_base

    base = _adapter_base(adapter)
    base.adapter = None
    return list(adapter.manifest.get("steps") or []), base
