"""The saved form of a model whose sizes its config cannot state ("mmkit-pruned"): BERT and
CLIP with pruned heads (their head size is derived from hidden_size / heads).

The folder holds config.json, `model.safetensors` (the state dict as is) and
`mmkit_prune.json` ({"format_version": 1, "family", "linears": {name: [out, in, bias]},
"attention": {module name: {heads, kv_heads, head_dim}}}). Loading builds the model from its
config, resizes those Linear layers and attention modules, and loads the state dict strictly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...core.errors import InputError

PRUNE_JSON = "mmkit_prune.json"


def save_pruned(loaded, folder: Path) -> None:
    """Write a structurally pruned model and the shapes that rebuild it."""
    from safetensors.torch import save_file

    from ...core.train import tied_duplicates

    model = loaded.model
    linears = {n: [m.out_features, m.in_features, m.bias is not None]
               for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    state = model.state_dict()
    for key in tied_duplicates(state):
        del state[key]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / PRUNE_JSON).write_text(json.dumps({
        "format_version": 1, "family": loaded.family, "linears": linears,
        "attention": loaded.extra["pruned"].get("attention", {})}, indent=2))


def is_pruned_folder(path) -> bool:
    """True for a folder written by save_pruned."""
    return path is not None and Path(path, PRUNE_JSON).is_file()


def load_pruned(cls, folder, config):
    """Rebuild a saved mmkit-pruned model of class `cls` (an Auto class); returns the model
    and its attention layout."""
    from safetensors.torch import load_file

    from ..quantize.qlinear import set_module
    from .slicing import set_head_count

    from ...core.artifacts import read_json_file

    spec = read_json_file(Path(folder, PRUNE_JSON), "an mmkit pruning description",
                          {"linears": dict, "attention": dict, "family": str})
    model = cls.from_config(config)
    modules = dict(model.named_modules())
    try:
        for name, (out_f, in_f, bias) in spec["linears"].items():
            old = modules.get(name)
            if old is None:
                raise InputError(f"{folder}: {PRUNE_JSON} names a layer {name[:200]} that its "
                                 "config does not build; the artifact is damaged. Re-create it.")
            if (old.out_features, old.in_features) != (out_f, in_f):
                set_module(model, name, torch.nn.Linear(int(in_f), int(out_f), bias=bool(bias)))
        for name, layout in spec["attention"].items():
            set_head_count(model.get_submodule(name), spec["family"], layout["heads"],
                           layout["kv_heads"], layout["head_dim"])
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as exc:
        raise InputError(f"{folder}: {PRUNE_JSON} does not describe this model's layers "
                         f"({type(exc).__name__}: {str(exc)[:200]}); the artifact is damaged. "
                         "Re-create it.") from None
    try:
        result = model.load_state_dict(load_file(str(Path(folder, "model.safetensors"))),
                                       strict=False)
    except RuntimeError as exc:  # shapes differ from what mmkit_prune.json describes
        raise InputError(f"{folder}: the weights do not match {PRUNE_JSON} ({str(exc)[:300]}); "
                         "re-create the artifact.") from None
    missing = [k for k in result.missing_keys if "lm_head" not in k]
    if missing or result.unexpected_keys:
        raise InputError(f"{folder} does not match its own {PRUNE_JSON} (missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}); re-create the artifact.")
    model.tie_weights()
    return model.eval(), spec["attention"]
