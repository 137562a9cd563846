"""Elastic fine-tuning (`mmkit finetune --elastic nested|sampled`) and distillation
(`mmkit finetune --distill`).

Elastic training fine-tunes every weight of the full network while training its
sub-networks at the same time, so that any of them can later be cut out (`mmkit extract`) or
searched (`mmkit search`) without more training:

1. Neurons, heads and layers are scored on a few training batches and each layer's units are
   reordered, most important first (`order.py`; the full network is unchanged).
2. Each training step runs the full network on the batch (its loss: the labels', or the
   teacher's with --teacher), then sub-networks on the same batch, each learning from the full
   network's logits and the labels (in-place distillation). nested (MatFormer) adds `samples`
   random width choices; sampled (InstaTune's sandwich rule) adds the smallest sub-network and
   `samples` random ones, depth included. A sub-network's pass costs what the sub-network
   costs (`widths.py` slices, it does not mask): with the defaults a step costs about 1.5x
   (nested) or 2x (sampled) a dense step, where MatFormer sums all its granularities (~4x).
3. The artifact is the full network, a plain Hugging Face model, with `mmkit_elastic.json`
   (`core.elastic_space`).
"""

from __future__ import annotations

import itertools
import logging
import random

from ...core.distill import distillation_loss, load_teacher, logits_of
from ...core.elastic_space import ElasticSpace, StackSpace
from ...core.errors import InputError
from ...core.train import clip_classifier, train
from ..calibration import calibration_batches
from .order import order_by_importance_
from .widths import Cut, active, install_, model_stacks, uninstall_

log = logging.getLogger("mmkit")


# ---------------------------------------------------------------- the space
def depths(cfg, n_layers: int) -> list[int]:
    """The depths trained: the config's, or the default of its mode; checked against the
    model's layer count."""
    if cfg.depth is None:
        return [n_layers] if cfg.mode == "nested" else list(range(max(1, n_layers - 2),
                                                                  n_layers + 1))
    if max(cfg.depth) != n_layers or min(cfg.depth) < 1:
        raise InputError(f"--depth {','.join(map(str, cfg.depth))}: the depths must lie in 1.."
                         f"{n_layers} and include {n_layers} (this model's full depth).")
    return list(cfg.depth)


class Sampler:
    """Which sub-networks each step trains besides the full one: `draw()` returns the list,
    the full network first (the sandwich rule's largest), then for `sampled` the smallest,
    then `samples` others drawn at random (never the full network)."""

    def __init__(self, mode: str, ffn, heads, depth, samples: int, seed: int):
        self.mode, self.samples = mode, samples
        self.rng = random.Random(seed)
        self.largest = Cut(max(ffn), max(heads), max(depth))
        self.smallest = Cut(min(ffn), min(heads), min(depth))
        self.others = [Cut(f, h, d) for f, h, d in itertools.product(ffn, heads, depth)
                       if Cut(f, h, d) != self.largest
                       and (mode == "nested" or Cut(f, h, d) != self.smallest)]

    def draw(self) -> list[Cut]:
        """The sub-networks of one step, the full network first."""
        cuts = [self.largest]
        if self.mode == "sampled" and self.smallest != self.largest:
            cuts.append(self.smallest)
        if self.others:
            cuts += [self.rng.choice(self.others) for _ in range(self.samples)]
        return cuts


# ---------------------------------------------------------------- the loss of one step
def _causal(loaded) -> bool:
    return loaded.task == "causal-lm"


def sandwich_loss(loaded, stacks_, drop_orders, sampler: Sampler, cfg, teacher=None):
    """The training loss of one elastic step (see the module's docstring)."""
    import torch

    causal = _causal(loaded)

    def loss(model, inputs):
        labels = inputs.get("labels")
        cuts = sampler.draw()
        out = model(**inputs)
        if teacher is not None:
            with torch.no_grad():
                soft = logits_of(teacher(**inputs))
            total = distillation_loss(logits_of(out), soft, labels, causal=causal,
                                      alpha=cfg.distill_weight, temperature=cfg.temperature)
        else:
            soft, total = logits_of(out).detach(), out["loss"]
        for cut in cuts[1:]:
            with active(stacks_, cut, drop_orders):
                sub = model(**inputs)
            total = total + distillation_loss(logits_of(sub), soft, labels, causal=causal,
                                              alpha=cfg.distill_weight,
                                              temperature=cfg.temperature)
        return total, out

    return loss


