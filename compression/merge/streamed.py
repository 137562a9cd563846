"""A merge that streams: the base's tensors are read from its files one at a time, merged
with the inputs' and written straight into the output files, so only a few tensors are in
memory at once (peak resident memory ~ the Python process plus the largest tensor times the
number of models), not the base model.

It applies when the merge is the recipe's only step and nothing evaluates the result: the
recipe then loads the base lazily (its structure on the meta device, `load_model(lazy=True)`).
The output files have the base files' exact layout (names, dtypes, shapes, offsets): the
header is copied, each merged tensor is written in its place in the base's dtype, and every
other tensor (integer buffers, tensors a merge leaves alone) is copied byte for byte. A base
Linear weight with pruned zeros keeps them. The files are moved into the artifact when it is
written (`core.loading` saves a model whose `weights_files` are ready that way).
"""

from __future__ import annotations

import logging
import shutil
import weakref
from contextlib import ExitStack
from pathlib import Path

from ...core.layers import is_linear
from ...core.outputs import scratch_folder
from ...core.sparsity import MIN_ZERO_FRACTION
from .inputs import _NeedsLoading, name_map
from .reading import TensorFile

log = logging.getLogger("mmkit")
INDEX = "model.safetensors.index.json"


def tied_sources(model) -> dict[str, str]:
    """{name of a tied duplicate: the name it shares its tensor with}, by the parameters'
    identity (a model on the meta device has no memory addresses to compare)."""
    first, out = {}, {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            out[name] = first[id(param)]
        else:
            first[id(param)] = name
    return out


class BaseFiles:
    """The base model's safetensors files, keyed by the model's tensor names."""

    def __init__(self, folder: str, model, stack: ExitStack):
        self.files = [stack.enter_context(TensorFile(p))
                      for p in sorted(Path(folder).glob("*.safetensors"))]
        keys = {key: handle for handle in self.files for key in handle.keys()}
        self.where = {name: (keys[key], key)
                      for name, key in name_map(model, list(keys)).items()}
        self.name_of = {(id(handle), key): name for name, (handle, key) in self.where.items()}
        self.folder = Path(folder)

    def tensor(self, name: str, rows: slice | None = None):
        """The base's tensor `name` (or the block `rows` of its first dimension), read now
        (writable, in the file's dtype)."""
        handle, key = self.where[name]
        return handle.get(key, rows)


def open_base(loaded, stack: ExitStack) -> BaseFiles | None:
    """The base's files, or None when transformers must read them itself (fused tensors)."""
    try:
        return BaseFiles(loaded.source.path, loaded.model, stack)
    except _NeedsLoading:
        return None


def stream(loaded, base: BaseFiles, names: list[str], merge, cuts, parts, out=None) -> dict:
    """Write the merged model's files into a scratch folder and mark them on `loaded` for the
    artifact writer. Each tensor goes in the row blocks `parts(shape)` gives:
    `merge(name, i, rows, base_block, cuts)` merges one block in place, `cuts(name, shape,
    base.tensor)` gives the tensor's TIES thresholds when they span its blocks. The files are
    written beside the artifact `out` (`core.outputs.scratch_folder`). Returns the report's
    account."""
    merged = set(names)
    tied = {d: s for d, s in tied_sources(loaded.model).items() if s in merged}
    modules = dict(loaded.model.named_modules())
    scratch = scratch_folder(out)
    weakref.finalize(loaded, shutil.rmtree, scratch, True)  # also on errors and at exit
    written, pruned = [], 0
    for handle in base.files:
        out_path = scratch / handle.path.name
        with open(out_path, "wb") as out:
            out.write(handle.header())
            for key in sorted(handle.keys(), key=lambda k: handle.span(k)[0]):
                name = base.name_of.get((id(handle), key))
                source = name if name in merged else tied.get(name)
                out.seek(handle.span(key)[0])
                if source is None:  # left as the base has it
                    handle.copy_bytes(*handle.span(key), out)
                    continue
                shape = handle.shape(key)
                thresholds = cuts(source, shape, base.tensor)
                masked = False
                for i, rows in enumerate(parts(shape)):
                    block = base.tensor(source, rows)
                    keep = _pruned_mask(modules, source, block)
                    merge(source, i, rows, block, thresholds)
                    if keep is not None:
                        block.mul_(keep)
                        masked = True
                    _write(out, handle, key, block, rows)
                pruned += masked
        written.append(str(out_path))
    if (base.folder / INDEX).is_file():
        shutil.copy(base.folder / INDEX, scratch / INDEX)
        written.append(str(scratch / INDEX))
    loaded.extra["weights_files"] = written
    loaded.extra.pop("lazy", None)
    return {"streamed": True, **({"pruned_layers_kept": pruned} if pruned else {})}


def _pruned_mask(modules, name: str, tensor):
    """The keep-mask of (a block of) a Linear weight whose base holds pruned zeros (as
    core.sparsity finds them, here block by block), else None."""
    module = modules.get(name.rsplit(".", 1)[0])
    if not name.endswith(".weight") or module is None or not is_linear(module):
        return None
    keep = tensor != 0
    return keep if 1 - float(keep.float().mean()) >= MIN_ZERO_FRACTION else None


def _write(out, handle, key: str, block, rows) -> None:
    """Write a merged block where the base's file holds it."""
    import torch

    begin, end = handle.span(key)
    shape = handle.shape(key)
    if rows is not None:
        row_bytes = (end - begin) // shape[0]
        first, last, _ = rows.indices(shape[0])
        begin, end = begin + first * row_bytes, begin + last * row_bytes
    data = block.contiguous().view(torch.uint8).reshape(-1).numpy()
    if data.nbytes != end - begin:
        raise RuntimeError(f"the merged {key} has {data.nbytes} bytes, the base's {end - begin}")
    out.seek(begin)
    out.write(memoryview(data))
