"""A causal LM's ONNX graph with a KV cache, and the check that its decoding is PyTorch's.

The graph follows the layout optimum and ONNX Runtime GenAI use:

    inputs   input_ids (batch, sequence), attention_mask (batch, total),
             position_ids (batch, sequence) where the model takes them,
             past_key_values.{i}.key / .value (batch, kv_heads, past_sequence, head_dim)
    outputs  logits (batch, sequence, vocab), present.{i}.key / .value

`total` is past_sequence + sequence. One graph serves both phases: the prefill feeds a past of
length 0 (so the graph also scores whole sequences, as the cache-less export did), each decode
step feeds one token and the previous step's presents. Inside, the tensors become a
transformers `DynamicCache`, so whatever attention the model's own code runs is what is
exported.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.ort_decoding import PAST, PRESENT, ort_greedy_decode
from .onnx_check import within

TRACE_PAST = 3  # past length of the traced call: above 1, so torch.export keeps it symbolic


def cache_layout(model) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) of each layer's cache, read off one short forward (so every
    family's own cache shapes, grouped-query attention included, are taken as they are)."""
    from transformers.cache_utils import DynamicCache

    ids = torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    cache = out.past_key_values
    if not isinstance(cache, DynamicCache):
        raise TypeError(f"{type(model).__name__} returns a {type(cache).__name__}, not a "
                        "DynamicCache")
    return [(layer.keys.shape[1], layer.keys.shape[3]) for layer in cache.layers]


def past_names(layers: int) -> list[str]:
    """The graph's past inputs, key then value of each layer."""
    return [f"{PAST}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def present_names(layers: int) -> list[str]:
    """The graph's present outputs, in the order of `past_names`."""
    return [f"{PRESENT}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def takes_positions(model) -> bool:
    """Whether the model's forward takes position_ids."""
    import inspect

    return "position_ids" in inspect.signature(model.forward).parameters


class KVGraph(torch.nn.Module):
    """The model with positional tensors in (`names`, then the pasts) and a tuple out (logits,
    then the presents)."""

    def __init__(self, model, names: list[str], layers: int):
        super().__init__()
        self.model, self.names, self.layers = model, list(names), layers
        self.outputs = ["logits"] + present_names(layers)

    def forward(self, *tensors):
        from transformers.cache_utils import DynamicCache

        n = len(self.names)
        past = tensors[n:]
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.layers)],
                             config=self.model.config)
        out = self.model(**dict(zip(self.names, tensors[:n])), past_key_values=cache,
                         use_cache=True)
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def empty_past(layout, batch: int, length: int = 0, generator=None) -> dict:
    """Past tensors of `length` positions (zeros; random with a generator), by input name."""
    tensors = {}
    for name, (heads, dim) in zip(past_names(len(layout)),
                                  [shape for shape in layout for _ in (0, 1)]):
        shape = (batch, heads, length, dim)
        tensors[name] = torch.randn(*shape, generator=generator) if generator is not None \
            else torch.zeros(*shape)
    return tensors


def positions(batch: int, start: int, length: int) -> torch.Tensor:
    """position_ids start .. start+length-1 for every row (what the model computes itself
    when it is not given them)."""
    return torch.arange(start, start + length).expand(batch, length).contiguous()


def trace_batch(text: dict, layout, with_positions: bool) -> dict:
    """The traced call: the text batch after TRACE_PAST random cached positions."""
    ids = text["input_ids"]
    batch, length = ids.shape
    made = {"input_ids": ids,
            "attention_mask": torch.cat([torch.ones(batch, TRACE_PAST, dtype=torch.long),
                                         text["attention_mask"]], dim=1)}
    if with_positions:
        made["position_ids"] = positions(batch, TRACE_PAST, length)
    made.update(empty_past(layout, batch, TRACE_PAST, torch.Generator().manual_seed(0)))
    return made


def prefill_batch(text: dict, layout, with_positions: bool) -> dict:
    """A whole-sequence call: the text batch with an empty past."""
    batch, length = text["input_ids"].shape
    made = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}
    if with_positions:
        made["position_ids"] = positions(batch, 0, length)
    made.update(empty_past(layout, batch))
    return made


def axes(names: list[str]) -> dict:
    """torch.export dimensions of each input."""
    from torch.export import Dim

    batch, sequence = Dim("batch"), Dim("sequence")
    total, past = Dim("total"), Dim("past_sequence")
    out = {}
    for name in names:
        if name.startswith(PAST):
            out[name] = {0: batch, 2: past}
        elif name == "attention_mask":
            out[name] = {0: batch, 1: total}
        else:
            out[name] = {0: batch, 1: sequence}
    return out


# ---------------------------------------------------------------- checking the cache
def torch_decode_steps(model, input_ids: torch.Tensor, new_tokens: int):
    """PyTorch's greedy decoding on its own cache: (tokens, last-position logits of every
    forward), the reference `check_decoding` compares the graph with."""
    mask = torch.ones_like(input_ids)
    tokens, steps = [], []
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, use_cache=True)
        steps.append(out.logits[:, -1].numpy())
        for _ in range(new_tokens):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = model(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values,
                        use_cache=True)
            steps.append(out.logits[:, -1].numpy())
    return torch.cat(tokens, dim=1), steps


def check_decoding(sess, model, prompt: torch.Tensor, new_tokens: int, atol: float,
                   rtol: float) -> dict:
    """Decode `new_tokens` greedily in PyTorch and in the graph (fed PyTorch's tokens) and
    compare the logits of every forward: the cache the graph returns must be the one it
    takes back."""
    tokens, want = torch_decode_steps(model, prompt, new_tokens)
    got = ort_greedy_decode(sess, prompt.numpy(), new_tokens, forced=tokens.numpy())[3]
    diffs = [np.abs(g - w) for g, w in zip(got, want)]
    return {"prompt_tokens": int(prompt.shape[1]), "new_tokens": new_tokens,
            "batch": int(prompt.shape[0]),
            "max_abs_diff": float(max(d.max() for d in diffs)),
            "argmax_agreement": float(np.mean([(g.argmax(-1) == w.argmax(-1)).mean()
                                               for g, w in zip(got, want)])),
            "within_tolerance": all(within(d, w, atol, rtol) for d, w in zip(diffs, want))}
