"""The Bots page: every bot live, its controls, and a form to create one.

* The table: the ``bots`` table of PostgreSQL, read every few seconds on a worker thread, and
  patched in between by ``status:{bot}`` messages from the hub (status, position, equity, P&L).
* Start / pause / resume / stop act on the selected bots by sending commands on
  ``bots.commands`` (the bots dataflow applies them and answers on ``bots.events``). Each
  control checks on the SERVER that the session is logged in (bokeh_app/auth.py) and that the
  names are valid before anything reaches Kafka.
* Create: a strategy from the registry; its params as JSON, checked by the strategy's own config
  model, and the rest by ``BotConfig``. Problems are shown next to their field; nothing is sent
  until every field is valid.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, get_args

from bokeh.document import Document
from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource
from bokeh.models.widgets import Button, DataTable, Div, Select, TableColumn, TextInput
from pydantic import ValidationError

from bokeh_app import data
from bokeh_app.context import AppContext, choices, in_background
from bots.bot import decode_status
from bots.commands import make_command, send_commands
from bots.config import BotConfig, ConfigError, describe_validation_error, validate_strategy
from bots.lifecycle import Action
from strategies.registry import available

__all__ = ["BotsPage", "FormErrors", "check_create_form"]

log = logging.getLogger(__name__)

_COLUMNS = ("name", "state", "strategy", "inst_id", "timeframe", "position", "equity", "realized_pnl",
            "num_trades", "heartbeat_age_s", "reason")  # fmt: skip
_FIELDS = ("name", "strategy", "inst_id", "timeframe", "params", "fee", "slippage_bps", "initial_cash")
_ACTIONS = [a for a in get_args(Action) if a in ("start", "pause", "resume", "stop")]

FormErrors = dict[str, str]


def default_params(strategy: str) -> str:
    """The JSON of a strategy's default params (the form's starting point)."""
    config_type = available()[strategy].config_type
    return json.dumps(config_type().model_dump(mode="json"))


def check_create_form(values: dict[str, str]) -> tuple[BotConfig | None, FormErrors]:
    """The create form's values -> a valid BotConfig, or the problems by field."""
    errors: FormErrors = {}
    try:
        params = json.loads(values.get("params") or "{}")
        if not isinstance(params, dict):
            errors["params"] = 'params must be a JSON object, like {"fast": 12}'
    except json.JSONDecodeError as exc:
        errors["params"] = f"not JSON: {exc.msg} (at character {exc.pos})"
        params = {}
    raw: dict[str, Any] = {k: values.get(k, "").strip() for k in _FIELDS if k != "params"}
    raw["params"] = params
    try:
        config = BotConfig.model_validate({k: v for k, v in raw.items() if v != ""})
    except ValidationError as exc:
        for item in exc.errors():
            field = str(item["loc"][0]) if item["loc"] else "name"
            errors.setdefault(
                field if field in _FIELDS else "name", item["msg"].removeprefix("Value error, ")
            )
        return None, errors
    try:
        validate_strategy(config)
    except ConfigError as exc:
        cause = exc.__cause__
        if isinstance(cause, ValidationError):
            errors["params"] = describe_validation_error(cause)
        else:
            errors["strategy"] = str(exc)
    if errors:
        return None, errors
    return config, {}


