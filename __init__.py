"""mmkit: adapt and compress pretrained transformer backbones.

The Python API that the command line calls. Heavy libraries (torch, transformers) load on
first use, so `import mmkit` stays fast.
"""

__version__ = "0.1.0"

from .core import plugins as _plugins  # noqa: E402
from .core.errors import InputError, MmkitError, RuntimeFailure  # noqa: E402

# Methods and formats register from their own packages; core loads them by this name on first
# use (core never imports the packages above it).
_plugins.MODULES.append(__name__ + ".registrations")

__all__ = [
    "InputError", "MmkitError", "RuntimeFailure", "load_model", "load_data", "evaluate",
    "profile", "run_recipe", "load_recipe", "inspect_model", "resolve",
]


def __getattr__(name):
    # Lazy re-exports: the API functions import torch, which `mmkit --help` must not pay for.
    lazy = {
        "load_model": ("core.loading", "load_model"),
        "load_data": ("core.data", "load_data"),
        "evaluate": ("core.evaluate", "evaluate"),
        "profile": ("core.profile", "profile"),
        "run_recipe": ("core.recipe", "run_recipe"),
        "load_recipe": ("core.recipe", "load_recipe"),
        "inspect_model": ("core.inspect", "inspect_model"),
        "resolve": ("core.refs", "resolve"),
    }
    if name not in lazy:
        raise AttributeError(f"module 'mmkit' has no attribute {name!r}")
    import importlib

    module, attr = lazy[name]
    return getattr(importlib.import_module(f".{module}", __name__), attr)
