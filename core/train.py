"""The training loop every fine-tuning method shares: HF Trainer with dynamic padding,
length-grouped batches, a learning-rate schedule, evaluation each epoch, the best checkpoint
kept, and resume from the last checkpoint."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Literal

from pydantic import Field

from .errors import InputError
from .families import check_length, prompt_tokens
from .registry import MethodConfig
from .tasks.batches import Collator, build_items

log = logging.getLogger("mmkit")


class TrainingConfig(MethodConfig):
    """Training settings every fine-tuning method takes."""

    epochs: float = Field(3.0, gt=0, description="passes over the training split")
    lr: float | None = Field(None, gt=0, description="peak learning rate; default: the method's "
                                                      "own")
    batch_size: int = Field(32, ge=1, description="examples per step (per device)")
    max_length: int = Field(128, ge=2, description="tokens per text, or per window for "
                                                  "causal-lm")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup: float = Field(0.06, ge=0, lt=1, description="warm-up as a fraction of the steps")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="learning-rate schedule after the warm-up")
    grad_accum: int = Field(1, ge=1, description="batches accumulated per optimizer step")
    save_steps: int | None = Field(None, ge=1, description="also checkpoint (and evaluate) every "
                                                         "N steps, not only each epoch")
    max_steps: int | None = Field(None, ge=1, description="stop after N optimizer steps")
    merge: bool = Field(False, description="merge the adapter into the weights and write a full "
                                           "model")
    keep_sparsity: bool = Field(False, description="keep a pruned model's zeros while training "
                                                   "(merges always keep them)")


# ---------------------------------------------------------------- CLIP as a classifier
def clip_classifier(model, tokenizer, label_names, template: str | None = None):
    """Wrap a CLIPModel so that it returns class logits (image vs. prompt similarity) and a
    cross-entropy loss: the objective for fine-tuning CLIP on labelled images."""
    import torch

    from .tasks.zero_shot import DEFAULT_TEMPLATE, prompts

    class ClipClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clip = model
            self.prompt_ids = tokenizer(prompts(label_names, template or DEFAULT_TEMPLATE),
                                        padding=True,
                                        return_tensors="pt")

        def forward(self, pixel_values, labels=None):
            text = {k: v.to(pixel_values.device) for k, v in self.prompt_ids.items()}
            out = self.clip(pixel_values=pixel_values, **text)
            logits = out.logits_per_image
            loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
            return {"loss": loss, "logits": logits}

    return ClipClassifier()


# ---------------------------------------------------------------- checkpoints and resume
def tied_duplicates(state: dict) -> list[str]:
    """Keys whose tensor is the same memory as an earlier key's."""
    seen, dups = set(), []
    for key, value in state.items():
        if value.data_ptr() in seen:
            dups.append(key)
        seen.add(value.data_ptr())
    return dups


def raw_checkpoints(model):
    """Wrap a transformers model so the Trainer checkpoints its plain state dict.

    The Trainer saves a transformers model with save_pretrained, which in transformers 5
    renames some keys on the way out (ViT's `layers.N` become `encoder.layer.N`), but reloads
    checkpoints (best model, --resume) with a plain load_state_dict that does not rename them
    back: the weights were silently not restored. Through a plain Module the Trainer saves and
    loads the same names. peft models and our CLIP wrapper are plain already.
    """
    import torch
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return model

    class RawCheckpoints(torch.nn.Module):
        accepts_loss_kwargs = False

        def __init__(self):
            super().__init__()
            self.model = model
            # tied weights (lm_head = embeddings) are saved once: safetensors refuses shared
            # tensors, and loading the one kept restores both; the Trainer expects them missing
            self._keys_to_ignore_on_save = tied_duplicates(super().state_dict())

        def forward(self, **inputs):
            return self.model(**inputs)

        def state_dict(self, *args, **kwargs):
            full = super().state_dict(*args, **kwargs)
            for key in self._keys_to_ignore_on_save:
                full.pop(key, None)
            return full

        def tie_weights(self):
            """Nothing to do: tied tensors are one tensor, restored in place."""

    return RawCheckpoints()


