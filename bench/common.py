"""Shared bits of the benchmarks: timing, machine description, result rows."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass
class Row:
    """One measured figure beside the baseline measured in the same run."""

    name: str
    value: float
    baseline_name: str
    baseline: float
    unit: str
    target: str
    higher_is_better: bool = True

    @property
    def ratio(self) -> float:
        if self.higher_is_better:
            return self.value / self.baseline if self.baseline else float("nan")
        return self.baseline / self.value if self.value else float("nan")


def best_rate(fn: Callable[[], int], repeats: int = 3) -> float:
    """Items per second of the best of ``repeats`` runs (``fn`` returns how many items it did)."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        items = fn()
        best = max(best, items / (time.perf_counter() - start))
    return best


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    return (
        f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, "
        f"Python {platform.python_version()}; run {datetime.now(tz=UTC):%Y-%m-%d %H:%M} UTC"
    )


def table(rows: list[Row]) -> str:
    lines = [
        "| what | measured | baseline (same run) | ratio | target |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} | {row.value:,.0f} {row.unit} | {row.baseline_name}: {row.baseline:,.0f} {row.unit} "
            f"| {row.ratio:.2f}x | {row.target} |"
        )
    return "\n".join(lines)
