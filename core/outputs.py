"""Where a command writes: the output is checked before any work, locked while the command
runs, written into a hidden sibling and swapped into place in one step, and whatever a killed
run left beside it is cleaned up (or restored) by the next run on the same output.

Beside OUT, only these hidden names are ever used (and only by the process holding the lock):
`.OUT.mmkit-lock` (the lock), `.OUT.mmkit-tmp-XXXXXXXX` (a folder being written, or the
previous version just swapped out) and `.OUT.mmkit-old-XXXXXXXX` (the previous version, where
the file system cannot swap two folders atomically).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError

log = logging.getLogger("mmkit")

TMP, OLD, LOCK = "mmkit-tmp", "mmkit-old", "mmkit-lock"
# files a folder must hold for --overwrite to replace it: mmkit's own outputs only
OWN_MARKERS = ("mmkit.json", "search.json", "mmkit_onnx.json")  # the last: an ONNX export
_HELD: set[Path] = set()  # outputs this process holds (the lock is re-entrant)


def output_path(out: str | os.PathLike) -> Path:
    """OUT as an absolute path (not resolving a final symbolic link), or a clear error."""
    text = os.fspath(out)
    if not text.strip():
        raise InputError("-o is empty; give the folder to write, e.g. -o out/model.")
    path = Path(os.path.abspath(os.path.expanduser(text)))
    if path.name in ("", ".", ".."):
        raise InputError(f"-o {text} names no folder (it is the root or a parent reference); "
                         "give a folder path such as out/model.")
    return path


def _hidden(out: Path, kind: str) -> re.Pattern:
    # mkdtemp's random part is 8 characters of [a-z0-9_]
    return re.compile(rf"^\.{re.escape(out.name)}\.{kind}-[a-z0-9_]{{8}}$")


def leftovers(out: Path) -> dict[str, list[Path]]:
    """The hidden siblings an interrupted run on OUT left: {"tmp": [...], "old": [...]}."""
    found = {"tmp": [], "old": []}
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return found
    for p in siblings:
        for key, kind in (("tmp", TMP), ("old", OLD)):
            if _hidden(out, kind).match(p.name):
                found[key].append(p)
    return found


def is_own_output(path: Path) -> bool:
    """True for an empty folder or one mmkit wrote (an artifact or a search folder)."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        names = {p.name for p in path.iterdir()}
    except OSError:
        return False
    return not names or bool(names & set(OWN_MARKERS))


def check_output(out: str | os.PathLike, overwrite: bool, inputs=()) -> Path:
    """Fail early, before any work, when OUT cannot or must not be written.

    `inputs` are (what, path) pairs the command reads (the model folder, data files): an
    output that is, contains or lies inside one of them would destroy or alter it.
    """
    out = output_path(out)
    check_not_an_input(out, inputs)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise InputError(f"The output '{out}' already exists. Pass --overwrite to replace "
                             "it, or choose another -o path.")
        if not out.is_dir() or out.is_symlink():
            raise InputError(f"The output '{out}' exists and is a file or a link, not an mmkit "
                             "output folder; choose another -o path.")
        if not is_own_output(out):
            raise InputError(f"The output '{out}' is a folder that mmkit did not write (no "
                             "mmkit.json): --overwrite replaces only mmkit's own outputs. "
                             "Move it away, or choose another -o path.")
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"Cannot write the output '{out}': {probe} is not a writable folder. "
                         "Choose an -o path in a folder you can write to.")
    return out


def check_not_an_input(out: Path, inputs) -> None:
    """Refuse an output that is, contains or lies inside an input."""
    real_out = Path(os.path.realpath(out))
    for what, path in inputs:
        if not path:
            continue
        real_in = Path(os.path.realpath(path))
        if real_out == real_in:
            how = "is"
        elif real_out in real_in.parents:
            how = "contains"
        elif real_in in real_out.parents:
            how = "lies inside"
        else:
            continue
        raise InputError(f"-o {out} {how} the {what} this command reads ({path}); writing there "
                         "would destroy or alter its input. Choose an -o path outside it.")


def _holder(lock_path: Path) -> str:
    try:
        info = json.loads(lock_path.read_text())
        return (f"pid {info['pid']} on {info['host']}, since {info['since']}: "
                f"{info['command'][:200]}")
    except (OSError, ValueError, KeyError, TypeError):
        return "another mmkit process"


