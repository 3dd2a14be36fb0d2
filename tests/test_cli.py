"""The `tcp` command end to end, as a user runs it (subprocesses, real services)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow.parquet as pq

from tcp.config import Settings
from tests.env_util import tcp_env
from tests.kafka_util import read_topic

ROOT = Path(__file__).resolve().parent.parent


def _env(settings: Settings, home: Path) -> dict[str, str]:
    return tcp_env(settings, TCP_HOME=str(home))


def tcp(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tcp.cli", *args], env=env, capture_output=True, text=True, timeout=180
    )


def _frame(inst: str, trade_id: int, px: str, ts: int) -> str:
    data = {"instId": inst, "tradeId": str(trade_id), "px": px, "sz": "0.5", "side": "buy", "ts": str(ts)}
    return json.dumps({"arg": {"channel": "trades", "instId": inst}, "data": [data]})


def test_ingest_replay_then_dlq_shows_reasons(services_settings: Settings, tmp_path: Path) -> None:
    settings = services_settings.model_copy(update={"topic_prefix": f"cli-{uuid.uuid4().hex[:8]}."})
    lines = [
        '{"event":"subscribe","arg":{"channel":"trades","instId":"BTC-USDT"},"connId":"a1"}',
        _frame("BTC-USDT", 1, "42000.1", 1_700_000_000_000),
        "this is not json",
        _frame("BTC-USDT", 2, "-5", 1_700_000_000_001),  # negative price
        _frame("BTC-USDT", 3, "42000.3", 1_700_000_000_002),
        _frame("BTC-USDT", 3, "42000.3", 1_700_000_000_002),  # duplicate
    ]
    path = tmp_path / "frames.jsonl"
    path.write_text("\n".join(lines) + "\n")
    env = _env(settings, tmp_path / "home")

    result = tcp(env, "ingest", "replay", str(path))
    assert result.returncode == 0, result.stderr
    assert (
        "trades 2" in result.stderr and "duplicates 1" in result.stderr and "dead letters 2" in result.stderr
    )

    trades = read_topic(settings, "okx.trades", expect=2)
    assert sorted(json.loads(m.value())["trade_id"] for m in trades) == [1, 3]
    dlq = tcp(env, "dlq")
    assert dlq.returncode == 0, dlq.stderr
    assert f"{path}:3" in dlq.stdout and f"{path}:4" in dlq.stdout
    assert "px" in dlq.stdout and "2 dead letter(s) shown" in dlq.stdout


def test_ingest_simulate_counts_match_the_topic(services_settings: Settings, tmp_path: Path) -> None:
    settings = services_settings.model_copy(update={"topic_prefix": f"cli-{uuid.uuid4().hex[:8]}."})
    env = _env(settings, tmp_path / "home")
    result = tcp(
        env, "ingest", "simulate", "--trades", "400", "--rate", "max", "--instruments", "BTC-USDT,PEPE-USDT"
    )
    assert result.returncode == 0, result.stderr
    assert "trades 400" in result.stderr
    assert len(read_topic(settings, "okx.trades", expect=400)) == 400


def test_candles_build_writes_parquet_without_services(tmp_path: Path) -> None:
    csv = tmp_path / "trades.csv"
    csv.write_text(
        "instrument_name,trade_id,side,price,size,created_time\n"
        "BTC-USDT,1,buy,100.5,1,1700000000000\n"
        "BTC-USDT,2,sell,101.5,2,1700000030000\n"
        "BTC-USDT,3,buy,99.5,1,1700000120000\n"  # two minutes later: one flat candle between
    )
    out = tmp_path / "candles.parquet"
    env = tcp_env(TCP_KAFKA_BOOTSTRAP="127.0.0.1:1", TCP_HOME=str(tmp_path / "none"))  # no services used
    result = tcp(env, "candles", "build", "--input", str(csv), "--output", str(out), "--timeframes", "1m")
    assert result.returncode == 0, result.stderr
    rows = pq.read_table(out).to_pylist()
    assert [(r["trade_count"], str(r["open"]).rstrip("0"), str(r["close"]).rstrip("0")) for r in rows] == [
        (2, "100.5", "101.5"),
        (0, "101.5", "101.5"),  # flat: OHLC = previous close
        (1, "99.5", "99.5"),
    ]
    assert not (tmp_path / "none").exists()


def test_ctrl_c_flushes_everything_it_counted(services_settings: Settings, tmp_path: Path) -> None:
    import re
    import signal
    import time

    settings = services_settings.model_copy(update={"topic_prefix": f"cli-{uuid.uuid4().hex[:8]}."})
    env = _env(settings, tmp_path / "home")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tcp.cli", "ingest", "simulate", "--rate", "2000"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    counted = [int(n.replace(",", "")) for n in re.findall(r"trades ([\d,]+)", err)]
    assert counted and counted[-1] > 0
    assert len(read_topic(settings, "okx.trades", expect=counted[-1])) == counted[-1]


def test_a_dataflow_command_does_not_import_the_dashboard_or_the_backtests() -> None:
    """`tcp candles run` (a scaled-out worker) parses its command line without importing Bokeh,
    DuckDB or pyarrow: ~140 MB of RSS and ~1 s of start-up it does not need. `tcp --help` still
    lists every command."""
    probe = (
        "import sys\n"
        "from tcp import cli\n"
        "cli.build_parser(cli._command_in(['-v', 'candles', 'run', '-w', '1']))\n"
        "print(sorted(m for m in ('bokeh', 'duckdb', 'pyarrow', 'backtest.engine') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr
    usage = subprocess.run([sys.executable, "-m", "tcp.cli", "--help"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout  # fmt: skip
    for command in (
        "candles",
        "export",
        "sql",
        "backtest",
        "replay",
        "dashboard",
        "bots",
        "run",
        "db",
        "demo",
    ):
        assert command in usage
