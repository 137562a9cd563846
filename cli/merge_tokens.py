"""mmkit merge-tokens: training-free token merging (ToMe, Token Transforming) for ViT and
CLIP's image tower."""

from __future__ import annotations

import click

from . import method_options as generated, options


def _human(r: dict) -> str:
    rep = r["steps"][0]["report"]
    line = (f"{r['artifact']}  {r['steps'][0]['method']} on {r['model']}: {rep['tokens_in']} "
            f"-> {rep['tokens_out']} tokens (mean {rep['token_fraction_mean']:.0%} per block; "
            f"proportional attention {'on' if rep['proportional_attention'] else 'off'})")
    return line + options.metric_lines(r)


@click.command("merge-tokens", cls=options.Command)
@options.model_argument
@generated.method_option("tokens")
@generated.method_options("tokens")
@options.writes_a_model
def merge_tokens_command(model, method, do_eval, data_spec, out, overwrite, device,
                         allow_pickle, trust_remote_code, as_json, **settings):
    """Make MODEL (ViT, CLIP) merge similar image tokens in each block and write OUT: the
    same weights plus the setting, which every mmkit command applies on load. Training-free."""
    if model == "-":
        model = options.one_model_from(model, "merge-tokens")
    params = generated.step_params("tokens", method, settings, f"--method {method}")
    result = options.run_one_step(
        {"step": "tokens", "method": method, **params}, model=model, data_spec=data_spec,
        out=out, eval_split="test" if do_eval else None,
        run=options.run_options(device, allow_pickle, trust_remote_code, overwrite))
    options.emit(result, as_json, _human)
