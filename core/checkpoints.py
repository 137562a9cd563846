"""Training checkpoints beside the output: `OUT.checkpoints/step-N/checkpoint-STEP`.

The folder belongs to one run, named by the fingerprint of its recipe in `mmkit-run.json`.
Only a run with a training step touches it, and only its own: another run's checkpoints, a
folder mmkit did not make, or a symbolic link are refused, never emptied or written through.
A run that finishes removes its checkpoints; an interrupted one keeps them for `--resume`,
which continues from the newest checkpoint that was saved completely.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

from .distributed import is_main
from .errors import InputError

log = logging.getLogger("mmkit")
RUN_FILE = "mmkit-run.json"
MARKING = RUN_FILE + ".tmp"  # the marker while it is written


def checkpoint_dir(out) -> Path:
    """Where a run keeps its training checkpoints: `<OUT>.checkpoints` beside the output."""
    out = Path(out)
    return out.parent / f"{out.name}.checkpoints"


def _recorded(workdir: Path) -> str | None:
    """The fingerprint in a checkpoint folder's marker, or None if it is not mmkit's."""
    try:
        value = json.loads((workdir / RUN_FILE).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def claim(workdir: Path, fingerprint: str, resume: bool, overwrite: bool) -> None:
    """Check, before any training, that `workdir` is this run's to use; with `overwrite`,
    discard an earlier run's checkpoints (only mmkit's own). In a multi-process run the main
    process alone does this."""
    if not is_main():
        return
    if workdir.is_symlink():
        raise InputError(f"{workdir} is a symbolic link; mmkit does not write or delete "
                         "checkpoints through links. Remove the link, or choose another -o.")
    if workdir.is_dir() and not workdir.is_symlink() and all(
            p.name == MARKING for p in workdir.iterdir()):  # killed as it was made: no loss
        shutil.rmtree(workdir)
    if not workdir.exists():
        if resume:
            raise InputError(f"--resume: there are no checkpoints to resume at {workdir}. Run "
                             "without --resume to start afresh.")
        return
    recorded = _recorded(workdir) if workdir.is_dir() else None
    if recorded is None:
        raise InputError(f"{workdir} exists but is not an mmkit checkpoint folder (no "
                         f"{RUN_FILE}); mmkit will neither write into it nor delete it. Move it "
                         "away, or choose another -o.")
    same = recorded == fingerprint
    if not resume and not resumable(workdir):  # killed before its first checkpoint: no loss
        shutil.rmtree(workdir)
        log.info("removed %s: an earlier run stopped before saving a checkpoint", workdir)
        return
    if resume:
        if not same:
            raise InputError(f"--resume: {workdir} holds checkpoints of a different run (its "
                             "model, data or settings differ). Resume with the same command, "
                             "or pass --overwrite without --resume to discard them.")
        return
    if not overwrite:
        raise InputError(
            f"{workdir} holds the checkpoints of an interrupted run"
            + (" of this same command. Pass --resume to continue it, or" if same else
               " with other settings. Pass") + " --overwrite to discard them and start afresh.")
    shutil.rmtree(workdir)
    log.info("discarded the earlier run's checkpoints in %s (--overwrite)", workdir)


def prepare_step(step_dir: Path, fingerprint: str, resume: bool) -> str | None:
    """Create, or when resuming reopen, one training step's checkpoint folder; return the
    newest complete checkpoint to resume from (None: start from the beginning)."""
    root = step_dir.parent
    if not (root / RUN_FILE).is_file():  # written first, whole, so a folder with content has it
        root.mkdir(parents=True, exist_ok=True)
        (root / MARKING).write_text(json.dumps({"fingerprint": fingerprint}))
        os.replace(root / MARKING, root / RUN_FILE)
    step_dir.mkdir(exist_ok=True)
    if not resume:
        return None
    found = sorted(step_dir.glob("checkpoint-*"), key=_step_number)
    complete = [c for c in found if is_complete(c)]
    for broken in [c for c in found if c not in complete]:
        shutil.rmtree(broken, ignore_errors=True)
        log.warning("removed %s: it was being written when the run stopped", broken.name)
    return str(complete[-1]) if complete else None


def release(workdir: Path, fingerprint: str, finished: bool = True) -> None:
    """Remove a run's checkpoints (only its own, never through a link): all of them when it
    finished, or when it failed before saving one it could resume from. Only the main process
    of a multi-process run does this."""
    if not is_main():
        return
    if not workdir.is_dir() or workdir.is_symlink() or _recorded(workdir) != fingerprint:
        return
    if finished or not resumable(workdir):
        shutil.rmtree(workdir, ignore_errors=True)


def same_run_to_resume(workdir: Path, fingerprint: str) -> bool:
    """True when `workdir` holds resumable checkpoints of the run `fingerprint` names."""
    return (workdir.is_dir() and not workdir.is_symlink()
            and _recorded(workdir) == fingerprint and resumable(workdir))


def resumable(workdir: Path) -> bool:
    """True when some training step in `workdir` saved a complete checkpoint."""
    return any(is_complete(c) for c in workdir.glob("step-*/checkpoint-*"))


def _step_number(path: Path) -> int:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def is_complete(checkpoint: Path) -> bool:
    """True when a Trainer checkpoint was written to the end: the trainer state (written last)
    reads, and the weights, optimizer and scheduler files are whole."""
    from safetensors import SafetensorError, safe_open

    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        if not isinstance(state, dict) or "global_step" not in state:
            return False
        weights = sorted(checkpoint.glob("*.safetensors"))
        if not weights:
            return False
        for path in weights:
            with safe_open(str(path), "pt") as handle:
                handle.keys()
        return all(zipfile.is_zipfile(checkpoint / name)
                   for name in ("optimizer.pt", "scheduler.pt"))
    except (OSError, ValueError, SafetensorError):
        return False
