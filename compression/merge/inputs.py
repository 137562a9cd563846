"""The models being merged, read one tensor at a time under the BASE model's tensor names.

Each input answers `shape(name, base_shape)` (None when it lacks the tensor) and
`tensor(name, base, rows=None)` (that model's tensor, or the block `rows` of its first
dimension, given the base's same block) for the names of the base's state dict:

- `FileInput`: a full model saved as plain safetensors (an mmkit artifact, a Hugging Face
  folder, an embedded model). Only the tensor asked for is read (`reading.TensorFile`); the
  files' keys are mapped to the base's names by transformers' own loading renames (ViT's
  `encoder.layer.N` files are `layers.N` in memory in transformers 5) and the base model
  prefix (`bert.`) added or stripped.
- `LoraInput`: a peft LoRA adapter trained on the base: the base's tensor plus the adapter's
  exact delta B·A·scaling per layer (scaling lora_alpha / r, or lora_alpha / sqrt(r) with
  rsLoRA; transposed for GPT-2's Conv1D), and the tensors it saves whole (a task head).
- `MemoryInput`: anything else (mmkit's own adapters such as SVFit, DoRA and the other peft
  types, a `tiny:` or hub reference, a pruned folder, a quantized model): loaded whole with
  `load_model`, its adapter merged and its quantized layers dequantized in memory
  (`quantized`). Correct for every format mmkit loads, at the cost of holding that whole
  model in memory while the merge runs.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import ExitStack
from pathlib import Path

from ...adapters.merging import has_adapter, merge_adapter_
from ...core.artifacts import weights_hash
from ...core.errors import InputError
from ...core.families import head_task
from ...core.formats import PLAIN, detect
from ...core.loading import check_weights, load_model, peek
from .reading import TensorFile

PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


class _NeedsLoading(Exception):
    """A checkpoint key that transformers converts together with others (fused or stacked
    tensors): the file must be read by transformers itself."""


# ------------------------------------------------------------------ names


def _conversions(model):
    """transformers' load-time renames and conversions for this model ([] when the installed
    transformers has none)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return [], []
    found = get_model_conversion_mapping(model)
    return ([c for c in found if isinstance(c, WeightRenaming)],
            [c for c in found if isinstance(c, WeightConverter)])


def _rename(key: str, renamings, converters, prefix: str | None, names: dict):
    """A checkpoint key as the model names it: (name, converter pattern or None)."""
    if renamings or converters:
        from transformers.core_model_loading import rename_source_key

        return rename_source_key(key, renamings, converters, prefix, names)
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in names:
        return key[len(prefix) + 1:], None
    if prefix and f"{prefix}.{key}" in names:
        return f"{prefix}.{key}", None
    return key, None


def name_map(model, keys, convert: str = "always") -> dict[str, str]:
    """{the model's tensor name: the key holding it} for the keys of a checkpoint of the same
    architecture. `convert="always"` applies transformers' load-time renames as
    from_pretrained does (files written by save_pretrained); `"never"` only adds or strips the
    base model prefix (another in-memory model's state dict); `"fallback"` renames only keys
    that are not the model's names already (peft adapters, saved with in-memory names). A
    returned name may still be one the model lacks: the caller decides what that means."""
    names = dict.fromkeys(model.state_dict(), True)
    renamings, converters = _conversions(model) if convert != "never" else ([], [])
    prefix = getattr(model, "base_model_prefix", "") or None
    out = {}
    for key in keys:
        name, pattern = _rename(key, [], [], prefix, names)
        if convert == "always" or (convert == "fallback" and name not in names):
            name, pattern = _rename(key, renamings, converters, prefix, names)
        if pattern is not None:
            raise _NeedsLoading(key)
        out.setdefault(name, key)
    return out


# ------------------------------------------------------------------ inputs


