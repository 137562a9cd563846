"""mmkit search: Optuna multi-objective search (accuracy / latency / size) under a latency
budget, and `mmkit search pick` to export another point later."""

from __future__ import annotations

import click

from . import options


class SearchGroup(click.Group):
    """`mmkit search [MODEL] ...` runs a search; `mmkit search pick OUT ...` picks from one."""

    def parse_args(self, ctx, args):
        if not args or args[0] not in self.commands:
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _human(r: dict) -> str:
    skipped = r.get("skipped_over_budget")
    skipped = (f"; {skipped} more point{'s' * (skipped > 1)} skipped untimed, cutting no more "
               "than one of those") if skipped else ""
    lines = [f"{r['out']}: {r['trials_completed']} trials ({r['rejected_without_evaluation']} "
             f"over the budget, not evaluated{skipped})", r["table"]]
    if r["space_exhausted"]:
        lines.append(f"every one of the {r['space_points']} points of the space has been tried")
    if r["exported"]:
        lines.append("exported: " + ", ".join(r["exported"]))
    lines += _passed_over(r.get("confirmation") or [])
    again = r.get("best_remeasured")
    if again:
        lines.append(_side_by_side(r["best"], again))
        if again.get("test_metrics"):
            lines.append("  in ONNX Runtime on the test split: " + ", ".join(
                f"{k} {v:.4f}" for k, v in again["test_metrics"].items()))
    return "\n".join(lines)


def _passed_over(confirmation: list[dict]) -> list[str]:
    """A line for each point passed over: within the budget in the search, over it when
    measured again."""
    from ..search.results import point_text

    return [f"trial {c['trial']} ({point_text(c['params'])}) passed over: "
            f"{c['search_ms']:.2f} ms, {_ratio(c['search_ratio'])} in the search, but "
            f"{c['remeasured_ms']:.2f} ms, {_ratio(c['remeasured_ratio'])} measured again, "
            "over the budget" for c in confirmation if not c["within_budget"]]


def _picked(r: dict) -> str:
    from ..search.results import point_text

    lines = _passed_over(r.get("confirmation") or [])
    lines.append(f"{r['artifact']}  trial {r['trial']} ({point_text(r['params'])}): "
                 + ", ".join(f"{k} {v:.4g}" for k, v in r["values"].items())
                 + f"; median latency {r['latency_ms']:.2f} ms"
                 + ("" if r.get("latency_ratio") is None
                    else f", {r['latency_ratio']:.3g}x the unmodified model"))
    again = r.get("remeasured")
    if again:
        lines.append(_side_by_side(r, again, "picked"))
    return "\n".join(lines)


def _ratio(value) -> str:
    return "no ratio" if value is None else f"{value:.3g}x"


def _side_by_side(best: dict, again: dict, what: str = "best") -> str:
    """The best model's latency in the search beside the one measured again at the end, each
    in ms and as a ratio to the unmodified model's (timed interleaved with it)."""
    return (f"{what} (trial {best['trial']}), latency against the unmodified model:\n"
            f"  {'in the search':<16}{best['latency_ms']:>9.2f} ms  "
            f"{_ratio(best.get('latency_ratio'))}\n"
            f"  {'measured again':<16}{again['median_ms']:>9.2f} ms  {_ratio(again['ratio'])} "
            f"(p10-p90 {again['ratio_p10']:.3g}-{again['ratio_p90']:.3g}x; unmodified "
            f"{again['reference_median_ms']:.2f} ms; {again['threads']} threads, load "
            f"{again['load_per_cpu']} per CPU)"
            + ("" if again["steady"] else "; unsteady: the machine is busy"))


@click.group("search", cls=SearchGroup)
def search_group():
    """Search for the most accurate model under a latency budget (`mmkit search --help`), or
    pick another point from a finished search (`mmkit search pick --help`)."""


@search_group.command("run", cls=options.Command)
@options.model_argument
@options.data
@click.option("--latency-budget", help="Slowest acceptable median latency: a time (20ms, 0.5s) "
                                       "or a ratio to the unmodified model's latency (0.5x, "
                                       "the two timed interleaved). Slower candidates are not "
                                       "evaluated.")
