"""Shared bits of the benchmarks: timing, machine description, result rows."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

#: Multiplies every benchmark's size (``BENCH_SCALE=0.05`` for a quick check; 1 = the issues' sizes).
SCALE_ENV = "BENCH_SCALE"


def scale() -> float:
    """The size factor from ``BENCH_SCALE`` (default 1.0: the sizes the issues ask for)."""
    text = os.environ.get(SCALE_ENV, "").strip()
    if not text:
        return 1.0
    value = float(text)
    if not value > 0:
        msg = f"{SCALE_ENV} must be a positive number, got {text!r}"
        raise ValueError(msg)
    return value


def scaled(n: int, minimum: int = 1_000) -> int:
    """``n`` times :func:`scale`, at least ``minimum`` (and never more than asked when scale < 1)."""
    return max(min(n, minimum), round(n * scale()))


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
    #: Whether the target is met (None: the target is not a pass/fail figure, or not checked).
    met: bool | None = None
    #: Printed instead of the ratio when a ratio means nothing here (e.g. RSS vs an idle process).
    ratio_text: str | None = None
    #: Digits after the point (latencies in ms, MB).
    decimals: int = 0

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
        "| what | measured | baseline (same run) | ratio | target | met |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        d = row.decimals
        ratio = row.ratio_text if row.ratio_text is not None else f"{row.ratio:.2f}x"
        met = "-" if row.met is None else ("yes" if row.met else "**no**")
        lines.append(
            f"| {row.name} | {row.value:,.{d}f} {row.unit} | {row.baseline_name}: {row.baseline:,.{d}f} {row.unit} "
            f"| {ratio} | {row.target} | {met} |"
        )
    return "\n".join(lines)


def split_sections(text: str) -> tuple[str, dict[str, str]]:
    """BENCHMARKS.md as (the part before the first section, {title: "## title ..." text})."""
    head, *parts = text.split("\n## ")
    sections: dict[str, str] = {}
    for part in parts:
        title = part.split("\n", 1)[0].strip()
        sections[title] = "## " + part.rstrip("\n")
    return head, sections


def write_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the section ``## title`` of ``path``, leaving every other section as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    head, sections = split_sections(text)
    sections[title] = f"## {title}\n\n{body.strip()}"
    path.write_text(head.rstrip("\n") + "\n\n" + "\n\n".join(sections.values()) + "\n")