class FileInput:
    """A full model in plain safetensors files, read lazily."""

    kind = "file"

    def __init__(self, ref: str, folder: str, model, labels, stack: ExitStack):
        self.ref, self.labels = ref, labels
        self._where = {}
        keys = {}
        for path in sorted(Path(folder).glob("*.safetensors")):
            handle = stack.enter_context(TensorFile(path))
            for key in handle.keys():
                keys.setdefault(key, handle)
        for name, key in name_map(model, list(keys)).items():
            self._where[name] = (keys[key], key)

    def shape(self, name, base_shape):
        """The tensor's shape, read from the file header (None when the model lacks it)."""
        if name not in self._where:
            return None
        handle, key = self._where[name]
        return handle.shape(key)

    def tensor(self, name, base, rows=None):
        """The model's tensor `name` (or its block `rows`), read from disk now."""
        handle, key = self._where[name]
        return handle.get(key, rows)


class LoraInput:
    """A peft LoRA adapter of the base: base + B·A·scaling on the layers it adapts."""

    kind = "lora"

    def __init__(self, ref: str, folder: str, config: dict, model, labels, stack: ExitStack):
        self.ref, self.labels = ref, labels
        self._handle = stack.enter_context(TensorFile(Path(folder, "adapter_model.safetensors")))
        # peft stores B·A as (out, in) and transposes it for GPT-2's Conv1D layers (weight in x
        # out), whatever the saved config's fan_in_fan_out says: decide per layer by its type
        self._conv1d = {f"{name}.weight" for name, module in model.named_modules()
                        if type(module).__name__ == "Conv1D"}
        parts, whole = {}, {}
        for key in self._handle.keys():
            body = key.removeprefix(PEFT_PREFIX)
            match = LORA_KEY.match(body)
            if match:
                parts.setdefault(match["module"], {})[match["part"]] = key
            else:
                whole[body] = key  # a module trained in full (modules_to_save: a task head)
        names = model.state_dict()
        self._whole = {name: whole[key] for name, key in
                       name_map(model, list(whole), "fallback").items()}
        targets = {f"{module}.weight": module for module in parts}
        found = name_map(model, list(targets), "fallback")
        for name, key in [*found.items(), *self._whole.items()]:
            if name not in names:
                raise InputError(f"The LoRA adapter '{ref}' changes {key.removesuffix('.weight')}"
                                 ", which the base model does not have: different "
                                 "architectures. Merge adapters trained on this base.")
        self._lora = {}
        for name, key in found.items():
            module = targets[key]
            pair = parts[module]
            if set(pair) != {"A", "B"}:
                raise InputError(f"The LoRA adapter '{ref}' has lora_{next(iter(pair))} but not "
                                 f"the other half for {module}; the adapter file is damaged.")
            r = self._handle.shape(pair["A"])[0]
            alpha = _pattern_value(config.get("alpha_pattern") or {}, module,
                                   config.get("lora_alpha", 8))
            scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
            self._lora[name] = (pair["A"], pair["B"], scaling)

    def shape(self, name, base_shape):
        """The delta's shape for an adapted layer, a saved module's shape, or the base's (the
        adapter leaves that tensor as it is)."""
        if name in self._lora:
            a, b, _ = self._lora[name]
            out, inp = self._handle.shape(b)[0], self._handle.shape(a)[1]
            return (inp, out) if name in self._conv1d else (out, inp)
        if name in self._whole:
            return self._handle.shape(self._whole[name])
        return tuple(base_shape)

    def delta(self, name, rows=None):
        """The exact update of an adapted layer, B·A·scaling (float32), or the block `rows`
        of its first dimension (the layer's: B's rows, or A's columns for a Conv1D)."""
        a, b, scaling = self._lora[name]
        a, b = self._handle.get(a).float(), self._handle.get(b).float()
        if name in self._conv1d:  # the layer's weight is (in, out): update.T
            return (b @ (a if rows is None else a[:, rows])).T * scaling
        return ((b if rows is None else b[rows]) @ a) * scaling

    def tensor(self, name, base, rows=None):
        """The adapted model's tensor (or its block `rows`; `base` is the base's same
        block): the base's plus the delta, kept in float32 (or the base's float64) so a
        float16 base does not round the delta away."""
        if name in self._whole:
            return self._handle.get(self._whole[name], rows)
        if name not in self._lora:
            return base
        wide = base.double() if base.dtype.itemsize > 4 else base.float()
        return wide + self.delta(name, rows).to(wide.device, wide.dtype)


