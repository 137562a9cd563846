"""Visual prompt tuning (Jia et al. 2022): learnable tokens in a frozen ViT's patch sequence.

Shallow: n tokens are inserted after the CLS token, once, on the embeddings' output. Deep: each
later layer replaces those n positions of its input with its own n tokens, so every layer has
fresh prompts. The classifier still reads the CLS token, so heads work unchanged. Works on ViT
and on CLIP's vision tower. Prompts add tokens, not weight changes, so they cannot be merged.
"""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from ..core.errors import InputError
from ..core.train import TrainingConfig

MARK = "mmkit_vpt"
DEFAULT_LR = 5e-3


class VPTConfig(TrainingConfig):
    """VPT: trained prompt tokens in the patch sequence (shallow, or deep: every layer)."""

    virtual_tokens: int = Field(10, ge=1, description="prompt tokens per layer")
    deep: bool = Field(False, description="fresh prompts in every layer, not only the first")

    @model_validator(mode="after")
    def _no_merge(self):
        if self.merge:
            raise ValueError("visual prompts add tokens, not weight changes, so they cannot be "
                             "merged into the weights; drop merge")
        return self


def structure(cfg: VPTConfig) -> dict:
    """The settings needed to rebuild the prompts when the adapter is loaded again."""
    return {"virtual_tokens": cfg.virtual_tokens, "deep": cfg.deep}


def _layers(tower):
    encoder = getattr(tower, "encoder", None)
    for layers in (getattr(tower, "layers", None), getattr(encoder, "layers", None),
                   getattr(encoder, "layer", None)):
        if layers is not None:
            return layers
    return None


def find_tower(model) -> str:
    """The name of the vision transformer inside `model` (ViT, or CLIP's vision tower)."""
    for name, module in model.named_modules():
        emb = getattr(module, "embeddings", None)
        has_patches = hasattr(emb, "patch_embeddings") or hasattr(emb, "patch_embedding")
        if has_patches and _layers(module) is not None:
            return name
    raise InputError(f"Visual prompt tuning needs a vision transformer with patch embeddings; "
                     f"none was found in this {type(model).__name__}. For text models use "
                     "--prompt or --prefix.")


def _patch_size(config) -> int:
    config = getattr(config, "vision_config", config)
    size = getattr(config, "patch_size", 16)
    return size if isinstance(size, int) else size[0]


def inject(model, params: dict, targets: list[str] | None = None,
           from_weights: bool = True) -> list[str]:
    """Add trainable prompt tokens to the vision transformer of `model`; return its name."""
    import torch

    name = find_tower(model)
    if targets is not None and list(targets) != [name]:
        raise InputError(f"This VPT adapter was trained on {targets}, but this model's vision "
                         f"transformer is '{name}'; load it onto its own base model.")
    tower = dict(model.named_modules())[name]
    layers = _layers(tower)
    n, depth = params["virtual_tokens"], len(layers) if params["deep"] else 1
    ref = next(model.parameters())
    hidden = getattr(getattr(model.config, "vision_config", model.config), "hidden_size")
    bound = math.sqrt(6.0 / (3 * _patch_size(model.config) ** 2 + hidden))  # the VPT paper's init
    prompts = torch.nn.Parameter(torch.empty(depth, n, hidden, device=ref.device, dtype=ref.dtype))
    torch.nn.init.uniform_(prompts, -bound, bound)
    holder = torch.nn.Module()
    holder.prompts = prompts
    setattr(tower, MARK, holder)

    def insert(mod, args, output):
        tokens = holder.prompts[0].to(output.dtype).expand(output.shape[0], -1, -1)
        return torch.cat([output[:, :1], tokens, output[:, 1:]], dim=1)

    tower.embeddings.register_forward_hook(insert)
    for i in range(1, depth):
        def replace(mod, args, kwargs, i=i):
            key = "hidden_states"
            hidden_states = args[0] if args else kwargs[key]
            tokens = holder.prompts[i].to(hidden_states.dtype).expand(hidden_states.shape[0], -1, -1)
            hidden_states = torch.cat([hidden_states[:, :1], tokens, hidden_states[:, 1 + n:]], 1)
            if args:
                return (hidden_states, *args[1:]), kwargs
            return args, {**kwargs, key: hidden_states}

        layers[i].register_forward_pre_hook(replace, with_kwargs=True)
    return [name]