class BotsPage:
    """One session's Bots page (``layout``). ``user`` is the logged-in user or ``None``."""

    def __init__(
        self, ctx: AppContext, doc: Document, *, user: str | None, on_bots: Callable[[list[str]], None]
    ) -> None:
        self.ctx, self.doc, self.user, self._on_bots = ctx, doc, user, on_bots
        self.source = ColumnDataSource({k: [] for k in _COLUMNS})
        self.table = DataTable(
            source=self.source, columns=[TableColumn(field=k, title=k.replace("_", " ")) for k in _COLUMNS],
            height=280, sizing_mode="stretch_width", selectable="checkbox", index_position=None, name="bots-table",
        )  # fmt: skip
        self.buttons = {a: Button(label=a, width=90, name=f"bot-{a}") for a in _ACTIONS}
        self.message = Div(text="" if user else "Read-only: <a href='/login'>log in</a> to control bots.")
        strategies = sorted(available())
        first = strategies[0] if strategies else ""
        self.inputs: dict[str, TextInput | Select] = {
            "name": TextInput(title="name", value="", width=160),
            "strategy": Select(title="strategy", value=first, options=choices(strategies), width=170),
            "inst_id": TextInput(title="instrument", value="BTC-USDT", width=120),
            "timeframe": Select(title="timeframe", value=ctx.settings.timeframes[0],
                                options=choices(ctx.settings.timeframes), width=90),
            "params": TextInput(title="params (JSON)", value=default_params(first) if first else "{}", width=300),
            "fee": TextInput(title="fee", value="0.001", width=80),
            "slippage_bps": TextInput(title="slippage bps", value="5", width=90),
            "initial_cash": TextInput(title="initial cash", value="10000", width=100),
        }  # fmt: skip
        self.errors = {
            k: Div(text="", styles={"color": "#c62828"}, width=w.width) for k, w in self.inputs.items()
        }
        self.create = Button(label="create and start", button_type="primary", name="bot-create")
        self.inputs["strategy"].on_change("value", self._strategy_changed)
        for action, button in self.buttons.items():
            button.on_click(lambda a=action: self.send(a, self.selected()))
            button.disabled = user is None
        self.create.on_click(self.submit)
        self.create.disabled = user is None
        form = row(*(column(self.inputs[k], self.errors[k]) for k in _FIELDS))
        self.layout = column(
            Div(text="<h3>Bots</h3>"), self.table, row(*self.buttons.values()), self.message,
            Div(text="<h4>Create a bot</h4>"), form, self.create, sizing_mode="stretch_width",
        )  # fmt: skip
        self._stop_listening = ctx.hub.listen("status:*", self._on_status)
        self._refresh = doc.add_periodic_callback(self.refresh, 3000)

    # ---- the table ----------------------------------------------------------------------
    def refresh(self) -> None:
        dsn = self.ctx.dsn
        in_background(self.ctx, self.doc, lambda: self.ctx.shared("bots", 2.5, lambda: data.bots(dsn)), self.show,
                      self._failed)  # fmt: skip

    def show(self, rows: list[data.BotRow]) -> None:
        columns: dict[str, list[Any]] = {k: [getattr(r, k) for r in rows] for k in _COLUMNS}
        columns["heartbeat_age_s"] = [None if a is None else round(a, 1) for a in columns["heartbeat_age_s"]]
        if columns != self.source.data:
            selected = set(self.selected())
            self.source.data = columns
            self.source.selected.indices = [i for i, name in enumerate(columns["name"]) if name in selected]
            self._on_bots(columns["name"])

    def _on_status(self, _channel: str, message: bytes) -> None:
        self.doc.add_next_tick_callback(lambda: self.apply_status(message))

    def apply_status(self, message: bytes) -> None:
        """A ``status:{bot}`` message: patch that bot's row (a new bot appears at the next refresh)."""
        try:
            status = decode_status(message)
        except ValueError as exc:
            log.warning("dashboard: a status message that does not decode: %s", exc)
            return
        names = list(self.source.data["name"])
        if status.name not in names:
            return
        i = names.index(status.name)
        self.source.patch({"state": [(i, status.state)], "position": [(i, status.position)],
                           "equity": [(i, status.equity or "")], "realized_pnl": [(i, status.realized_pnl)],
                           "num_trades": [(i, status.num_trades)], "heartbeat_age_s": [(i, 0.0)],
                           "reason": [(i, status.reason or "")]})  # fmt: skip

    def selected(self) -> list[str]:
        names = self.source.data["name"]
        return [names[i] for i in self.source.selected.indices if i < len(names)]

    def _failed(self, error: Exception) -> None:
        self.message.text = f"<b>error:</b> {type(error).__name__}: {error}"

    # ---- controls -----------------------------------------------------------------------
    def _allowed(self) -> bool:
        if self.user is None:
            self.message.text = "<b>refused:</b> controls need a login (<a href='/login'>log in</a>)."
            return False
        return True

    def send(self, action: str, names: list[str]) -> None:
        """Send ``action`` for ``names`` (checked here, on the server) on ``bots.commands``."""
        if not self._allowed():
            return
        if action not in _ACTIONS:
            self.message.text = f"<b>refused:</b> unknown action {action!r}"
            return
        if not names:
            self.message.text = "Select one or more bots in the table first."
            return
        try:
            commands = [make_command(action, data.check_bot_name(n), user=self.user) for n in names]  # type: ignore[arg-type]
        except ValueError as exc:
            self.message.text = f"<b>refused:</b> {exc}"
            return
        settings = self.ctx.settings
        self.message.text = f"sending {action} for {', '.join(names)} ..."
        in_background(self.ctx, self.doc, lambda: send_commands(settings, commands),
                      lambda n: self._sent(f"{action} sent for {', '.join(names)} ({n} command(s))"),
                      self._failed)  # fmt: skip

    def _sent(self, text: str) -> None:
        self.message.text = text

    def _strategy_changed(self, _attr: str, _old: str, new: str) -> None:
        if new in available():
            self.inputs["params"].value = default_params(new)

    def submit(self) -> None:
        """The create form: check every field, then send ``create`` and ``start``."""
        if not self._allowed():
            return
        values = {k: str(w.value) for k, w in self.inputs.items()}
        config, errors = check_create_form(values)
        for field, div in self.errors.items():
            div.text = errors.get(field, "")
        if config is None:
            self.message.text = "Fix the fields marked in red."
            return
        commands = [make_command("create", config.name, config=config, user=self.user),
                    make_command("start", config.name, user=self.user)]  # fmt: skip
        settings = self.ctx.settings
        in_background(self.ctx, self.doc, lambda: send_commands(settings, commands),
                      lambda _n: self._sent(f"create and start sent for {config.name}"), self._failed)  # fmt: skip

    def close(self) -> None:
        self._stop_listening()
