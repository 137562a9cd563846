"""mmkit run: run a recipe (a model and ordered steps, in YAML) and write one artifact."""

from __future__ import annotations

import click

from . import options


def _human(r: dict) -> str:
    steps = " -> ".join(f"{s['step']}:{s['method']}" for s in r["steps"]) or "no steps"
    return f"{r['artifact']}  from {r['model']}  ({steps})" + options.metric_lines(r)


@click.command("run", cls=options.Command)
@click.argument("recipe", type=click.Path(dir_okay=False))
@options.output
@options.device()
@options.loading
@options.common
def run_command(recipe, out, overwrite, device, allow_pickle, trust_remote_code, as_json):
    """Run RECIPE (YAML: model, data, steps, eval) and write the artifact to OUT."""
    from ..core.recipe import load_recipe, parse_recipe, run_recipe

    parsed = parse_recipe(load_recipe(recipe), where=str(recipe))
    result = run_recipe(parsed, out, overwrite=overwrite, device=device,
                        allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    options.emit(result, as_json, _human)
