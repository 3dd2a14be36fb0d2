"""Replay recorded trades from a file as a :class:`connectors.base.TradeSource` (``origin="replay"``).

Two formats, told apart by the first non-blank line:

* **OKX WebSocket frames as JSON lines**, one frame per line, as written by
  :func:`connectors.simulate.write_frames` or captured from the feed. Lines may carry the
  capture prefix of cryptofeed's recorder, ``<recv unix seconds>: <json>`` (the receive time
  becomes ``received_at``); its outgoing-request lines ``wss://... <- ...`` and connection
  markers ``wss://... <-> ...`` are skipped. Each frame goes through the OKX connector's own
  parser (:func:`connectors.okx.parse.parse_ws_frame`), so a replay sees exactly what the live
  feed would: ``trades`` pushes give trades, acks/tickers/books/``pong`` are skipped (and
  counted), garbage and invalid trades become dead letters.
* **OKX trade-history CSV exports** with a header naming the columns ``instrument_name,
  trade_id, side, price, size, created_time`` (epoch ms) in any order, ``count`` optional.
  A row that does not make a valid trade becomes a dead letter with the reason.

Dead letters say ``where`` as ``replay:<path>:<line number>`` (1-based, blank lines counted).
Files ending in ``.gz`` (or starting with gzip's magic bytes) are decompressed on the fly.

Pacing: ``speed=None`` replays as fast as possible; ``speed=1`` reproduces the original pacing
by event time (``ts``), ``speed=10`` ten times faster. Event times are never rewritten; a trade
whose ``ts`` is earlier than one already replayed is simply not waited for.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal, cast

import msgspec

from connectors.base import Batch
from connectors.okx.parse import FrameKind, parse_ws_frame
from tcp.schemas import MAX_COUNT, MAX_TS_MS, MIN_TS_MS, DeadLetter, Trade, trade_problem
from tcp.timeframes import now_ms

__all__ = [
    "CSV_COLUMNS",
    "EventClock",
    "ReplaySource",
    "ReplayStats",
    "detect_format",
]

#: Columns an OKX trade-history CSV must have (by name, any order); ``count`` is optional.
CSV_COLUMNS = ("instrument_name", "trade_id", "side", "price", "size", "created_time")
#: Items per batch when replaying as fast as possible.
BATCH_SIZE = 1000
#: A pacing wait shorter than this is not slept (asyncio's timer resolution is about 1 ms).
MIN_SLEEP_S = 0.001
#: Bytes of lines read from the file at a time.
_READ_HINT = 1 << 20
_MAX_ID_DIGITS = 18
_GZIP_MAGIC = b"\x1f\x8b"
_UTF8_BOM = b"\xef\xbb\xbf"
_SIDES = frozenset({"buy", "sell"})

Format = Literal["jsonl", "csv"]
_force_setattr = msgspec.structs.force_setattr
_TRADES = FrameKind.TRADES
_INVALID = FrameKind.INVALID


@dataclass
class ReplayStats:
    """What a replay has read so far: lines, trades, dead letters and frames skipped by kind."""

    lines: int = 0
    trades: int = 0
    dead_letters: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


class EventClock:
    """Maps event time (epoch ms) to wall time at ``speed`` times real time.

    The first event anchors the clock: it is due at once, an event ``d`` ms later is due
    ``d / speed`` ms of wall time after it. Anchoring once (rather than per event) keeps
    rounding from accumulating into drift.
    """

    def __init__(self, speed: float) -> None:
        if not speed > 0:
            msg = f"speed must be positive (or None for as fast as possible), got {speed}"
            raise ValueError(msg)
        self._ms_per_wall_s = 1000.0 * speed
        self._origin_ts: int | None = None
        self._origin_wall = 0.0

    def wait_s(self, ts_ms: int) -> float:
        """Seconds to sleep before the event at ``ts_ms`` is due; 0.0 when it is (nearly) due."""
        if self._origin_ts is None:
            self._origin_ts = ts_ms
            self._origin_wall = time.monotonic()
            return 0.0
        due = self._origin_wall + (ts_ms - self._origin_ts) / self._ms_per_wall_s
        wait = due - time.monotonic()
        return wait if wait >= MIN_SLEEP_S else 0.0


def _open_binary(path: Path) -> BinaryIO:
    """The file's bytes, gunzipped when it starts with gzip's magic bytes (whatever its name)."""
    raw = path.open("rb")
    if raw.peek(2)[:2] != _GZIP_MAGIC:
        return raw
    raw.close()
    return cast(BinaryIO, gzip.open(path, "rb"))


def _first_line(path: Path) -> bytes:
    with _open_binary(path) as stream:
        for line in stream:
            stripped = line.removeprefix(_UTF8_BOM).strip()
            if stripped:
                return stripped
    return b""


def detect_format(first_line: bytes) -> Format:
    """``csv`` when the first non-blank line is a header naming ``instrument_name`` or
    ``trade_id``; ``jsonl`` otherwise (frames, capture lines, and garbage, which is
    dead-lettered line by line rather than guessed at)."""
    if first_line[:1] in (b"{", b"[") or first_line[:1].isdigit() or first_line.startswith(b"ws"):
        return "jsonl"
    names = {name.strip().strip(b'"').lower() for name in first_line.split(b",")}
    if b"instrument_name" in names or b"trade_id" in names:
        return "csv"
    return "jsonl"


class ReplaySource:
    """A :class:`connectors.base.TradeSource` reading a recorded file (see the module docstring).

    ``where_prefix`` replaces ``replay:<path>`` in dead letters' ``where``. ``stats`` counts
    what was read. A file can be replayed again by calling :meth:`batches` again.
    """

    name = "replay"

    def __init__(
        self,
        path: str | Path,
        *,
        speed: float | None = None,
        where_prefix: str | None = None,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        if speed is not None and not speed > 0:
            msg = f"speed must be positive (or None for as fast as possible), got {speed}"
            raise ValueError(msg)
        if batch_size < 1:
            msg = f"batch_size must be at least 1, got {batch_size}"
            raise ValueError(msg)
        self.path = Path(path)
        self.speed = speed
        self.where_prefix = where_prefix if where_prefix is not None else f"replay:{self.path}"
        self.batch_size = batch_size
        self.stats = ReplayStats()

    @property
    def format(self) -> Format:
        """``jsonl`` or ``csv``, from the file's first non-blank line."""
        return detect_format(_first_line(self.path))

    def iter_batches(self) -> Iterator[Batch]:
        """The whole file, unpaced, in batches of at most ``batch_size`` items, in file order."""
        size = self.batch_size
        for items, _ in self._chunks():
            for start in range(0, len(items), size):
                yield items[start : start + size]

    async def batches(self) -> AsyncIterator[Batch]:
        """The :class:`TradeSource` interface: :meth:`iter_batches`, paced when ``speed`` is set.

        Paced, a batch is cut wherever the next trade is not due yet, and the source sleeps
        until it is; dead letters travel with the trades read around them. Trades whose
        ``received_at`` is the time their chunk was read (no receive time in the file) get the
        time they are actually sent on instead, so ``received_at - ts`` stays meaningful.
        """
        if self.speed is None:
            for whole in self.iter_batches():
                yield whole
                await asyncio.sleep(0)  # let the event loop run (cancellation, progress)
            return
        clock = EventClock(self.speed)
        size = self.batch_size
        for items, read_at in self._chunks():
            batch: Batch = []
            sent_at = now_ms()
            for item in items:
                if type(item) is Trade:
                    wait = clock.wait_s(item.ts)
                    if wait > 0.0:
                        if batch:
                            yield batch
                            batch = []
                        await asyncio.sleep(wait)
                        sent_at = now_ms()
                    if item.received_at == read_at:
                        _force_setattr(item, "received_at", sent_at)  # made by this replay: ours alone
                batch.append(item)
                if len(batch) >= size:
                    yield batch
                    batch = []
                    sent_at = now_ms()
            if batch:
                yield batch
            await asyncio.sleep(0)

    def _chunks(self) -> Iterator[tuple[Batch, int]]:
        """The file's items chunk by chunk (about a MB of lines each), with the time each was read."""
        self.stats = ReplayStats()
        if self.format == "csv":
            yield from self._csv_chunks()
        else:
            yield from self._jsonl_chunks()

    # --- JSON lines of WebSocket frames ----------------------------------------------------------

    def _jsonl_chunks(self) -> Iterator[tuple[Batch, int]]:
        lineno = 0
        with _open_binary(self.path) as stream:
            while lines := stream.readlines(_READ_HINT):
                if lineno == 0:
                    lines[0] = lines[0].removeprefix(_UTF8_BOM)
                read_at = now_ms()
                yield self._frames(lines, lineno, read_at), read_at
                lineno += len(lines)
        self.stats.lines = lineno

    def _frames(self, lines: list[bytes], lineno: int, now: int) -> Batch:
        """The trades and dead letters of a chunk of frame lines (``lineno``: lines before it).

        One loop with everything in locals: this is the hot path of a replay at full speed.
        """
        stats = self.stats
        skipped = stats.skipped
        prefix = self.where_prefix
        out: Batch = []
        append = out.append
        trades = 0
        for line in lines:
            lineno += 1
            frame, received_at = (line, now) if line.startswith(b"{") else _split_capture_line(line, now)
            if frame is None:
                if line.strip():
                    skipped["request"] = skipped.get("request", 0) + 1
                continue
            parsed = parse_ws_frame(
                frame, received_at=received_at, origin="replay", where=f"{prefix}:{lineno}"
            )
            kind = parsed.kind
            if kind is _TRADES:
                for item in parsed.items:
                    if type(item) is Trade:
                        trades += 1
                    else:
                        stats.dead_letters += 1
                    append(item)
            elif kind is _INVALID:
                reason = "; ".join(dl.reason for dl in parsed.items if isinstance(dl, DeadLetter))
                append(DeadLetter.of(line.rstrip(b"\r\n"), reason=reason, where=f"{prefix}:{lineno}", at=now))
                stats.dead_letters += 1
            else:
                skipped[kind.value] = skipped.get(kind.value, 0) + 1
        stats.trades += trades
        return out

    # --- OKX trade-history CSV -------------------------------------------------------------------

    def _csv_chunks(self) -> Iterator[tuple[Batch, int]]:
        columns: _CsvColumns | None = None
        lineno = 0
        with (
            _open_binary(self.path) as binary,
            io.TextIOWrapper(binary, encoding="utf-8-sig", errors="replace", newline="") as text,
        ):
            while lines := text.readlines(_READ_HINT):
                start = 0
                if columns is None:  # the header is the first non-blank line
                    while start < len(lines) and not lines[start].strip():
                        start += 1
                    if start < len(lines):
                        columns = _CsvColumns.from_header(lines[start].rstrip("\r\n"))
                        start += 1
                if columns is not None:
                    read_at = now_ms()
                    yield (
                        self._rows(columns, lines[start:] if start else lines, lineno + start, read_at),
                        read_at,
                    )
                lineno += len(lines)
        self.stats.lines = lineno

    def _rows(self, columns: _CsvColumns, lines: list[str], lineno: int, now: int) -> Batch:
        """The trades and dead letters of a chunk of CSV lines (``lineno``: lines before it)."""
        prefix = self.where_prefix
        out: Batch = []
        append = out.append
        trade_of = columns.trade
        dead = 0
        for line in lines:
            lineno += 1
            line = line.rstrip("\r\n")
            result = trade_of(line, now)
            if isinstance(result, str):
                if not line.strip():
                    continue
                append(DeadLetter(reason=result, where=f"{prefix}:{lineno}", at=now, raw=line))
                dead += 1
            else:
                append(result)
        self.stats.dead_letters += dead
        self.stats.trades += len(out) - dead
        return out