def teacher_loss(loaded, teacher, cfg):
    """The training loss of distillation from `teacher` (a module taking the same inputs)."""
    import torch

    causal = _causal(loaded)

    def loss(model, inputs):
        out = model(**inputs)
        with torch.no_grad():
            soft = logits_of(teacher(**inputs))
        return distillation_loss(logits_of(out), soft, inputs.get("labels"), causal=causal,
                                 alpha=cfg.distill_weight, temperature=cfg.temperature), out

    return loss


def _trained(loaded, model, ctx):
    """What the Trainer trains: CLIP as a classifier of the data's labels, else the model."""
    if loaded.task == "zero-shot-image-classification":
        return clip_classifier(model, loaded.tokenizer, ctx.dataset.label_names)
    return model


# ---------------------------------------------------------------- the methods
def elastic_finetune(loaded, cfg, ctx):
    """Fine-tune a super-network (see the module docstring); the artifact is the full model
    with its space."""
    if cfg.keep_sparsity:
        raise InputError("--keep-sparsity does not apply to elastic training: its sub-networks "
                         "slice whole neurons and heads. Prune unstructured after extracting "
                         "(`mmkit prune SUB --method magnitude`).")
    stacks_ = model_stacks(loaded)
    trained_depths = depths(cfg, min(len(s.blocks) for s in stacks_))
    teacher = _teacher_module(loaded, cfg, ctx) if cfg.teacher else None
    for p in loaded.model.parameters():
        p.requires_grad_(True)
    batches = calibration_batches(loaded, ctx.dataset, cfg.importance_samples, cfg.max_length)
    loaded.model.eval()
    drop_orders = order_by_importance_(loaded.model, stacks_, batches)
    sampler = Sampler(cfg.mode, cfg.ffn, cfg.heads, trained_depths, cfg.samples, ctx.seed)
    log.info("elastic (%s): %d sub-networks in the space; each step trains %d of them",
             cfg.mode, len(sampler.others) + 1 + (cfg.mode == "sampled"), len(sampler.draw()))
    install_(stacks_)
    try:
        model = _trained(loaded, loaded.model, ctx)
        ctx.report.update(train(loaded, model, cfg, ctx, 5e-5, None,
                                sandwich_loss(loaded, stacks_, drop_orders, sampler, cfg,
                                              teacher)))
    finally:
        uninstall_(stacks_)
    loaded.model.eval()
    space = ElasticSpace(mode=cfg.mode, family=loaded.family,
                         space={"ffn": cfg.ffn, "heads": cfg.heads, "depth": trained_depths},
                         stacks={s.name: StackSpace(layers=len(s.blocks), ffn=s.ffn,
                                                    kv_heads=s.kv_heads,
                                                    drop_order=drop_orders[s.name])
                                 for s in stacks_})
    loaded.extra["elastic"] = space
    ctx.report["elastic"] = {"mode": cfg.mode, "space": space.space,
                             "passes_per_step": len(sampler.draw()),
                             "teacher": cfg.teacher or "the full network (in-place)",
                             "drop_order": drop_orders}
    return loaded


def _teacher_module(loaded, cfg, ctx):
    """The teacher's forward (its CLIP wrapped like the student's)."""
    teacher = load_teacher(cfg.teacher, ctx, loaded)
    return _trained(teacher, teacher.model, ctx)


def distill_finetune(loaded, cfg, ctx):
    """Fine-tune every weight on the labels and a teacher's logits: by default the run's
    input model (recovery after cuts), else --teacher."""
    from ...core.sparsity import zero_masks

    teacher = _teacher_module(loaded, cfg, ctx)
    for p in loaded.model.parameters():
        p.requires_grad_(True)
    masks = zero_masks(loaded.model) if cfg.keep_sparsity else None
    model = _trained(loaded, loaded.model, ctx)
    ctx.report.update(train(loaded, model, cfg, ctx, 5e-5, masks,
                            teacher_loss(loaded, teacher, cfg)))
    loaded.model.eval()
    ctx.report["teacher"] = cfg.teacher or "the run's input model"
    return loaded
