-- Signals of strategies, virtual bots, their fills and their equity per candle close
-- (docs/bots.md). Money is NUMERIC (exact), times timestamptz (UTC). Every table has a natural
-- key, and the sinks upsert on it: a dataflow replaying after a crash writes the same rows again.

-- A strategy instance (name + params hash) on one stream (inst_id, timeframe) signals at most
-- once per candle: two bots running the same strategy with the same params share its signals.
CREATE TABLE signals (
    strategy    text        NOT NULL,
    params_hash text        NOT NULL,
    inst_id     text        NOT NULL,
    timeframe   text        NOT NULL,
    ts_close    timestamptz NOT NULL,
    action      text        NOT NULL CHECK (action IN ('buy', 'sell')),
    price       numeric     NOT NULL,
    indicators  jsonb       NOT NULL,
    reason      text        NOT NULL,
    written_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (strategy, params_hash, inst_id, timeframe, ts_close)
);
CREATE INDEX signals_stream ON signals (inst_id, timeframe, ts_close);

-- One row per bot: its config, lifecycle state, heartbeat and latest portfolio figures.
CREATE TABLE bots (
    name           text        PRIMARY KEY,
    strategy       text        NOT NULL,
    params         jsonb       NOT NULL,
    params_hash    text        NOT NULL,
    inst_id        text        NOT NULL,
    timeframe      text        NOT NULL,
    config         jsonb       NOT NULL,
    state          text        NOT NULL
        CHECK (state IN ('created', 'running', 'paused', 'stopped', 'failed')),
    reason         text,
    cash           numeric     NOT NULL,
    position       numeric     NOT NULL,
    avg_entry      numeric,
    realized_pnl   numeric     NOT NULL,
    equity         numeric,
    fees_paid      numeric     NOT NULL,
    num_trades     integer     NOT NULL,
    last_candle    timestamptz,
    last_heartbeat timestamptz,
    stale          boolean     NOT NULL DEFAULT false,
    restarts       integer     NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Fills. A bot fills at most once per side per candle: (bot, ts, side) is the natural key;
-- seq numbers a bot's fills 1, 2, 3 ...
CREATE TABLE bot_trades (
    bot            text        NOT NULL,
    ts             timestamptz NOT NULL,
    side           text        NOT NULL CHECK (side IN ('buy', 'sell')),
    seq            integer     NOT NULL,
    inst_id        text        NOT NULL,
    timeframe      text        NOT NULL,
    price          numeric     NOT NULL,
    size           numeric     NOT NULL,
    notional       numeric     NOT NULL,
    fee            numeric     NOT NULL,
    cash_after     numeric     NOT NULL,
    position_after numeric     NOT NULL,
    realized_pnl   numeric     NOT NULL,
    written_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bot, ts, side)
);

-- Equity of a bot marked at every candle close.
CREATE TABLE bot_performance (
    bot            text        NOT NULL,
    ts_close       timestamptz NOT NULL,
    close          numeric     NOT NULL,
    cash           numeric     NOT NULL,
    position       numeric     NOT NULL,
    equity         numeric     NOT NULL,
    unrealized_pnl numeric     NOT NULL,
    realized_pnl   numeric     NOT NULL,
    fees_paid      numeric     NOT NULL,
    written_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bot, ts_close)
);
