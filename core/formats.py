"""On-disk formats as a table: name -> detect(folder) / load / save.

Every folder mmkit reads or writes is one of these formats. A model format builds the whole
model from a folder; an adapter format goes on top of a base model that is loaded first (its
folder names the base). `load_model` and the artifact writer dispatch through this table, so a
new format is one module plus one `register_format` call in its package's `__init__.py`.

The plain Hugging Face format ("hf-model", `save_pretrained` / `from_pretrained`) is the
fallback and is registered by `core.loading`; the others register from the packages that
write them (adapters/, compression/).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import plugins

PLAIN = "hf-model"


@dataclass(frozen=True)
class Format:
    """One on-disk format.

    Model formats: `load(cls, source, config, options) -> (model, extra)`, where `cls` is the
    task's Auto class and `options` the `LoadOptions` of the call; `extra` is kept on the
    loaded model (its "format" key makes a later save write this format again).
    Adapter formats: `load(model, source) -> (model, extra)` attaches the adapter to its base,
    and `base(folder) -> str | None` names that base.
    Both: `detect(folder) -> bool` and `save(loaded, folder)`.
    """

    name: str
    detect: Callable[[Path], bool]
    load: Callable
    save: Callable
    adapter: bool = False
    base: Callable[[Path], str | None] | None = None
    summary: str = ""


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add a format; folders are matched against formats in registration order, the plain
    Hugging Face format last."""
    if fmt.name in _FORMATS:
        raise ValueError(f"format {fmt.name} registered twice")
    if fmt.adapter and fmt.base is None:
        raise ValueError(f"adapter format {fmt.name} needs base()")
    _FORMATS[fmt.name] = fmt
    return fmt


def all_formats() -> list[Format]:
    """Every registered format, the plain one last."""
    plugins.load()
    return sorted(_FORMATS.values(), key=lambda f: f.name == PLAIN)


def get_format(name: str) -> Format:
    """A format by name (the "format" a loaded model or a manifest records)."""
    plugins.load()
    return _FORMATS[name]


def detect(folder, adapter: bool = False) -> Format | None:
    """The first model (or adapter) format whose files the folder holds."""
    if folder is None or not Path(folder).is_dir():
        return None
    for fmt in all_formats():
        if fmt.adapter == adapter and fmt.detect(Path(folder)):
            return fmt
    return None


def save(loaded, folder: Path) -> None:
    """Write a loaded model in the format it carries (plain Hugging Face files by default)."""
    get_format(loaded.extra.get("format", PLAIN)).save(loaded, folder)
