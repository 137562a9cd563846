"""Shell completion beyond click's own.

Click completes commands, options and choices (`--method`, `--task`, `--elastic`) from the
command definitions, whose method choices come from the registry. This module adds what click
cannot know: model references (the built-in names, then folders) wherever a MODEL, `--base`,
`--teacher` or `--model` is expected; bundled dataset names (then files) for `--data` and
`--calib`; device names. Everything here reads plain lists (`core.embedded`, `core.tiny`,
`core.data`) and imports no torch: a completion costs what building the command's options
from the registry costs (under half a second).

It also fixes bash's handling of colons: bash splits words at ':' (COMP_WORDBREAKS), so
`tiny:bert` reaches click as three words. `MmkitBash` joins them back and trims what bash will
keep of the word from each answer. The shell's rc file line is click's own:
`eval "$(_MMKIT_COMPLETE=bash_source mmkit)"` (zsh_source, fish_source).
"""

from __future__ import annotations

import os

from click.shell_completion import BashComplete, CompletionItem, add_completion_class, \
    split_arg_string

DEVICES = ("cpu", "cuda", "auto")


def model_names() -> list[str]:
    """The model references mmkit knows by name: the embedded models and `tiny:<family>`."""
    from ..core.embedded import ALIASES
    from ..core.tiny import TINY_FAMILIES

    return [*ALIASES, *(f"tiny:{family}" for family in TINY_FAMILIES)]


def dataset_names() -> list[str]:
    """The bundled datasets' names."""
    from ..core.data import BUNDLED

    return list(BUNDLED)


def _named(names, incomplete: str, help_text: dict | None = None) -> list[CompletionItem]:
    return [CompletionItem(n, help=(help_text or {}).get(n)) for n in names
            if n.startswith(incomplete)]


def complete_model(ctx, param, incomplete: str) -> list[CompletionItem]:
    """A model reference: built-in names, else a folder (an artifact or a saved model)."""
    from ..core.embedded import ALIASES

    # the folder item goes first: click's bash script clears its list on a folder item
    return [CompletionItem(incomplete, type="dir"),
            *_named(model_names(), incomplete, ALIASES)]


def complete_data(ctx, param, incomplete: str) -> list[CompletionItem]:
    """A dataset: bundled names, else a file or image folder; after a comma (`--data A,B`)
    the next name."""
    from ..core.data import BUNDLED

    head, comma, tail = incomplete.rpartition(",")
    described = {name: text for name, (_, text) in BUNDLED.items()}
    named = [CompletionItem(head + comma + item.value, help=item.help)
             for item in _named(dataset_names(), tail, described)]
    return named if comma else [CompletionItem(incomplete, type="file"), *named]


def complete_device(ctx, param, incomplete: str) -> list[CompletionItem]:
    """cpu, cuda, auto."""
    return _named(DEVICES, incomplete)


class MmkitBash(BashComplete):
    """Click's bash completion, with words that contain ':' (tiny:bert, hf:name) kept whole."""

    def get_completion_args(self) -> tuple[list[str], str]:
        """The words before the cursor and the word being completed, each rejoined where bash
        split it at a colon."""
        words = split_arg_string(os.environ["COMP_WORDS"])
        cword = int(os.environ["COMP_CWORD"])
        typed, current = words[:cword], words[cword] if cword < len(words) else None
        joined: list[str] = []
        for word in typed:
            if joined and (word == ":" or joined[-1].endswith(":")):
                joined[-1] += word
            else:
                joined.append(word)
        if current is not None and joined and (current == ":" or joined[-1].endswith(":")):
            incomplete = joined.pop() + current  # the word under the cursor has a colon
        else:
            incomplete = current or ""
        # bash replaces only the part after the last colon: answer with that part
        self._kept = incomplete.rpartition(":")[0] + ":" if ":" in incomplete else ""
        return joined[1:], incomplete

    def format_completion(self, item: CompletionItem) -> str:
        """`type,value`, the value without the part before the word's last colon."""
        kept = getattr(self, "_kept", "")
        value = item.value
        if kept and item.type == "plain" and value.startswith(kept):
            value = value[len(kept):]
        return f"{item.type},{value}"


def register() -> None:
    """Use `MmkitBash` for `_MMKIT_COMPLETE=bash_source` / `bash_complete`."""
    add_completion_class(MmkitBash, "bash")