def _split_capture_line(line: bytes, now: int) -> tuple[bytes | None, int]:
    """``(frame, received_at)`` of one line; frame None for a line with nothing to parse.

    Plain JSON lines are frames as they are. cryptofeed's capture lines are
    ``<recv unix s>: <frame>`` for received frames, ``<url> <- <recv>: <request>`` for our own
    requests and ``<url> <-> <time>`` for a (re)connect: the last two are not OKX's data.
    Anything else (``pong``, garbage) is passed on whole, for the parser to classify.
    """
    first = line[:1]
    if first == b"{":
        return line, now
    if not line.strip():
        return None, now
    if first.isdigit():
        head, sep, rest = line.partition(b": ")
        if sep:
            try:
                return rest, int(float(head) * 1000)
            except (ValueError, OverflowError):  # not a time after all ("1e999: ..." included)
                pass
        return line, now
    if line.startswith((b"wss://", b"ws://", b"https://", b"http://")):
        url, sep, rest = line.partition(b" -> ")
        if sep and b" " not in url.strip():
            return _split_capture_line(rest, now)
        return None, now
    return line.rstrip(b"\r\n"), now


class _CsvColumns:
    """Where each field is in an OKX trade-history CSV row (from the header) and how to read a row.

    ``layout`` is (width, instrument_name, trade_id, side, price, size, created_time, count)
    as column indexes, count -1 when absent: one tuple, unpacked once per row.
    """

    __slots__ = ("layout",)

    def __init__(self, layout: tuple[int, int, int, int, int, int, int, int]) -> None:
        self.layout = layout

    @classmethod
    def from_header(cls, header: str) -> _CsvColumns:
        names = [name.strip().strip('"').lower() for name in next(csv.reader([header]))]
        missing = [name for name in CSV_COLUMNS if name not in names]
        if missing:
            msg = f"CSV header {header!r} lacks the column(s) {', '.join(missing)} (need {', '.join(CSV_COLUMNS)})"
            raise ValueError(msg)
        index = names.index
        return cls(
            (
                len(names),
                *(index(name) for name in CSV_COLUMNS),
                index("count") if "count" in names else -1,
            )  # type: ignore[arg-type]
        )

    def trade(self, line: str, received_at: int) -> Trade | str:
        """The row as a trade, or the reason it is not one. (Hot path: fields in locals.)"""
        width, i_inst, i_id, i_side, i_px, i_sz, i_ts, i_count = self.layout
        fields = line.split(",") if '"' not in line else next(csv.reader([line]))
        if len(fields) != width:
            return f"expected {width} fields as in the header, got {len(fields)}"
        # isdigit() alone also takes non-ASCII digits, which int() would read: check ASCII once.
        ascii_line = line.isascii()
        trade_id = fields[i_id]
        if not (
            trade_id.isdigit() and len(trade_id) <= _MAX_ID_DIGITS and (ascii_line or trade_id.isascii())
        ):
            return f"trade_id: {trade_id!r} is not a non-negative integer"
        created = fields[i_ts]
        if not (created.isdigit() and len(created) <= _MAX_ID_DIGITS and (ascii_line or created.isascii())):
            return f"created_time: {created!r} is not an integer (epoch ms)"
        ts = int(created)
        if not MIN_TS_MS <= ts < MAX_TS_MS:
            return f"created_time: {ts} is outside 2010-01-01..2100-01-01 in epoch ms (wrong unit?)"
        side = fields[i_side]
        if side not in _SIDES:
            side = side.strip().lower()
            if side not in _SIDES:
                return f"side: {fields[i_side]!r} is not 'buy' or 'sell'"
        count = 1
        if i_count >= 0 and fields[i_count]:
            text = fields[i_count]
            if not (
                text.isdigit()
                and text.isascii()
                and len(text) <= _MAX_ID_DIGITS
                and 1 <= int(text) <= MAX_COUNT
            ):
                return f"count: {text!r} is not a positive integer (at most {MAX_COUNT})"
            count = int(text)
        trade = Trade(
            fields[i_inst],
            int(trade_id),
            fields[i_px],
            fields[i_sz],
            side,  # type: ignore[arg-type]  # checked against _SIDES above
            ts,
            "replay",
            received_at,
            count,
        )
        return trade_problem(trade) or trade
