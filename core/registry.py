"""The method registry: every technique is registered by an explicit call under its step.

A method is `apply(loaded, config, ctx) -> loaded` with a typed config that rejects unknown
keys and bad values. Methods register from their own packages (`adapters/__init__.py`,
`compression/quantize/__init__.py`, ...); `mmkit.registrations` imports them all, and the
registry imports that module by name on first lookup (`core.plugins`), so core never imports
the packages above it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from . import plugins
from .errors import InputError

STEPS = ("finetune", "prune", "quantize", "merge", "extract", "cast", "tokens")


class MethodConfig(BaseModel):
    """Base of every method's config: typed, frozen, unknown keys and non-finite numbers
    (nan, inf) rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_yes_no_numbers(cls, data):
        # lax validation reads YAML's `true` as 1 (`max_steps: true`: one step); only a field
        # that takes a yes / no may have one
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if isinstance(value, bool) and field is not None and not _takes_bool(
                        field.annotation):
                    raise ValueError(f"'{key}' takes a value, not {str(value).lower()}")
        return data


def _takes_bool(annotation) -> bool:
    """True when a field's type admits True / False (bool, Any, or a union or Literal of
    them)."""
    import typing

    if annotation is bool or annotation is typing.Any:
        return True
    return any(arg is True or arg is False or _takes_bool(arg)
               for arg in typing.get_args(annotation))


@dataclass(frozen=True)
class Method:
    """One registered technique."""

    step: str
    name: str
    config: type[MethodConfig]
    apply: Callable
    summary: str
    kinds: tuple[str, ...] = ("text-encoder", "vision", "clip", "causal-lm")
    needs_data: bool = False
    hint: str = ""  # what to use instead on the kinds it does not apply to
    load_options: Callable | None = None  # config -> load_model kwargs (QLoRA's 4/8-bit base)
    mergeable: bool = False  # finetune: the result is a weight change that merges into the base
    models: tuple[str, ...] = ()  # config fields that name further models (a teacher, ...)
    # a chooser ("quantize auto"): (params, kind, device) -> (method name, why); the plan
    # replaces the step by the method it picks, checked with that method's config
    pick: Callable | None = None


def lazy(target: str) -> Callable:
    """An apply function named "module:function", imported on first call: registering a
    method costs no torch import, so `mmkit --help` stays fast."""
    cache = []

    def apply(*args, **kwargs):
        if not cache:
            import importlib

            module, name = target.split(":")
            cache.append(getattr(importlib.import_module(module), name))
        return cache[0](*args, **kwargs)

    apply.target = target
    return apply


@dataclass
class Context:
    """What a method may use besides the model: data, device, seed, a place for its report."""

    device: str = "cpu"
    seed: int = 0
    dataset: object = None
    max_samples: int | None = None  # the recipe's cap on each split, for data a step loads
    out: object = None  # the artifact's path: a step's large scratch files go beside it
    workdir: object = None  # where a training step keeps its checkpoints
    fingerprint: str = ""  # identifies the run, so --resume refuses another run's checkpoints
    resume: bool = False
    callbacks: list = field(default_factory=list)  # extra HF TrainerCallbacks
    models: dict = field(default_factory=dict)  # further models the step names: ref -> source
    allow_pickle: bool = False  # how those further models may be read (the run's flags)
    trust_remote_code: bool = False
    # the model the steps started from (a LoadedModel, or a source to load): the teacher a
    # distillation step uses when it names none
    origin: object = None
    report: dict = field(default_factory=dict)


_REGISTRY: dict[tuple[str, str], Method] = {}
_DEFAULT: dict[str, str] = {}


def register(method: Method, default: bool = False) -> Method:
    """Add a method; `default` makes it the one a step uses when none is named."""
    if method.step not in STEPS:
        raise ValueError(f"unknown step {method.step}")
    key = (method.step, method.name)
    if key in _REGISTRY:
        raise ValueError(f"method {key} registered twice")
    _REGISTRY[key] = method
    if default or method.step not in _DEFAULT:
        _DEFAULT[method.step] = method.name
    return method


def _loaded():
    plugins.load()
    return _REGISTRY


def all_methods() -> list[Method]:
    """Every registered method, in registration order."""
    return list(_loaded().values())


def get_method(step: str, name: str | None = None) -> Method:
    """Look a method up, or fail with the list of what exists."""
    registry = _loaded()
    if step not in STEPS:
        raise InputError(f"Unknown recipe step '{step}'. Steps: {', '.join(STEPS)}.")
    available = sorted(n for s, n in registry if s == step)
    name = name or _DEFAULT[step]
    if (step, name) not in registry:
        raise InputError(f"Unknown {step} method '{name}'. Methods: {', '.join(available)}.")
    return registry[(step, name)]


def methods_for(kind: str) -> list[Method]:
    """Methods that apply to a model kind (text-encoder, vision, clip, causal-lm)."""
    return [m for m in all_methods() if kind in m.kinds]


def default_method(step: str) -> str:
    """The method a step uses when none is named."""
    _loaded()
    return _DEFAULT[step]


def is_mergeable(name: str) -> bool:
    """True when a finetune method's adapter is a weight change that can be merged (prompt
    and bottleneck adapters add tokens or branches instead)."""
    method = _loaded().get(("finetune", name))
    return bool(method and method.mergeable)


def build_config(method: Method, params: dict, where: str, cli: bool = False) -> MethodConfig:
    """Validate a step's parameters, turning pydantic's errors into one clear paragraph that
    names what the user typed: command-line flags (`cli`) or recipe keys."""
    try:
        return method.config(**params)
    except ValidationError as exc:
        fields = [f for f in method.config.model_fields if not (cli and f in method.models)]
        name = (lambda key: "--" + key.replace("_", "-")) if cli else (lambda key: key)
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = _in_terms(err["msg"].removeprefix("Value error, "), fields, cli)
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown {'option' if cli else 'key'} '{name(key)}'")
            else:
                problems.append(f"'{name(key)}': {msg}" if key else msg)
        what = "Options" if cli else "Keys"
        raise InputError(f"{where}: {'; '.join(problems)}. {what} that {method.step} "
                         f"{method.name} takes: {', '.join(map(name, fields)) or 'none'}.") \
            from None


def _in_terms(message: str, fields: list[str], cli: bool) -> str:
    """A validator's message, which names flags (--calib), in recipe keys (calib) when the
    parameters came from a recipe."""
    import re

    if cli:
        return message
    message = re.sub(r"pass --([a-z][a-z0-9-]*) ", lambda m: f"set {m.group(1).replace('-', '_')}: ",
                     message)
    return re.sub(r"--([a-z][a-z0-9-]*)",
                  lambda m: m.group(1).replace("-", "_")
                  if m.group(1).replace("-", "_") in fields else m.group(0), message)
