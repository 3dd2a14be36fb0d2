"""Fault drills (the deploy issue): the same tests run small in ``make test`` and full size in
``make drill``.

``make drill`` runs the tests marked ``drill`` with ``TCP_DRILL=1`` (full size: 20 SIGKILLs,
30 s without PostgreSQL, 1,000,000 fuzzed messages, a WebSocket drop every 10 s, a broker
restart) and ``TCP_DRILL_REPORT=<file>``: each drill appends its figures there (one JSON
object per line), and bench/drills.py writes them into the "Fault drills" section of
BENCHMARKS.md. Without ``TCP_DRILL_REPORT`` nothing is recorded.
"""

from __future__ import annotations

import json
import os
from typing import TypeVar

__all__ = ["FULL", "record", "size"]

T = TypeVar("T")

#: Full-size drills (``make drill``)?
FULL = os.environ.get("TCP_DRILL") == "1"


def size(small: T, full: T) -> T:
    """``full`` under ``make drill``, ``small`` in the test suite."""
    return full if FULL else small


def record(drill: str, *, runs: int, compared: int, lost: int, duplicated: int, detail: str) -> None:
    """Append a drill's figures to ``$TCP_DRILL_REPORT`` (when set): how many times the fault
    was injected (``runs``), the rows (or messages, or trade ids) compared against what is
    expected, how many were lost and how many duplicated, and what was seen."""
    path = os.environ.get("TCP_DRILL_REPORT")
    if not path:
        return
    line = {"drill": drill, "full": FULL, "runs": runs, "compared": compared, "lost": lost,
            "duplicated": duplicated, "detail": detail}  # fmt: skip
    with open(path, "a") as out:
        out.write(json.dumps(line) + "\n")
