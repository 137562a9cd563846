"""mmkit inspect: what a model is made of and which mmkit methods apply to it."""

from __future__ import annotations

import click

from . import options


def _human(r: dict) -> str:
    lines = [f"{r['model']}  ({r['source']}: {r['path'] or 'built in memory'})",
             f"  family {r['family']}  kind {r['kind']}  class {r['class']}  task {r['task']}",
             f"  parameters {r['parameters']:,}  weights {r['weights_mb']:.1f} MB"
             + (f"  disk {r['disk_mb']:.1f} MB" if r["disk_mb"] is not None else ""),
             "  dtypes " + ", ".join(f"{k} {v:,}" for k, v in r["dtypes"].items()),
             "  by module " + ", ".join(f"{k} {v:,}" for k, v in
                                       r["parameters_by_module_type"].items()),
             f"  linear layers {len(r['linear_layers'])}: " + ", ".join(
                 f"{g['suffix']} x{g['count']} ({g['shape']})" for g in r["linear_groups"]),
             "  methods " + (", ".join(r["methods"]) or "none")]
    if r["labels"]:
        lines.insert(2, "  labels " + ", ".join(r["labels"]))
    if r["adapter"]:
        a = r["adapter"]
        rank = f" r={a['r']}" if a["r"] else ""
        lines.insert(3, f"  adapter {a['method']}{rank}: {a['parameters']:,} parameters")
    if r.get("elastic"):
        e = r["elastic"]
        lines.insert(3, f"  elastic super-network ({e['mode']}): " + "; ".join(
            f"{k} {','.join(f'{v:g}' for v in values)}" for k, values in e["space"].items()))
    if r["steps"]:
        lines.append(f"  made from {r['parent']} by " + " -> ".join(r["steps"]))
    return "\n".join(lines)


@click.command("inspect", cls=options.Command)
@options.model_argument
@options.task_option
@options.loading
@options.common
@options.with_models
def inspect_command(ref, task, allow_pickle, trust_remote_code, as_json):
    """Show MODEL's family, parameters by module type, size, dtypes, linear layers and the
    mmkit methods that apply."""
    from ..core.inspect import inspect_model
    from ..core.loading import load_model

    loaded = load_model(ref, task, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                        task_head=False)
    options.emit(inspect_model(loaded), as_json, _human)
