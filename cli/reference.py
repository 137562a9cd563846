"""The README's command reference, rendered from the commands' own --help.

`python -m mmkit.cli.reference README.md` rewrites the README's reference section (between
the two marker comments); a test fails when the README and --help disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .main import cli


def command_help(name: str | None = None, sub: str | None = None) -> str:
    """`mmkit [name [sub]] --help` as text, at the fixed width the CLI uses."""
    parent = click.Context(cli, info_name="mmkit", **cli.context_settings)
    if name is None:
        return cli.get_help(parent)
    command = cli.commands[name]
    ctx = click.Context(command, info_name=name, parent=parent, **cli.context_settings)
    if sub is None:
        return command.get_help(ctx)
    inner = command.commands[sub]
    return inner.get_help(click.Context(inner, info_name=sub, parent=ctx,
                                        **cli.context_settings))


def _names():
    for name in sorted(cli.commands):
        command = cli.commands[name]
        if isinstance(command, click.Group):  # e.g. search: its subcommands, each in full
            yield from ((name, sub) for sub in sorted(command.commands))
        else:
            yield name, None


def reference_markdown() -> str:
    """One fenced block per command, `mmkit --help` first."""
    parts = ["```text\n$ mmkit --help\n" + command_help() + "\n```"]
    for name, sub in _names():
        title = f"{name} {sub}" if sub else name
        parts.append(f"```text\n$ mmkit {title} --help\n" + command_help(name, sub) + "\n```")
    return "\n\n".join(parts) + "\n"


START, END = "<!-- reference:start -->", "<!-- reference:end -->"


def readme_reference(text: str) -> str:
    """The reference section of a README's text (between the markers)."""
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def write_reference(readme: Path) -> None:
    """Replace the README's reference section with the current --help texts."""
    text = readme.read_text()
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{START}\n{reference_markdown()}{END}{tail}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        write_reference(Path(sys.argv[1]))
    else:
        print(reference_markdown(), end="")
