"""A search worker process: `python -m mmkit.search.worker OUT TRIALS TIMEOUT`.

`mmkit search --workers N` starts N-1 of these beside itself; each loads the model and runs
trials on the shared study until it holds TRIALS completed trials.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def main() -> None:
    """Run one worker for the search in OUT."""
    from .run import SETTINGS_FILE, work

    logging.basicConfig(level=logging.INFO, format="worker: %(message)s", stream=sys.stderr)
    out, trials, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    job = json.loads(Path(out, SETTINGS_FILE).read_text())
    work(job, trials, timeout or None)


if __name__ == "__main__":
    main()
