"""Command-line options generated from the registry: a step's method choice and every option
its methods' configs take, written once (in the configs).

Nothing here loads the registry when a command is defined: the options are placeholders
(`Later`) that `options.Command` builds the first time the command's parameters are used, so
`mmkit --help` imports no method or config.

Each config field becomes one flag: its name (`group_size` -> `--group-size`), its click type
from the annotation and bounds (int / float ranges, Literal choices, lists as repeatable
flags, booleans as `--x/--no-x`), its help from the field's description, followed by the
methods that take it and their defaults. Options are unset unless given, so a method's own
default applies; one given to a method that does not take it is refused by `step_params`.
A field may carry `json_schema_extra={"cli": {"zero_is_none": True}}` (0 on the command line
means None). A field taking a list or a string is one comma-separated flag.
"""

from __future__ import annotations

import types
import typing

import click

from ..core.errors import InputError


def flag(field: str) -> str:
    """The flag of a config field."""
    return "--" + field.replace("_", "-")


def _methods(step: str) -> list:
    from ..core.registry import all_methods

    return [m for m in all_methods() if m.step == step]


def fields_of(step: str, skip=()) -> dict[str, list]:
    """Every config field the step's methods take: name -> [(method, FieldInfo)], in first-
    seen order (choosers such as `quantize auto` take their picks' fields)."""
    out: dict[str, list] = {}
    for method in _methods(step):
        if method.pick is not None:
            continue
        for name, info in method.config.model_fields.items():
            if name not in skip:
                out.setdefault(name, []).append((method, info))
    return out


def _bounds(metadata) -> dict:
    bounds = {}
    for item in metadata:
        for key in ("ge", "gt", "le", "lt"):
            if getattr(item, key, None) is not None:
                bounds[key] = getattr(item, key)
    return bounds


def _cli_extra(info) -> dict:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return extra.get("cli", {})


def _click_kwargs(info) -> dict:
    """click.option keyword arguments for a field's type and bounds."""
    ann = info.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        ann = args[0] if len(args) == 1 else ann
    if ann is bool:
        return {"is_flag": True}
    if typing.get_origin(ann) is typing.Literal:
        values = typing.get_args(ann)
        return {"type": click.Choice([str(v) for v in values])}
    if typing.get_origin(ann) is list:
        return {"multiple": True}
    b = _bounds(info.metadata)
    if ann is int and not b:
        return {"type": int}
    if ann is int:
        low = b.get("ge", b["gt"] + 1 if "gt" in b else None)
        if _cli_extra(info).get("zero_is_none"):
            low = 0
        high = b.get("le", b["lt"] - 1 if "lt" in b else None)
        return {"type": click.IntRange(low, high)}
    if ann is float and not b:
        return {"type": float}
    if ann is float:
        return {"type": click.FloatRange(b.get("ge", b.get("gt")), b.get("le", b.get("lt")),
                                         min_open="gt" in b, max_open="lt" in b)}
    return {"type": str}


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _defaults(takers: list) -> str:
    """`[default: 16; vera 256]`: the most common default, then the methods that differ."""
    from pydantic_core import PydanticUndefined

    values = [(m.name, info.get_default(call_default_factory=True)) for m, info in takers
              if info.default is not PydanticUndefined or info.default_factory is not None]
    if not values:
        return ""
    counts: dict[str, int] = {}
    for _, v in values:
        counts[_shown(v)] = counts.get(_shown(v), 0) + 1
    common = max(counts, key=counts.get)
    others = [f"{name} {_shown(v)}" for name, v in values if _shown(v) != common]
    if common == "none" and not others:
        return ""
    return "[default: " + "; ".join([common, *others]) + "]"


def _help(name: str, takers: list, all_count: int) -> str:
    """The field's description (each distinct one, with the methods that say it), the methods
    that take it when not all do, and their defaults."""
    said: dict[str, list[str]] = {}
    for method, info in takers:
        said.setdefault(info.description or name.replace("_", " "), []).append(method.name)
    if len(said) == 1:
        text = next(iter(said))
        if len(takers) != all_count:
            text += " (" + ", ".join(m.name for m, _ in takers) + ")"
    else:
        text = "; ".join(f"{d} ({', '.join(names)})" for d, names in said.items())
    return f"{text[0].upper()}{text[1:]}. {_defaults(takers)}".strip()


def registry_state() -> tuple:
    """What the registry holds now, to tell when options built from it are out of date."""
    from ..core.registry import all_methods

    return tuple((m.step, m.name, m.config) for m in all_methods())


class Later:
    """A placeholder among a command's parameters: `build()` returns the click parameters it
    stands for, made from the registry when the command is first used."""

    def __init__(self, build):
        self.build = build


