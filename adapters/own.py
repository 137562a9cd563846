"""mmkit's own adapters (AdaptFormer, VPT, SVFit; CoOp and MaPLe, which train through
clip_prompts.py): training, and their save / load format.

Format of an adapter folder (besides mmkit.json, recipe.yaml and the tokenizer / processor):
- `mmkit_adapter.json`: {"format": "mmkit-adapter", "format_version": 1, "method": name,
  "params": the settings that rebuild the modules, "targets": the module names adapted,
  "base_model": the base's reference, "task": task name}
- `mmkit_adapter.safetensors`: the adapter's tensors (and a trained task head's), keyed by
  their parameter names in the adapted model (each adapter's modules sit under an attribute
  named `mmkit_<method>`).

`attach_adapter(base_model, folder)` rebuilds the modules on a freshly loaded base and loads the
tensors; `mmkit eval / bench / run` do it for you when given the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import InputError
from ..core.layers import new_heads
from ..core.sparsity import zero_masks
from . import adaptformer, clip_prompts, maple, svfit, vpt
from .training import train_adapted

ADAPTER_JSON = "mmkit_adapter.json"
ADAPTER_WEIGHTS = "mmkit_adapter.safetensors"
FORMAT_VERSION = 1
METHODS = {"adaptformer": adaptformer, "vpt": vpt, "svfit": svfit, "coop": clip_prompts,
           "maple": maple}
HEADS = new_heads()  # new task heads: trained in full beside the adapter and saved with it


def _is_adapter_tensor(name: str) -> bool:
    return any(part.startswith("mmkit_") for part in name.split("."))


def adapter_tensors(model, task: str) -> dict:
    """The tensors an adapter folder stores: the adapter's, and the task head's."""
    keep_head = task in ("text-classification", "image-classification")
    return {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()
            if _is_adapter_tensor(name) or (keep_head and name.split(".")[0] in HEADS)}


def make_apply(name: str):
    """The apply function of one of our adapters."""
    module = METHODS[name]

    def apply(loaded, cfg, ctx):
        model = loaded.model
        masks = zero_masks(model)  # the base's own zeros, before the adapter exists
        for p in model.parameters():
            p.requires_grad_(False)
        params = {**module.structure(cfg)}
        if hasattr(cfg, "target_modules"):
            params["target_modules"] = cfg.target_modules
        targets = module.inject(model, params)
        for n, p in model.named_parameters():  # the adapter, and a classification head
            if _is_adapter_tensor(n) or (loaded.task != "causal-lm" and n.split(".")[0] in HEADS):
                p.requires_grad_(True)
        ctx.report["adapted_modules"] = len(targets)
        if not train_adapted(loaded, model, cfg, ctx, module.DEFAULT_LR, masks,
                             lambda: module.merge(model)):
            loaded.extra["format"] = "mmkit-adapter"
            loaded.extra["adapter"] = {"method": name, "params": params, "targets": targets,
                                       "base_model": loaded.source.ref}
        return loaded

    apply.__name__ = f"{name}_finetune"
    return apply


def save_adapter(loaded, folder: Path) -> None:
    """Write the adapter's two files into `folder`."""
    from safetensors.torch import save_file

    spec = loaded.extra["adapter"]
    save_file(adapter_tensors(loaded.model, loaded.task), str(folder / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    meta = {"format": "mmkit-adapter", "format_version": FORMAT_VERSION, **spec,
            "task": loaded.task}
    (folder / ADAPTER_JSON).write_text(json.dumps(meta, indent=2))


def read_spec(folder) -> dict:
    """The adapter description of an adapter folder, checked."""
    path = Path(folder, ADAPTER_JSON)
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} cannot be read ({exc}); the adapter folder is damaged. "
                         "Re-create it.") from None
    if spec.get("format_version", 0) > FORMAT_VERSION or spec.get("method") not in METHODS:
        raise InputError(f"{path} describes a {spec.get('method')} adapter of format version "
                         f"{spec.get('format_version')}, which this mmkit cannot load (it knows "
                         f"{', '.join(METHODS)}, version {FORMAT_VERSION}). Upgrade mmkit.")
    return spec


def attach_adapter(model, folder):
    """Rebuild an mmkit adapter on `model` (its base, freshly loaded) and load its tensors.

    Plain Python use: `attach_adapter(AutoModelFor...from_pretrained(base), folder)`.
    """
    from safetensors.torch import load_file

    spec = read_spec(folder)
    METHODS[spec["method"]].inject(model, spec["params"], spec["targets"], from_weights=False)
    tensors = load_file(str(Path(folder, ADAPTER_WEIGHTS)))
    expected = {n for n in model.state_dict() if _is_adapter_tensor(n)}
    missing, unexpected = expected - set(tensors), set(tensors) - set(model.state_dict())
    if missing or unexpected:
        raise InputError(f"The adapter in {folder} does not fit this base model (missing "
                         f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); load it "
                         "onto the model it was trained on.")
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shapes differ: another base, or another rank
        raise InputError(f"The adapter in {folder} does not fit this base model: {exc}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
