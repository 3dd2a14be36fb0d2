"""What every service tells the outside: Prometheus metrics and structured logs.

* :func:`serve_metrics` starts this process's ``/metrics`` endpoint (prometheus-client) on
  ``TCP_METRICS_PORT`` (0: a free port) and announces it in ``<home>/run/metrics-<service>-<pid>.json``
  so that ``tcp services status`` finds and reads every running service of a home.
* :func:`configure_logging`: text lines, or with ``TCP_LOG_FORMAT=json`` one JSON object per line
  with ``ts``, ``level``, ``service``, ``logger``, ``msg``, ``inst_id`` and ``bot`` (null when the
  line is not about one; code passes them with ``extra={"inst_id": ...}``).
* The metrics below are the whole vocabulary; the code that counts imports them from here.
  Counters are bumped per batch, never per trade, so they cost nothing measurable.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from tcp.config import Settings
from tcp.services import pid_alive

__all__ = [
    "BOT_EQUITY",
    "BOT_HEARTBEAT",
    "BOT_REALIZED_PNL",
    "CANDLES_OUT",
    "CONSUMER_LAG",
    "DEAD_LETTERS",
    "DUPLICATES",
    "LATE_TRADES",
    "SINK_ROWS",
    "SINK_SECONDS",
    "TRADES_IN",
    "Endpoint",
    "JsonFormatter",
    "configure_logging",
    "endpoints",
    "samples",
    "scrape",
    "serve_metrics",
    "watch_counts",
]

TRADES_IN = Counter(
    "tcp_trades_in", "Valid trades taken in (ingest: produced; dataflows: consumed)", ["inst_id"]
)
DUPLICATES = Counter(
    "tcp_duplicates", "Trades dropped by the ingest as duplicates (same inst_id and trade id)"
)
DEAD_LETTERS = Counter(
    "tcp_dead_letters", "Messages sent to a dead-letter topic, with their reason", ["topic"]
)
LATE_TRADES = Counter("tcp_late_trades", "Trades later than the allowed lateness", ["inst_id"])
CANDLES_OUT = Counter(
    "tcp_candles_out", "Final candles emitted (revisions included)", ["inst_id", "timeframe"]
)
SINK_ROWS = Histogram(
    "tcp_sink_batch_rows", "Rows per sink write", ["sink"], buckets=(1, 10, 100, 1_000, 10_000, 100_000)
)
SINK_SECONDS = Histogram("tcp_sink_write_seconds", "Time per sink write (retries included)", ["sink"])
CONSUMER_LAG = Gauge("tcp_consumer_lag", "Messages behind the partition's end", ["topic", "partition"])
BOT_HEARTBEAT = Gauge(
    "tcp_bot_heartbeat_seconds", "Wall-clock time of the bot's last status (epoch s)", ["bot"]
)
BOT_EQUITY = Gauge("tcp_bot_equity", "The bot's equity at its last candle (quote currency)", ["bot"])
BOT_REALIZED_PNL = Gauge("tcp_bot_realized_pnl", "The bot's realized P&L (quote currency)", ["bot"])


class _Counts(Collector):
    """Counters read from a live object at scrape time (e.g. the ingest's running stats)."""

    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, value in self._read().items():
            yield CounterMetricFamily(name, f"{name} (read from the running service)", value=value)


def watch_counts(read: Callable[[], dict[str, float]]) -> Callable[[], None]:
    """Publish the counters ``read()`` returns (names without ``_total``) at every scrape;
    returns the function that stops publishing them."""
    collector = _Counts(read)
    REGISTRY.register(collector)
    return lambda: REGISTRY.unregister(collector)


# --------------------------------------------------------------------------------------------
# The endpoint


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A running service's metrics endpoint, as announced in ``<home>/run/``."""

    service: str
    pid: int
    port: int
    started: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"


def _run_dir(settings: Settings) -> Path:
    return settings.home.resolve() / "run"


_serving: Endpoint | None = None


def serve_metrics(service: str, settings: Settings) -> Endpoint | None:
    """Serve this process's metrics (``TCP_METRICS_PORT``; 0 picks a free port) and announce
    the endpoint until the process exits. ``None`` when ``TCP_METRICS=false``. One endpoint per
    process: a second call returns the first one."""
    global _serving
    if not settings.metrics:
        return None
    if _serving is not None:
        return _serving
    server, _thread = start_http_server(settings.metrics_port, addr=settings.metrics_addr)
    endpoint = Endpoint(service, os.getpid(), server.server_port, datetime.now(tz=UTC).isoformat())
    run = _run_dir(settings)
    run.mkdir(parents=True, exist_ok=True)
    path = run / f"metrics-{service}-{endpoint.pid}.json"
    path.write_text(json.dumps({"service": service, "pid": endpoint.pid, "port": endpoint.port,
                                "started": endpoint.started}))  # fmt: skip
    atexit.register(path.unlink, missing_ok=True)
    logging.getLogger(__name__).info("%s: metrics on port %d", service, endpoint.port)
    _serving = endpoint
    return endpoint


def endpoints(settings: Settings) -> list[Endpoint]:
    """The metrics endpoints of the running services of this home (stale announcements of
    processes that died are removed)."""
    found = []
    run = _run_dir(settings)
    for path in sorted(run.glob("metrics-*.json")) if run.is_dir() else []:
        try:
            data = json.loads(path.read_text())
            endpoint = Endpoint(
                str(data["service"]), int(data["pid"]), int(data["port"]), str(data["started"])
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if pid_alive(endpoint.pid):
            found.append(endpoint)
        else:
            path.unlink(missing_ok=True)
    return found


def samples(endpoint: Endpoint, *, timeout: float = 2.0) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of the endpoint: (name, labels, value)."""
    with urllib.request.urlopen(endpoint.url, timeout=timeout) as response:  # noqa: S310 - our own loopback URL
        text = response.read().decode()
    return [
        (sample.name, dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def scrape(endpoint: Endpoint, *, timeout: float = 2.0) -> dict[str, float]:
    """Every sample of the endpoint summed over its labels, by sample name (``tcp_trades_in_total``)."""
    totals: dict[str, float] = {}
    for name, _labels, value in samples(endpoint, timeout=timeout):
        totals[name] = totals.get(name, 0.0) + value
    return totals


# --------------------------------------------------------------------------------------------
# Logs

#: The context fields of every JSON line (null when a line is not about one).
CONTEXT = ("inst_id", "bot")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ms), level, service, logger, msg, inst_id, bot[, exc]."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in CONTEXT:
            data[key] = getattr(record, key, None)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure_logging(service: str, settings: Settings, *, verbose: bool = False) -> None:
    """Set up the root logger for ``service``: text (the default) or JSON lines, on stderr.
    Like ``logging.basicConfig``, it leaves a root logger that has handlers already alone."""
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = logging.DEBUG if verbose else getattr(logging, settings.log_level)
    logging.basicConfig(level=level, handlers=[handler])


def summary_rows(values: Iterable[tuple[Endpoint, dict[str, float] | str]]) -> list[str]:
    """``tcp services status``'s lines for the running services: the figures that matter."""
    lines = [f"{'service':<12}{'pid':<8}{'port':<7}figures"]
    for endpoint, totals in values:
        if isinstance(totals, str):
            lines.append(f"{endpoint.service:<12}{endpoint.pid:<8}{endpoint.port:<7}unreachable: {totals}")
            continue
        shown = [
            (label, totals.get(name))
            for label, name in (
                ("trades in", "tcp_trades_in_total"),
                ("duplicates", "tcp_duplicates_total"),
                ("dead letters", "tcp_dead_letters_total"),
                ("late", "tcp_late_trades_total"),
                ("candles out", "tcp_candles_out_total"),
                ("sink rows", "tcp_sink_batch_rows_sum"),
                ("lag", "tcp_consumer_lag"),
                ("reconnects", "tcp_reconnects_total"),
                ("backfilled", "tcp_backfilled_trades_total"),
                ("bots equity", "tcp_bot_equity"),
            )
        ]
        text = "  ".join(f"{label} {value:,.0f}" for label, value in shown if value is not None)
        lines.append(f"{endpoint.service:<12}{endpoint.pid:<8}{endpoint.port:<7}{text or '-'}")
    return lines
