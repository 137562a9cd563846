"""AdaptFormer (Chen et al. 2022): a bottleneck branch parallel to each block's MLP.

branch(x) = scale * up(ReLU(down(x))), added to the MLP's output; `up` starts at zero so the
adapted model starts equal to the base. The backbone stays frozen. The branch is nonlinear, so
it cannot be merged into the weights.

Where the branch goes, by block layout (transformers 5 module names):
- blocks with an `mlp` module (ViT, CLIP's two towers, Llama, GPT-2): a forward hook on `mlp`
  adds branch(mlp input) to its output; the input is the pre-norm LayerNorm's output, as in the
  paper.
- BERT-style post-norm blocks (`intermediate` + `output`): `output` computes
  LayerNorm(dense(h) + x); a pre-hook adds branch(x) to x, so the branch runs parallel to the
  FFN inside the same residual sum.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from ..core.errors import InputError
from ..core.layers import is_linear, weight_view
from ..core.train import TrainingConfig

MARK = "mmkit_adaptformer"
DEFAULT_LR = 1e-3


class AdaptFormerConfig(TrainingConfig):
    """AdaptFormer: a down -> ReLU -> up bottleneck beside each MLP, scaled."""

    bottleneck: int = Field(64, ge=1, description="width of the bottleneck")
    scale: float = Field(0.1, gt=0, description="multiplier of the branch's output")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout inside the branch")

    @model_validator(mode="after")
    def _no_merge(self):
        if self.merge:
            raise ValueError("AdaptFormer's branch is nonlinear (ReLU), so it cannot be merged into "
                             "the weights; drop merge (the adapter folder loads through mmkit)")
        return self


def structure(cfg: AdaptFormerConfig) -> dict:
    """The settings needed to rebuild the modules when the adapter is loaded again."""
    return {"bottleneck": cfg.bottleneck, "scale": cfg.scale, "dropout": cfg.dropout}


def _branch_class():
    import torch

    class Bottleneck(torch.nn.Module):
        def __init__(self, width: int, bottleneck: int, scale: float, dropout: float):
            super().__init__()
            self.down = torch.nn.Linear(width, bottleneck)
            self.up = torch.nn.Linear(bottleneck, width)
            self.dropout = torch.nn.Dropout(dropout)
            self.scale = scale
            torch.nn.init.zeros_(self.up.weight)  # the adapted model starts equal to the base
            torch.nn.init.zeros_(self.up.bias)

        def forward(self, x):
            return self.up(self.dropout(torch.relu(self.down(x)))) * self.scale

    return Bottleneck


def _input_width(module) -> int:
    for m in module.modules():
        if is_linear(m):  # GPT-2's Conv1D has no in_features (a packed 4-bit weight would mislead)
            return getattr(m, "in_features", None) or weight_view(m).shape[1]
    raise ValueError("no Linear layer")


def find_blocks(model) -> list[tuple[str, str]]:
    """(module name, layout) of every block the branch attaches to; layout is 'mlp' (hook the
    named MLP module) or 'post-norm' (BERT-style layer with intermediate + output)."""
    found = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        if "mlp" in children:
            found.append((f"{name}.mlp" if name else "mlp", "mlp"))
        elif "intermediate" in children and hasattr(children.get("output"), "dense"):
            found.append((name, "post-norm"))
    return found


def _attach(module, layout: str, branch) -> None:
    setattr(module, MARK, branch)
    if layout == "mlp":
        def add_branch(mod, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()))
            return output + branch(x)

        module.register_forward_hook(add_branch, with_kwargs=True)
    else:
        def add_to_residual(mod, args, kwargs):
            args = list(args)
            if len(args) > 1:
                args[1] = args[1] + branch(args[1])
            else:
                kwargs["input_tensor"] = kwargs["input_tensor"] + branch(kwargs["input_tensor"])
            return tuple(args), kwargs

        module.output.register_forward_pre_hook(add_to_residual, with_kwargs=True)


def inject(model, params: dict, targets: list[str] | None = None,
           from_weights: bool = True) -> list[str]:
    """Add a trainable branch beside every MLP of `model`; return the names of the blocks."""
    blocks = find_blocks(model)
    if not blocks:
        raise InputError(f"AdaptFormer found no transformer MLP blocks in this "
                         f"{type(model).__name__} (it looks for `mlp` modules or BERT-style "
                         "intermediate/output pairs). Use --lora instead.")
    if targets is not None and [b for b, _ in blocks] != list(targets):
        raise InputError("This AdaptFormer adapter was trained on a model with different blocks "
                         f"({len(targets)} recorded, {len(blocks)} here); load it onto its own "
                         "base model.")
    Bottleneck = _branch_class()
    modules = dict(model.named_modules())
    ref = next(model.parameters())
    for name, layout in blocks:
        module = modules[name]
        width = _input_width(module.intermediate if layout == "post-norm" else module)
        branch = Bottleneck(width, params["bottleneck"], params["scale"], params["dropout"])
        _attach(module, layout, branch.to(device=ref.device, dtype=ref.dtype))
    return [b for b, _ in blocks]