def make_folders(path: Path) -> list[Path]:
    """mkdir -p, or a clear error; returns the folders it made, outermost first."""
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    missing.reverse()
    try:
        for p in missing:
            p.mkdir(exist_ok=True)
    except OSError as exc:
        _remove_empty(missing)
        raise InputError(f"Cannot create the folder '{path}': {exc.strerror}. Choose an -o path "
                         "in a folder you can write to.") from None
    return missing


@contextmanager
def output_lock(out: Path, wait_s: float = 0.0):
    """Hold OUT for this process: a second writer fails at once (or after `wait_s`) with a
    message naming the holder. The lock dies with its process, so a kill -9 leaves no stale
    lock (at most an unlocked lock file, which the next run reuses and removes). In a
    multi-process run only the main process, the one that writes, takes it."""
    import fcntl

    from .distributed import is_main

    out = output_path(out)
    if out in _HELD or not is_main():
        yield out
        return
    created = make_folders(out.parent)
    lock_path = out.parent / f".{out.name}.{LOCK}"
    deadline = time.monotonic() + wait_s
    fd = None
    try:
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                fd = None
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                raise InputError(f"Another mmkit process is writing '{out}' right now "
                                 f"({_holder(lock_path)}). Wait for it to finish, or choose "
                                 "another -o path.") from None
            try:  # the file may have been removed by its last holder after we opened it
                same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            fd = None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
    except BaseException:
        if fd is not None:
            os.close(fd)
        _remove_empty(created)
        raise
    ok = False
    _HELD.add(out)
    try:
        recover(out)
        yield out
        ok = True
    finally:
        _HELD.discard(out)
        try:
            os.unlink(lock_path)  # while still holding it: the next writer makes a new one
        except OSError:
            pass
        os.close(fd)
        if not ok:
            _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    for p in reversed(folders):
        try:
            p.rmdir()
        except OSError:
            break


def recover(out: Path) -> None:
    """Clean up after a run on OUT that was killed (call with OUT's lock held): restore the
    previous version if it was swapped out but not replaced, remove temporary folders."""
    found = leftovers(out)
    moved = [p for p in found["old"] if (p / "x").exists()]
    if moved and not (out.exists() or out.is_symlink()):
        keep = max(moved, key=lambda p: p.stat().st_mtime)
        os.rename(keep / "x", out)
        log.warning("restored %s: an interrupted run had moved it aside to %s", out, keep.name)
    stale = found["tmp"] + found["old"]
    for p in stale:
        _remove(p)
    if stale:
        log.warning("removed %d unfinished folder(s) an interrupted run left beside %s: %s",
                    len(stale), out.name, ", ".join(p.name for p in stale))


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish_mode(folder: Path) -> None:
    """Give the written files the modes a plain write would (0666 / 0777 less the umask):
    temporary folders and some writers create them private (0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


def scratch_folder(out: Path | None) -> Path:
    """A folder for a step's large temporary files: a hidden sibling of OUT (same file
    system, so they move into the artifact by a rename; named like a staging folder, so the
    next run on OUT removes it if this one is killed), or a system temporary folder."""
    if out is None:
        return Path(tempfile.mkdtemp(prefix="mmkit-"))
    out = output_path(out)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{TMP}-", dir=out.parent))


@contextmanager
def staging(out: Path, overwrite: bool):
    """Yield a hidden sibling folder to write into; on success it becomes OUT in one step, on
    failure it vanishes. Call with OUT's lock held (`output_lock`)."""
    out = output_path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{TMP}-", dir=out.parent))
    try:
        yield tmp
        _publish_mode(tmp)
        if out.exists() or out.is_symlink():
            if not overwrite:  # appeared while we worked (a writer that takes no lock)
                raise InputError(f"The output '{out}' appeared while this command ran; pass "
                                 "--overwrite to replace it, or choose another -o path.")
            if not _exchange(tmp, out):
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.{OLD}-", dir=out.parent))
                os.rename(out, old / "x")  # killed here: the next run restores it
                os.rename(tmp, out)
                _remove(old)
        else:
            os.rename(tmp, out)
    finally:
        _remove(tmp)  # unfinished work, or the previous version after the swap
