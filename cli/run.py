"""mmkit run: run a recipe (a model and ordered steps, in YAML) and write one artifact."""

from __future__ import annotations

import click

from . import completion, options


def _human(r: dict) -> str:
    steps = " -> ".join(f"{s['step']}:{s['method']}" + (" (cached)" if s.get("cached") else "")
                        for s in r["steps"]) or "no steps"
    return f"{r['artifact']}  from {r['model']}  ({steps})" + options.metric_lines(r)


@click.command("run", cls=options.Command)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--model", "model", default=None, metavar="REF",
              shell_complete=completion.complete_model,
              help="Run the recipe on this model instead of the one it names.")
@click.option("--max-samples", type=click.IntRange(min=1), default=None,
              help="Use at most this many examples of each split (instead of the recipe's "
                   "max_samples).")
@click.option("--set", "changes", multiple=True, metavar="KEY=VALUE",
              help="Change one value of the recipe (repeatable): a recipe key (seed=1), the "
                   "eval's (eval.split=validation), or a step's parameter by step number or "
                   "step name (2.sparsity=0.3; finetune.epochs=1 sets every finetune step). "
                   "VALUE is YAML: 5, true, [out/a, out/b].")
@click.option("--no-cache", is_flag=True,
              help="Neither reuse nor keep step results (see `mmkit cache`); by default a step "
                   "whose model, parameters, data and mmkit version match an earlier run's is "
                   "skipped, and each finished step is kept, so an interrupted run resumes at "
                   "its first unfinished step.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted training step from its last checkpoint.")
@options.output
@options.device()
@options.loading
@options.common
def run_command(recipe, model, max_samples, changes, no_cache, resume, out, overwrite, device,
                allow_pickle, trust_remote_code, as_json):
    """Run RECIPE (YAML: model, data, steps, eval) and write the artifact to OUT."""
    from ..core.recipe import load_recipe, parse_recipe, run_recipe

    data = load_recipe(recipe)
    if model is not None:
        changes = (f"model={model}", *changes)  # a reference is a string, never YAML
    if max_samples is not None:
        changes = (f"max_samples={max_samples}", *changes)
    apply_changes(data, changes, str(recipe))
    parsed = parse_recipe(data, where=str(recipe))
    result = run_recipe(parsed, out, overwrite=overwrite, device=device, resume=resume,
                        allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                        cache=not no_cache)
    options.emit(result, as_json, _human)


def apply_changes(data: dict, changes, where: str) -> None:
    """Apply `--set KEY=VALUE` changes to a loaded recipe, in place. KEY is a recipe key,
    `eval.KEY`, or `STEP.KEY` where STEP is a step's number (1 = the first) or a step name
    (every step of that name). VALUE is parsed as YAML, except a model reference."""
    import yaml

    from ..core.errors import InputError, shown
    from ..core.recipe import RECIPE_KEYS

    seen = set()
    for change in changes:
        key, sep, text = change.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"--set {shown(change, 80)}: expected KEY=VALUE, e.g. "
                             "max_samples=100, 2.sparsity=0.3 or finetune.epochs=1.")
        if key in seen:
            raise InputError(f"'{key}' is set twice (by --set, --model or --max-samples); "
                             "set it once (mmkit does not let a later value silently win).")
        seen.add(key)
        if key == "model":
            value = text.strip()
        else:
            try:
                value = yaml.safe_load(text)
            except (yaml.YAMLError, RecursionError):
                raise InputError(f"--set {shown(change, 80)}: the value is not valid YAML; "
                                 "quote it, e.g. --set \"merge.models=[out/a, out/b]\".") \
                    from None
        which, dot, name = key.rpartition(".")
        if not dot:
            if name == "steps" or name not in RECIPE_KEYS:
                raise InputError(f"--set {shown(key, 60)}: not a recipe key. Recipe keys: "
                                 f"{', '.join(k for k in RECIPE_KEYS if k != 'steps')}; a "
                                 "step's parameter is STEP.KEY (2.sparsity, finetune.epochs).")
            data[name] = value
        elif which == "eval":
            if not isinstance(data.get("eval"), dict):
                data["eval"] = {}
            data["eval"][name] = value
        else:
            for step in _steps_named(data, which, key, where):
                if name == "step":
                    raise InputError(f"--set {key}: a step's kind cannot be changed; edit "
                                     f"{where} instead.")
                step[name] = value


def _steps_named(data: dict, which: str, key: str, where: str) -> list[dict]:
    """The steps `which` names: one by its number, or every step of that name."""
    from ..core.errors import InputError, shown

    steps = data.get("steps") if isinstance(data.get("steps"), list) else []
    names = [s.get("step") if isinstance(s, dict) else None for s in steps]
    listed = ", ".join(f"{i} {n}" for i, n in enumerate(names, 1)) or "none"
    if which.isdigit():
        if not 1 <= int(which) <= len(steps) or not isinstance(steps[int(which) - 1], dict):
            raise InputError(f"--set {shown(key, 60)}: {where} has no step {which}. Its steps: "
                             f"{listed}.")
        return [steps[int(which) - 1]]
    found = [s for s, n in zip(steps, names) if n == which]
    if not found:
        raise InputError(f"--set {shown(key, 60)}: {where} has no {shown(which, 40)} step. Its "
                         f"steps: {listed} (name one by number or by step name).")
    return found
