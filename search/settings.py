"""The search's typed options: what a user asks for (`SearchRequest`, unchecked), the checked
settings a study is made by (`SearchSettings`: the same model is stored in the study and in
search.json) and the whole job a worker reads back from search.json (`SearchJob`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, model_serializer

from ..core.data import DataSpec

# settings written only when set, so that studies of earlier versions (which had none of
# them) still resume: their stored settings compare equal to a command that sets none
WRITTEN_WHEN_SET = ("columns", "threads", "budget_ratio", "runtime")


@dataclass(frozen=True, kw_only=True)
class SearchRequest:
    """A search as the user asked for it (`mmkit search` options); `prepare` checks it."""

    out: str | Path  # the search folder (-o)
    model: str = "minilm"
    data: DataSpec = field(default_factory=DataSpec)
    budget: str | None = None  # --latency-budget as written, e.g. '20ms' or '0.5x'
    objectives: str = "accuracy,latency,size"  # comma-separated
    knobs: str | None = None  # comma-separated knob names (or space_file)
    space_file: str | None = None
    sampler: str = "tpe"
    batch_size: int = 1
    seq_len: int = 128
    threads: int | None = None
    workers: int = 1
    storage: str | None = None  # an Optuna storage URL; None: SQLite in OUT
    runtime: str = "torch"  # where latency and accuracy are measured: torch | onnxruntime


class SearchSettings(BaseModel):
    """What a study is made by: a run with other settings does not resume it. Field order is
    search.json's key order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    task: str
    max_samples: int | None
    data: str  # the data reference load_data reads (also the calibration data)
    seed: int
    columns: dict[str, str] = {}  # load_data's column keywords, from the model's manifest
    space: dict[str, list[int | float | str]]  # knob -> values, in the order trials ask them
    objectives: list[str]
    budget_ms: float | None  # an absolute budget (--latency-budget 20ms)
    # a relative one (--latency-budget 0.5x): the candidate's latency over the unmodified
    # model's, the two measured interleaved
    budget_ratio: float | None = None
    device: str
    batch_size: int
    seq_len: int
    sampler: str
    threads: int | None = None
    # the runtime trials are timed and scored in: None is PyTorch; "onnxruntime" exports
    # every candidate (ONNX Runtime's int8 for the quant knob's ort-int8)
    runtime: str | None = None

    @model_serializer(mode="wrap")
    def _written(self, handler) -> dict:
        data = handler(self)
        for key in WRITTEN_WHEN_SET:
            if not data.get(key):
                data.pop(key, None)
        return data

    def plain(self) -> dict:
        """The settings as JSON reads them back: what the study stores and compares."""
        return json.loads(json.dumps(self.model_dump()))


class LoadingFlags(BaseModel):
    """What the search's model loading may trust (search.json's `loading`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    allow_pickle: bool = False
    trust_remote_code: bool = False


class SearchJob(BaseModel):
    """search.json: the settings, the loading flags, the storage and the search folder;
    everything a worker needs to join the search."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    settings: SearchSettings
    loading: LoadingFlags = LoadingFlags()  # search.json of the first version had none
    storage: str
    out: str
