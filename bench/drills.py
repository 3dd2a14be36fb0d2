"""``make drill``: turn the fault drills' figures (tests marked ``drill``, run with
``TCP_DRILL=1``; see tests/drill_util.py) into the "Fault drills" section of BENCHMARKS.md.

    .venv/bin/python bench/drills.py REPORT.jsonl [--started EPOCH_S]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, write_section  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
TITLE = "Fault drills"
NOTES = """\
`make drill`: the tests marked `drill` at full size (`TCP_DRILL=1`), against the local services
(embedded Tansu, PostgreSQL, Redis; private instances where a drill stops one). A drill passes
when its test passes: the counts below are what the test compared, and it fails on any loss or
duplicate. "Lost" and "duplicated" are rows (or messages, or trade ids) missing from, or extra
in, the result against the expected set; a row that exists but differs counts as lost."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("report", type=Path)
    parser.add_argument("--started", type=float, default=None, help="when the drills started (epoch s)")
    parser.add_argument("--passed", action="store_true", help="the pytest run passed")
    args = parser.parse_args(argv)
    lines = (
        [json.loads(line) for line in args.report.read_text().splitlines() if line.strip()]
        if args.report.exists()
        else []
    )
    took = f"; {(time.time() - args.started) / 60:.1f} min in all" if args.started else ""
    outcome = "all passed" if args.passed else "**SOME FAILED** (see the pytest output)"
    rows = [
        "| drill | faults injected | compared | lost | duplicated | what was seen |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for d in lines:
        size = "" if d["full"] else " (small: not TCP_DRILL=1)"
        rows.append(f"| {d['drill']}{size} | {d['runs']:,} | {d['compared']:,} | {d['lost']:,} | "
                    f"{d['duplicated']:,} | {d['detail']} |")  # fmt: skip
    body = f"{NOTES}\n\nMachine: {machine()}{took}; pytest: {outcome}.\n\n" + "\n".join(rows)
    write_section(OUT, TITLE, body)
    print(body)
    print(f"written to {OUT} (section {TITLE!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
