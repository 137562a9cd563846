"""PEFT methods through the peft library: LoRA (with rsLoRA / DoRA), AdaLoRA, VeRA, IA3,
prompt tuning and prefix tuning. The artifact is a peft adapter folder that
`PeftModel.from_pretrained(base, folder)` loads.

References: LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023), DoRA (Liu et al. 2024),
AdaLoRA (Zhang et al. 2023), VeRA (Kopiczko et al. 2024), IA3 (Liu et al. 2022),
prompt tuning (Lester et al. 2021), prefix tuning (Li & Liang 2021).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..core.errors import InputError
from ..core.layers import new_heads
from ..core.sparsity import zero_masks
from ..core.train import TrainingConfig
from .targets import check_targets, ia3_targets
from .training import train_adapted

TEXT_ONLY = ("text-encoder", "causal-lm")


class LoraConfig(TrainingConfig):
    """LoRA: rank-r updates B·A on the target layers, scaled by alpha / r (or / sqrt(r))."""

    r: int = Field(16, ge=1, description="rank of the update")
    alpha: float | None = Field(None, gt=0, description="LoRA scaling numerator; default: 2 x r")
    dropout: float = Field(0.05, ge=0, lt=1, description="adapter dropout")
    target_modules: list[str] | str = Field(
        "all-linear", description="comma-separated layer names, or all-linear")
    rslora: bool = Field(False, description="scale by alpha / sqrt(r) (rsLoRA)")
    dora: bool = False
    bits: Literal[4, 8] | None = Field(None, description="QLoRA: load the base in 4-bit (nf4, "
                                       "double quantization) or 8-bit")

    @model_validator(mode="after")
    def _bits(self):
        if self.bits not in (None, 4, 8):
            raise ValueError(f"bits must be 4 or 8 (QLoRA through bitsandbytes), not {self.bits}")
        return self


def qlora_base(cfg: LoraConfig) -> dict:
    """How QLoRA loads its base: in 4 or 8 bits through bitsandbytes."""
    return {"bits": cfg.bits} if cfg.bits else {}


class AdaLoraConfig(TrainingConfig):
    """AdaLoRA: LoRA whose rank budget moves to the layers that need it during training."""

    init_r: int = Field(12, ge=1, description="starting rank")
    target_r: int = Field(8, ge=1, description="average final rank")
    alpha: float = Field(32, gt=0, description="scaling numerator")
    dropout: float = Field(0.05, ge=0, lt=1, description="adapter dropout")
    target_modules: list[str] | str = Field(
        "all-linear", description="comma-separated layer names, or all-linear")

    @model_validator(mode="after")
    def _ranks(self):
        if self.target_r > self.init_r:
            raise ValueError("target_r must not exceed init_r")
        return self


class VeraConfig(TrainingConfig):
    """VeRA: frozen shared random projections, trained per-layer scaling vectors."""

    r: int = Field(256, ge=1, description="rank of the shared random projections")
    dropout: float = Field(0.0, ge=0, lt=1, description="adapter dropout")
    target_modules: list[str] | str = Field(
        "all-linear", description="comma-separated layer names, or all-linear")


class IA3Config(TrainingConfig):
    """IA3: learned vectors that rescale keys, values and FFN activations."""

    target_modules: list[str] | None = Field(
        None, description="comma-separated layer names; default: keys, values, FFN "
                          "down-projection")
    feedforward_modules: list[str] | None = Field(
        None, description="comma-separated layers scaled on their input; default: the FFN "
                          "down-projection")


class PromptConfig(TrainingConfig):
    """Prompt tuning: trained virtual tokens prepended to the input (text models only)."""

    virtual_tokens: int = Field(20, ge=1, description="trained virtual tokens")

    @model_validator(mode="after")
    def _no_merge(self):
        if self.merge:
            raise ValueError("prompt and prefix tuning cannot be merged into the weights (they "
                             "add tokens, not weight changes); drop merge")
        return self


class PrefixConfig(PromptConfig):
    """Prefix tuning: trained key / value prefixes in every layer (text models only)."""


def _task_type(loaded):
    from peft import TaskType

    return {"text-classification": TaskType.SEQ_CLS, "causal-lm": TaskType.CAUSAL_LM}.get(loaded.task)


def _head_names(loaded) -> list[str] | None:
    """Modules trained in full beside the adapter: a new task head must learn."""
    if loaded.task == "image-classification":  # ViT / DeiT: `classifier`
        return [h for h in new_heads() if hasattr(loaded.model, h)] or None
    return None  # peft's SEQ_CLS already keeps classifier / score trainable


def _total_steps(cfg, ctx) -> int:
    import math

    n = len(ctx.dataset.split("train"))
    return cfg.max_steps or math.ceil(n / (cfg.batch_size * cfg.grad_accum) * cfg.epochs)


def _peft_config(method: str, cfg, loaded, ctx):
    import peft

    common = {"task_type": _task_type(loaded)}
    if loaded.family == "gpt2":  # its Conv1D layers store weights transposed
        common["fan_in_fan_out"] = True
    if method in ("lora", "dora"):
        check_targets(loaded.model, cfg.target_modules, method)
        return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha or 2 * cfg.r,
                               lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                               use_rslora=cfg.rslora, use_dora=cfg.dora or method == "dora",
                               modules_to_save=_head_names(loaded), **common)
    if method == "adalora":
        check_targets(loaded.model, cfg.target_modules, method)
        steps = max(_total_steps(cfg, ctx), 4)
        # rank pruning happens between a warm-up and a final phase, a quarter of training each
        return peft.AdaLoraConfig(init_r=cfg.init_r, target_r=cfg.target_r,
                                  lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                  target_modules=cfg.target_modules, total_step=steps,
                                  tinit=steps // 4, tfinal=steps // 4, deltaT=1,
                                  modules_to_save=_head_names(loaded), **common)
    if method == "vera":
        check_targets(loaded.model, cfg.target_modules, method)
        return peft.VeraConfig(r=cfg.r, vera_dropout=cfg.dropout, target_modules=cfg.target_modules,
                               modules_to_save=_head_names(loaded), **common)
    if method == "ia3":
        targets, ff = ia3_targets(loaded.family)
        targets, ff = cfg.target_modules or targets, cfg.feedforward_modules or ff
        check_targets(loaded.model, targets, method)
        return peft.IA3Config(target_modules=targets, feedforward_modules=ff,
                              modules_to_save=_head_names(loaded), **common)
    if method in ("prompt", "prefix"):
        if loaded.kind not in TEXT_ONLY:
            raise InputError(f"--{method} tuning works on text models only (peft's prompt methods "
                             f"need token inputs); this is a {loaded.kind} model. For ViT use "
                             "--vpt (visual prompt tuning).")
        if method == "prefix":
            _check_prefix(loaded)
        cls = peft.PromptTuningConfig if method == "prompt" else peft.PrefixTuningConfig
        return cls(num_virtual_tokens=cfg.virtual_tokens, task_type=common["task_type"])
    raise ValueError(method)


def _check_prefix(loaded) -> None:
    """Prefix tuning feeds its prefixes as past key / values: the model (or its backbone)
    must take them. transformers 5.24 removed them from encoder models such as BERT."""
    import inspect

    model = loaded.model
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), model)
    if not any("past_key_values" in inspect.signature(m.forward).parameters
               for m in (model, backbone)):
        import transformers

        raise InputError(f"--prefix tuning passes its prefixes as past key / values, which this "
                         f"{loaded.family} model does not take in transformers "
                         f"{transformers.__version__} (5.24 removed them from encoder models). "
                         "Use --prompt or --lora, or transformers < 5.24.")


DEFAULT_LR = {"lora": 5e-4, "dora": 5e-4, "adalora": 1e-3, "vera": 4e-3, "ia3": 3e-3,
              "prompt": 3e-2, "prefix": 1e-2}


def _adalora_allocator(peft_model):
    """A TrainerCallback running AdaLoRA's rank allocation after each backward, before the
    optimizer step (where peft requires it)."""
    from transformers import TrainerCallback

    class AdaLoraAllocator(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            peft_model.base_model.update_and_allocate(state.global_step)

    return AdaLoraAllocator()


def make_apply(method: str):
    """The apply function of one peft method."""

    def apply(loaded, cfg, ctx):
        import peft

        pconfig = _peft_config(method, cfg, loaded, ctx)
        masks = zero_masks(loaded.model)  # the base's own zeros, before any adapter exists
        if getattr(loaded.model, "is_quantized", False):  # QLoRA: a 4/8-bit base
            from ..core.bnb_cpu import fit_cpu_kernels_

            fit_cpu_kernels_(loaded.model, training=True)  # the fused CPU kernel has no backward
            loaded.model = peft.prepare_model_for_kbit_training(loaded.model,
                                                                use_gradient_checkpointing=False)
            ctx.report["base_bits"] = getattr(cfg, "bits", None)
        model = peft.get_peft_model(loaded.model, pconfig)
        if method == "adalora":
            ctx.callbacks.append(_adalora_allocator(model))

        def merge():
            loaded.model = model.merge_and_unload()

        if not train_adapted(loaded, model, cfg, ctx, DEFAULT_LR[method], masks, merge):
            loaded.model = model
            loaded.extra["format"] = "peft-adapter"
        return loaded

    apply.__name__ = f"{method}_finetune"
    return apply
