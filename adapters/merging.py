"""Folding a loaded adapter into its base, for steps that need plain weights (prune, quantize,
search): they take an adapter folder as it comes, merge it first, and say so."""

from __future__ import annotations

import logging

from ..core.errors import InputError
from ..core.sparsity import reapply_, zero_masks

log = logging.getLogger("mmkit")
MERGEABLE_PEFT = ("LORA", "ADALORA", "VERA", "IA3")  # weight updates; prompts add tokens


def has_adapter(loaded) -> bool:
    """True when the loaded model carries a peft adapter or one of mmkit's own."""
    return hasattr(loaded.model, "peft_config") or loaded.extra.get("format") == "mmkit-adapter"


def merge_adapter_(loaded, why: str):
    """Fold the adapter on `loaded` into its base weights (in place) so that `why` (e.g.
    "quantize") works on plain weights; a pruned base keeps its zeros. An adapter that is not
    a weight update (prompt / prefix tuning, AdaptFormer, VPT) or sits on a 4/8-bit base is
    refused with what to do instead."""
    if not has_adapter(loaded):
        return loaded
    model, ref = loaded.model, loaded.source.ref
    if hasattr(model, "peft_config"):
        kind = str(model.peft_config[model.active_adapter].peft_type.value)
        if kind not in MERGEABLE_PEFT:
            raise InputError(f"'{ref}' is a {kind.lower()} adapter, which adds tokens rather than "
                             f"weight changes, so it cannot be merged for {why}. Fine-tune with "
                             "a mergeable method (--lora, --svfit, ...) and pass --merge.")
        if getattr(model.get_base_model(), "is_quantized", False):
            raise InputError(f"'{ref}' is a QLoRA adapter on a 4/8-bit base; merging it would "
                             f"round the base again. For {why}, train LoRA on the full-precision "
                             "base (without --bits).")
        masks = zero_masks(model)
        loaded.model = model.merge_and_unload()
    else:
        method = loaded.extra["adapter"]["method"]
        if method != "svfit":
            raise InputError(f"'{ref}' is an {method} adapter, which is not a weight change and "
                             f"cannot be merged for {why}. Apply {why} to the base model.")
        from . import svfit

        masks = zero_masks(model)
        svfit.merge(model)
    reapply_(masks)
    loaded.extra.pop("format", None)
    loaded.extra.pop("adapter", None)
    loaded.extra["merged_adapter"] = ref
    log.info("%s: merged the adapter %s into its base first", why, ref)
    return loaded