class MemoryInput:
    """Any model mmkit loads, held whole in memory (its adapter merged in)."""

    kind = "memory"

    def __init__(self, ref: str, source, task: str, model, seed: int, **reading):
        from .quantized import dequantize_

        # `reading`: allow_pickle / trust_remote_code, as the run was given them
        loaded = load_model(source, task, task_head=False, seed=seed, **reading)
        if has_adapter(loaded):
            merge_adapter_(loaded, "mmkit merge")
        if dequantize_(loaded, f"'{ref}'") is not None:
            self.kind = "dequantized"
        self.ref = ref
        self.labels = loaded.labels if loaded.task == task else None
        self._state = loaded.model.state_dict()
        self._names = name_map(model, list(self._state), "never")

    def shape(self, name, base_shape):
        """The tensor's shape (None when the model lacks it)."""
        key = self._names.get(name)
        return None if key is None else tuple(self._state[key].shape)

    def tensor(self, name, base, rows=None):
        """The model's tensor `name` (or its block `rows`)."""
        tensor = self._state[self._names[name]]
        return tensor if rows is None else tensor[rows]


def _pattern_value(patterns: dict, module: str, default):
    """peft's per-layer override (alpha_pattern): the first pattern matching the end of the
    module's name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


# ------------------------------------------------------------------ choosing the input kind


def _peft_config(folder) -> dict:
    try:
        return json.loads(Path(folder, "adapter_config.json").read_text())
    except (OSError, ValueError):
        return {}


def _streamable_lora(adapter) -> dict | None:
    """The adapter's peft config when it is a plain LoRA whose delta is B·A·scaling on Linear
    layers (no DoRA, LoRA bias, embedding LoRA or layer replication), else None."""
    from ...core.formats import get_format

    if detect(adapter.path, adapter=True) is not get_format("peft-adapter"):
        return None
    config = _peft_config(adapter.path)
    plain = (config.get("peft_type") == "LORA" and not config.get("use_dora")
             and not config.get("lora_bias") and not config.get("layer_replication")
             and not config.get("trainable_token_indices"))
    weights = Path(adapter.path, "adapter_model.safetensors")
    if not plain or not weights.is_file():
        return None
    with TensorFile(weights) as handle:
        for key in handle.keys():
            body = key.removeprefix(PEFT_PREFIX)
            if ".lora_" in body and not LORA_KEY.match(body):
                return None  # lora_embedding_A, lora_magnitude_vector, ...
    return config


def _labels(source, config, task: str):
    """The class names of the model's head for `task`, or None when it has none for it."""
    if not task.endswith("classification") or task.startswith("zero-shot"):
        return None
    made = (source.adapter or source).manifest.get("task") or {}
    if made.get("name") == task:
        return [str(label) for label in made.get("labels") or []] or None
    if source.adapter is None and head_task(config) == task:
        return [str(config.id2label[i]) for i in range(config.num_labels)]
    return None


def same_model(a, b, seed_a: int, seed_b: int) -> bool:
    """True when two model sources hold the same weights: the same tiny model and seed, the
    same recorded or computed weight hash, or the same folder / hub id."""
    if a.kind == "tiny" or b.kind == "tiny":
        return a.ref == b.ref and seed_a == seed_b
    recorded = ((a.adapter.manifest.get("parent") or {}).get("weights_sha256")
                if a.adapter is not None else None) or weights_hash(a)
    current = weights_hash(b)
    if recorded and current:
        return recorded == current
    return (a.kind, a.path) == (b.kind, b.path)


