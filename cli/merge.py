"""mmkit merge: merge fine-tunes of one base (model soups, task arithmetic, TIES, DARE, SLERP),
or fold one adapter into its base."""

from __future__ import annotations

import click

from ..core.errors import InputError, shown
from . import completion, method_options as generated, options

ONE = ("merging needs two or more models, or one adapter: '{ref}' is a full model. Give the "
       "models to merge (with --base BASE for task-arithmetic, ties and dare), or an adapter "
       "folder to fold into its base.")


def _human(r: dict) -> str:
    rep = r["steps"][0]["report"]
    if rep["method"] == "adapter":
        line = (f"{r['artifact']}  merged the {rep['adapter_kind']} adapter {rep['adapter']} "
                "into its base")
    elif rep.get("as_adapter"):
        line = (f"{r['artifact']}  {rep['method']} of {len(rep['models'])} LoRA adapters as one "
                f"{rep['as_adapter']} adapter of {r['model']} (max rank {rep['max_rank']}, "
                f"{rep['layers']} layers)")
    else:
        heads = _heads_said(rep.get("heads"))
        line = (f"{r['artifact']}  {rep['method']} of {len(rep['models'])} models onto "
                f"{r['model']}: {rep['tensors_merged']} tensors merged{heads}")
    if rep.get("lambda_auto"):
        line += f"; lambda auto: {rep['lambda_auto']['chosen']} on validation"
    if rep["method"] == "greedy-soup":
        line += (f"; soup of {len(rep['ingredients'])} (validation {rep['soup_score']:.4f}, best "
                 f"single {max(rep['single'].values()):.4f})")
    if rep["method"] == "atlas":
        loss = rep["few_shot_loss"]
        line += f"; few-shot loss {loss['start']:.4f} -> {loss['end']:.4f}"
    return line + options.metric_lines(r)


def _heads_said(heads) -> str:
    if heads is None:
        return ""
    if heads == "merged":
        return ", heads merged"
    extra = heads.get("extra") or {}
    if not extra:
        return ", heads averaged (the base's head is untrained)"
    said = f"; main head: {', '.join(heads['main']['labels'] or [])}"
    return said + "".join(f"; head {name} ({', '.join(h['labels'][:4])}) kept in heads/{name}"
                          for name, h in extra.items())


def _lambda(value: str):
    if value == "auto":
        return value
    try:
        lam = float(value)
    except ValueError:
        lam = float("nan")
    if lam != lam or lam in (float("inf"), float("-inf")):
        raise InputError(f"--lambda {shown(value)}: give a number (e.g. 0.3) or auto.")
    return lam


def _data(data_spec, method: str, lam) -> tuple:
    """(the data spec of the recipe, the step's list of datasets or None): --data names one
    dataset, or one per task comma-separated; the first is the recipe's data."""
    import dataclasses

    from ..compression.merge.configs import NEEDS_DATA

    if data_spec.data is None:
        if method in NEEDS_DATA or lam == "auto":
            what = "--lambda auto" if lam == "auto" else f"--method {method}"
            raise InputError(f"{what} chooses on labelled data: give --data, one dataset per "
                             "task the models were fine-tuned on, comma-separated (e.g. --data "
                             "tweets-sentiment,bbc-news). Its validation split is used, never "
                             "test.")
        return data_spec, None
    names = [d.strip() for d in data_spec.data.split(",") if d.strip()]
    if not names:
        raise InputError(f"--data {shown(data_spec.data)} names no dataset.")
    spec = dataclasses.replace(data_spec, data=names[0])
    return spec, (names if len(names) > 1 else None)


def _weights(value: str) -> list[float]:
    try:
        return [float(w) for w in value.split(",") if w.strip()]
    except ValueError:
        raise InputError(f"--weights {shown(value)}: give one number per MODEL, comma-separated "
                         "(e.g. 0.5,0.5).") from None


def _adapter_step(models: list[str], base, given: dict, settings: dict) -> tuple[str, dict]:
    """`mmkit merge ADAPTER -o OUT`: the adapter is the recipe's model."""
    from ..core.refs import resolve

    given = {"--base": base, **given,
             **{generated.flag(key): value for key, value in settings.items() if value != ()}}
    extra = [flag for flag, value in given.items() if value is not None]
    if len(models) != 1 or extra:
        raise InputError("--method adapter folds one adapter into its base: give one MODEL (the "
                         f"adapter folder) and no {', '.join(extra) or 'other models'}.")
    if not resolve(models[0]).is_adapter:
        raise InputError(ONE.format(ref=shown(models[0])))
    return models[0], {"step": "merge", "method": "adapter"}


