"""The file that makes a plain model folder an elastic super-network: `mmkit_elastic.json`.

An elastic artifact is the full network as a plain Hugging Face model (every command loads it
as that) whose FFN neurons and attention heads were reordered so that every prefix keeps the
most important ones. The JSON says which sub-networks were trained and which layers a smaller
depth keeps:

    {"format_version": 1, "mode": "nested" | "sampled", "family": "bert",
     "space": {"ffn": [0.25, 0.5, 0.75, 1.0], "heads": [0.5, 0.75, 1.0], "depth": [4, 5, 6]},
     "stacks": {"bert.encoder.layer": {"layers": 6, "ffn": 1536, "kv_heads": 12,
                                       "drop_order": [2, 3, 1, 4, 0, 5]}}}

`ffn` / `heads` are the kept fractions of each layer's FFN neurons and key/value heads (a
prefix of round(fraction x units), at least one), `depth` the layers kept in each stack (those
not first in `drop_order`, the least important first).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InputError

ELASTIC_FILE = "mmkit_elastic.json"
FORMAT_VERSION = 1


class StackSpace(BaseModel):
    """One stack of transformer blocks of the super-network."""

    model_config = ConfigDict(extra="forbid")
    layers: int = Field(ge=1)
    ffn: int = Field(ge=1)  # FFN neurons per layer in the full network
    kv_heads: int = Field(ge=1)  # key/value heads (groups) per layer
    drop_order: list[int]  # layer indices, the least important first


class ElasticSpace(BaseModel):
    """A super-network's trained space and the orderings that make its prefixes work."""

    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    mode: str
    family: str
    space: dict[str, list[int | float]]  # ffn, heads (fractions kept), depth (layers kept)
    stacks: dict[str, StackSpace]

    @model_validator(mode="after")
    def _complete(self):
        if set(self.space) != {"ffn", "heads", "depth"}:
            raise ValueError("space must hold ffn, heads and depth")
        if not all(self.space.values()):
            raise ValueError("each dimension of the space needs a value")
        if not all(0 < v <= 1 for k in ("ffn", "heads") for v in self.space[k]):
            raise ValueError("ffn and heads must be fractions in (0, 1]")
        deepest = max(s.layers for s in self.stacks.values()) if self.stacks else 0
        if not all(v == int(v) and 1 <= v <= deepest for v in self.space["depth"]):
            raise ValueError(f"depth must be whole layer counts from 1 to {deepest}")
        return self

    def text(self) -> str:
        """The space as a user reads it: 'ffn 0.25,0.5,0.75,1; heads 0.5,0.75,1; depth 4,5,6'."""
        return "; ".join(f"{k} {','.join(f'{v:g}' for v in vals)}" for k, vals in
                         self.space.items())


def read_elastic(folder) -> ElasticSpace | None:
    """The super-network description in `folder`, None when it has none; a damaged one is an
    error."""
    path = Path(folder) / ELASTIC_FILE if folder else None
    if path is None or not path.is_file():
        return None
    try:
        spec = ElasticSpace.model_validate(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, RecursionError, ValueError, ValidationError) as exc:
        raise InputError(f"{path} cannot be read as an elastic super-network description "
                         f"({str(exc).splitlines()[0][:200]}); the artifact is damaged. "
                         "Re-create it with `mmkit finetune --elastic`.") from None
    if spec.format_version > FORMAT_VERSION:
        raise InputError(f"{path} was written by a newer mmkit (format {spec.format_version}); "
                         "upgrade mmkit to read it.")
    for name, stack in spec.stacks.items():
        if sorted(stack.drop_order) != list(range(stack.layers)):
            raise InputError(f"{path}: the drop order of {name} is not a permutation of its "
                             f"{stack.layers} layers; the artifact is damaged. Re-create it.")
    return spec


def write_elastic(spec: ElasticSpace, folder: Path) -> None:
    """Write `mmkit_elastic.json` into a model folder."""
    (Path(folder) / ELASTIC_FILE).write_text(json.dumps(spec.model_dump(), indent=2))
