"""Settings saved beside a model's weights that change how it runs, not what it holds (token
merging): one small JSON file each, applied by every command when the model loads.

A setting registers from the package that implements it (`register_setting`): its name, the
file, and `install(loaded, data)`, which checks the JSON against the model and patches the
loaded model in place (raising InputError for a file that does not fit). The loaded model
keeps each installed setting's data in `loaded.extra["settings"]`, and `write_settings` saves
it again with the model, so a setting survives every later step and save.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import plugins
from .errors import InputError

MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class RuntimeSetting:
    """One kind of saved setting."""

    name: str
    file: str
    install: Callable  # (loaded, data: dict) -> None


_SETTINGS: dict[str, RuntimeSetting] = {}


def register_setting(setting: RuntimeSetting) -> RuntimeSetting:
    """Add a kind of setting."""
    if setting.name in _SETTINGS:
        raise ValueError(f"setting {setting.name} registered twice")
    _SETTINGS[setting.name] = setting
    return setting


def _read(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_BYTES:
            raise InputError(f"{path} is {path.stat().st_size:,} bytes, too large for a "
                             "settings file; the artifact is damaged. Re-create it.")
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); the artifact is damaged. "
                         f"Re-create it, or delete {path.name} to load the model without "
                         "it.") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object; the artifact is damaged. "
                         f"Re-create it, or delete {path.name}.")
    return data


def apply_settings(loaded, folders: list) -> None:
    """Install every registered setting whose file one of the model's folders holds (the
    first that has it: an adapter's folder before its base's)."""
    folders = [Path(f) for f in folders if f and Path(f).is_dir()]
    if not folders:
        return
    plugins.load()
    for setting in _SETTINGS.values():
        path = next((f / setting.file for f in folders if (f / setting.file).is_file()), None)
        if path is not None:
            data = _read(path)
            setting.install(loaded, data)
            loaded.extra.setdefault("settings", {})[setting.name] = data


def write_settings(loaded, folder: Path) -> None:
    """Write the settings the model carries beside its weights."""
    for name, data in (loaded.extra.get("settings") or {}).items():
        Path(folder, _SETTINGS[name].file).write_text(json.dumps(data, indent=2))
