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
@options.device()
@options.loading
@options.common
@options.with_models
def eval_command(ref, data_spec, split, batch_size, max_length, device, allow_pickle,
                 trust_remote_code, as_json):
    """Score MODEL on a split of a dataset (accuracy and macro-F1, or perplexity)."""
    from ..core.data import load_data, resolve_data
    from ..core.evaluate import evaluate
    from ..core.families import check_length
    from ..core.loading import load_model, peek

    source, config, kind, task = peek(ref, data_spec.task, trust_remote_code)
    if kind in ("text-encoder", "causal-lm"):
        check_length(config, max_length, "--max-length", ref)
    request = resolve_data(source, task, data_spec.data, data_spec.seed, **data_spec.columns)
    dataset = load_data(request.pop("spec"), task, max_samples=data_spec.max_samples, **request)
    labels = dataset.label_names if task != "zero-shot-image-classification" else None
    loaded = load_model(source, task, labels, device=device, seed=dataset.info["seed"],
                        allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    result = {"model": ref, **evaluate(loaded, dataset, split, batch_size=batch_size,
                                       max_length=max_length),
              "fresh_head": loaded.fresh_head, "data_info": dataset.info}
    if loaded.source.path != (source.adapter or source).path:  # one of several heads
        result["head"] = loaded.source.path
    options.emit(result, as_json, _human)
