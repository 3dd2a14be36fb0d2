-- The Parquet lake (backtest/lake.py) exports, incrementally, the rows written since its last
-- run: every exported table needs `written_at`, the start of the transaction that wrote (or
-- last changed) the row. trades had none; a candle revised by a late trade gets a new one.
ALTER TABLE trades ADD COLUMN written_at timestamptz NOT NULL DEFAULT now();

CREATE FUNCTION tcp_touch_written_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.written_at := now();
    RETURN NEW;
END $$;

CREATE TRIGGER candles_written_at BEFORE UPDATE ON candles
    FOR EACH ROW EXECUTE FUNCTION tcp_touch_written_at();

-- BRIN: rows arrive in written_at order, so a tiny index finds a run's new rows.
CREATE INDEX trades_written_at ON trades USING brin (written_at);
CREATE INDEX candles_written_at ON candles USING brin (written_at);
CREATE INDEX signals_written_at ON signals USING brin (written_at);
CREATE INDEX bot_trades_written_at ON bot_trades USING brin (written_at);
CREATE INDEX bot_performance_written_at ON bot_performance USING brin (written_at);
