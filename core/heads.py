"""Several task heads on one backbone: the layout a merge of fine-tunes for different tasks
writes, and the choice of head when such a model is loaded for a dataset.

Layout of a model folder OUT with extra heads:

    OUT/config.json, OUT/model.safetensors    the backbone and its main head (plain HF)
    OUT/heads.json                            {"main": {...}, "heads": {NAME: {...}}}: each
                                              head's labels, task and the model it came from
    OUT/heads/NAME/config.json                the config with that head's labels
    OUT/heads/NAME/head.safetensors           that head's tensors only
    OUT/heads/NAME/model.safetensors.index.json
                                              maps the backbone's tensors to
                                              ../../model.safetensors and the head's to
                                              head.safetensors
    OUT/heads/NAME/tokenizer files            a copy (small), so the folder is complete

So `from_pretrained(OUT)` is the model with its main head, `from_pretrained(OUT/heads/NAME)`
the same backbone with head NAME, each a plain Hugging Face model, and the backbone is stored
once. mmkit commands given data (`mmkit eval OUT --data X`) load the head whose labels fit X.
"""

from __future__ import annotations

import json
import logging
import re
from copy import copy
from pathlib import Path

from .errors import InputError

log = logging.getLogger("mmkit")
HEADS_FILE = "heads.json"
HEADS_DIR = "heads"
HEAD_WEIGHTS = "head.safetensors"
INDEX = "model.safetensors.index.json"


def head_name(ref: str, manifest: dict, taken) -> str:
    """A folder name for the head of model `ref`: its training data's name (tweets-sentiment),
    else the model folder's name; made unique among `taken`."""
    data = (manifest.get("data") or {}).get("source") or ""
    stem = str(data).removeprefix("bundled:") or Path(str(ref).rstrip("/")).name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(stem).name).strip("-.") or "head"
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}-{i}", i + 1
    return name


def fits(data_labels, head_labels) -> bool:
    """True when a head knows every class of the data."""
    return head_labels is not None and all(lab in head_labels for lab in data_labels)


def write_heads(loaded, folder: Path) -> None:
    """Write `loaded.extra["heads"]` ({name: {"labels", "task", "from", "tensors"}}) beside
    the model that save_pretrained wrote into `folder` (see the module's docstring)."""
    from safetensors.torch import save_file

    heads = loaded.extra.get("heads") or {}
    if not heads:
        return
    body = _weight_files(folder)
    listed = {"main": {"labels": loaded.labels, "task": loaded.task,
                       "from": loaded.extra.get("main_head_from")}, "heads": {}}
    for name, head in heads.items():
        where = folder / HEADS_DIR / name
        where.mkdir(parents=True)
        config = copy(loaded.model.config)
        _set_labels(config, head["labels"])
        config.save_pretrained(where)
        tensors = {k: v.detach().contiguous().cpu() for k, v in head["tensors"].items()}
        save_file(tensors, str(where / HEAD_WEIGHTS), metadata={"format": "pt"})
        weight_map = {k: f"../../{f}" for k, f in body.items() if k not in tensors}
        weight_map.update({k: HEAD_WEIGHTS for k in tensors})
        (where / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                              indent=1))
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(where)
        if loaded.image_processor is not None:
            loaded.image_processor.save_pretrained(where)
        listed["heads"][name] = {"labels": head["labels"], "task": head["task"],
                                 "from": head["from"], "path": f"{HEADS_DIR}/{name}"}
    (folder / HEADS_FILE).write_text(json.dumps(listed, indent=2))


def _weight_files(folder: Path) -> dict[str, str]:
    """tensor name -> the file in `folder` holding it (one file, or a sharded checkpoint)."""
    index = folder / INDEX
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return {k: "model.safetensors" for k in handle.keys()}


def _set_labels(config, labels) -> None:
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {lab: i for i, lab in enumerate(labels)}


def listed_heads(folder) -> dict:
    """The extra heads a model folder holds ({} when it holds none)."""
    path = Path(folder, HEADS_FILE) if folder else None
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        heads = data["heads"]
        assert isinstance(heads, dict) and all(isinstance(h["labels"], list)
                                               for h in heads.values())
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
        raise InputError(f"{path} cannot be read ({type(exc).__name__}); the model's extra "
                         "heads are unusable. Re-create the model (or delete heads.json and "
                         "heads/ to keep only its main head).") from None
    return heads


def pick_head(source, config_labels, labels):
    """The source to load for data with `labels`: the model itself when its main head fits
    (or it has no extra heads), else its extra head whose labels fit, as a source of its own
    (the head's folder, read through its index). None of them fitting leaves the model, so
    the usual error names the main head's labels."""
    if labels is None or source.kind not in ("artifact", "folder") or source.adapter is not None:
        return source
    heads = listed_heads(source.path)
    if not heads or fits(labels, config_labels):
        return source
    for name, head in heads.items():
        if fits(labels, head["labels"]):
            folder = Path(source.path, HEADS_DIR, name)
            if not (folder / INDEX).is_file():
                raise InputError(f"'{source.ref}' lists the head {name} in {HEADS_FILE} but "
                                 f"{folder} is incomplete; re-create the model.")
            log.info("'%s': the data fits its head %s (labels %s)", source.ref, name,
                     ", ".join(head["labels"][:5]))
            from .loading import check_weights

            check_weights(source, allow_pickle=False)  # the backbone's files, by their hashes
            picked = copy(source)
            picked.ref, picked.kind, picked.path, picked.manifest = str(folder), "folder", \
                str(folder), {}
            return picked
    return source


def set_head(loaded, tensors: dict, labels: list[str]) -> None:
    """Make the model's task head these tensors ({state-dict name: tensor}; a Linear layer is
    rebuilt when its number of classes changes) and its labels these."""
    import torch

    model = loaded.model
    for name, tensor in tensors.items():
        path, attr = name.rsplit(".", 1)
        module = model.get_submodule(path)
        if tuple(getattr(module, attr).shape) != tuple(tensor.shape):
            if not isinstance(module, torch.nn.Linear) or attr not in ("weight", "bias"):
                raise InputError(f"the task head {path} cannot be resized to {tuple(tensor.shape)}"
                                 "; merge models whose heads have the base's labels.")
            parent, _, child = path.rpartition(".")
            new = torch.nn.Linear(tensors[f"{path}.weight"].shape[1],
                                  tensors[f"{path}.weight"].shape[0],
                                  bias=module.bias is not None, dtype=module.weight.dtype,
                                  device=module.weight.device)
            setattr(model.get_submodule(parent) if parent else model, child, new)
            module = new
        with torch.no_grad():
            getattr(module, attr).copy_(tensor.to(getattr(module, attr).dtype))
    config = model.config
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {lab: i for i, lab in enumerate(labels)}
    loaded.labels, loaded.fresh_head = labels, False