def run_fingerprint(recipe: dict) -> str:
    """Identifies a run: the same recipe (model, data, steps) gives the same fingerprint."""
    text = json.dumps(recipe, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _log_callback():
    """Logs each evaluation to mmkit's logger (stderr)."""
    from transformers import TrainerCallback

    class LogCallback(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            shown = {k[5:]: round(v, 4) for k, v in (metrics or {}).items()
                     if k in ("eval_loss", "eval_accuracy", "eval_macro_f1")}
            log.info("epoch %.2f step %d: validation %s", state.epoch or 0, state.global_step,
                     shown)

    return LogCallback()


def _compute_metrics(task):
    import numpy as np

    from .tasks.common import classification_metrics

    def compute(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        metrics = classification_metrics(pred.label_ids.tolist(), np.argmax(logits, -1).tolist())
        return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}

    return None if task == "causal-lm" else compute


@contextlib.contextmanager
def _without_kv_cache(model):
    """Training needs no KV cache; a causal LM's classifier would return one from each
    evaluation batch (past_key_values), which the Trainer cannot gather."""
    configs = {id(m.config): m.config for m in model.modules()
               if getattr(getattr(m, "config", None), "use_cache", False)}
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs.values():
            config.use_cache = True


def train(loaded, model, cfg: TrainingConfig, ctx, default_lr: float, masks=None,
          loss=None) -> dict:
    """Train `model` (the loaded model, possibly wrapped) on ctx.dataset; return a report.

    Evaluates on the validation split each epoch and ends with the best epoch's weights.
    `masks` are the zeros of the base model's pruned layers (`zero_masks` taken before any
    adapter was added); with `keep_sparsity` they are re-applied after every step. `loss`
    (model, inputs) -> (loss, outputs) replaces the model's own training loss (distillation,
    elastic training); evaluation keeps the model's own.
    """
    from transformers import set_seed

    from .checkpoints import prepare_step
    from .distributed import world_size

    train_items, eval_items = _training_data(loaded, model, cfg, ctx.dataset, masks)
    workdir = Path(ctx.workdir)
    set_seed(ctx.seed)
    # several processes (accelerate launch) each take batch_size examples a step
    per_step = cfg.batch_size * cfg.grad_accum * world_size()
    steps_per_epoch = math.ceil(len(train_items) / per_step)
    total = cfg.max_steps or math.ceil(steps_per_epoch * cfg.epochs)
    args = _training_arguments(cfg, ctx, workdir, total, default_lr, loaded.task != "causal-lm",
                               "input_ids" in train_items[0])
    # the main process makes (or, resuming, tidies) the folder; the others then read it
    with args.main_process_first(local=False, desc="checkpoint folder"):
        resume_from = prepare_step(workdir, ctx.fingerprint, ctx.resume)
    trainer = _trainer(loaded, model, args, train_items, eval_items, ctx, cfg, masks, loss)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    length = (f"{total} steps ({total / steps_per_epoch:.2f} epochs)" if cfg.max_steps
              else f"{cfg.epochs:g} epochs ({total} steps)")
    log.info("training %s of %s parameters (%.2f%%), %d examples, %s%s", f"{trainable:,}",
             f"{total_params:,}", 100 * trainable / total_params, len(train_items), length,
             f", resuming from {resume_from}" if resume_from else "")
    with _without_kv_cache(model):
        result = trainer.train(resume_from_checkpoint=resume_from)
    ran = trainer.state.global_step - _checkpoint_step(resume_from)
    if not ran:
        log.info("the checkpoint resumed from was at the last step: nothing left to train")
    history = [h for h in trainer.state.log_history if "eval_loss" in h]
    return {
        "trainable_parameters": trainable, "total_parameters": total_params,
        "trainable_percent": 100 * trainable / total_params, "epochs": cfg.epochs,
        "steps": trainer.state.global_step, "train_examples": len(train_items),
        # the Trainer's loss and speed cover the steps this run trained (none: not 0.0)
        "steps_this_run": ran, "train_loss": result.training_loss if ran else None,
        "train_seconds": result.metrics.get("train_runtime"),
        "train_samples_per_second": result.metrics.get("train_samples_per_second")
        if ran else None,
        "best_checkpoint_metric": trainer.state.best_metric,
        "validation_history": [{k: v for k, v in h.items() if k.startswith("eval_") or k == "epoch"}
                               for h in history],
        "lr": cfg.lr or default_lr, "resumed_from": resume_from,
        "device": str(next(model.parameters()).device),
    }


def _checkpoint_step(checkpoint: str | None) -> int:
    """The step a checkpoint was saved at (0: none)."""
    if checkpoint is None:
        return 0
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])


