"""A search worker process: `python -m mmkit.search.worker OUT TRIALS TIMEOUT WORKER RUN`.

`mmkit search --workers N` starts N-1 of these beside itself (WORKER = 1 .. N-1 of the RUN-th
run on the study); each loads the model and runs trials on the shared study until it holds
TRIALS completed trials. SIGTERM (the main process stopping it) ends the running trial as
failed and exits 143.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import warnings
from pathlib import Path


def main() -> None:
    """Run one worker for the search in OUT."""
    from ..core.errors import MmkitError, Terminated, interrupted_by
    from .run import SETTINGS_FILE, work
    from .settings import SearchJob

    def terminate(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, terminate)
    warnings.filterwarnings("ignore", category=FutureWarning)  # as `mmkit` itself does
    logging.basicConfig(level=logging.INFO, format="worker: %(message)s", stream=sys.stderr)
    out, trials, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    worker, run = int(sys.argv[4]), int(sys.argv[5])
    try:
        job = SearchJob.model_validate(json.loads(Path(out, SETTINGS_FILE).read_text()))
        work(job, trials, timeout or None, worker, run)
    except MmkitError as exc:
        logging.getLogger("mmkit").error("%s", exc)
        sys.exit(exc.exit_code)
    except BaseException as exc:  # noqa: BLE001 - a failing cleanup after the signal included
        interruption = interrupted_by(exc)
        if interruption is None:
            raise
        sys.exit(143 if isinstance(interruption, Terminated) else 130)


if __name__ == "__main__":
    main()
