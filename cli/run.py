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
def run_command(recipe, model, no_cache, resume, out, overwrite, device, allow_pickle,
                trust_remote_code, as_json):
    """Run RECIPE (YAML: model, data, steps, eval) and write the artifact to OUT."""
    from ..core.recipe import load_recipe, parse_recipe, run_recipe

    data = load_recipe(recipe)
    if model is not None:
        data["model"] = model
    parsed = parse_recipe(data, where=str(recipe))
    result = run_recipe(parsed, out, overwrite=overwrite, device=device, resume=resume,
                        allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                        cache=not no_cache)
    options.emit(result, as_json, _human)
