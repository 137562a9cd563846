"""mmkit prune: unstructured (magnitude, Wanda, N:M) and structured (heads, neurons, layers)."""

from __future__ import annotations

import click

from . import options

METHODS = ("magnitude", "wanda", "nm", "heads", "neurons", "layers")
METHOD_OPTIONS = {"sparsity": "--sparsity", "scope": "--scope", "nm": "--nm", "score": "--score",
                  "importance": "--importance", "calib": "--calib",
                  "calib_samples": "--calib-samples", "calib_length": "--calib-length",
                  "skip": "--skip"}


def _human(r: dict) -> str:
    rep = r["steps"][0]["report"]
    what = (f"{rep['sparsity']:.1%} of {rep['layers_pruned']} layers' weights zero"
            if "sparsity" in rep else
            {"heads": lambda: f"{len(rep['attention'])} attention layers resized",
             "neurons": lambda: "FFN width now " + _per_stack(rep["intermediate_size"]),
             "layers": lambda: "removed layers " + _per_stack(rep["removed_layers"])
             }[rep["method"]]())
    line = f"{r['artifact']}  {rep['method']} on {r['model']}: {what}"
    line += options.metric_lines(r)
    return line


def _per_stack(values: dict) -> str:
    """`768`, or `vision_model.encoder.layers 64, text_model.encoder.layers 64` for CLIP."""
    if len(values) == 1:
        return str(next(iter(values.values())))
    return ", ".join(f"{stack} {value}" for stack, value in values.items())


@click.command("prune", cls=options.Command)
@options.model_argument
@click.option("--method", type=click.Choice(METHODS), default="magnitude", show_default=True)
@click.option("--sparsity", type=float, help="Fraction of weights (or of heads / neurons / "
              "layers) to remove, in [0, 1). [default: 0.5; structured 0.25]")
@click.option("--scope", type=click.Choice(["layer", "global"]),
              help="magnitude: one threshold per layer or for all. [default: layer]")
@click.option("--nm", help="nm: keep N of every M weights, e.g. 2:4. [default: 2:4]")
@click.option("--score", type=click.Choice(["magnitude", "wanda"]), help="nm: the weight score.")
@click.option("--importance", type=click.Choice(["weights", "calibration"]),
              help="heads / neurons / layers: how to rank them. [default: calibration with "
                   "--calib, else weights]")
@click.option("--calib", help="Calibration data (wanda, nm --score wanda, importance).")
@click.option("--calib-samples", type=click.IntRange(min=1), help="[default: 64]")
@click.option("--calib-length", type=click.IntRange(min=8), help="[default: 128]")
@click.option("--skip", multiple=True, help="Leave layers matching this pattern dense.")
@click.option("--eval", "do_eval", is_flag=True, help="Score the result on the test split.")
@options.data
@options.output
@options.device()
@options.loading
@options.common
def prune_command(model, method, do_eval, task, data, text_column, image_column,
                  label_column, max_samples, seed, out, overwrite, device, allow_pickle,
                  trust_remote_code, as_json, **settings):
    """Prune MODEL and write OUT: zeroed weights (magnitude, wanda, nm), or a smaller model
    (heads, neurons, layers)."""
    from ..core.registry import get_method

    if model == "-":
        model = options.models_from(model)[0]
    params = options.method_params(settings, get_method("prune", method).config.model_fields,
                                   METHOD_OPTIONS, f"--method {method}")
    result = options.run_one_step(
        {"step": "prune", "method": method, **params}, model=model, task=task, data=data,
        text_column=text_column, image_column=image_column, label_column=label_column,
        max_samples=max_samples, seed=seed, eval_split="test" if do_eval else None, out=out,
        overwrite=overwrite, device=device, allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code)
    options.emit(result, as_json, _human)
