"""mmkit cache: the size of the step cache `mmkit run` keeps, and emptying it."""

from __future__ import annotations

import click

from . import options


@click.group("cache")
def cache_group():
    """The step cache of `mmkit run` (in $MMKIT_RUN_CACHE, else ~/.cache/mmkit/runs)."""


@cache_group.command("info", cls=options.Command)
@options.common
def info_command(as_json):
    """Where the step cache is, how many step results it holds and their size."""
    from ..core.run_cache import usage

    options.emit(usage(), as_json, lambda r: f"{r['path']}  {r['entries']} step result(s), "
                                             f"{r['bytes'] / 1e6:.1f} MB")


@cache_group.command("clear", cls=options.Command)
@options.common
def clear_command(as_json):
    """Remove every cached step result (those a running `mmkit run` is writing stay)."""
    from ..core.run_cache import clear

    options.emit(clear(), as_json, lambda r: (
        f"{r['path']}  removed {r['removed']} step result(s), freed "
        f"{r['freed_bytes'] / 1e6:.1f} MB" + (f"; {r['busy']} in use, kept" if r["busy"] else "")))