def _merge_step(models: list[str], base, method: str, given: dict, settings: dict):
    """The recipe's model (the base, or the first MODEL for linear / slerp) and the step."""
    from ..core.registry import get_method

    fields = get_method("merge", method).config.model_fields
    for flag, key in (("--weights", "weights"), ("--lambda", "lam")):
        if given[flag] is not None and key not in fields:
            raise InputError(f"{flag} does not apply to --method {method}.")
    if base is None:
        if "lam" in fields:  # the task-vector methods
            raise InputError(f"{method} adds task vectors (model - base) to a base: pass --base "
                             "BASE, the model that MODELS were fine-tuned from.")
        if len(models) < 2:
            raise InputError(ONE.format(ref=shown(models[0])))
        base = models[0]  # the structure donor; merged only as one of the models
    if method == "slerp" and len(models) != 2:
        raise InputError(f"--method slerp interpolates exactly two MODELS; {len(models)} given "
                         "(--base only gives the architecture).")
    params = generated.step_params("merge", method, settings, f"--method {method}")
    if given["--weights"] is not None:
        params["weights"] = _weights(given["--weights"])
        if len(params["weights"]) != len(models):
            raise InputError(f"--weights gives {len(params['weights'])} weights for "
                             f"{len(models)} MODELS: give one weight per model.")
    if given["--lambda"] is not None:
        params["lambda"] = _lambda(given["--lambda"])
        if params["lambda"] == "auto" and method not in ("task-arithmetic", "ties", "dare-linear",
                                                         "dare-ties"):
            raise InputError(f"--lambda auto applies to task-arithmetic, ties and dare; "
                             f"--method {method} does not take it.")
    return base, {"step": "merge", "method": method, "models": models, **params}


@click.command("merge", cls=options.Command)
@click.argument("models", nargs=-1, required=True, shell_complete=completion.complete_model)
@click.option("--base", default=None, shell_complete=completion.complete_model,
              help="The model MODELS were fine-tuned from: task vectors are taken against it, "
                   "and it gives the architecture. Needed by task-arithmetic, ties, dare and "
                   "atlas; linear, slerp and greedy-soup default to the first MODEL (not "
                   "averaged unless listed).")
@generated.method_option("merge")
@click.option("--weights", default=None,
              help="One weight per MODEL, comma-separated (e.g. 0.7,0.3). [default: equal; "
                   "linear normalises them to sum 1]")
@click.option("--lambda", "lam", default=None,
              help="Scale of the summed task vectors (task-arithmetic, ties, dare), or auto: "
                   "the value of 0.1 ... 1.5 scoring best on the validation split of --data; "
                   "atlas: the coefficients' start. [default: 1; atlas 0.3]")
@generated.method_options("merge", skip=("models", "weights", "lam", "data"))
@options.writes_a_model
def merge_command(models, base, method, weights, lam, do_eval, data_spec, out, overwrite,
                  device, allow_pickle, trust_remote_code, as_json, **settings):
    """Merge MODELS (fine-tunes of one base) into one model and write OUT; or, given one
    adapter, fold it into its base. Fine-tunes of one task average their heads; fine-tunes of
    different tasks keep one head each (OUT/heads/NAME), and mmkit eval OUT --data X uses the
    head that fits X. greedy-soup, atlas and --lambda auto choose on --data (validation
    split; atlas learns from a few training examples per class)."""
    models = [ref for model in models for ref in options.models_from(model)]
    given = {"--weights": weights, "--lambda": lam}
    chosen = click.get_current_context().get_parameter_source("method")
    defaulted = chosen is click.core.ParameterSource.DEFAULT
    if method == "adapter" or (defaulted and len(models) == 1 and base is None):
        model, step = _adapter_step(models, base, given, settings)
    else:
        model, step = _merge_step(models, base, method, given, settings)
        data_spec, datasets = _data(data_spec, method, step.get("lambda"))
        if datasets:
            step["data"] = datasets
    result = options.run_one_step(
        step, model=model, data_spec=data_spec, out=out, eval_split="test" if do_eval else None,
        run=options.run_options(device, allow_pickle, trust_remote_code, overwrite))
    options.emit(result, as_json, _human)
