"""mmkit eval: accuracy and macro-F1, or perplexity, of a model on a dataset split."""

from __future__ import annotations

import click

from . import options


def _human(r: dict) -> str:
    if "perplexity" in r:
        score = f"perplexity {r['perplexity']:.3f} over {r['tokens']} tokens"
    else:
        score = f"{options.score_line(r)}  ({r['examples']} examples)"
    head = f" (head {r['head']})" if r.get("head") else ""
    if r.get("linear_probe"):
        head += f" linear probe (C {r['linear_probe']['C']:g})"
    elif r.get("templates"):
        head += f" {len(r['templates'])} template(s)"
    return f"{r['model']}{head}  {r['task']}  {r['data']}:{r['split']}  {score}  [{r['seconds']:.1f} s]"


@click.command("eval", cls=options.Command)
@options.model_argument
@options.data
@click.option("--split", type=click.Choice(["train", "validation", "test"]), default="test",
              show_default=True, help="Which split to score.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--max-length", type=click.IntRange(min=2), default=None,
              help="Tokens per text (classification, default 128) or per window (causal-lm, "
                   "default 512).")
@click.option("--template", "templates", multiple=True, metavar="TEMPLATE|SET",
              help="CLIP zero-shot: a prompt template with {} where the class name goes, or a "
                   "named set (default: 'a photo of {}.'; photos: seven photo templates). "
                   "Repeat to ensemble: each class's unit text embeddings are averaged.")
@click.option("--linear-probe", is_flag=True,
              help="Instead of the model's own head / prompts: fit a logistic regression on "
                   "its frozen image features (CLIP, ViT) of the train split, C chosen on the "
                   "validation split, and score the test split.")
@options.device()
@options.loading
@options.common
@options.with_models
def eval_command(ref, data_spec, split, batch_size, max_length, templates, linear_probe,
                 device, allow_pickle, trust_remote_code, as_json):
    """Score MODEL on a split of a dataset (accuracy and macro-F1, or perplexity)."""
    from ..core.data import load_data, resolve_data
    from ..core.evaluate import evaluate
    from ..core.errors import InputError
    from ..core.families import check_length
    from ..core.loading import load_model, peek
    from ..core.tasks.zero_shot import resolve_templates

    source, config, kind, task = peek(ref, data_spec.task, trust_remote_code)
    if templates and (task != "zero-shot-image-classification" or linear_probe):
        raise InputError("--template describes classes for CLIP zero-shot classification; "
                         f"drop it ({'--linear-probe uses no text' if linear_probe else task}).")
    templates = resolve_templates(templates) if templates else None
    if linear_probe and split != "test":
        raise InputError(f"--linear-probe trains on the train split and chooses C on the "
                         f"validation split, so it scores the test split only; drop --split "
                         f"{split}.")
    if kind in ("text-encoder", "causal-lm"):
        check_length(config, max_length, "--max-length", ref)
    request = resolve_data(source, task, data_spec.data, data_spec.seed, **data_spec.columns)
    dataset = load_data(request.pop("spec"), task, max_samples=data_spec.max_samples, **request)
    labels = dataset.label_names if task != "zero-shot-image-classification" else None
    loaded = load_model(source, task, labels, device=device, seed=dataset.info["seed"],
                        allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if linear_probe:
        from ..core.linear_probe import linear_probe as probe

        scores = probe(loaded, dataset, split, batch_size=batch_size)
    else:
        extra = {"templates": templates} if templates else {}
        scores = evaluate(loaded, dataset, split, batch_size=batch_size, max_length=max_length,
                          **extra)
    result = {"model": ref, **scores, "fresh_head": loaded.fresh_head, "data_info": dataset.info}
    if loaded.source.path != (source.adapter or source).path:  # one of several heads
        result["head"] = loaded.source.path
    options.emit(result, as_json, _human)
