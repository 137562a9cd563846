"""mmkit prune: unstructured (magnitude, Wanda, N:M) and structured (heads, neurons, layers)."""

from __future__ import annotations

import click

from . import method_options as generated, options

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
@generated.method_option("prune")
@generated.method_options("prune")
@options.writes_a_model
def prune_command(model, method, do_eval, data_spec, out, overwrite, device, allow_pickle,
                  trust_remote_code, as_json, **settings):
    """Prune MODEL and write OUT: zeroed weights (magnitude, wanda, nm), or a smaller model
    (heads, neurons, layers)."""
    if model == "-":
        model = options.one_model_from(model, "prune")
    params = generated.step_params("prune", method, settings, f"--method {method}")
    result = options.run_one_step(
        {"step": "prune", "method": method, **params}, model=model, data_spec=data_spec,
        out=out, eval_split="test" if do_eval else None,
        run=options.run_options(device, allow_pickle, trust_remote_code, overwrite))
    options.emit(result, as_json, _human)
