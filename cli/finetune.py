"""mmkit finetune: train a PEFT adapter (or the full model) on labelled data or a corpus."""

from __future__ import annotations

import click

from ..core.errors import InputError
from . import options

METHODS = ("lora", "dora", "adalora", "vera", "ia3", "adaptformer", "prompt", "prefix", "vpt",
           "svfit", "full")
# CLI option -> config key, for the method-specific options
METHOD_OPTIONS = {
    "r": "--r", "alpha": "--alpha", "dropout": "--dropout", "target_modules": "--target-modules",
    "rslora": "--rslora", "bits": "--bits", "virtual_tokens": "--virtual-tokens",
    "init_r": "--init-r", "target_r": "--target-r", "bottleneck": "--bottleneck",
    "scale": "--scale", "deep": "--deep",
}
TRAINING_OPTIONS = ("epochs", "lr", "batch_size", "max_length", "weight_decay", "warmup",
                    "scheduler", "grad_accum", "save_steps", "max_steps", "merge", "keep_sparsity")


def _human(r: dict) -> str:
    rep = r["steps"][0]["report"]
    line = (f"{r['artifact']}  {r['steps'][0]['method']} on {r['model']}: trained "
            f"{rep['trainable_parameters']:,} of {rep['total_parameters']:,} parameters "
            f"({rep['trainable_percent']:.2f}%), {rep['steps']} steps, "
            f"{rep['train_samples_per_second']:.1f} samples/s")
    line += options.metric_lines(r)
    return line


def _method_flags(func):
    for name in reversed(METHODS):
        func = click.option(f"--{name}", "method", flag_value=name, default=None,
                            help=f"Fine-tune with {name}" + (" (default)." if name == "lora" else "."))(func)
    return func


@click.command("finetune", cls=options.Command)
@options.model_argument
@options.data
@_method_flags
@click.option("--r", type=click.IntRange(min=1),
              help="Rank (LoRA, DoRA, VeRA), or singular values per layer (SVFit). [default: 16; "
                   "VeRA 256; SVFit 32]")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True),
              help="LoRA scaling numerator. [default: 2 x r]")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True),
              help="Adapter dropout (LoRA family, VeRA, AdaptFormer).")
@click.option("--target-modules", help="Comma-separated layer names, or all-linear. [default: "
                                       "all-linear; IA3: keys, values, FFN down-projection]")
@click.option("--rslora", is_flag=True, default=None, help="Scale LoRA by alpha/sqrt(r).")
@click.option("--bits", type=click.Choice(["4", "8"]), help="QLoRA: load the base in 4-bit (nf4, "
                                                            "double quantization) or 8-bit.")
@click.option("--virtual-tokens", type=click.IntRange(min=1),
              help="Prompt / prefix / VPT length. [default: 20; VPT 10]")
@click.option("--deep", is_flag=True, default=None, help="VPT: fresh prompts in every layer.")
@click.option("--bottleneck", type=click.IntRange(min=1), help="AdaptFormer width. [default: 64]")
@click.option("--scale", type=click.FloatRange(min=0, min_open=True),
              help="AdaptFormer branch scale. [default: 0.1]")
@click.option("--init-r", type=click.IntRange(min=1), help="AdaLoRA starting rank.")
@click.option("--target-r", type=click.IntRange(min=1), help="AdaLoRA average final rank.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=3, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True),
              help="Peak learning rate. [default: the method's]")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--max-length", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens per text, or per window for causal-lm.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.01, show_default=True)
@click.option("--warmup", type=click.FloatRange(0, 1, max_open=True), default=0.06,
              show_default=True, help="Warm-up as a fraction of the steps.")
@click.option("--scheduler", type=click.Choice(["linear", "cosine", "constant"]), default="linear",
              show_default=True)
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--save-steps", type=click.IntRange(min=1),
              help="Also checkpoint (and evaluate) every N steps, not only each epoch.")
@click.option("--max-steps", type=click.IntRange(min=1), help="Stop after N optimizer steps.")
@click.option("--merge", is_flag=True, default=None,
              help="Merge the adapter into the weights and write a full model.")
@click.option("--keep-sparsity", is_flag=True, default=None,
              help="Keep a pruned model's zeros while training (merges always keep them).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run of this same command "
                                             "from its last checkpoint (in OUT.checkpoints).")
@click.option("--eval-split", type=click.Choice(["validation", "test", "none"]), default="test",
              show_default=True, help="Score the result on this split.")
@options.output
@options.device()
@options.loading
@options.common
@click.pass_context
def finetune_command(ctx, model, task, data, text_column, image_column, label_column, max_samples,
                     seed, method, eval_split, out, overwrite, resume, device, allow_pickle,
                     trust_remote_code, as_json, **settings):
    """Fine-tune MODEL with a PEFT method (LoRA by default) or fully, and write OUT: a peft
    adapter folder, or a full model with --merge / --full."""
    from ..core.registry import get_method

    method = method or "lora"
    if model == "-":
        model = options.models_from(model)[0]
    fields = get_method("finetune", method).config.model_fields
    params = {}
    for key, value in settings.items():
        explicit = ctx.get_parameter_source(key).name not in ("DEFAULT", "DEFAULT_MAP")
        if key in METHOD_OPTIONS and explicit and key not in fields:
            usable = ", ".join(METHOD_OPTIONS[k] for k in fields if k in METHOD_OPTIONS) or "none"
            raise InputError(f"{METHOD_OPTIONS[key]} does not apply to --{method}. Options "
                             f"--{method} takes: {usable}.")
        if value is None or (key not in TRAINING_OPTIONS and not explicit):
            continue
        if key == "target_modules":
            value = value if value == "all-linear" else [v.strip() for v in value.split(",")]
        params[key] = int(value) if key == "bits" else value
    result = options.run_one_step(
        {"step": "finetune", "method": method, **params}, model=model, task=task, data=data,
        text_column=text_column, image_column=image_column, label_column=label_column,
        max_samples=max_samples, seed=seed,
        eval_split=None if eval_split == "none" else eval_split, out=out, overwrite=overwrite,
        device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
        resume=resume)
    options.emit(result, as_json, _human)
