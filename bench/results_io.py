"""Shared by the bench scripts: where results go and how they are written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_result(result: dict, out: str | Path) -> None:
    """Write a result as indented JSON to `out` (creating its folder) and echo it to stdout."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    json.dump(result, sys.stdout, indent=2)
    print()
