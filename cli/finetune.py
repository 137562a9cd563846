"""mmkit finetune: train a PEFT adapter (or the full model) on labelled data or a corpus."""

from __future__ import annotations

import click

from . import method_options as generated, options

def _human(r: dict) -> str:
    rep = r["steps"][0]["report"]
    line = (f"{r['artifact']}  {r['steps'][0]['method']} on {r['model']}: trained "
            f"{rep['trainable_parameters']:,} of {rep['total_parameters']:,} parameters "
            f"({rep['trainable_percent']:.2f}%), {rep['steps']} steps, "
            + (f"{rep['train_samples_per_second']:.1f} samples/s"
               if rep.get("train_samples_per_second") is not None
               else "none left to train (resumed at the last step)"))
    line += options.metric_lines(r)
    return line


@click.command("finetune", cls=options.Command)
@options.model_argument
@options.data
@generated.method_flags("finetune", "Fine-tune", skip=("elastic",))
@click.option("--elastic", "elastic_mode", type=click.Choice(["nested", "sampled"]),
              help="Fine-tune an elastic super-network: every weight, with nested (MatFormer) "
                   "or sampled (InstaTune) sub-networks trained alongside; cut them out with "
                   "`mmkit extract`.")
@generated.method_options("finetune", skip=("dora", "mode"))  # DoRA is its own method
@click.option("--resume", is_flag=True, help="Continue an interrupted run of this same command "
                                             "from its last checkpoint (in OUT.checkpoints).")
@click.option("--eval-split", type=click.Choice(["validation", "test", "none"]), default="test",
              show_default=True, help="Score the result on this split.")
@options.output
@options.device()
@options.loading
@options.common
def finetune_command(model, data_spec, method, elastic_mode, eval_split, out, overwrite, resume,
                     device, allow_pickle, trust_remote_code, as_json, **settings):
    """Fine-tune MODEL with a PEFT method (LoRA by default) or fully, and write OUT: a peft
    adapter folder, or a full model with --merge / --full / --distill / --elastic."""
    from ..core.errors import InputError
    from ..core.registry import default_method

    if elastic_mode and method:
        raise InputError(f"--elastic and --{method} are two methods; elastic training is full "
                         "fine-tuning. Drop one of them.")
    method = "elastic" if elastic_mode else method or default_method("finetune")
    if model == "-":
        model = options.one_model_from(model, "finetune")
    flag = f"--elastic {elastic_mode}" if elastic_mode else f"--{method}"
    params = generated.step_params("finetune", method, settings, flag)
    if elastic_mode:
        params["mode"] = elastic_mode
    result = options.run_one_step(
        {"step": "finetune", "method": method, **params}, model=model, data_spec=data_spec,
        out=out, eval_split=None if eval_split == "none" else eval_split, resume=resume,
        run=options.run_options(device, allow_pickle, trust_remote_code, overwrite))
    options.emit(result, as_json, _human)
