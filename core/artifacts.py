"""Artifacts: one folder per produced model, written whole or not at all.

Layout: the Hugging Face files (config.json, *.safetensors, tokenizer / processor files),
`recipe.yaml` (the resolved recipe, re-runnable with `mmkit run`) and `mmkit.json` (the
manifest: schema and mmkit versions, parent and its weights' hash, steps, metrics, data
splits and file hashes).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from pathlib import Path

from .outputs import check_output, output_lock, output_path, staging
from .refs import MANIFEST

SCHEMA_VERSION = 1
RECIPE_FILE = "recipe.yaml"
log = logging.getLogger("mmkit")


def file_hashes(folder: Path) -> dict:
    """sha256 and size of every file in a folder but the manifest itself."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        out[str(path.relative_to(folder))] = {"sha256": h.hexdigest(), "bytes": path.stat().st_size}
    return out


def weights_hash(source) -> str | None:
    """A fingerprint of a model reference's weights: its manifest's, or the sha256 of its
    safetensors files (None for tiny models and hub ids)."""
    if source.manifest.get("weights_sha256"):
        return source.manifest["weights_sha256"]
    if not source.path or not os.path.isdir(source.path):
        return None
    return _weights_sha(Path(source.path))


def _weights_sha(folder: Path) -> str | None:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def save_model_files(loaded, folder: Path) -> None:
    """Write the model in the format it carries (`core.formats`), its runtime settings
    (`core.runtime_settings`), its tokenizer / processor, an elastic super-network's space
    (`core.elastic_space`), and the extra task
    heads a merge of several tasks keeps (`core.heads`; they point into plain weight files,
    so only a plain model keeps them)."""
    from .elastic_space import write_elastic
    from .formats import PLAIN, save
    from .heads import write_heads
    from .runtime_settings import write_settings

    save(loaded, folder)
    write_settings(loaded, folder)  # e.g. token merging: how the model runs
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(folder)
    if loaded.image_processor is not None:
        loaded.image_processor.save_pretrained(folder)
    if loaded.extra.get("elastic") is not None:  # an elastic super-network's space
        write_elastic(loaded.extra["elastic"], folder)
    if loaded.extra.get("heads"):
        if loaded.extra.get("format", PLAIN) == PLAIN:
            write_heads(loaded, folder)
        else:
            log.warning("the extra task heads (%s) are not written: a %s model keeps its main "
                        "head only. Compress the model once per head (--data of that task "
                        "picks it).", ", ".join(loaded.extra["heads"]), loaded.extra["format"])


def write_artifact(loaded, out, *, recipe: dict, steps: list, metrics: list, data_info=None,
                   overwrite: bool = False, fmt: str = "hf-model", parent=None) -> Path:
    """Write a model artifact atomically and return its path (taking OUT's lock unless this
    process holds it already). `parent` is the model the steps started from (a ModelSource;
    default: the one `loaded` was loaded from)."""
    out = output_path(out)
    with output_lock(out):
        check_output(out, overwrite)
        return _write(loaded, out, recipe, steps, metrics, data_info, overwrite, fmt,
                      parent or loaded.source)


def _write(loaded, out, recipe, steps, metrics, data_info, overwrite, fmt, parent) -> Path:
    import yaml

    from .versions import _versions

    with staging(out, overwrite) as tmp:
        save_model_files(loaded, tmp)
        (tmp / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False))
        files = file_hashes(tmp)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "mmkit_version": _versions().get("mmkit"),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "format": fmt,
            "family": loaded.family,
            "kind": loaded.kind,
            "task": {"name": loaded.task, "labels": loaded.labels},
            "parent": {"ref": parent.ref, "kind": parent.kind,
                       "path": parent.path, "weights_sha256": weights_hash(parent),
                       "seed": recipe.get("seed", 0)},
            "steps": steps,
            "metrics": metrics,
            "data": data_info,
            "weights_sha256": _weights_sha(tmp),
            "weights_disk_mb": sum(f.stat().st_size for f in tmp.glob("*.safetensors")) / 1e6,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return out


def read_json_file(path: Path, what: str, keys: dict) -> dict:
    """Read one of an artifact's own JSON files (mmkit_quant.json, ...): a JSON object whose
    `keys` hold values of the given types; anything else is a damaged artifact (exit 2)."""
    from .errors import InputError

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise InputError(f"{path} cannot be read ({str(exc)[:200]}); the artifact is damaged. "
                         "Re-create it.") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), t) for k, t in keys.items()):
        raise InputError(f"{path} is not {what} (a JSON object with "
                         f"{', '.join(keys)}); the artifact is damaged. Re-create it.")
    return data
