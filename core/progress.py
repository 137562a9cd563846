"""Progress bars on stderr for long work (training, calibration, GPTQ / Wanda blocks,
evaluation, search trials): shown only when stderr is a terminal and not turned off with
`--quiet` (or MMKIT_PROGRESS=0); stdout never carries them."""

from __future__ import annotations

import os
import sys

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Turn progress bars off (`--quiet`) or back to the default."""
    global _QUIET
    _QUIET = quiet


def enabled() -> bool:
    """Whether bars are shown: MMKIT_PROGRESS=1 / 0 forces it, else a terminal on stderr."""
    forced = os.environ.get("MMKIT_PROGRESS")
    if _QUIET or forced == "0":
        return False
    if forced == "1":
        return True
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def bar(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it"):
    """A tqdm bar on stderr around `iterable` (or a manual one), or a silent stand-in."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr,
                disable=not enabled(), dynamic_ncols=True, leave=False)


def trainer_callback():
    """transformers' progress bar for the Trainer, without its habit of printing the logs to
    stdout (which carries results only)."""
    from transformers.trainer_callback import ProgressCallback

    class StderrProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            """Logs go through mmkit's logger (stderr), not tqdm.write (stdout)."""

    return StderrProgress()
