"""Facts about a model's layers that every package shares: which modules are Linear layers,
their weight as (out, in), which modules are task heads, and how many bytes the weights take.

Nothing here imports torch or transformers at module level: the CLI's `--help` stays fast.
"""

from __future__ import annotations

# The task heads of the model families mmkit loads: a classification head (BERT / ViT
# `classifier`, Llama / GPT-2 sequence classification `score`), a causal LM's vocabulary
# projection, and CLIP's two projections into the shared image-text space. Compression leaves
# them in floating point: they are small and the outputs are most sensitive to them.
TASK_HEADS = ("classifier", "score", "lm_head", "visual_projection", "text_projection")


def output_heads() -> tuple[str, ...]:
    """The task heads that produce the model's outputs (class or vocabulary logits).

    CLIP's projections are left out: they map each tower into the shared space and are adapted
    like any other layer (SVFit factors them), and a QLoRA base quantizes them.
    """
    return tuple(h for h in TASK_HEADS if not h.endswith("_projection"))


def new_heads() -> tuple[str, ...]:
    """The heads a classification task puts on a backbone (`classifier`, `score`).

    They start from random weights, so an adapter trains them in full beside itself and saves
    them with it; a causal LM's head is pretrained (and often tied to the embeddings).
    """
    return tuple(h for h in output_heads() if h != "lm_head")


def is_task_head(name: str, heads: tuple[str, ...] = TASK_HEADS) -> bool:
    """True when a module name is (or sits under) one of `heads`: a top-level head such as
    `classifier.dense`, or a layer named like one (`vision_model.head.classifier`)."""
    parts = name.split(".")
    return parts[0] in heads or parts[-1] in heads


def is_linear(module) -> bool:
    """A torch Linear, or transformers' Conv1D (GPT-2's Linear, weight stored as (in, out))."""
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def weight_view(module):
    """A Linear's or Conv1D's weight as (out, in): a view sharing the layer's storage, so
    in-place writes reach the layer."""
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


def weight_bytes(model) -> int:
    """Bytes the model's parameters and buffers take in memory; tensors that share memory
    (tied embeddings and LM head) count once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def own_memory_(model) -> None:
    """Copy a model's CPU weights out of the memory-mapped file they were loaded from
    (transformers maps safetensors files) into the process's own memory; once per model.

    A mapped model's speed depends on how the page cache holds its file: two identical BERTs
    timed interleaved here differed by 13% (one file's pages huge, the other's not), and a
    search's candidates, built in memory, were timed against a mapped reference. Every model
    mmkit times goes through this first, so all of them sit in the same kind of memory."""
    import torch

    if getattr(model, "_mmkit_own_memory", False):
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()  # the same Parameter: ties are kept
    model._mmkit_own_memory = True
