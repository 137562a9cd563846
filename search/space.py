"""The search space: knobs, the values each may take, and the recipe steps a choice becomes.

A space file (YAML, safe-loaded) names knobs and their values:

    knobs:
      layers: [0, 1, 2]          # transformer layers removed
      heads: [0, 0.25, 0.5]      # fraction of attention heads removed in every layer
      ffn: [0, 0.25, 0.5]        # fraction of FFN neurons removed
      sparsity: [0, 0.5]         # unstructured magnitude sparsity
      quant: [none, dynamic-int8, rtn-8, rtn-4, gptq-4, nf4, int8]   # ort-int8 under
                                 # --runtime onnxruntime: ONNX Runtime's dynamic int8
      recovery: [0, 50]          # fine-tuning steps after the cuts, distilled from the uncut model
      tokens: [1.0, 0.5, 0.3]    # ViT / CLIP: the fraction of image tokens left after the
                                 # last block (ToMe token merging; 1.0: none)

On an elastic super-network (`mmkit finetune --elastic`) the structural knobs take the values
it was trained for and become one `extract` step: its sub-networks need no recovery.

The first value of every knob should be "no change": trial 0 is always the unmodified model.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import InputError, shown

MAX_SPACE_BYTES = 1 << 20  # a space file is a few lines of YAML (as a recipe)
ENUMERATE_LIMIT = 100_000  # spaces up to this many points are listed to find untried ones
# how an error message shows a bad value: a YAML alias bomb's value would print as 300 MB
ECHO = reprlib.Repr()
ECHO.maxlevel, ECHO.maxlist, ECHO.maxdict, ECHO.maxstring, ECHO.maxother = 2, 4, 4, 40, 40


@dataclass(frozen=True)
class Knob:
    """One dimension of the space."""

    name: str
    help: str
    default: tuple
    check: object  # value -> error text or None
    identity: object  # the value that leaves the model unchanged


def _fraction(v):
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    return None if number and 0 <= v < 1 else "a fraction in [0, 1)"


def _keep_fraction(v):
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    return None if number and 0 < v <= 1 else "a fraction in (0, 1]"


def _count(v):
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else \
        "a whole number >= 0"


QUANT = {"none": None, "dynamic-int8": {"method": "dynamic-int8"},
         "rtn-8": {"method": "rtn", "bits": 8}, "rtn-4": {"method": "rtn", "bits": 4},
         "gptq-4": {"method": "gptq", "bits": 4}, "nf4": {"method": "nf4"},
         "int8": {"method": "int8"},
         "ort-int8": None}  # no PyTorch step: the ONNX export is quantized by ONNX Runtime
RUNTIMES = ("torch", "onnxruntime")
RECOVERY_LR = 5e-5  # the recovery knob's distillation learning rate (see steps_for)
ORT_QUANT = ("none", "ort-int8")  # what the quant knob takes under --runtime onnxruntime

KNOBS = {k.name: k for k in (
    Knob("layers", "transformer layers removed", (0, 1, 2), _count, 0),
    Knob("heads", "fraction of attention heads removed per layer", (0.0, 0.25, 0.5), _fraction,
         0.0),
    Knob("ffn", "fraction of FFN neurons removed per layer", (0.0, 0.25, 0.5), _fraction, 0.0),
    Knob("sparsity", "unstructured magnitude sparsity", (0.0, 0.5), _fraction, 0.0),
    Knob("quant", "weight quantization", ("none", "dynamic-int8", "rtn-8"),
         lambda v: None if isinstance(v, str) and v in QUANT else f"one of {', '.join(QUANT)}",
         "none"),
    Knob("recovery", "fine-tuning steps after the cuts, distilled from the uncut model", (0, 50),
         _count, 0),
    Knob("tokens", "fraction of image tokens left after the last block (token merging; ViT, "
                   "CLIP)", (1.0, 0.5, 0.3), _keep_fraction, 1.0),
)}
TOKEN_KINDS = ("vision", "clip")  # model kinds the tokens knob applies to
DEFAULT_KNOBS = ("layers", "heads", "ffn", "quant")


def from_knob_names(names: str | None) -> dict[str, list]:
    """`--knobs layers,heads` -> those knobs with their default values."""
    chosen = [n.strip() for n in (names or ",".join(DEFAULT_KNOBS)).split(",") if n.strip()]
    unknown = [n for n in chosen if n not in KNOBS]
    if unknown:
        raise InputError(f"Unknown knob '{shown(unknown[0], 60)}'. Knobs: {', '.join(KNOBS)}.")
    return {n: list(KNOBS[n].default) for n in chosen}


def _key_lines(text: str) -> dict:
    """Line of every key under `knobs` (for error messages)."""
    import yaml

    lines = {}
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(root, yaml.MappingNode):
        return lines
    for key, value in root.value:
        if getattr(key, "value", None) == "knobs" and isinstance(value, yaml.MappingNode):
            for k, _ in value.value:
                if isinstance(k, yaml.ScalarNode):
                    lines[k.value] = k.start_mark.line + 1
    return lines


def _read_yaml(path: Path):
    """The file's YAML (safe-loaded), or a clear error for anything that is not a short
    UTF-8 YAML text."""
    import yaml

    try:
        if path.stat().st_size > MAX_SPACE_BYTES:
            raise InputError(f"{shown(path)} is {path.stat().st_size:,} bytes; a space file is a "
                             f"short YAML file (at most {MAX_SPACE_BYTES:,} bytes). Pass the "
                             "right file.")
        text = path.read_text(encoding="utf-8")
        return text, yaml.safe_load(text)
    except OSError as exc:
        raise InputError(f"Cannot read the space file {shown(path)}: {shown(exc)}.") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{shown(path)} is not UTF-8 text (byte {exc.start}); save the space "
                         "file as UTF-8.") from None
    except RecursionError:
        raise InputError(f"{shown(path)} nests brackets or blocks too deeply to be a space "
                         "file; fix the file.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InputError(f"{shown(path)} is not valid YAML{where}: "
                         f"{shown(getattr(exc, 'problem', exc))}. Fix the file.") from None


def from_file(path: str) -> dict[str, list]:
    """Read and check a space file; repeated values of a knob count once."""
    path = Path(path)
    text, data = _read_yaml(path)
    if not isinstance(data, dict) or set(data) != {"knobs"} or not isinstance(data["knobs"], dict):
        raise InputError(f"{shown(path)} must hold one mapping, `knobs:`, of knob names to lists "
                         f"of values, e.g. `knobs: {{layers: [0, 1]}}`. Knobs: {', '.join(KNOBS)}.")
    lines = _key_lines(text)
    space = {}
    for name, values in data["knobs"].items():
        at = f"{shown(path)}, line {lines.get(name, '?')}, knob '{shown(name, 60)}'"
        if name not in KNOBS:
            raise InputError(f"{at}: unknown knob. Knobs: {', '.join(KNOBS)}.")
        if not isinstance(values, list) or not values:
            raise InputError(f"{at}: give a non-empty list of values, e.g. "
                             f"{list(KNOBS[name].default)}.")
        for v in values:
            problem = KNOBS[name].check(v)
            if problem:
                raise InputError(f"{at}: value {ECHO.repr(v)} is not {problem}.")
        space[name] = list(dict.fromkeys(values))
    return space


def for_runtime(space: dict, runtime: str, from_file: bool) -> dict:
    """The space as the target runtime can run it: under ONNX Runtime the quant knob's
    default values are its own int8 (mmkit's packed layers do not export), and the PyTorch
    quantizers are refused; under PyTorch, ort-int8 is."""
    quant = space.get("quant")
    if quant is None:
        return space
    if runtime == "onnxruntime":
        if not from_file:
            return {**space, "quant": list(ORT_QUANT)}
        other = [q for q in quant if q not in ORT_QUANT]
        if other:
            raise InputError(f"Knob 'quant' value {other[0]} is a PyTorch quantizer, whose "
                             "layers ONNX export cannot take; under --runtime onnxruntime "
                             f"'quant' takes {', '.join(ORT_QUANT)} (ONNX Runtime's dynamic "
                             "int8, per channel, embeddings included).")
    elif "ort-int8" in quant:
        raise InputError("Knob 'quant' value ort-int8 is ONNX Runtime's quantization; search "
                         "with --runtime onnxruntime to use it, or pick dynamic-int8 (its "
                         "PyTorch counterpart).")
    return space


def ort_int8(params: dict) -> bool:
    """Whether a point's ONNX export is quantized by ONNX Runtime."""
    return params.get("quant") == "ort-int8"


def baseline(space: dict) -> dict:
    """The parameters of the unmodified model (trial 0)."""
    return {name: KNOBS[name].identity for name in space}


def check_baseline(space: dict) -> None:
    """Every knob must offer its 'no change' value, or trial 0 is not the original model."""
    for name, values in space.items():
        if KNOBS[name].identity not in values:
            raise InputError(f"Knob '{name}' must include {KNOBS[name].identity!r} (no change), "
                             "so that trial 0 is the unmodified model.")


def size(space: dict) -> int:
    """How many points the space holds."""
    return math.prod(len(values) for values in space.values())


def point_key(params: dict, space: dict) -> str | None:
    """A point's canonical name ('layers=1 heads=0.25'; 0 and 0.0 are one value), or None when
    `params` are not a whole point of `space` (a trial cut off before it chose every knob)."""
    if set(params) != set(space):
        return None
    parts = []
    for name, values in space.items():
        try:
            parts.append(f"{name}={values[values.index(params[name])]}")
        except ValueError:
            return None
    return " ".join(parts)


# how a knob's value moves the latency: 1, a larger value cuts more (no slower); -1, a larger
# value keeps more (no faster); 0, no effect (recovery trains the weights of the same cut).
# The other knobs (quant, sparsity) are not ordered: points must match in them to compare.
LATENCY_ORDER = {"layers": 1, "heads": 1, "ffn": 1, "tokens": -1, "recovery": 0}


def no_faster(point: dict, than: dict) -> bool:
    """True when `point` can be no faster than `than`: it cuts no more in any ordered knob
    and matches it in the others. A point no faster than one over the budget is over it."""
    for name, value in point.items():
        order = LATENCY_ORDER.get(name)
        if order is None and value != than.get(name):
            return False
        if order and (name not in than or order * (value - than[name]) > 0):
            return False
    return True


def untried_point(space: dict, taken: set[str], seed: int, skip=None) -> dict | None:
    """A point whose key is not in `taken` (nor one `skip(point)` is true of), chosen at random
    by `seed`; None when every point is taken (or, in a space too large to list, when random
    draws find none)."""
    import itertools
    import random

    rng = random.Random(seed)
    names = list(space)
    if size(space) <= ENUMERATE_LIMIT:
        points = [dict(zip(names, values)) for values in itertools.product(*space.values())]
        rng.shuffle(points)
    else:
        points = ({n: rng.choice(space[n]) for n in names} for _ in range(1000))
    return next((p for p in points if point_key(p, space) not in taken
                 and not (skip and skip(p))), None)


ELASTIC_KNOBS = ("layers", "heads", "ffn")  # knobs an elastic model answers by extraction


def elastic_values(elastic) -> dict[str, list]:
    """The structural knobs' values an elastic super-network was trained for, as the knobs
    count them (fractions / layers removed), 'no change' first."""
    trained = elastic.space
    full = max(int(d) for d in trained["depth"])
    return {"layers": [full - int(d) for d in sorted(trained["depth"], reverse=True)],
            "heads": [round(1 - h, 6) for h in sorted(trained["heads"], reverse=True)],
            "ffn": [round(1 - f, 6) for f in sorted(trained["ffn"], reverse=True)]}


def for_elastic(space: dict, elastic, from_file: bool) -> dict:
    """The space searched on an elastic super-network: its structural knobs take the values
    it was trained for (a space file may pick some of them, no others); the other knobs
    (quant, sparsity, recovery) stay as given."""
    trained = elastic_values(elastic)
    out = {}
    for name, values in space.items():
        if name not in ELASTIC_KNOBS:
            out[name] = values
        elif not from_file:
            out[name] = trained[name]
        else:
            outside = [v for v in values if not any(abs(v - t) < 1e-6 for t in trained[name])]
            if outside:
                raise InputError(
                    f"Knob '{name}' value {ECHO.repr(outside[0])} is a sub-network this "
                    f"elastic model was not trained for; its space is {elastic.text()}, so "
                    f"'{name}' can take {trained[name]} ({KNOBS[name].help}).")
            out[name] = values
    return out


def steps_for(params: dict, n_layers: int, calib: str | None, elastic=None) -> list[dict]:
    """The recipe steps of one point in the space, in the order they run. On an elastic
    super-network the structural knobs become one `extract` of a trained sub-network."""
    steps = []
    structured = {"calib": calib, "calib_samples": 32} if calib else {}
    if elastic is not None:
        steps += _extract_step(params, elastic)
        params = {k: v for k, v in params.items() if k not in ELASTIC_KNOBS}
    if params.get("layers"):
        steps.append({"step": "prune", "method": "layers",
                      "sparsity": min(params["layers"] / n_layers, 0.99), **structured})
    if params.get("heads"):
        steps.append({"step": "prune", "method": "heads", "sparsity": params["heads"],
                      **structured})
    if params.get("ffn"):
        steps.append({"step": "prune", "method": "neurons", "sparsity": params["ffn"],
                      **structured})
    if params.get("sparsity"):
        steps.append({"step": "prune", "method": "magnitude", "sparsity": params["sparsity"]})
    if params.get("tokens", 1.0) < 1:  # before recovery: it trains with the merging it keeps
        steps.append({"step": "tokens", "method": "tome", "keep": params["tokens"]})
    if params.get("recovery"):  # distilled from the uncut model (the trial's teacher)
        # 5e-5, the distill method's own default: on MiniLM's depth-4 cut (tweets, 2,000
        # samples, 50 steps) it recovered 0.5 point more than 2e-5 did (bench/elastic.py)
        steps.append({"step": "finetune", "method": "distill", "max_steps": params["recovery"],
                      "keep_sparsity": bool(params.get("sparsity")), "lr": RECOVERY_LR})
    quant = QUANT[params.get("quant", "none")]
    if quant:
        step = {"step": "quantize", **quant}
        if quant["method"] == "gptq":
            if not calib:
                raise InputError("quant gptq-4 needs calibration data; the search uses --data.")
            step.update({"calib": calib, "calib_samples": 32})
        steps.append(step)
    return steps


def _extract_step(params: dict, elastic) -> list[dict]:
    """The `extract` step of a point's structural knobs (none for the full network)."""
    full = max(int(d) for d in elastic.space["depth"])
    ffn, heads = 1 - params.get("ffn", 0), 1 - params.get("heads", 0)
    layers = params.get("layers", 0)
    if not (layers or params.get("ffn") or params.get("heads")):
        return []
    step = {"step": "extract", "method": "subnet", "ffn": round(ffn, 6), "heads": round(heads, 6)}
    if layers:
        step["depth"] = full - layers
    return [step]
