"""Which modules an adapter attaches to, per family, and a clear error when names match nothing."""

from __future__ import annotations

from ..core.errors import InputError
from ..core.layers import is_linear

# IA3 scales keys, values and the FFN down-projection (the IA3 paper's choice); peft knows
# bert / llama / gpt2, we add the transformers-5 names of ViT and CLIP.
IA3_TARGETS = {
    "vit": (["k_proj", "v_proj", "fc2"], ["fc2"]),
    "clip": (["k_proj", "v_proj", "fc2"], ["fc2"]),
}


def linear_names(model) -> list[str]:
    """Full names of the Linear (and GPT-2 Conv1D) layers of a model."""
    return [n for n, m in model.named_modules() if is_linear(m)]


def check_targets(model, targets, method: str) -> None:
    """Fail, listing the layer names that exist, when no Linear layer matches `targets`."""
    if targets is None or targets == "all-linear":
        return
    names = linear_names(model)
    wanted = [targets] if isinstance(targets, str) else list(targets)
    hits = [n for n in names for t in wanted if n == t or n.endswith("." + t)]
    if not hits:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise InputError(f"--target-modules {','.join(wanted)} match no Linear layer of this model "
                         f"for {method}. Its Linear layers end in: {', '.join(suffixes)} (or use "
                         "all-linear).")


def ia3_targets(model_type: str):
    """(target_modules, feedforward_modules) for IA3 on a family."""
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TM)

    if model_type in IA3_TARGETS:
        return IA3_TARGETS[model_type]
    if model_type in TM:
        return TM[model_type], FF[model_type]
    raise InputError(f"IA3 has no default target modules for {model_type} models; pass "
                     "--target-modules and --feedforward-modules.")
