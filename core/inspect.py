"""inspect_model: what a model is made of and which mmkit methods apply to it."""

from __future__ import annotations

from collections import Counter, defaultdict

from .loading import LoadedModel
from .layers import weight_bytes
from .profile import count_parameters, disk_bytes, megabytes

# submodules an adapter adds (peft's and mmkit's): not layers of the model itself
ADAPTER_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "vera_A", "vera_B",
                 "lora_magnitude_vector", "modules_to_save"}
WRAPPER_PARTS = ("base_layer", "original_module")  # peft's wrappers around the model's layers
QUANTIZED_FORMATS = ("mmkit-quantized", "mmkit-ptq", "compressed-tensors")  # mmkit's quantized


def _layer_name(name: str) -> str | None:
    """The model's own name of a layer, or None for a module an adapter added."""
    parts = name.split(".")
    if any(p in ADAPTER_PARTS or p.startswith("mmkit_") for p in parts):
        return None
    return ".".join(p for p in parts if p not in WRAPPER_PARTS)


def _linear_layers(model) -> list[dict]:
    import torch

    out, seen = [], set()
    for name, mod in model.named_modules():
        own = _layer_name(name)
        if own is None or own in seen:
            continue
        if isinstance(mod, torch.nn.Linear) or hasattr(mod, "in_features") and hasattr(
                mod, "qweight"):  # QuantLinear too (not QuantEmbedding)
            row = {"name": own, "in": mod.in_features, "out": mod.out_features,
                   "bias": mod.bias is not None}
        elif type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):  # GPT-2's transposed Linear
            row = {"name": own, "in": mod.weight.shape[0], "out": mod.nf,
                   "bias": mod.bias is not None, "type": "Conv1D"}
        else:
            continue
        if type(mod).__name__ != "Linear" and "type" not in row:
            row["type"] = type(mod).__name__
        seen.add(own)
        out.append(row)
    return out


def linear_groups(layers: list[dict]) -> list[dict]:
    """Linear layers grouped by their last name part and shape (fc1 384->1536), with count."""
    groups = defaultdict(list)
    for layer in layers:
        groups[(layer["name"].rsplit(".", 1)[-1], layer["in"], layer["out"])].append(layer)
    return [{"suffix": suffix, "count": len(v), "shape": f"{n_in}->{n_out}"}
            for (suffix, n_in, n_out), v in groups.items()]


def _adapter(loaded: LoadedModel) -> dict | None:
    """The adapter a loaded model carries: its method and trainable size."""
    model = loaded.model
    if hasattr(model, "peft_config"):
        config = model.peft_config[model.active_adapter]
        method = str(config.peft_type.value).lower()
        rank = getattr(config, "r", None)
    elif loaded.extra.get("format") == "mmkit-adapter":
        method = loaded.extra["adapter"]["method"]
        rank = loaded.extra["adapter"]["params"].get("r")
    else:
        return None
    size = sum(p.numel() for n, p in model.named_parameters() if _layer_name(n) is None)
    return {"method": method, "r": rank, "parameters": size}


def applicable_methods(loaded: LoadedModel) -> list[str]:
    """The registered methods mmkit's commands accept for this model as it is now: by its
    kind, and by its state (an adapter is merged only when it is a weight change; a
    quantized model is not pruned or quantized again)."""
    from .registry import is_mergeable, methods_for

    adapter = _adapter(loaded)
    quantized = loaded.extra.get("format") in QUANTIZED_FORMATS or \
        getattr(loaded.model, "is_quantized", False)
    mergeable = adapter is None or is_mergeable(adapter["method"])
    out = []
    for m in methods_for(loaded.kind):
        if m.step == "finetune" and adapter is not None:
            continue  # an adapter on an adapter: merge first
        if m.step == "extract" and loaded.extra.get("elastic") is None:
            continue  # only a super-network has sub-networks to extract
        if m.step in ("prune", "quantize") and (quantized or not mergeable):
            continue
        if m.step == "finetune" and quantized and m.name not in ("lora", "dora"):
            continue  # only (Q)LoRA trains on a quantized base
        if m.step == "finetune" and loaded.extra.get("format") in QUANTIZED_FORMATS:
            continue
        out.append(f"{m.step}:{m.name}")
    return out


def _dtype(tensor) -> str:
    return str(tensor.dtype).replace("torch.", "")


def _stored(module, name: str, tensor) -> tuple[int, str]:
    """(logical elements, what they are stored as) of one of a module's own tensors: a
    bitsandbytes 4-bit weight counts its unpacked elements, as nf4 / fp4."""
    state = getattr(tensor, "quant_state", None)
    if state is not None and name == "weight":
        import math

        return math.prod(state.shape), str(getattr(state, "quant_type", "4-bit"))
    return tensor.numel(), _dtype(tensor)


def _quantized(module) -> list[tuple[int, str]]:
    """A quantized layer's weights kept outside its parameters, by their logical size: mmkit's
    QuantLinear / QuantEmbedding codes (int4 / int8, in a buffer) and their bias (the kernels
    it builds from them are not submodules)."""
    if getattr(module, "qweight", None) is None or not hasattr(module, "bits"):
        return []
    n = (module.num_embeddings * module.embedding_dim if hasattr(module, "num_embeddings")
         else module.in_features * module.out_features)
    bias = getattr(module, "bias", None)
    return [(n, f"int{module.bits}")] + ([(bias.numel(), _dtype(bias))] if bias is not None
                                          else [])


def _breakdown(model) -> tuple[Counter, Counter]:
    """Parameters by module type and by dtype, tied tensors once, quantized layers' weights
    by their logical size (their sums are `count_parameters`' total)."""
    by_type, dtypes, seen = Counter(), Counter(), set()
    for mod in model.modules():
        kept = []
        for name, p in mod.named_parameters(recurse=False):
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                kept.append(_stored(mod, name, p))
        codes = getattr(mod, "qweight", None)
        if codes is None or codes.data_ptr() not in seen:
            if codes is not None:
                seen.add(codes.data_ptr())
            kept += _quantized(mod)
        for n, dtype in kept:
            by_type[type(mod).__name__] += n
            dtypes[dtype] += n
    return by_type, dtypes


def inspect_model(loaded: LoadedModel) -> dict:
    """Family, parameters by module type, sizes (MB = 10^6 bytes), dtypes, linear layers,
    the adapter it carries, an elastic super-network's space, and the methods that apply."""
    model = loaded.model
    by_type, dtypes = _breakdown(model)
    layers = _linear_layers(model)
    manifest = loaded.source.manifest
    return {
        "model": loaded.source.ref,
        "source": loaded.source.kind,
        "path": loaded.source.path,
        "family": loaded.family,
        "kind": loaded.kind,
        "class": type(model).__name__,
        "task": loaded.task,
        "labels": loaded.labels,
        "parameters": count_parameters(model),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters_by_module_type": dict(by_type.most_common()),
        "dtypes": dict(dtypes),
        "weights_mb": megabytes(weight_bytes(model)),
        "disk_mb": megabytes(disk_bytes(loaded.source.path)),
        "adapter": _adapter(loaded),
        "elastic": None if loaded.extra.get("elastic") is None else
        {"mode": loaded.extra["elastic"].mode, "space": loaded.extra["elastic"].space},
        "linear_layers": layers,
        "linear_groups": linear_groups(layers),
        "methods": applicable_methods(loaded),
        "steps": [f"{s['step']}:{s['method']}" for s in manifest.get("steps", [])],
        "parent": (manifest.get("parent") or {}).get("ref"),
    }
