-- Optional TimescaleDB: when the server has it, trades and candles become hypertables (chunked
-- by time, so a time range reads only its chunks and old chunks can be dropped or compressed).
-- Without it this migration only creates the function below, which then does nothing: the
-- tables stay plain tables and everything works the same (docs/operations.md).
--
-- No key changes. A hypertable needs its time column in every unique index, and both primary
-- keys have it: trades (inst_id, trade_id, ts), candles (inst_id, timeframe, ts_close). The
-- sinks' upserts (ON CONFLICT on exactly these keys, sinks/postgres.py) work unchanged, and no
-- foreign key points at either table. The BEFORE UPDATE trigger on candles (0003) applies to
-- the chunks too.
--
-- A function, so that it can be run again by hand on a database that was migrated without
-- TimescaleDB and has since moved to a server with it:  SELECT tcp_enable_timescaledb();
-- It is idempotent and returns whether it turned the tables into hypertables. It needs
-- TimescaleDB 2.13 or newer (by_range).

CREATE FUNCTION tcp_enable_timescaledb() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        RAISE NOTICE 'TimescaleDB is not installed on this server: trades and candles stay plain tables';
        RETURN false;
    END IF;
    -- Without the library in shared_preload_libraries, CREATE EXTENSION ends the session (FATAL:
    -- no exception handler catches it). shared_preload_libraries is readable by privileged roles
    -- only; timescaledb.bgw_launcher_poll_time, defined by the preloaded loader, by every role.
    IF current_setting('timescaledb.bgw_launcher_poll_time', true) IS NULL THEN
        RAISE WARNING 'TimescaleDB is installed but not preloaded: trades and candles stay plain tables';
        RETURN false;
    END IF;
    CREATE EXTENSION IF NOT EXISTS timescaledb;
    -- migrate_data: rows already in the tables move into chunks (locks the table while it runs).
    -- create_default_indexes => false: the keys, trades_inst_ts and the BRIN indexes on
    -- written_at serve every query; a default (time DESC) index would only cost writes.
    -- Chunk sizes: one day of trades, a week of candles (set_chunk_time_interval changes them).
    PERFORM create_hypertable('trades', by_range('ts', INTERVAL '1 day'),
        create_default_indexes => false, if_not_exists => true, migrate_data => true);
    PERFORM create_hypertable('candles', by_range('ts_close', INTERVAL '7 days'),
        create_default_indexes => false, if_not_exists => true, migrate_data => true);
    RETURN true;
END $$;

SELECT tcp_enable_timescaledb();
