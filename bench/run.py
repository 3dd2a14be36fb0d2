"""`make bench`: run every benchmark and write BENCHMARKS.md (machine, date, baselines, ratios).

Each figure stands beside a baseline measured in the same run, on the same machine: absolute
times on a shared 2-core machine are noisy, ratios much less so.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import ingest_bench  # noqa: E402
from bench.common import machine, table  # noqa: E402
from tcp import services  # noqa: E402
from tcp.config import Settings  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def main() -> int:
    settings = services.ensure(Settings.load(), ("kafka",))
    sections: list[str] = []

    print("ingest: decode + validate ...", flush=True)
    rows = ingest_bench.decode_rows()
    print("ingest: produce into Kafka ...", flush=True)
    rows += ingest_bench.produce_rows(settings)
    sections.append("## Ingest (issue 2)\n\n" + table(rows))

    text = (
        "# Benchmarks\n\n"
        "Written by `make bench` (bench/run.py); do not edit by hand.\n\n"
        f"Machine: {machine()}.\n"
        f"Kafka: {settings.kafka_bootstrap} "
        f"({'configured' if Settings.load().kafka_bootstrap else 'embedded Tansu, in memory'}).\n\n"
        + "\n\n".join(sections)
        + "\n"
    )
    OUT.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
