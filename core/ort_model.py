"""An ONNX Runtime session behind the interface mmkit's scoring and timing call: a module
whose forward takes the task's batch (torch tensors) and returns an output with `.logits`.

With it, `evaluate` and `profile_pair` measure an exported model exactly as they measure a
PyTorch one (same batches, same metrics, interleaved with a reference), which is what a
search whose target runtime is ONNX Runtime needs: accuracy and latency of the graph that
will be served, not of the PyTorch model it came from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .ort_runtime import MODEL_FILE, read_export, session


class OrtModel(torch.nn.Module):
    """An exported folder's graph, called like a transformers model (CPU only)."""

    def __init__(self, folder, config, threads: int | None = None):
        super().__init__()
        self.folder = Path(folder)
        self.config = config
        self.info = read_export(folder)
        # threads sleep when idle: it is timed interleaved with other sessions or with torch
        self.session = session(self.folder / MODEL_FILE, threads, spin=False)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.input_types = {i.name: i.type for i in self.session.get_inputs()}
        # evaluate / profile read a parameter's device and dtype: one empty float32 tensor
        self.register_parameter("anchor", torch.nn.Parameter(torch.empty(0),
                                                             requires_grad=False))

    def forward(self, **batch):
        from transformers.modeling_outputs import ModelOutput

        feeds = {}
        for name in self.inputs:
            value = batch.get(name)
            if value is None:
                value = filler(name, self.session, batch["input_ids"])
            array = value.detach().cpu().numpy()
            feeds[name] = array.astype("int64") if "int64" in self.input_types[name] else \
                array.astype("float32")
        # a causal LM's presents are the next call's cache, which a whole-sequence call drops
        names = [o["name"] for o in self.info["outputs"] if not o["name"].startswith("present")]
        values = self.session.run(names, feeds)
        return ModelOutput(**{n: torch.from_numpy(v) for n, v in zip(names, values)})


def filler(name: str, sess, input_ids):
    """The value of a graph input a whole-sequence batch does not hold: one segment, positions
    from 0, an empty KV cache."""
    batch, length = input_ids.shape
    if name == "token_type_ids":
        return torch.zeros_like(input_ids)
    if name == "position_ids":
        return torch.arange(length).expand(batch, length)
    if name.startswith("past_key_values"):
        shape = next(i.shape for i in sess.get_inputs() if i.name == name)
        return torch.zeros(batch, int(shape[1]), 0, int(shape[3]))
    raise ValueError(f"the ONNX graph needs '{name}', which the batch lacks")


def as_onnx(loaded, folder, threads: int | None = None):
    """A copy of the LoadedModel `loaded` whose model is the exported graph in `folder`."""
    return dataclasses.replace(loaded, model=OrtModel(folder, loaded.model.config, threads))
