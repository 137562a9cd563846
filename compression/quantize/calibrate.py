"""Calibration for GPTQ: batches from a dataset, and a block-by-block pass through the model.

The inputs of each stack of transformer blocks are captured once (a hook on the first block
stops the forward there); then each block runs on its inputs, its Linear layers' Hessians are
collected, the layers are quantized, and the block runs again to give the next block its
inputs, now carrying the quantization error of everything before it.
"""

from __future__ import annotations

import logging

import torch

from ...core import progress

log = logging.getLogger("mmkit")


class _Stop(Exception):
    """Raised by the capture hook: the rest of the forward is not needed."""


def calibration_batches(loaded, dataset, samples: int, length: int, batch_size: int = 8):
    """Up to `samples` model inputs from the dataset's train split, in batches."""
    from ...core.tasks.causal_lm import max_positions
    from ...core.train import Collator, build_items

    config = getattr(loaded.model.config, "text_config", loaded.model.config)
    items = build_items(loaded, dataset.split("train"), min(length, max_positions(config)))
    items = [items[i] for i in range(min(samples, len(items)))]
    collate = Collator(loaded)
    text = {}
    if loaded.task == "zero-shot-image-classification":  # CLIP's text tower reads the prompts
        from ...core.tasks.zero_shot import DEFAULT_TEMPLATE, prompts

        text = dict(loaded.tokenizer(prompts(dataset.label_names, DEFAULT_TEMPLATE),
                                     padding=True, return_tensors="pt"))
    batches = []
    for start in range(0, len(items), batch_size):
        batch = collate(items[start:start + batch_size])
        batch.pop("labels", None)
        batches.append({**batch, **text})
    return batches


def _forward(model, batch, device):
    kwargs = {k: v.to(device) for k, v in batch.items()}
    if getattr(model.config, "use_cache", None) is not None:
        kwargs["use_cache"] = False  # a cache would grow each time a block is re-run
    return model(**kwargs)


def block_stacks(model) -> list:
    """Every ModuleList of transformer blocks (CLIP has two: one per tower)."""
    stacks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and any(
                isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"
                for m in module[0].modules()):
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


def run_blocks(blocks, inputs, quantize_block, desc: str = "blocks") -> None:
    """For each block: `quantize_block(block, run)` where run() feeds it every calibration
    input; then the (quantized) block's outputs become the next block's inputs."""
    def run(block):
        outs = []
        with torch.no_grad():
            for args, kwargs in inputs:
                out = block(*args, **kwargs)
                outs.append(out[0] if isinstance(out, tuple) else out)
        return outs

    for i, block in enumerate(progress.bar(blocks, desc=desc, unit="block")):
        quantize_block(block, lambda b=block: run(b))
        outs = run(block)
        inputs = [((out, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": out})
                  for out, (args, kwargs) in zip(outs, inputs)]
        log.debug("gptq: block %d of %d done", i + 1, len(blocks))


def run_batches(model, batches, hooks=()) -> None:
    """Forward every calibration batch (no gradients), then remove `hooks`."""
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in progress.bar(batches, desc="calibration", unit="batch"):
                _forward(model, batch, device)
    finally:
        for h in hooks:
            h.remove()


def collect_inputs(model, names, batches, fold) -> dict:
    """For each named layer, fold its inputs (as rows x features, float) over the calibration
    batches: state = fold(state or None, x)."""
    state = {}
    modules = dict(model.named_modules())

    def hook_for(name):
        def hook(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            state[name] = fold(state.get(name), x)
        return hook

    run_batches(model, batches, [modules[n].register_forward_pre_hook(hook_for(n)) for n in names])
    return state