@click.option("--objectives", default="accuracy,latency,size", show_default=True,
              help="Comma-separated: accuracy | macro_f1 | perplexity, latency, size.")
@click.option("--knobs", help="Comma-separated knobs with their default values: layers, heads, "
                              "ffn, sparsity, quant, recovery. [default: layers,heads,ffn,quant]")
@click.option("--space", "space_file", type=click.Path(),
              help="A YAML file `knobs: {name: [values]}` (instead of --knobs).")
@click.option("--trials", type=click.IntRange(min=1), default=30, show_default=True,
              help="Completed trials the study should hold (all workers together).")
@click.option("--timeout", help="Stop starting trials after this long, e.g. 600s or 10m.")
@click.option("--sampler", default="tpe", show_default=True,
              help="tpe | nsga2 | nsga3 | random | grid | qmc.")
@click.option("--storage", help="Optuna storage URL (default: sqlite in OUT); journal:PATH for "
                                "a journal file.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes running trials on the same storage.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batch size the latency is measured at.")
@options.measuring
@click.option("--runtime", type=click.Choice(["torch", "onnxruntime"]), default="torch",
              show_default=True, help="Where trials are timed and scored: PyTorch, or ONNX "
              "Runtime (each candidate exported; quant knob: none / ort-int8; mmkit[onnx]). "
              "The exported model is then an ONNX folder.")
@click.option("--export", type=click.Choice(["best", "pareto", "none"]), default="best",
              show_default=True, help="Which models to write under OUT.")
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="Search folder: study, pareto.*, exported models. Run again to resume.")
@click.option("--overwrite", is_flag=True, help="Delete OUT's study and start afresh.")
@options.device()
@options.loading
@options.common
def search_run(model, data_spec, latency_budget, objectives, knobs, space_file, trials,
               timeout, sampler, storage, workers, batch_size, seq_len, threads, runtime, export,
               out, overwrite, device, allow_pickle, trust_remote_code, as_json):
    """Search MODEL's compressed variants (structural cuts, sparsity, quantization) for the
    best accuracy / latency / size trade-offs on the target device, and export the most
    accurate one under --latency-budget."""
    from ..core.errors import InputError
    from ..search.run import parse_seconds, prepare, search
    from ..search.settings import SearchRequest

    if data_spec.columns:
        raise InputError("search reads data by its default columns; convert the file or use "
                         "a bundled dataset.")
    if knobs and space_file:
        raise InputError("Pass either --knobs or --space, not both.")
    timeout_s = parse_seconds(timeout)
    request = SearchRequest(model=model, data=data_spec, budget=latency_budget,
                            objectives=objectives, knobs=knobs, space_file=space_file,
                            sampler=sampler, batch_size=batch_size, seq_len=seq_len,
                            threads=threads, workers=workers, out=out, storage=storage,
                            runtime=runtime)
    prepared = prepare(request, options.run_options(device, allow_pickle, trust_remote_code,
                                                    overwrite))
    options.emit(search(prepared, trials, timeout_s, workers, export), as_json, _human)


@search_group.command("pick", cls=options.Command)
@click.argument("out", type=click.Path())
@click.option("--latency-budget", required=True, help="The new budget, e.g. 10ms or 0.5x.")
@click.option("-o", "--output", "dest", type=click.Path(),
              help="Where to write the model. [default: OUT/pick-<budget>ms or "
                   "OUT/pick-<ratio>x]")
@click.option("--overwrite", is_flag=True, help="Replace the output if it exists.")
@options.common
def search_pick(out, latency_budget, dest, overwrite, as_json):
    """Export the most accurate evaluated point of a finished search under a new budget,
    without searching again. It is measured again against the unmodified model first, and
    passed over for the next most accurate when it no longer meets the budget."""
    from ..search.run import pick

    options.emit(pick(out, latency_budget, dest, overwrite), as_json, _picked)
