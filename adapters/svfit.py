"""SVFit (Sun et al. 2024): fine-tune only the top-r singular values of each target weight.

Each target W (out x in) is factored once, W = U diag(s) V^T. The adapted layer computes
W x + U_r diag(delta) V_r^T x with U_r, V_r (the top-r singular vectors) frozen and only delta
(r numbers, starting at zero) trained, which is the same as training s_r + delta. Merging adds
U_r diag(delta) V_r^T to W exactly.

U_r and V_r are stored in the adapter file rather than recomputed from the base on load, so a
reload never depends on the SVD routine of another torch / BLAS build.
"""

from __future__ import annotations

from pydantic import Field

from ..core.errors import InputError
from ..core.layers import is_linear, is_task_head, output_heads, weight_view
from ..core.train import TrainingConfig
from .targets import check_targets

MARK = "mmkit_svfit"
DEFAULT_LR = 1e-2


class SVFitConfig(TrainingConfig):
    """SVFit: train the top-r singular values of every target Linear layer."""

    r: int = Field(32, ge=1, description="singular values trained per layer")
    target_modules: list[str] | str = Field(
        "all-linear", description="comma-separated layer names, or all-linear")


def structure(cfg: SVFitConfig) -> dict:
    """The settings needed to rebuild the modules when the adapter is loaded again."""
    return {"r": cfg.r}


def find_targets(model, target_modules) -> list[str]:
    """Names of the Linear / Conv1D layers SVFit adapts: all but the output heads (trained in
    full, not factored; CLIP's projections are factored like any layer)."""
    check_targets(model, target_modules, "svfit")
    wanted = None if target_modules == "all-linear" else (
        [target_modules] if isinstance(target_modules, str) else list(target_modules))
    names = []
    for name, m in model.named_modules():
        if not is_linear(m) or is_task_head(name, output_heads()):
            continue
        if wanted is None or any(name == t or name.endswith("." + t) for t in wanted):
            names.append(name)
    return names


def _delta_class():
    import torch

    class SingularDelta(torch.nn.Module):
        """U_r diag(delta) V_r^T as a side path: ((x V_r) * delta) U_r^T."""

        def __init__(self, u, v):
            super().__init__()
            self.register_buffer("u", u)  # (out, r), frozen
            self.register_buffer("v", v)  # (in, r), frozen
            self.delta = torch.nn.Parameter(torch.zeros(u.shape[1], dtype=u.dtype, device=u.device))

        def forward(self, x):
            return ((x @ self.v) * self.delta) @ self.u.T

        def update(self):
            """The dense weight change, (out, in)."""
            return (self.u * self.delta) @ self.v.T

    return SingularDelta


def inject(model, params: dict, targets: list[str] | None = None,
           from_weights: bool = True) -> list[str]:
    """Factor every target layer and add its trainable singular-value delta; with
    `from_weights=False` (loading a saved adapter) the factors are left empty for the saved
    ones to fill."""
    import torch

    names = targets if targets is not None else find_targets(model, params.get("target_modules",
                                                                               "all-linear"))
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise InputError(f"This SVFit adapter adapts layers this model does not have "
                         f"({missing[:3]}); load it onto its own base model.")
    Delta = _delta_class()
    for name in names:
        module = modules[name]
        w = weight_view(module).detach()
        r = min(params["r"], *w.shape)
        if from_weights:
            u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
            u, v = u[:, :r].to(w.dtype), vh[:r].T.to(w.dtype)
        else:
            u, v = w.new_zeros(w.shape[0], r), w.new_zeros(w.shape[1], r)
        delta = Delta(u.contiguous(), v.contiguous())
        setattr(module, MARK, delta)
        delta.hook = module.register_forward_hook(lambda mod, args, out, d=delta: out + d(args[0]))
    return list(names)


def merge(model) -> None:
    """Fold every delta into its layer's weight and remove the side paths."""
    import torch

    for name, module in list(model.named_modules()):
        delta = getattr(module, MARK, None)
        if delta is None:
            continue
        with torch.no_grad():
            weight_view(module).add_(delta.update())  # a view: reaches Conv1D's (in, out) too
        delta.hook.remove()
        delattr(module, MARK)
