"""The step cache of `mmkit run`: each step's result kept as an artifact, so that a rerun
skips the steps it has done and an interrupted run resumes at its first unfinished step.

A step's key hashes everything its result depends on: the key of the step before it (for the
first step, the base model's identity: its reference and the hash of its weights), the step's
method and parameters, the files and models the parameters name, the content of the data, the
task, labels, seed, device and load options, and the mmkit version. So a changed CSV, a new
fine-tune under the same folder name or another mmkit version all miss, and two recipes that
share their first steps share those steps' results.

Entries live in `$MMKIT_RUN_CACHE` (default: mmkit's cache folder, `runs/`), one artifact
folder per key, written whole or not at all like any output (a kill -9 leaves no entry, only
a hidden staging folder that `clear` removes). Nothing is evicted on its own: `mmkit cache
info` reports the size and `mmkit cache clear` empties it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from .errors import InputError

log = logging.getLogger("mmkit")

CACHE_ENV = "MMKIT_RUN_CACHE"


def runs_dir() -> Path:
    """The folder that holds the cached steps."""
    from .embedded import cache_dir

    return Path(os.environ.get(CACHE_ENV) or cache_dir() / "runs").expanduser()


# ---------------------------------------------------------------- keys
def _sha(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _hub_revision(ref: str) -> str | None:
    """The commit of a hub model's local snapshot, when there is one."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(ref, "config.json")
    except Exception:  # noqa: BLE001 - an id the hub library rejects: keyed by name alone
        return None
    return Path(hit).parent.name if isinstance(hit, str) else None


def model_identity(source) -> dict:
    """What names a model's weights: its reference, kind and weights hash (the local hub
    snapshot's commit for a hub id; the name alone for a tiny model, whose weights follow
    from the seed); an adapter's and its base's both."""
    from .artifacts import weights_hash

    def one(s):
        if s.kind == "hub":
            return {"ref": s.ref, "kind": s.kind, "revision": _hub_revision(s.ref)}
        return {"ref": s.ref, "kind": s.kind, "weights": weights_hash(s)}

    found = one(source)
    if source.adapter is not None:
        found["adapter"] = one(source.adapter)
    return found


def _named_files(value) -> list:
    """The content hashes of the local files a step parameter names (a calibration CSV): a
    file edited in place must miss the cache."""
    from .loading import _sha256

    values = value if isinstance(value, list) else [value]
    found = []
    for v in values:
        if isinstance(v, str) and len(v) < 4096 and os.path.isfile(v):
            found.append([v, _sha256(Path(v))])
        elif isinstance(v, str) and len(v) < 4096 and os.path.isdir(v):
            found.append([v, sorted((str(p.relative_to(v)), p.stat().st_size,
                                     p.stat().st_mtime_ns)
                                    for p in Path(v).rglob("*") if p.is_file())])
    return found


def data_fingerprint(dataset) -> str | None:
    """A hash of the examples and labels of every split (images by their pixels)."""
    if dataset is None:
        return None
    h = hashlib.sha256(json.dumps([dataset.name, dataset.label_names]).encode())
    for name in sorted(dataset.splits):
        split = dataset.splits[name]
        h.update(f"|{name}:{len(split)}|".encode())
        for item in split.inputs:
            if isinstance(item, str):
                h.update(item.encode("utf-8", "surrogatepass") + b"\0")
            elif hasattr(item, "tobytes"):  # a PIL image
                h.update(f"{getattr(item, 'mode', '')}{getattr(item, 'size', '')}".encode())
                h.update(item.tobytes())
            else:
                h.update(json.dumps(item, default=str).encode())
        h.update(json.dumps(split.labels).encode())
    return h.hexdigest()


def step_keys(plan, device: str) -> list[str]:
    """One key per step of a planned recipe (see the module's docstring)."""
    from .versions import _versions

    common = {"mmkit": _versions().get("mmkit"), "task": plan.task, "labels": plan.labels,
              "seed": plan.seed, "device": device, "data": data_fingerprint(plan.dataset),
              "max_samples": plan.recipe.max_samples, "load": plan.load_options}
    parent = _sha({"base": model_identity(plan.source), **common})
    keys = []
    for method, cfg, _ in plan.steps:
        params = cfg.model_dump(mode="json")
        named = {ref: model_identity(src) for ref, src in plan.models.items()
                 if ref in json.dumps(params)}
        files = [_named_files(v) for v in params.values()]
        parent = _sha({"parent": parent, "step": method.step, "method": method.name,
                       "params": params, "models": named, "files": files, **common})
        keys.append(parent)
    return keys