def _later(build):
    """A decorator putting a `Later` where click puts an option (in the same order)."""

    def decorate(func):
        if not hasattr(func, "__click_params__"):
            func.__click_params__ = []
        func.__click_params__.append(Later(build))
        return func

    return decorate


def _field_options(step: str, skip) -> list:
    fields = fields_of(step, skip)
    count = len([m for m in _methods(step) if m.pick is None])
    made = []
    for name, takers in fields.items():
        kwargs = _click_kwargs(takers[0][1])
        if kwargs.pop("is_flag", False):
            decls = [f"{flag(name)}/--no-{name.replace('_', '-')}", name]
        else:
            decls = [flag(name), name]
        made.append(click.Option(decls, default=None, help=_help(name, takers, count),
                                 shell_complete=_completer(name, takers), **kwargs))
    return made


def _completer(name: str, takers: list):
    """What completes a field's flag: model references for fields naming models (a teacher),
    dataset names for calibration data; None (click's own) for the rest."""
    from . import completion

    if any(name in method.models for method, _ in takers):
        return completion.complete_model
    return completion.complete_data if name == "calib" else None


def method_options(step: str, skip=()):
    """A decorator adding one flag per config field of the step's methods."""
    return _later(lambda: _field_options(step, skip))


def method_option(step: str):
    """A decorator adding `--method`, its choices and default from the registry."""
    def build():
        from ..core.registry import default_method

        return [click.Option(["--method"], type=MethodChoice(step), default=default_method(step),
                             show_default=True, help=method_help(step))]

    return _later(build)


def method_flags(step: str, verb: str, skip=()):
    """A decorator adding one flag per method (`--lora`, `--dora`, ...) setting `method`;
    methods in `skip` have an option of their own."""
    def build():
        from ..core.registry import default_method

        default = default_method(step)
        return [click.Option([f"--{name}", "method"], flag_value=name, default=None,
                             help=f"{verb} with {name}"
                                  + (" (default)." if name == default else "."))
                for name in method_choice(step) if name not in skip]

    return _later(build)


def step_params(step: str, method: str, settings: dict, method_flag: str) -> dict:
    """The options a user gave, as the method's step parameters. An option the method does
    not take is an error naming the options it does take; `auto` (a chooser) takes all of
    them and its pick checks them."""
    from ..core.registry import get_method

    chosen = get_method(step, method)
    fields = fields_of(step)
    own = None if chosen.pick is not None else chosen.config.model_fields
    params = {}
    for key, value in settings.items():
        if value is None or value == () or key not in fields:
            continue
        if own is not None and key not in own:
            usable = ", ".join(flag(k) for k in own if k in fields) or "none"
            raise InputError(f"{flag(key)} does not apply to {method_flag}. Options it takes: "
                             f"{usable}.")
        info = (own or {}).get(key) or fields[key][0][1]
        params[key] = _convert(value, info)
    return params


def _literals(annotation) -> tuple:
    """The values of a Literal annotation (also inside Optional / a union)."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return tuple(v for a in typing.get_args(annotation) for v in _literals(a))


def _takes_numbers(annotation) -> bool:
    """A list of numbers (list[int], list[float], also inside Optional)."""
    lists = [annotation] + list(typing.get_args(annotation))
    return any(typing.get_origin(a) is list and typing.get_args(a)[0] in (int, float)
               for a in lists)


def _takes_list(annotation) -> bool:
    return typing.get_origin(annotation) is list or any(
        typing.get_origin(a) is list for a in typing.get_args(annotation))


def _convert(value, info):
    """A command-line value as the config field wants it: 0 as None where the field says so,
    a comma-separated string as a list (unless it is the field's own default, such as
    all-linear), repeated flags as a list, a choice back to its typed literal (4, not '4')."""
    if _cli_extra(info).get("zero_is_none") and value == 0:
        return None
    if isinstance(value, tuple):  # a repeated flag; numbers may also be comma-separated
        if _takes_numbers(info.annotation):
            return [v.strip() for item in value for v in str(item).split(",") if v.strip()]
        return list(value)
    if isinstance(value, str) and _takes_list(info.annotation) and value != info.default:
        return [v.strip() for v in value.split(",") if v.strip()]
    return next((v for v in _literals(info.annotation) if str(v) == value), value)


def method_choice(step: str) -> list[str]:
    """The names a step's methods have, from the registry."""
    return [m.name for m in _methods(step)]


class MethodChoice(click.Choice):
    """`--method`'s choices, read from the registry when they are used (a method registered
    after the command was built is a choice too)."""

    def __init__(self, step: str):
        self.step = step
        super().__init__([])

    @property
    def choices(self):
        return method_choice(self.step)

    @choices.setter
    def choices(self, _value):
        pass


def method_help(step: str) -> str:
    """The `--method` help: each method of the step with its summary (auto: its own)."""
    return "; ".join(f"{m.name}: {m.summary}" for m in _methods(step)) + "."
