"""OKX v5: live trades over WebSocket (``OkxTradeSource``), REST backfill, and the frame parser.

Everything OKX-shaped stays in this package; what leaves it is ``Trade`` and ``DeadLetter``.
"""

from connectors.okx.parse import FrameKind, RestError, RestTrades, WsFrame, parse_rest_trades, parse_ws_frame
from connectors.okx.rest import OkxRestClient, OkxRestError
from connectors.okx.ws import OkxSourceError, OkxStats, OkxTradeSource, subscribe_requests

__all__ = [
    "FrameKind",
    "OkxRestClient",
    "OkxRestError",
    "OkxSourceError",
    "OkxStats",
    "OkxTradeSource",
    "RestError",
    "RestTrades",
    "WsFrame",
    "parse_rest_trades",
    "parse_ws_frame",
    "subscribe_requests",
]