# ---------------------------------------------------------------- entries
def entry_path(key: str) -> Path:
    """Where the result of the step with this key is kept."""
    return runs_dir() / key[:32]


def cached_prefix(keys: list[str]) -> tuple[int, Path | None, list]:
    """How many leading steps are cached, the entry of the last of them, and the step
    records it keeps; (0, None, []) when the first step is not cached."""
    from .refs import read_manifest

    for n in range(len(keys), 0, -1):
        path = entry_path(keys[n - 1])
        if not (path / "mmkit.json").is_file():
            continue
        try:
            steps = read_manifest(path).get("steps")
        except InputError:
            steps = None
        if isinstance(steps, list) and len(steps) == n:
            return n, path, steps
        log.warning("ignoring a damaged cache entry %s", path)
    return 0, None, []


def store(loaded, key: str, recipe: dict, steps: list, data_info, parent) -> None:
    """Keep a step's result (`parent`: the model the run started from); a result another
    run is writing or has written is left to it."""
    from .artifacts import write_artifact
    from .outputs import output_lock

    path = entry_path(key)
    if path.exists():
        return
    try:
        with output_lock(path):
            if not path.exists():
                steps = [{k: v for k, v in r.items() if k != "cached"} for r in steps]
                write_artifact(loaded, path, recipe=recipe, steps=steps, metrics=[],
                               data_info=data_info, fmt=loaded.extra.get("format", "hf-model"),
                               parent=parent)
    except InputError as exc:  # another run holds the entry; its copy will do
        log.info("not caching step %d: %s", len(steps), exc)
    except OSError as exc:  # a full disk must not fail the run the cache serves
        log.warning("could not cache step %d (%s); the run goes on without it", len(steps), exc)


ENTRY_NAME = re.compile(r"^[0-9a-f]{32}$")  # entry_path's: what else is in the folder is not ours
# what a killed run leaves beside an entry (core.outputs' staging and lock names)
LEFT_BESIDE = re.compile(r"^\.([0-9a-f]{32})\.mmkit-(?:tmp|old|lock)(?:-[a-z0-9_]{8})?$")


def _ours(root: Path) -> list[Path]:
    """The entries in the cache folder and what killed runs left beside them; any other file
    or folder there (a mistyped MMKIT_RUN_CACHE may point anywhere) is not the cache's."""
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if ENTRY_NAME.match(p.name) or LEFT_BESIDE.match(p.name)]


def usage() -> dict:
    """The cache's folder, entries and bytes on disk."""
    root = runs_dir()
    ours = _ours(root)
    entries = [p for p in ours if p.is_dir() and ENTRY_NAME.match(p.name)]
    size = sum(f.stat().st_size for p in ours for f in ([p] if p.is_file() else p.rglob("*"))
               if f.is_file())
    return {"path": str(root), "entries": len(entries), "bytes": size}


def discard(path: Path) -> None:
    """Remove one entry that cannot be loaded, so that the run's result replaces it (an entry
    a run is writing is left to it)."""
    from .outputs import output_lock

    try:
        with output_lock(path):
            shutil.rmtree(path, ignore_errors=True)
    except InputError:
        pass


def clear() -> dict:
    """Remove every entry no run is writing right now, with what killed runs left beside
    them (unfinished folders, lock files); returns what was removed."""
    from .outputs import output_lock

    root, before = runs_dir(), usage()
    names = set()
    for path in _ours(root):
        match = LEFT_BESIDE.match(path.name)
        names.add(match.group(1) if match else path.name)
    removed, busy = 0, 0
    for name in sorted(names):
        path = root / name
        try:
            with output_lock(path):  # a run writing this entry holds it: leave it be; taking
                removed += path.is_dir()  # the lock removes what a killed run left beside it
                shutil.rmtree(path, ignore_errors=True)
        except InputError:
            busy += 1
    after = usage()
    return {"path": before["path"], "removed": removed, "busy": busy,
            "freed_bytes": before["bytes"] - after["bytes"], "bytes": after["bytes"]}
