"""mmkit extract: cut a standalone smaller model out of an elastic super-network."""

from __future__ import annotations

import click

from . import method_options as generated, options


def _human(r: dict) -> str:
    rep = r["steps"][0]["report"]
    line = (f"{r['artifact']}  {rep['subnetwork']} of {r['model']}: "
            f"{rep['parameters_after']:,} of {rep['parameters_before']:,} parameters "
            f"({rep['parameter_fraction']:.0%}), {rep['format']} format")
    return line + options.metric_lines(r)


@click.command("extract", cls=options.Command)
@options.model_argument
@generated.method_options("extract")
@options.writes_a_model
def extract_command(model, do_eval, data_spec, out, overwrite, device, allow_pickle,
                    trust_remote_code, as_json, **settings):
    """Cut the sub-network of the given widths and depth out of SUPERNET (a model trained
    with `mmkit finetune --elastic`) and write it to OUT as a standalone model."""
    if model == "-":
        model = options.one_model_from(model, "extract")
    params = generated.step_params("extract", "subnet", settings, "extract")
    result = options.run_one_step(
        {"step": "extract", "method": "subnet", **params}, model=model, data_spec=data_spec,
        out=out, eval_split="test" if do_eval else None,
        run=options.run_options(device, allow_pickle, trust_remote_code, overwrite))
    options.emit(result, as_json, _human)
