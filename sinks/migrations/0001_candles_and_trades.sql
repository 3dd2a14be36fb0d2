-- Candles, labelled by close time (see docs/candles.md), and the raw trade archive.
-- Prices and sizes are NUMERIC (exact), times timestamptz (UTC).

CREATE TABLE candles (
    inst_id        text        NOT NULL,
    timeframe      text        NOT NULL,
    ts_close       timestamptz NOT NULL,
    open           numeric     NOT NULL,
    high           numeric     NOT NULL,
    low            numeric     NOT NULL,
    close          numeric     NOT NULL,
    volume         numeric     NOT NULL,
    quote_volume   numeric     NOT NULL,
    trade_count    bigint      NOT NULL,
    vwap           numeric,
    first_trade_id bigint,
    last_trade_id  bigint,
    revision       integer     NOT NULL DEFAULT 0,
    written_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (inst_id, timeframe, ts_close)
);

-- The trade archive. Uniqueness is (inst_id, trade_id); ts is part of the key so that the table
-- can be turned into one partitioned by month (PARTITION BY RANGE (ts)) without changing it:
-- a trade id always comes with the same ts.
CREATE TABLE trades (
    inst_id     text        NOT NULL,
    trade_id    bigint      NOT NULL,
    ts          timestamptz NOT NULL,
    px          numeric     NOT NULL,
    sz          numeric     NOT NULL,
    side        text        NOT NULL CHECK (side IN ('buy', 'sell')),
    count       integer     NOT NULL DEFAULT 1,
    source      smallint    NOT NULL DEFAULT 0,
    seq_id      bigint,
    origin      text        NOT NULL,
    received_at timestamptz,
    PRIMARY KEY (inst_id, trade_id, ts)
);
CREATE INDEX trades_inst_ts ON trades (inst_id, ts);
