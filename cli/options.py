"""Options that several commands share, defined once."""

from __future__ import annotations

import functools
import json
import sys

import click

from ..core.loading import TASKS
from .completion import complete_data, complete_device, complete_model


class Command(click.Command):
    """A command that refuses an option given twice or two that exclude each other (click
    would silently keep the last: `--lora --dora` trained DoRA), and whose registry-made
    options (`method_options.Later`) are built the first time its parameters are used."""

    @property
    def params(self):
        from .method_options import Later, registry_state

        if not any(isinstance(p, Later) for p in self._raw_params):
            return self._raw_params
        state = registry_state()  # rebuilt if a method was registered since (a plugin, a test)
        if self._built_for != state:
            self._built = [q for p in self._raw_params
                           for q in (p.build() if isinstance(p, Later) else [p])]
            self._built_for = state
        return self._built

    @params.setter
    def params(self, value):
        self._raw_params, self._built_for = value, None

    def parse_args(self, ctx, args):
        parser = self.make_parser(ctx)
        _, _, order = parser.parse_args(args=list(args))  # parsing only; nothing is run
        single = [p for p in order if isinstance(p, click.Option) and not p.multiple
                  and not p.count and not p.is_eager]
        by_name = {}
        for param in single:
            by_name.setdefault(param.name, []).append(param)
        for name, params in by_name.items():
            flags = [p.opts[0] for p in params]
            if len(set(flags)) > 1:
                raise click.UsageError(f"{' and '.join(dict.fromkeys(flags))} exclude each "
                                       "other; give one of them.", ctx)
            if len(params) > 1:
                raise click.UsageError(f"{flags[0]} was given {len(params)} times; give it once "
                                       "(mmkit does not let a later value silently win).", ctx)
        return super().parse_args(ctx, args)


def _set_debug(ctx, _param, value):
    if value:
        ctx.meta["mmkit.debug"] = True
    return value


def _set_quiet(ctx, _param, value):
    import logging

    from ..core import progress

    progress.set_quiet(value)
    if value:
        logging.getLogger("mmkit").setLevel(logging.WARNING)
    return value


def common(func):
    """--json, --quiet and --debug, on every command."""
    func = click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON object per result on stdout.")(func)
    func = click.option("--quiet", "-q", is_flag=True, expose_value=False, callback=_set_quiet,
                        help="No progress bars and no log lines on stderr (warnings and errors "
                             "still show). Bars show only when stderr is a terminal.")(func)
    func = click.option("--debug", is_flag=True, expose_value=False, is_eager=True,
                        callback=_set_debug, help="Show tracebacks on errors.")(func)
    return func


def model_argument(func):
    """MODEL: a reference, or `-` to read artifact paths / JSON lines from stdin."""
    return click.argument("model", default="minilm", required=False,
                          shell_complete=complete_model)(func)


def loading(func):
    """--trust-remote-code and --allow-pickle: both off unless asked for."""
    func = click.option("--allow-pickle", is_flag=True,
                        help="Allow loading pickle (.bin) weights. Only for files you trust.")(func)
    func = click.option("--trust-remote-code", is_flag=True,
                        help="Run model code shipped with a hub model. Only for code you trust.")(func)
    return func


def device(default: str = "cpu"):
    """--device cpu|cuda|cuda:N|auto."""
    return click.option("--device", default=default, show_default=True,
                        shell_complete=complete_device,
                        help="Where to run: cpu, cuda, cuda:N or auto.")


DATA_KEYS = ("task", "data", "text_column", "image_column", "label_column", "max_samples",
             "seed")


def data(func):
    """Task and data selection, shared by every command that reads data; the command gets
    them as one `data_spec` (core.data.DataSpec)."""
    from ..core.data import DataSpec

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        kwargs["data_spec"] = DataSpec(**{key: kwargs.pop(key) for key in DATA_KEYS})
        return func(*args, **kwargs)

    options = [
        click.option("--task", type=click.Choice(TASKS), default=None,
                     help="What to score (default: the model's own task)."),
        click.option("--data", default=None, shell_complete=complete_data,
                     help="A bundled dataset name, a CSV / TSV / JSONL / parquet / text file, an "
                          "image folder, or hf:<name>. Default: the task's bundled dataset."),
        click.option("--text-column", default=None, help="Column holding the text."),
        click.option("--image-column", default=None, help="Column holding image paths."),
        click.option("--label-column", default=None, help="Column holding the label."),
        click.option("--max-samples", type=click.IntRange(min=1), default=None,
                     help="Use at most this many examples of each split."),
        click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=None,
                     help="Seed for the data split and any new weights. [default: the one the "
                          "model was made with, else 0]"),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def output(func):
    """-o/--output and --overwrite, for commands that write an artifact."""
    func = click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")(func)
    func = click.option("-o", "--output", "out", required=True, type=click.Path(),
                        help="Folder to write the artifact to (created whole, or not at all).")(func)
    return func


