"""The ``tcp db`` commands (wired into ``tcp.cli`` with :func:`register`).

    tcp db migrate                  apply the migrations not applied yet
    tcp db backup --out FILE        pg_dump in custom format (-Fc): every table, schema_migrations too
    tcp db restore FILE [--clean]   pg_restore, in one transaction, into an empty database
                                    (--clean: over one that has the backup's tables; they are replaced)

The database is ``TCP_POSTGRES_DSN`` when set (an unreachable one is an error: these commands
never fall back to the embedded server), else the embedded one. pg_dump and pg_restore are
found like the embedded server's programs (:func:`tcp.services.pg_client`); the password goes
to them in ``PGPASSWORD``, never on a command line, and is never printed. Exit code 2 with
``error: ...`` (and the tool's own message) when something fails. docs/operations.md.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tcp import services
from tcp.config import Settings

__all__ = ["DatabaseToolError", "archived_extensions", "backup", "register", "restore", "user_tables"]

# pg_restore --list names an archived extension "<id>; <class> <oid> EXTENSION - <name> <owner>".
_EXTENSION = re.compile(r"^\d+; \d+ \d+ EXTENSION - (\S+)", re.MULTILINE)
# Timescale's procedure for restoring a dump of a database with TimescaleDB.
_PRE_RESTORE = "CREATE EXTENSION IF NOT EXISTS timescaledb; SELECT timescaledb_pre_restore()"
_POST_RESTORE = "SELECT timescaledb_post_restore()"


class DatabaseToolError(RuntimeError):
    """A backup or restore failed; the message says why (with pg_dump's or pg_restore's output)."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``db`` (migrate, backup, restore) to the ``tcp`` subcommands."""
    p = sub.add_parser("db", help="PostgreSQL: apply migrations, back up, restore")
    db = p.add_subparsers(dest="action", required=True)
    db.add_parser("migrate", help="apply the migrations not applied yet")
    q = db.add_parser("backup", help="pg_dump the database into one file (custom format, -Fc)")
    q.add_argument("--out", type=Path, required=True, help="the backup file to write")
    q = db.add_parser("restore", help="pg_restore a backup into an empty database, in one transaction")
    q.add_argument("file", type=Path, help="a file written by `tcp db backup`")
    q.add_argument(
        "--clean",
        action="store_true",
        help="drop and re-create the backup's tables etc. first (pg_restore --clean --if-exists): "
        "restore over a database that has them",
    )
    p.set_defaults(func=cmd_db)


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    from sinks.migrate import apply_migrations

    dsn = _database(settings)
    where = _describe(dsn)
    try:
        if args.action == "migrate":
            applied = apply_migrations(dsn)
            print(f"{where}: " + (f"applied {', '.join(applied)}" if applied else "up to date"))
        elif args.action == "backup":
            size = backup(dsn, args.out)
            print(f"{where} -> {args.out} ({size:,} bytes)")
        else:
            restore(dsn, args.file, clean=args.clean)
            print(f"{args.file} -> {where}")
    except (DatabaseToolError, psycopg.Error, OSError) as exc:
        print(f"error: {where}: {exc}", file=sys.stderr)
        return 2
    return 0


def backup(dsn: str, out: Path) -> int:
    """Dump the database into ``out`` (custom format); returns its size in bytes.

    The dump goes to ``out.partial`` first and replaces ``out`` only when pg_dump succeeded.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        _run("pg_dump", dsn, ["--format=custom", f"--file={partial}"])
    except DatabaseToolError:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(out)
    return out.stat().st_size


def restore(dsn: str, archive: Path, *, clean: bool = False) -> None:
    """Restore ``archive`` in one transaction: all of it or nothing.

    Without ``clean`` the database must be empty (:func:`user_tables`). Objects belong to the
    user restoring (``--no-owner --no-acl``), so a backup restores on another server with
    other roles. A backup of a database with TimescaleDB is wrapped in Timescale's
    ``timescaledb_pre_restore()`` / ``timescaledb_post_restore()``.
    """
    if not archive.is_file():
        msg = f"no backup file at {archive}"
        raise DatabaseToolError(msg)
    timescaledb = "timescaledb" in archived_extensions(archive)
    if timescaledb and clean:
        msg = f"{archive} holds TimescaleDB data: restore it into an empty database, without --clean"
        raise DatabaseToolError(msg)
    if not clean and (tables := user_tables(dsn)):
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        msg = (f"the database is not empty (tables {shown}): restore into a new, empty database, "
               "or pass --clean to replace what the backup contains")  # fmt: skip
        raise DatabaseToolError(msg)
    options = ["--single-transaction", "--no-owner", "--no-acl"]
    if clean:
        options += ["--clean", "--if-exists"]
    if timescaledb:
        _timescaledb_restoring(dsn, _PRE_RESTORE)
    try:
        _run("pg_restore", dsn, [*options, str(archive)])
    finally:
        if timescaledb:
            _timescaledb_restoring(dsn, _POST_RESTORE)


def archived_extensions(archive: Path) -> list[str]:
    """The extensions a backup creates, from ``pg_restore --list`` (which fails on a file that
    is not a backup)."""
    return _EXTENSION.findall(_run("pg_restore", None, ["--list", str(archive)]))


def user_tables(dsn: str) -> list[str]:
    """The tables, views and sequences of ``dsn``'s database, other than the system's and those
    of extensions (TimescaleDB's images create the extension in every new database)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')"
            " AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
            " AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'"
            " AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass"
            "                 AND d.objid = c.oid AND d.deptype = 'e')"
            " ORDER BY 1"
        ).fetchall()
    return [row[0] for row in rows]


def _timescaledb_restoring(dsn: str, statement: str) -> None:
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(statement.encode())  # fixed statements, no parameters
    except psycopg.Error as exc:
        msg = f"the backup holds TimescaleDB data, and `{statement}` failed: {exc}"
        raise DatabaseToolError(msg) from exc


def _run(tool: str, dsn: str | None, args: list[str]) -> str:
    """Run pg_dump/pg_restore (on ``dsn``'s database when given); its stdout, or the error with its stderr."""
    command = [services.pg_client(tool)]
    env = dict(os.environ)
    if dsn is not None:
        params = conninfo_to_dict(dsn)
        password = params.pop("password", None)
        if password is not None:
            env["PGPASSWORD"] = str(password)
        command.append(f"--dbname={make_conninfo('', **params)}")
    result = subprocess.run([*command, *args], env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        msg = f"{tool} failed (exit code {result.returncode}): {result.stderr.strip() or 'no message'}"
        raise DatabaseToolError(msg)
    return result.stdout


def _database(settings: Settings) -> str:
    """The configured database, as it is (never the embedded one instead); else the embedded one."""
    configured = settings.postgres_dsn.get_secret_value()
    if configured:
        return configured
    return services.ensure(settings, ("postgres",)).postgres_dsn.get_secret_value()


def _describe(dsn: str) -> str:
    """``database tcp on host:port``: how the commands name a database (no password)."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "the database (TCP_POSTGRES_DSN does not parse)"
    host, port = params.get("host") or "localhost", params.get("port") or "5432"
    return f"database {params.get('dbname') or params.get('user') or '?'} on {host}:{port}"
