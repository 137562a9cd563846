"""inspect_model: what a model is made of and which mmkit methods apply to it."""

from __future__ import annotations

from collections import Counter, defaultdict

from .loading import LoadedModel
from .profile import count_parameters, disk_bytes, weights_bytes


def _linear_layers(model) -> list[dict]:
    import torch

    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            out.append({"name": name, "in": mod.in_features, "out": mod.out_features,
                        "bias": mod.bias is not None})
        elif type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):  # GPT-2's transposed Linear
            out.append({"name": name, "in": mod.weight.shape[0], "out": mod.nf,
                        "bias": mod.bias is not None, "type": "Conv1D"})
    return out


def linear_groups(layers: list[dict]) -> list[dict]:
    """Linear layers grouped by their last name part (q_proj, fc1, ...), with count and shape."""
    groups = defaultdict(list)
    for layer in layers:
        groups[layer["name"].rsplit(".", 1)[-1]].append(layer)
    return [{"suffix": k, "count": len(v), "shape": f"{v[0]['in']}->{v[0]['out']}"}
            for k, v in groups.items()]


def inspect_model(loaded: LoadedModel) -> dict:
    """Family, parameters by module type, sizes, dtypes, linear layers, applicable methods."""
    from .registry import methods_for

    model = loaded.model
    by_type = Counter()
    for mod in model.modules():
        own = sum(p.numel() for p in mod.parameters(recurse=False))
        if own:
            by_type[type(mod).__name__] += own
    dtypes = Counter()
    for p in model.parameters():
        dtypes[str(p.dtype).replace("torch.", "")] += p.numel()
    layers = _linear_layers(model)
    disk = disk_bytes(loaded.source.path)
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
        "weights_mb": weights_bytes(model) / 2**20,
        "disk_mb": None if disk is None else disk / 2**20,
        "linear_layers": layers,
        "linear_groups": linear_groups(layers),
        "methods": [f"{m.step}:{m.name}" for m in methods_for(loaded.kind)],
        "steps": [f"{s['step']}:{s['method']}" for s in manifest.get("steps", [])],
        "parent": (manifest.get("parent") or {}).get("ref"),
    }
