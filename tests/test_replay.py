"""connectors.replay: OKX frame files (plain and cryptofeed captures) and trade-history CSVs.

Fixtures are written here in the shapes of real OKX frames (2022 captures without count,
source and seqId; 2025 pushes with them), mixed with acks, tickers, books, pong and garbage.
The end-to-end test replays into the real Kafka of the ``settings`` fixture.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from pathlib import Path
from typing import Any

import pytest

from connectors.ingest import run_ingest
from connectors.replay import EventClock, ReplaySource, detect_format
from tcp import topics
from tcp.config import Settings
from tcp.schemas import DeadLetter, Trade, decode_dead_letter, decode_trade
from tests.kafka_util import read_topic

T0 = 1_735_689_600_000  # 2025-01-01T00:00:00Z


# --- fixture builders ------------------------------------------------------------------------------


def push_2025(
    inst_id: str, trade_id: int, px: str, sz: str, side: str, ts: int, count: int = 1, **extra: Any
) -> str:
    """A ``trades`` push as OKX sends it since 2023: count, source and seqId included."""
    item = {
        "instId": inst_id,
        "tradeId": str(trade_id),
        "px": px,
        "sz": sz,
        "side": side,
        "ts": str(ts),
        "count": str(count),
        "source": "0",
        "seqId": trade_id * 10,
    }
    item.update(extra)
    return json.dumps(
        {"arg": {"channel": "trades", "instId": inst_id}, "data": [item]}, separators=(",", ":")
    )


def push_2022(inst_id: str, trade_id: int, px: str, sz: str, side: str, ts: int) -> str:
    """A ``trades`` push as captured in 2022: only instId, tradeId, px, sz, side, ts."""
    item = {"instId": inst_id, "tradeId": str(trade_id), "px": px, "sz": sz, "side": side, "ts": str(ts)}
    return json.dumps(
        {"arg": {"channel": "trades", "instId": inst_id}, "data": [item]}, separators=(",", ":")
    )


ACK = '{"event":"subscribe","arg":{"channel":"trades","instId":"BTC-USDT"},"connId":"a4d3ae55"}'
ACK_2022 = '{"event":"subscribe","arg":{"channel":"tickers","instId":"BTC-USDT"}}'
TICKER = (
    '{"arg":{"channel":"tickers","instId":"BTC-USDT"},"data":[{"instType":"SPOT","instId":"BTC-USDT",'
    '"last":"94000.1","lastSz":"0.01","askPx":"94000.2","askSz":"1","bidPx":"94000.1","bidSz":"2",'
    '"ts":"1735689600100"}]}'
)
BOOK = (
    '{"arg":{"channel":"books","instId":"BTC-USDT"},"action":"update","data":[{"asks":[["94000.2","0.5","0","1"]],'
    '"bids":[],"ts":"1735689600200","checksum":-123456}]}'
)
ERROR = '{"event":"error","code":"60018","msg":"Wrong URL or channel:trades,instId:FOO-USDT doesn\'t exist."}'
NOTICE = '{"event":"notice","code":"64008","msg":"The connection will soon be closed for a service upgrade.","connId":"x"}'


def write_lines(path: Path, lines: list[str]) -> Path:
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as out:
            out.write("\n".join(lines) + "\n")
    else:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def replay_all(source: ReplaySource) -> list[Trade | DeadLetter]:
    return [item for batch in source.iter_batches() for item in batch]


def trades_of(items: list[Trade | DeadLetter]) -> list[Trade]:
    return [item for item in items if isinstance(item, Trade)]


def dead_of(items: list[Trade | DeadLetter]) -> list[DeadLetter]:
    return [item for item in items if isinstance(item, DeadLetter)]


# A mixed file: line numbers in comments, used by the assertions below.
MIXED = [
    ACK,  # 1
    ACK_2022,  # 2
    push_2022("BTC-USDT", 338476307, "30236", "0.0002", "buy", T0),  # 3
    TICKER,  # 4
    "",  # 5 blank
    push_2025("BTC-USDT", 338476310, "30243.5", "0.001", "buy", T0 + 5, count=3),  # 6
    BOOK,  # 7
    "pong",  # 8
    "this is not json",  # 9
    push_2025("ETH-USDT", 7001, "3350.01", "0.5", "sell", T0 + 5),  # 10
    push_2025("ETH-USDT", 7002, "-1", "0.5", "sell", T0 + 6),  # 11 invalid px
    '{"arg":{"channel":"trades","instId":"ETH-USDT"},"data":[{"instId":"ETH-USDT"',  # 12 truncated
    ERROR,  # 13
    NOTICE,  # 14
    push_2025("PEPE-USDT", 55, "0.00001001", "1500000", "buy", T0 + 7),  # 15
    "[1,2,3]",  # 16 not an object
    push_2022("BTC-USDT", 338476311, "30243.6", "0.5", "sell", T0 + 9),  # 17
]


# --- JSON lines --------------------------------------------------------------------------------------


def test_jsonl_trades_come_out_in_order_and_the_rest_is_skipped_or_dead_lettered(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "mixed.jsonl", MIXED)
    source = ReplaySource(path)
    items = replay_all(source)

    trades = trades_of(items)
    assert [(t.inst_id, t.trade_id) for t in trades] == [
        ("BTC-USDT", 338476307),
        ("BTC-USDT", 338476310),
        ("ETH-USDT", 7001),
        ("PEPE-USDT", 55),
        ("BTC-USDT", 338476311),
    ]
    assert all(t.origin == "replay" for t in trades)
    old, new = trades[0], trades[1]
    assert (old.px, old.sz, old.side, old.ts, old.count, old.source, old.seq_id) == (
        "30236",
        "0.0002",
        "buy",
        T0,
        1,
        0,
        None,
    )
    assert (new.px, new.sz, new.count, new.seq_id) == ("30243.5", "0.001", 3, 3384763100)
    assert trades[3].px == "0.00001001"  # exact decimal string kept

    dead = dead_of(items)
    where = {d.where: d for d in dead}
    prefix = f"replay:{path}"
    assert set(where) == {f"{prefix}:9", f"{prefix}:11", f"{prefix}:12", f"{prefix}:16"}
    assert "invalid JSON" in where[f"{prefix}:9"].reason
    assert where[f"{prefix}:9"].raw == "this is not json"
    assert "px" in where[f"{prefix}:11"].reason
    assert "invalid JSON" in where[f"{prefix}:12"].reason
    assert "object" in where[f"{prefix}:16"].reason
    # Dead letters stay in file order among the trades.
    assert [type(i).__name__ for i in items] == [
        "Trade",
        "Trade",
        "DeadLetter",
        "Trade",
        "DeadLetter",
        "DeadLetter",
        "Trade",
        "DeadLetter",
        "Trade",
    ]

    stats = source.stats
    assert stats.lines == len(MIXED)
    assert (stats.trades, stats.dead_letters) == (5, 4)
    assert stats.skipped == {"subscribed": 2, "ignored": 2, "pong": 1, "error": 1, "notice": 1}


def test_one_bad_item_in_a_push_does_not_sink_its_neighbours(tmp_path: Path) -> None:
    good = {"instId": "SOL-USDT", "tradeId": "10", "px": "190.01", "sz": "1", "side": "buy", "ts": str(T0)}
    bad = dict(good, tradeId="11", side="hold")
    line = json.dumps({"arg": {"channel": "trades", "instId": "SOL-USDT"}, "data": [good, bad]})
    items = replay_all(ReplaySource(write_lines(tmp_path / "one.jsonl", [line])))
    assert [type(i) for i in items] == [Trade, DeadLetter]
    dead = items[1]
    assert isinstance(dead, DeadLetter)
    assert "side" in dead.reason
    assert dead.where.endswith("one.jsonl:1")


def test_cryptofeed_capture_lines_give_receive_times_and_requests_are_skipped(tmp_path: Path) -> None:
    url = "wss://ws.okx.com:8443/ws/v5/public"
    lines = [
        f"{url} <-> 1735689599.5",
        f'{url} <- 1735689599.6: {{"op":"subscribe","args":[{{"channel":"trades","instId":"BTC-USDT"}}]}}',
        f"1735689599.7037491: {ACK_2022}",
        f"1735689600.1234567: {push_2022('BTC-USDT', 1, '94000', '0.01', 'buy', T0)}",
        f"1735689600.2: {TICKER}",
        "1735689600.3: {garbage",
        f"1735689600.4: {push_2025('BTC-USDT', 2, '94000.1', '0.02', 'sell', T0 + 300)}",
    ]
    source = ReplaySource(write_lines(tmp_path / "OKX.ws.1.0", lines))
    items = replay_all(source)
    trades = trades_of(items)
    assert [t.trade_id for t in trades] == [1, 2]
    assert [t.received_at for t in trades] == [1_735_689_600_123, 1_735_689_600_400]
    (dead,) = dead_of(items)
    assert dead.where.endswith(":6")
    assert dead.raw == "1735689600.3: {garbage"  # the whole line, as it was in the file
    assert source.stats.skipped == {"request": 2, "subscribed": 1, "ignored": 1}


def test_the_real_capture_shape_replays(tmp_path: Path) -> None:
    """Like the 2022 cryptofeed capture: CRLF line ends, 2022 trades among tickers and books."""
    lines = [
        f"1652459225.5072603: {push_2022('BTC-USDT', 338476307, '30236', '0.0002', 'buy', 1652459224818)}",
        f"1652459226.1638422: {push_2022('BTC-USDT', 338476308, '30243.5', '0.001', 'buy', 1652459226050)}",
        f"1652459226.1639628: {push_2022('BTC-USDT', 338476309, '30243.5', '0.0002', 'buy', 1652459226050)}",
    ]
    path = tmp_path / "capture.txt"
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    items = replay_all(ReplaySource(path))
    assert [t.trade_id for t in trades_of(items)] == [338476307, 338476308, 338476309]
    assert not dead_of(items)


def test_gzip_is_read_by_name_or_by_magic_bytes(tmp_path: Path) -> None:
    plain = replay_all(ReplaySource(write_lines(tmp_path / "a.jsonl", MIXED)))
    packed = replay_all(ReplaySource(write_lines(tmp_path / "a.jsonl.gz", MIXED)))
    unnamed = tmp_path / "a.bin"
    unnamed.write_bytes((tmp_path / "a.jsonl.gz").read_bytes())
    disguised = replay_all(ReplaySource(unnamed))

    def strip(items: list[Trade | DeadLetter]) -> list[Any]:
        return [i if isinstance(i, Trade) else (i.reason, i.where.rsplit(":", 1)[1]) for i in items]

    def without_received_at(items: list[Any]) -> list[Any]:
        return [(i.inst_id, i.trade_id, i.px, i.ts) if isinstance(i, Trade) else i for i in items]

    assert without_received_at(strip(packed)) == without_received_at(strip(plain))
    assert without_received_at(strip(disguised)) == without_received_at(strip(plain))


def test_batches_are_bounded(tmp_path: Path) -> None:
    lines = [push_2025("BTC-USDT", i, "94000", "0.01", "buy", T0 + i) for i in range(1, 2501)]
    source = ReplaySource(write_lines(tmp_path / "many.jsonl", lines), batch_size=1000)
    sizes = [len(batch) for batch in source.iter_batches()]
    assert sum(sizes) == 2500
    assert max(sizes) <= 1000


# --- CSV ---------------------------------------------------------------------------------------------


def test_csv_with_reordered_columns_optional_count_and_bad_rows(tmp_path: Path) -> None:
    rows = [
        "\ufeffcreated_time,side,price,instrument_name,size,trade_id,count",  # 1 header (with BOM)
        f"{T0},buy,94000.1,BTC-USDT,0.01,100,1",  # 2
        f"{T0 + 1},sell,94000,BTC-USDT,0.02,103,3",  # 3
        "",  # 4 blank
        f"{T0 + 2},SELL,94000,BTC-USDT,0.02,104,",  # 5 upper-case side, empty count -> 1
        f"{T0 + 3},hold,94000,BTC-USDT,0.02,105,1",  # 6 bad side
        f"{T0 // 1000},buy,94000,BTC-USDT,0.02,106,1",  # 7 seconds, not ms
        f"{T0 + 4},buy,abc,BTC-USDT,0.02,107,1",  # 8 bad price
        f"{T0 + 5},buy,94000,BTC-USDT,0.02",  # 9 too few fields
        f"{T0 + 6},buy,94000,BTC-USDT,0.02,-5,1",  # 10 bad id
        f"{T0 + 7},buy,94000,btc-usdt,0.02,108,1",  # 11 bad instrument id
        f"{T0 + 8},buy,94000,BTC-USDT,0.02,109,0",  # 12 count 0
        f'{T0 + 9},buy,"94000.5",ETH-USDT,0.5,200,2',  # 13 quoted field
        f"{T0 + 10},buy,94000,BTC-USDT,0.02,110,2147483648",  # 14 count beyond trades.count (integer)
    ]
    path = tmp_path / "BTC-USDT-trades.csv"
    path.write_text("\r\n".join(rows) + "\r\n", encoding="utf-8")
    source = ReplaySource(path)
    assert source.format == "csv"
    items = replay_all(source)

    trades = trades_of(items)
    assert [(t.inst_id, t.trade_id, t.px, t.sz, t.side, t.ts, t.count) for t in trades] == [
        ("BTC-USDT", 100, "94000.1", "0.01", "buy", T0, 1),
        ("BTC-USDT", 103, "94000", "0.02", "sell", T0 + 1, 3),
        ("BTC-USDT", 104, "94000", "0.02", "sell", T0 + 2, 1),
        ("ETH-USDT", 200, "94000.5", "0.5", "buy", T0 + 9, 2),
    ]
    assert all(t.origin == "replay" for t in trades)

    dead = {d.where.rsplit(":", 1)[1]: d for d in dead_of(items)}
    assert set(dead) == {"6", "7", "8", "9", "10", "11", "12", "14"}
    assert "side" in dead["6"].reason
    assert "created_time" in dead["7"].reason
    assert "px" in dead["8"].reason
    assert "fields" in dead["9"].reason
    assert "trade_id" in dead["10"].reason
    assert "inst_id" in dead["11"].reason
    assert "count" in dead["12"].reason
    assert dead["14"].reason == "count: '2147483648' is not a positive integer (at most 2147483647)"
    assert dead["8"].raw == f"{T0 + 4},buy,abc,BTC-USDT,0.02,107,1"
    assert source.stats.trades == 4
    assert source.stats.dead_letters == 8


def test_csv_without_count_and_gzipped(tmp_path: Path) -> None:
    rows = ["instrument_name,trade_id,side,price,size,created_time"]
    rows += [f"DOGE-USDT,{i},buy,0.3201,{i}.5,{T0 + i}" for i in range(1, 101)]
    items = replay_all(ReplaySource(write_lines(tmp_path / "doge.csv.gz", rows)))
    trades = trades_of(items)
    assert [t.trade_id for t in trades] == list(range(1, 101))
    assert all(t.count == 1 for t in trades)
    assert trades[0].sz == "1.5"


def test_csv_missing_a_column_is_refused(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "bad.csv", ["instrument_name,trade_id,side,price,created_time", "BTC-USDT,1,buy,1,1"]
    )
    with pytest.raises(ValueError, match="size"):
        replay_all(ReplaySource(path))


def test_format_detection() -> None:
    assert detect_format(b'{"event":"subscribe"}') == "jsonl"
    assert detect_format(b"1652459225.5037491: {}") == "jsonl"
    assert detect_format(b"wss://ws.okx.com:8443/ws/v5/public <-> 1652459224.53") == "jsonl"
    assert detect_format(b"instrument_name,trade_id,side,price,size,created_time") == "csv"
    assert detect_format(b'"trade_id","instrument_name"') == "csv"
    assert detect_format(b"garbage") == "jsonl"


# --- pacing ------------------------------------------------------------------------------------------


async def _collect(source: ReplaySource) -> tuple[list[Trade | DeadLetter], float]:
    started = time.monotonic()
    items = [item async for batch in source.batches() for item in batch]
    return items, time.monotonic() - started


def test_speed_paces_by_event_time_without_rewriting_it(tmp_path: Path) -> None:
    # 41 trades over 2 s of event time, plus a garbage line in the middle.
    lines = [push_2025("BTC-USDT", i, "94000", "0.01", "buy", T0 + i * 50) for i in range(1, 42)]
    lines.insert(20, "garbage")
    path = write_lines(tmp_path / "paced.jsonl", lines)

    fast, fast_s = asyncio.run(_collect(ReplaySource(path)))
    very_fast, very_fast_s = asyncio.run(_collect(ReplaySource(path, speed=1000)))  # 2 ms of pacing
    paced, paced_s = asyncio.run(_collect(ReplaySource(path, speed=5)))  # 0.4 s of pacing

    def view(items: list[Trade | DeadLetter]) -> list[Any]:
        return [(i.trade_id, i.ts) if isinstance(i, Trade) else i.reason for i in items]

    assert view(paced) == view(fast) == view(very_fast)  # same items, same order, same event times
    assert very_fast_s < 1.5
    assert paced_s >= 0.3
    assert paced_s > fast_s
    assert paced_s < 10


def test_paced_batches_are_cut_where_the_clock_waits(tmp_path: Path) -> None:
    # Two bursts of 5 trades, 1 s apart in event time: at speed 10 the source waits ~0.1 s once.
    lines = [push_2025("BTC-USDT", i, "94000", "0.01", "buy", T0) for i in range(1, 6)]
    lines += [push_2025("BTC-USDT", i, "94000", "0.01", "buy", T0 + 1000) for i in range(6, 11)]
    source = ReplaySource(write_lines(tmp_path / "bursts.jsonl", lines), speed=10)

    async def batches() -> list[list[int]]:
        return [[i.trade_id for i in batch if isinstance(i, Trade)] async for batch in source.batches()]

    assert asyncio.run(batches()) == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]


def test_paced_trades_are_stamped_when_sent_unless_the_file_says_when_they_were_received(
    tmp_path: Path,
) -> None:
    lines = [push_2025("BTC-USDT", i, "94000", "0.01", "buy", T0 + i * 100) for i in range(1, 6)]
    lines += [f"1735689600.9: {push_2025('BTC-USDT', 6, '94000', '0.01', 'buy', T0 + 600)}"]
    source = ReplaySource(write_lines(tmp_path / "stamps.jsonl", lines), speed=2)
    before = int(time.time() * 1000)
    items, _ = asyncio.run(_collect(source))
    trades = trades_of(items)
    stamps = [t.received_at for t in trades[:5]]
    assert stamps == sorted(stamps)
    assert stamps[0] >= before
    assert stamps[4] - stamps[0] >= 150  # 400 ms of event time at 2x, sent as it became due
    assert trades[5].received_at == 1_735_689_600_900


def test_a_utf8_bom_before_the_first_frame_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + push_2025("BTC-USDT", 1, "94000", "0.01", "buy", T0).encode() + b"\n")
    items = replay_all(ReplaySource(path))
    assert [type(i) for i in items] == [Trade]


def test_event_clock() -> None:
    clock = EventClock(speed=2.0)
    assert clock.wait_s(T0) == 0.0  # the first event anchors the clock
    assert 0.4 < clock.wait_s(T0 + 1000) <= 0.5  # 1 s of event time at 2x
    assert clock.wait_s(T0 - 5000) == 0.0  # earlier than the anchor: due at once
    with pytest.raises(ValueError):
        EventClock(speed=0)
    with pytest.raises(ValueError):
        ReplaySource("x.jsonl", speed=-1)


# --- end to end: replay -> run_ingest -> Kafka ---------------------------------------------------------


def test_replay_into_kafka_every_trade_once_every_garbage_line_in_the_dlq(
    tmp_path: Path, settings: Settings
) -> None:
    lines = list(MIXED)
    # A reconnect: OKX acks again and re-sends the last trade, which ingest must de-duplicate.
    lines += [ACK, push_2022("BTC-USDT", 338476311, "30243.6", "0.5", "sell", T0 + 9)]
    lines += [
        push_2025("SOL-USDT", 900 + i, "190.0" + str(i), "1.5", "buy", T0 + 10 + i) for i in range(1, 10)
    ]
    path = write_lines(tmp_path / "e2e.jsonl.gz", lines)

    stats = asyncio.run(run_ingest(ReplaySource(path), settings))
    assert (stats.trades, stats.duplicates, stats.dead_letters) == (14, 1, 4)

    trades = [decode_trade(m.value() or b"") for m in read_topic(settings, topics.TRADES, expect=14)]
    keys = sorted((t.inst_id, t.trade_id) for t in trades)
    assert len(keys) == len(set(keys)) == 14
    expected = {("BTC-USDT", 338476307), ("BTC-USDT", 338476310), ("BTC-USDT", 338476311)}
    expected |= {("ETH-USDT", 7001), ("PEPE-USDT", 55)} | {("SOL-USDT", 900 + i) for i in range(1, 10)}
    assert set(keys) == expected
    assert all(t.origin == "replay" for t in trades)

    dead = [decode_dead_letter(m.value() or b"") for m in read_topic(settings, topics.DLQ, expect=4)]
    by_line = {d.where.rsplit(":", 1)[1]: d for d in dead}
    assert set(by_line) == {"9", "11", "12", "16"}
    assert all(d.where.startswith(f"replay:{path}:") for d in dead)
    assert by_line["9"].raw == "this is not json"
    assert "invalid JSON" in by_line["9"].reason
    assert "px" in by_line["11"].reason