def lineage_root(source, seed: int):
    """Where a model's recorded lineage starts, following the parents mmkit's manifests
    record: ("tiny", ref, seed), ("sha256", weights hash), or None when unknown (a hub id)."""
    from ...core.refs import read_manifest

    if source.kind == "tiny":
        return ("tiny", source.ref, seed)
    manifest, root, seen = source.manifest, None, {source.path}
    for _ in range(64):  # longer than any lineage mmkit writes
        parent = manifest.get("parent") if isinstance(manifest, dict) else None
        if not isinstance(parent, dict):
            break
        root, path = parent, parent.get("path")
        if path in seen:  # a folder written over from itself: its record says no more
            return None
        seen.add(path)
        try:
            manifest = read_manifest(path) if isinstance(path, str) and Path(path).is_dir() \
                else {}
        except InputError:
            return None
    if root is None:  # not made by mmkit: the model is its own root
        digest = weights_hash(source)
        return ("sha256", digest) if digest else None
    if root.get("kind") == "tiny":
        return ("tiny", root.get("ref"), root.get("seed", 0))
    return ("sha256", root["weights_sha256"]) if root.get("weights_sha256") else None


def _root_text(root) -> str:
    return f"'{root[1]}' (seed {root[2]})" if root[0] == "tiny" else f"weights {root[1][:12]}"


def open_input(ref: str, source, loaded, base_source, base_seed: int, seed: int,
               stream_adapters: bool, task_vectors: bool, stack: ExitStack,
               allow_pickle: bool = False, trust_remote_code: bool = False):
    """The input for one model to merge. `source` is its resolved ModelSource (an adapter's
    base, with `.adapter` set); `base_source` / `base_seed` identify the base's weights.
    `task_vectors`: the method takes task vectors against the base, so an adapter must have
    been trained on it (linear and slerp take an adapter of another base as the full model
    it makes, loaded whole). `stream_adapters` is False when the loaded base had an adapter
    of its own merged in (then a LoRA input's own base is not at hand, and it is loaded
    whole)."""
    task, model = loaded.task, loaded.model
    adapter = source.adapter
    config = peek(source, task, trust_remote_code)[1]
    reading = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    if adapter is not None:
        check_weights(adapter, allow_pickle)
        trained_seed = (adapter.manifest.get("parent") or {}).get("seed", 0)
        own_base = same_model(source, base_source, trained_seed, base_seed)
        if not own_base and not task_vectors:
            return MemoryInput(ref, source, task, model, trained_seed, **reading)
        if not own_base:
            seeds = (f" (seed {trained_seed})", f" (seed {base_seed})") \
                if source.ref == base_source.ref else ("", "")
            raise InputError(f"'{ref}' is an adapter of '{source.ref}'{seeds[0]}, not of the "
                             f"base '{base_source.ref}'{seeds[1]} these models are merged onto: "
                             "an adapter's "
                             "delta only means something on its own base. Pass --base "
                             f"{source.ref} (or merge the adapter into its base first with "
                             f"`mmkit merge {ref} -o OUT`).")
        lora = _streamable_lora(adapter) if stream_adapters else None
        if lora is not None:
            return LoraInput(ref, adapter.path, lora, model, _labels(source, config, task),
                             stack)
        return MemoryInput(ref, source, task, model, trained_seed, **reading)
    if task_vectors:  # its task vector means something only against its own starting point
        own, base = lineage_root(source, seed), lineage_root(base_source, base_seed)
        if own and base and own[0] == base[0] and own != base:
            raise InputError(f"'{ref}' was fine-tuned from {_root_text(own)}, and the base "
                             f"'{base_source.ref}' these models are merged onto comes from "
                             f"{_root_text(base)}: its task vector would be mostly the gap "
                             "between the two starting points. Pass --base with the model the "
                             "inputs were fine-tuned from.")
    fmt = detect(source.path) if source.kind not in ("tiny", "hub") else None
    quantized = getattr(config, "quantization_config", None) is not None
    if (fmt is not None and fmt.name == PLAIN and not quantized
            and any(Path(source.path).glob("*.safetensors"))):
        check_weights(source, allow_pickle)
        try:
            return FileInput(ref, source.path, model, _labels(source, config, task), stack)
        except _NeedsLoading:
            pass  # fused / stacked tensors: let transformers read the files
    return MemoryInput(ref, source, task, model, seed, **reading)