def _training_data(loaded, model, cfg: TrainingConfig, dataset, masks):
    """The train and validation items, after the checks that need no checkpoint folder."""
    if loaded.kind in ("text-encoder", "causal-lm"):
        check_length(loaded.model.config, cfg.max_length, "--max-length", loaded.source.ref,
                     prompt_tokens(model))
    train_items = build_items(loaded, dataset.split("train"), cfg.max_length)
    eval_items = build_items(loaded, dataset.split("validation"), cfg.max_length)
    if len(train_items) == 0:
        raise InputError("The training split is empty; use more data.")
    if len(eval_items) == 0:  # the best epoch is chosen on it
        raise InputError(f"The validation split is empty ({len(train_items)} training examples "
                         "in all): the data is too small to split. Give it more rows (a file "
                         "of 10 or more), or a validation split of its own.")
    labels = dataset.split("train").labels
    if labels is not None and len(set(labels)) < 2:
        raise InputError(f"The training data has a single class ({dataset.label_names[labels[0]]}"
                         "); a classifier needs at least two. Check the label column.")
    if cfg.keep_sparsity and not masks:  # checked before any checkpoint folder is made
        raise InputError("--keep-sparsity: this model has no sparse layers (no Linear layer "
                         "is 1% or more exact zeros); prune it first, or drop the option.")
    return train_items, eval_items


def _training_arguments(cfg: TrainingConfig, ctx, workdir: Path, total: int, default_lr: float,
                        classify: bool, has_ids: bool):
    """HF TrainingArguments: evaluate and checkpoint each epoch (or every save_steps), keep the
    best, length-grouped batches for token inputs, seeded, no logging of our own to stdout."""
    from transformers import TrainingArguments

    from . import progress

    return TrainingArguments(
        output_dir=str(workdir), num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        learning_rate=cfg.lr or default_lr, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        weight_decay=cfg.weight_decay, warmup_steps=int(cfg.warmup * total),
        lr_scheduler_type=cfg.scheduler, eval_strategy="steps" if cfg.save_steps else "epoch",
        eval_steps=cfg.save_steps, save_strategy="steps" if cfg.save_steps else "epoch",
        save_steps=cfg.save_steps or 500,
        save_total_limit=2, load_best_model_at_end=True,
        metric_for_best_model="accuracy" if classify else "loss", greater_is_better=classify,
        train_sampling_strategy="group_by_length" if has_ids else "random",
        seed=ctx.seed, data_seed=ctx.seed, report_to="none", logging_strategy="epoch",
        disable_tqdm=not progress.enabled(), remove_unused_columns=False,
        use_cpu=ctx.device == "cpu", dataloader_num_workers=0, label_names=["labels"],
    )


def _loss_trainer(loss):
    """A Trainer whose training loss is `loss(model, inputs) -> (loss, outputs)`."""
    from transformers import Trainer

    class LossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not model.training:  # evaluation scores the model as it is
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            value, outputs = loss(model, inputs)
            return (value, outputs) if return_outputs else value

    return LossTrainer


def _trainer(loaded, model, args, train_items, eval_items, ctx, cfg: TrainingConfig, masks,
             loss=None):
    """The HF Trainer with mmkit's callbacks: kept zeros, progress on stderr only, our log."""
    from transformers import PrinterCallback, ProgressCallback, Trainer

    from . import progress

    trainer = (Trainer if loss is None else _loss_trainer(loss))(model=raw_checkpoints(model), args=args, train_dataset=train_items,
                      eval_dataset=eval_items, data_collator=Collator(loaded),
                      compute_metrics=_compute_metrics(loaded.task),
                      callbacks=list(ctx.callbacks))
    if cfg.keep_sparsity:
        from .sparsity import keep_sparsity_callback

        trainer.add_callback(keep_sparsity_callback(masks))
        log.info("keeping the zeros of %d sparse layers", len(masks))
    trainer.remove_callback(PrinterCallback)  # it prints to stdout, which carries results only
    trainer.remove_callback(ProgressCallback)  # so does its bar's log lines: ours does not
    if progress.enabled():
        trainer.add_callback(progress.trainer_callback())
    trainer.add_callback(_log_callback())
    return trainer
