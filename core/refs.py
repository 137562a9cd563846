"""Model references: one string names any model, resolved here to where it lives."""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from .embedded import ALIASES, alias_path
from .errors import InputError, shown
from .tiny import TINY_FAMILIES

MANIFEST = "mmkit.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass
class ModelSource:
    """Where a model reference points.

    kind is "tiny", "embedded", "artifact" (an mmkit output folder), "folder" (a plain HF
    folder) or "hub". `path` is the local folder (None for tiny; the hub id for hub).
    """

    ref: str
    kind: str
    path: str | None = None
    family: str | None = None  # for tiny
    manifest: dict = field(default_factory=dict)
    adapter: "ModelSource | None" = None  # set on a base model when an adapter goes on top

    @property
    def is_adapter(self) -> bool:
        """True when the folder holds an adapter (any registered adapter format) rather than
        full weights."""
        from .formats import detect

        return self.kind != "hub" and detect(self.path, adapter=True) is not None


def _aliases_hint() -> str:
    names = ", ".join(sorted(ALIASES)) + ", " + ", ".join(f"tiny:{f}" for f in TINY_FAMILIES)
    return f"Built-in names: {names}."


def read_manifest(folder: str | os.PathLike) -> dict:
    """The mmkit.json of an artifact folder ({} when there is none)."""
    path = Path(folder, MANIFEST)
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, RecursionError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); the artifact is damaged. "
                         "Re-create it, or delete mmkit.json to load the folder as plain "
                         "Hugging Face files.") from None
    files = manifest.get("files", {}) if isinstance(manifest, dict) else None
    shaped = isinstance(files, dict) and all(isinstance(v, dict) for v in files.values()) and all(
        isinstance(manifest.get(k) or {}, dict) for k in ("task", "parent", "data")) and all(
        isinstance(step, dict) for step in manifest.get("steps") or [])
    if not shaped:
        raise InputError(f"{path} is not an mmkit manifest (a JSON object whose 'files' maps "
                         "names to their hashes, with 'task', 'parent' and 'data' objects); the "
                         "artifact is damaged. Re-create it, or delete mmkit.json to load the "
                         "folder as plain Hugging Face files.")
    for name in files:
        inside = Path(folder, name).resolve()
        if Path(folder).resolve() not in inside.parents:
            raise InputError(f"{path} lists a file outside its own folder ({name[:200]}); an "
                             "artifact only describes its own files. The manifest was altered: "
                             "re-create the artifact.")
    return manifest


def _local_folder(ref: str, path: Path) -> ModelSource:
    if not path.is_dir():
        raise InputError(f"Model '{ref}' is a file, not a folder. Pass the folder that holds "
                         "config.json and the weights.")
    from .formats import detect

    if not (path / "config.json").is_file() and detect(path, adapter=True) is None:
        raise InputError(f"The folder '{ref}' has no config.json (nor an adapter's config), so "
                         "it is not a Hugging Face model folder. Pass the folder that "
                         "save_pretrained wrote, or an mmkit artifact.")
    manifest = read_manifest(path)
    return ModelSource(ref, "artifact" if manifest else "folder", str(path.resolve()),
                       manifest=manifest)


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the model hub answers at all (a fast TCP probe, not a download)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = re.sub(r"^https?://", "", endpoint).split("/")[0]
    host, _, port = host.partition(":")
    try:
        socket.create_connection((host, int(port or 443)), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    hit = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(hit, str)


def resolve(ref: str | os.PathLike) -> ModelSource:
    """Resolve a model reference (a string, or a path object for a local folder), or fail at
    once with what was tried.

    Order: `tiny:<family>`, an embedded alias, a local folder, a hub id (online, or in the
    local hub cache when offline).
    """
    ref = os.fspath(ref).strip()
    if not ref:
        raise InputError(f"The model reference is empty. {_aliases_hint()}")
    if ref.startswith("tiny:"):
        family = ref.split(":", 1)[1]
        if family not in TINY_FAMILIES:
            raise InputError(f"Unknown tiny model '{ref}'. Tiny families: "
                             f"{', '.join('tiny:' + f for f in TINY_FAMILIES)}.")
        return ModelSource(ref, "tiny", family=family)
    if ref in ALIASES:
        return ModelSource(ref, "embedded", str(alias_path(ref)))
    path = Path(ref).expanduser()
    try:
        exists = path.exists()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise InputError(f"Model '{shown(ref)}' is not a usable path ({exc.strerror}) nor a "
                         f"built-in name or hub id. {_aliases_hint()}") from None
    if exists:
        return _local_folder(ref, path)
    looks_like_path = ref.startswith((".", "/", "~")) or os.sep in ref.strip("/").split("/", 1)[-1]
    if HUB_ID.match(ref) and not looks_like_path and not _moved_aside(path):
        if _hub_cached(ref) or hub_reachable():
            return ModelSource(ref, "hub", ref)
        raise InputError(
            f"Model '{shown(ref)}' is not a local folder, not a built-in name, and the model hub "
            f"cannot be reached (offline or HF_HUB_OFFLINE=1) with no cached copy. Tried: a "
            f"folder at {path.resolve()}, the built-in names, the hub cache. Pass a local "
            f"folder or a built-in name. {_aliases_hint()}"
        )
    raise InputError(f"Model '{shown(ref)}' does not exist: no folder at "
                     f"{shown(path.resolve())} and it is not a built-in name or a hub id."
                     f"{_moved_aside(path)} {_aliases_hint()}")


def _moved_aside(path: Path) -> str:
    """A hint when an interrupted mmkit run moved the folder aside while replacing it."""
    from .outputs import leftovers, output_path

    try:
        moved = [p for p in leftovers(output_path(path))["old"] if (p / "x").is_dir()]
    except (InputError, OSError):
        return ""
    if not moved:
        return ""
    return (f" An interrupted mmkit run moved it aside to {moved[0]}/x; any mmkit command "
            f"writing -o {path} restores it first (or move it back yourself).")
