"""Where registrations come from, without core importing the packages above it.

Methods and on-disk formats register themselves from their own packages (adapters/,
compression/, ...). The top-level package names the one module whose import runs all of
those registrations (`mmkit.registrations`) in `MODULES`; the registry and the format table
import it by name on their first lookup. So `core/` never imports upward, and `import mmkit`
stays cheap until a method or format is needed.
"""

from __future__ import annotations

import importlib

MODULES: list[str] = []  # set by mmkit/__init__.py
_loaded = False


def load() -> None:
    """Import the registration modules once."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # first: a registration module may look something up while it loads
    try:
        for name in MODULES:
            importlib.import_module(name)
    except BaseException:
        _loaded = False
        raise
