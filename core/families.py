"""What kind of backbone a config describes, and which task it serves by default."""

from __future__ import annotations

from .errors import InputError

TEXT_ENCODERS = {
    "bert", "roberta", "distilbert", "xlm-roberta", "electra", "albert", "deberta",
    "deberta-v2", "mpnet", "camembert", "modernbert",
}
DUAL_ENCODERS = {"clip", "siglip", "siglip2", "chinese_clip"}

# kind -> the task a bare command runs on it
DEFAULT_TASK = {
    "text-encoder": "text-classification",
    "vision": "image-classification",
    "clip": "zero-shot-image-classification",
    "causal-lm": "causal-lm",
}


def model_kind(config) -> str:
    """One of text-encoder, vision, clip, causal-lm, or other."""
    mtype = getattr(config, "model_type", "")
    if mtype in DUAL_ENCODERS or (hasattr(config, "text_config") and hasattr(config, "vision_config")):
        return "clip" if mtype in DUAL_ENCODERS else "other"
    if mtype in TEXT_ENCODERS:
        return "text-encoder"
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return "causal-lm"
    if hasattr(config, "image_size") and not hasattr(config, "vocab_size"):
        return "vision"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if mtype in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal-lm"
    return "other"


def head_task(config) -> str | None:
    """The task a checkpoint's trained head serves, read from `architectures`, or None."""
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith("ForSequenceClassification"):
            return "text-classification"
        if arch.endswith("ForImageClassification"):
            return "image-classification"
        if arch.endswith("ForCausalLM"):
            return "causal-lm"
    return None


def max_positions(config) -> int | None:
    """The most tokens a text model (or CLIP's text tower) takes in one sequence."""
    config = getattr(config, "text_config", None) or config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def prompt_tokens(model) -> int:
    """Positions a prompt- or prefix-tuning adapter puts before the input (0 for other
    models): prefix tuning's keys shift the input's positions as a prompt does."""
    configs = getattr(model, "peft_config", None) or {}
    config = configs.get(getattr(model, "active_adapter", None))
    if config is None or str(config.peft_type.value) not in ("PROMPT_TUNING", "P_TUNING",
                                                             "PREFIX_TUNING"):
        return 0
    return int(config.num_virtual_tokens)


def length_limit(config, reserved: int = 0) -> int | None:
    """The longest input a text model takes, less the positions a prompt reserves."""
    limit = max_positions(config)
    return None if limit is None else limit - reserved


def check_length(config, length: int | None, option: str, ref: str, reserved: int = 0) -> None:
    """Refuse a sequence length the model's position table cannot hold (with `reserved`
    positions taken by prompt-tuning tokens)."""
    limit = length_limit(config, reserved)
    if length is not None and limit is not None and length > limit:
        taken = f" (less {reserved} for the adapter's virtual tokens)" if reserved else ""
        raise InputError(f"{option} {length} is longer than the {limit} positions '{ref}' "
                         f"takes{taken}; use {option} {limit} or less.")
