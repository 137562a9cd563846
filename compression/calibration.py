"""Calibration, shared by quantize, prune and search: batches from a dataset, passes of them
through the model with hooks on chosen modules, and a block-by-block pass.

The block-by-block pass (GPTQ, Wanda) captures the inputs of each stack of transformer blocks
once (a hook on the first block stops the forward there); then each block runs on its inputs,
the caller measures and changes the block, and the block runs again to give the next block its
inputs, now carrying the error of everything changed before it.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from ..core import progress
from ..core.layers import is_linear

log = logging.getLogger("mmkit")


class _Stop(Exception):
    """Raised by the capture hook: the rest of the forward is not needed."""


# ---------------------------------------------------------------- batches
def calibration_batches(loaded, dataset, samples: int, length: int, batch_size: int = 8):
    """Up to `samples` model inputs from the dataset's train split, in batches."""
    from ..core.tasks.batches import Collator, build_items
    from ..core.tasks.causal_lm import max_positions

    config = getattr(loaded.model.config, "text_config", loaded.model.config)
    items = build_items(loaded, dataset.split("train"), min(length, max_positions(config)))
    items = [items[i] for i in range(min(samples, len(items)))]
    collate = Collator(loaded)
    text = {}
    if loaded.task == "zero-shot-image-classification":  # CLIP's text tower reads the prompts
        from ..core.tasks.zero_shot import DEFAULT_TEMPLATE, prompts

        text = dict(loaded.tokenizer(prompts(dataset.label_names, DEFAULT_TEMPLATE),
                                     padding=True, return_tensors="pt"))
    batches = []
    for start in range(0, len(items), batch_size):
        batch = collate(items[start:start + batch_size])
        batch.pop("labels", None)
        batches.append({**batch, **text})
    return batches


def load_calibration(loaded, cfg, ctx) -> list:
    """The calibration batches a method's config names (`calib`, `calib_samples`,
    `calib_length`), drawn with the run's seed."""
    from ..core.data import load_data

    data = load_data(cfg.calib, loaded.task, seed=ctx.seed, max_samples=cfg.calib_samples)
    return calibration_batches(loaded, data, cfg.calib_samples, cfg.calib_length)


def _forward(model, batch, device):
    kwargs = {k: v.to(device) for k, v in batch.items()}
    if getattr(model.config, "use_cache", None) is not None:
        kwargs["use_cache"] = False  # a cache would grow each time a block is re-run
    return model(**kwargs)


def run_batches(model, batches) -> None:
    """Forward every calibration batch (no gradients)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in progress.bar(batches, desc="calibration", unit="batch"):
            _forward(model, batch, device)


# ---------------------------------------------------------------- hooked passes
@contextmanager
def hooked(modules: dict, hook_fn):
    """While inside: `hook_fn(key, module, x, output)` after each of `modules` ({key: module})
    runs, x being its first input (the hidden states). The hooks are always removed."""
    def hook_for(key):
        def hook(mod, args, kwargs, out):
            hook_fn(key, mod, args[0] if args else kwargs["hidden_states"], out)
        return hook

    handles = [m.register_forward_hook(hook_for(k), with_kwargs=True) for k, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def hooked_pass(model, modules: dict, hook_fn, batches) -> None:
    """Forward every calibration batch through the model with `hook_fn` on `modules` (see
    `hooked`): how calibration measures layers."""
    with hooked(modules, hook_fn):
        run_batches(model, batches)


def fold_inputs(state: dict, fold):
    """A hook_fn that folds each module's inputs (rows x features, float) into `state`:
    state[key] = fold(state.get(key), x)."""
    def hook_fn(key, module, x, out):
        x = x.detach().reshape(-1, x.shape[-1]).float()
        state[key] = fold(state.get(key), x)
    return hook_fn


def collect_inputs(model, names, batches, fold) -> dict:
    """For each named layer, fold its inputs (as rows x features, float) over the calibration
    batches: state = fold(state or None, x)."""
    state = {}
    hooked_pass(model, {n: model.get_submodule(n) for n in names}, fold_inputs(state, fold),
                batches)
    return state


# ---------------------------------------------------------------- block by block
def block_stacks(model) -> list:
    """Every ModuleList of transformer blocks (CLIP has two: one per tower)."""
    stacks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and any(
                is_linear(m) for m in module[0].modules()):
            stacks.append((name, module))
    return stacks


def capture_inputs(model, blocks, batches, device) -> list:
    """(args, kwargs) of the first block for each calibration batch."""
    captured = []

    def grab(mod, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in progress.bar(batches, desc="calibration inputs", unit="batch"):
                try:
                    _forward(model, batch, device)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


def run_blocks(blocks, inputs, change_block, desc: str = "blocks") -> None:
    """For each block: `change_block(block, run)` where run() feeds it every calibration
    input; then the (changed) block's outputs become the next block's inputs."""
    def run(block):
        outs = []
        with torch.no_grad():
            for args, kwargs in inputs:
                out = block(*args, **kwargs)
                outs.append(out[0] if isinstance(out, tuple) else out)
        return outs

    for i, block in enumerate(progress.bar(blocks, desc=desc, unit="block")):
        change_block(block, lambda b=block: run(b))
        outs = run(block)
        inputs = [((out, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": out})
                  for out, (args, kwargs) in zip(outs, inputs)]
        log.debug("%s: block %d of %d done", desc, i + 1, len(blocks))


def every_block(model, batches, change_block, desc: str) -> None:
    """`run_blocks` over every stack of blocks in the model, each on its captured inputs;
    `desc` (the progress bar's) may name the stack as {stack}."""
    device = next(model.parameters()).device
    for name, blocks in block_stacks(model):
        run_blocks(blocks, capture_inputs(model, blocks, batches, device), change_block,
                   desc=desc.format(stack=name))
