"""The saved form of RTN / GPTQ / dynamic-int8 models ("mmkit-quantized").

The folder holds config.json, `mmkit_quantized.safetensors` (the model's state dict:
QuantLinear layers as `qweight` int32 words + `scales`, `zeros`, `g_idx`, `bias`; every other
tensor as is) and `mmkit_quant.json` ({"format_version": 1, "layers": {name: {bits,
in_features, out_features, groups, bias, kernel, symmetric}}}; `symmetric`, the grid's kind,
is absent in files of mmkit 0.1). A quantized token-embedding table (QuantEmbedding) adds
"embeddings": {name: {bits, num_embeddings, embedding_dim, padding_idx, tied_head}} and
format_version 2; a tied head's codes are saved once, under the table's name. Loading builds the model from its config,
swaps those layers for QuantLinear and loads the state dict strictly: the same outputs as
before saving. The weights are not in `model.safetensors` on purpose: plain transformers would
load that with random weights in every quantized layer; this way it says it finds no weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...core.errors import InputError

QUANT_JSON = "mmkit_quant.json"
WEIGHTS = "mmkit_quantized.safetensors"
FORMAT_VERSION = 2  # 2: quantized embedding tables; files without them still say 1


def save_quantized(model, folder: Path) -> None:
    """Write a model holding QuantLinear layers."""
    from safetensors.torch import save_file

    from ...core.train import tied_duplicates
    from .qembedding import QuantEmbedding
    from .qlinear import QuantLinear

    layers = {name: {"bits": m.bits, "in_features": m.in_features,
                     "out_features": m.out_features, "groups": m.scales.shape[1],
                     "bias": m.bias is not None, "kernel": m.kernel,
                     **({"symmetric": m.symmetric} if m.symmetric is not None else {})}
              for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    heads = {id(m.qweight): name for name, m in model.named_modules()
             if isinstance(m, QuantLinear)}
    tables = {name: {"bits": m.bits, "num_embeddings": m.num_embeddings,
                     "embedding_dim": m.embedding_dim, "padding_idx": m.padding_idx,
                     "tied_head": heads.get(id(m.qweight))}
              for name, m in model.named_modules() if isinstance(m, QuantEmbedding)}
    state = model.state_dict()
    for key in tied_duplicates(state):
        del state[key]
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    model.config.save_pretrained(folder)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
              str(folder / WEIGHTS), metadata={"format": "pt"})
    spec = {"format_version": FORMAT_VERSION if tables else 1, "layers": layers}
    if tables:
        spec["embeddings"] = tables
    (folder / QUANT_JSON).write_text(json.dumps(spec, indent=2))


def is_quantized_folder(path) -> bool:
    """True for a folder written by save_quantized."""
    return path is not None and Path(path, QUANT_JSON).is_file()


def load_quantized(cls, folder, config):
    """Rebuild a saved mmkit-quantized model of class `cls` (an Auto class)."""
    from safetensors.torch import load_file

    from .qlinear import KERNELS, QuantLinear, set_module

    spec = _read_spec(folder)
    model = cls.from_config(config)
    modules = dict(model.named_modules())
    for name, s in spec["layers"].items():
        if name not in modules:
            raise InputError(f"{Path(folder, QUANT_JSON)} names a layer {name[:200]} that the "
                             "model's config does not build; the artifact is damaged. Re-create "
                             "it.")
        try:
            layer = QuantLinear(int(s["in_features"]), int(s["out_features"]), int(s["bits"]),
                                int(s["groups"]), bool(s["bias"]), s["kernel"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"{Path(folder, QUANT_JSON)} describes layer {name[:200]} "
                             f"incompletely ({type(exc).__name__}: {exc}); the artifact is "
                             "damaged. Re-create it.") from None
        if layer.kernel not in KERNELS:
            raise InputError(f"{Path(folder, QUANT_JSON)}: layer {name[:200]} names an unknown "
                             f"kernel {str(layer.kernel)[:40]}; this mmkit knows "
                             f"{', '.join(KERNELS)}.")
        layer.conv1d = type(modules[name]).__name__ == "Conv1D"
        layer.symmetric = s.get("symmetric") if isinstance(s.get("symmetric"), bool) else None
        set_module(model, name, layer)
    tied = _swap_tables(model, modules, spec.get("embeddings") or {}, folder)
    weights = Path(folder, WEIGHTS)
    if not weights.is_file():  # written by mmkit 0.1.0 before the file was renamed
        weights = Path(folder, "model.safetensors")
    state = load_file(str(weights))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ from what mmkit_quant.json describes
        raise InputError(f"{folder}: the weights do not match {QUANT_JSON} ({str(exc)[:300]}); "
                         "the artifact is damaged. Re-create it.") from None
    shared = {f"{head}.{b}" for head in tied.values() for b in ("qweight", "scales", "zeros")}
    tied_keys = set(getattr(model, "_tied_weights_keys", None) or {}) | shared
    missing = [k for k in result.missing_keys if k not in tied_keys and "lm_head" not in k]
    if missing or result.unexpected_keys:
        raise InputError(f"{folder} does not match its own config (missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}); the artifact is damaged. "
                         "Re-create it.")
    if tied:  # the head reads the table's codes; transformers' tying expects float weights
        from .qembedding import share_buffers

        for table, head in tied.items():
            share_buffers(model.get_submodule(table), model.get_submodule(head))
    else:
        model.tie_weights()
    return model.eval()


def _swap_tables(model, modules, tables: dict, folder) -> dict:
    """Put QuantEmbedding tables in; returns {table name: tied head name}."""
    from .qembedding import QuantEmbedding
    from .qlinear import QuantLinear, set_module

    tied = {}
    for name, s in tables.items():
        head = s.get("tied_head") if isinstance(s, dict) else None
        try:
            if name not in modules or (head is not None and not isinstance(
                    model.get_submodule(head), QuantLinear)):
                raise KeyError(name)
            table = QuantEmbedding(int(s["num_embeddings"]), int(s["embedding_dim"]),
                                   int(s["bits"]), s.get("padding_idx"))
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise InputError(f"{Path(folder, QUANT_JSON)} describes the embedding table "
                             f"{str(name)[:200]} wrongly ({type(exc).__name__}: {exc}); the "
                             "artifact is damaged. Re-create it.") from None
        set_module(model, name, table)
        if head is not None:
            tied[name] = head
    return tied


def _read_spec(folder) -> dict:
    from ...core.artifacts import read_json_file

    spec = read_json_file(Path(folder, QUANT_JSON), "an mmkit quantization description",
                          {"layers": dict})
    if not all(isinstance(v, dict) for v in spec["layers"].values()):
        raise InputError(f"{Path(folder, QUANT_JSON)}: every layer needs an object of its "
                         "sizes and bits; the artifact is damaged. Re-create it.")
    tables = spec.get("embeddings", {})
    if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
        raise InputError(f"{Path(folder, QUANT_JSON)}: \"embeddings\" must map each table to "
                         "an object of its sizes and bits; the artifact is damaged. Re-create "
                         "it.")
    version = spec.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InputError(f"{folder} was quantized by a newer mmkit (format version "
                         f"{str(version)[:20]}); upgrade mmkit to load it.")
    return spec