def writes_a_model(func):
    """The options every command that writes a model by one step shares: --eval, the data,
    -o / --overwrite, --device, the loading flags, and --json / --quiet / --debug."""
    func = data(output(device()(loading(common(func)))))  # innermost shows last in --help
    return click.option("--eval", "do_eval", is_flag=True,
                        help="Score the result on the test split.")(func)


def models_from(model: str) -> list[str]:
    """The model references to work on: MODEL itself, or one per stdin line for `-`."""
    from ..core.errors import shown

    if model != "-":
        return [model]
    refs = []
    for n, raw in enumerate(sys.stdin, 1):
        line = raw.strip()
        if not line or raw[0] in " \t":  # blank, or a human result's indented detail line
            continue
        if line.startswith(("{", "[")):
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                raise click.BadParameter(f"stdin line {n} is not valid JSON: {shown(line, 80)}") \
                    from None
            ref = obj.get("artifact") if isinstance(obj, dict) else None
            if not isinstance(ref, str) or not ref.strip():
                raise click.BadParameter(f"stdin line {n} needs an 'artifact' key holding a path "
                                         f"(a JSON object such as {{\"artifact\": \"out/m\"}}): "
                                         f"{shown(line, 80)}")
            refs.append(ref)
        else:
            refs.append(_path_of(line))
    if not refs:
        raise click.BadParameter("MODEL is '-' but stdin held no artifact paths.")
    return refs


def one_model_from(model: str, command: str) -> str:
    """The one model reference a command that writes one OUT works on: MODEL, or the single
    artifact path stdin holds for `-` (more would be silently dropped)."""
    refs = models_from(model)
    if len(refs) > 1:
        raise click.BadParameter(f"stdin held {len(refs)} artifact paths ({', '.join(refs[:3])}"
                                 f"{', ...' if len(refs) > 3 else ''}); `mmkit {command}` writes "
                                 "one OUT from one model. Pipe one path, or loop: "
                                 f"`... | while read m; do mmkit {command} \"$m\" ...; done`.")
    return refs[0]


def _path_of(line: str) -> str:
    """The artifact a stdin line names: the whole line when it is a path, else its first
    field (a command's human result line starts with the artifact, then two spaces)."""
    import os

    if os.path.exists(line) or "  " not in line:
        return line
    return line.split("  ", 1)[0]


SEQ_LEN = 128  # tokens per input when latency is measured (bench and search alike)


def measuring(func):
    """--threads and --seq-len, for every command that measures latency."""
    func = click.option("--seq-len", type=click.IntRange(min=1), default=SEQ_LEN,
                        show_default=True,
                        help="Tokens per input when measuring latency (text models).")(func)
    func = click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="CPU threads torch uses (default: torch's choice, one per core). "
                             "Recorded with every figure.")(func)
    return func


def task_option(func):
    """--task for commands that only need to pick the head."""
    return click.option("--task", type=click.Choice(TASKS), default=None,
                        help="Load the model for this task (default: its own).")(func)


def emit(result: dict, as_json: bool, human) -> None:
    """Print a result: one JSON line, or the short human form. In a multi-process run only the
    main process prints (every process holds the same result)."""
    from ..core.distributed import is_main

    if not is_main():
        return
    if as_json:
        click.echo(json.dumps(result, default=str))
    else:
        click.echo(human(result))


def with_models(func):
    """Call `func(ref=..., **kwargs)` once per model reference."""

    @functools.wraps(func)
    def wrapper(model, **kwargs):
        for ref in models_from(model):
            func(ref=ref, **kwargs)

    return wrapper


def run_one_step(step: dict, *, model: str, data_spec, out, run, eval_split: str | None = None,
                 resume: bool = False) -> dict:
    """Build the one-step recipe of a command and run it (`run`: core.recipe.RunOptions)."""
    from ..core.recipe import parse_recipe, run_recipe

    recipe = {"model": model, **data_spec.recipe_keys(), "steps": [step]}
    if eval_split:
        recipe["eval"] = {"split": eval_split}
    return run_recipe(parse_recipe(recipe, where=step["step"], cli=True), out,
                      overwrite=run.overwrite, device=run.device, allow_pickle=run.allow_pickle,
                      trust_remote_code=run.trust_remote_code, resume=resume)


def run_options(device: str, allow_pickle: bool, trust_remote_code: bool,
                overwrite: bool = False):
    """The shared loading / writing flags as core.recipe.RunOptions."""
    from ..core.recipe import RunOptions

    return RunOptions(device, trust_remote_code, allow_pickle, overwrite)


def metric_lines(result: dict) -> str:
    """The metrics of a result, one indented line per split."""
    return "".join(f"\n  {m['split']}: {score_line(m)}" for m in result["metrics"])


def score_line(m: dict) -> str:
    """A metrics dict as one line; classification adds the majority-class floor."""
    if "perplexity" in m:
        return f"perplexity {m['perplexity']:.3f}"
    line = f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}"
    floor = m.get("majority")
    if floor:
        line += (f"  (always '{floor['class']}': accuracy {floor['accuracy']:.4f}, macro-F1 "
                 f"{floor['macro_f1']:.4f}; gain {m['macro_f1'] - floor['macro_f1']:+.4f} "
                 "macro-F1)")
    return line
