"""Run `usage-service serve` as a real process for the client's live tests.

The server is the executable in USAGE_SERVICE_BIN (default: `usage-service` on PATH, or beside
this Python). It gets a fresh database on the PostgreSQL at USAGE_TEST_PG, else DATABASE_URL, else
postgresql://postgres@127.0.0.1:5432/test, when that server is reachable, and otherwise starts its
own embedded PostgreSQL under a temporary USAGE_DATA_DIR.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

PLANS_FILE = pathlib.Path(__file__).with_name("plans.toml")
# A PostgreSQL on which the tests may CREATE DATABASE.
ADMIN_DSN = (
    os.environ.get("USAGE_TEST_PG")
    or os.environ.get("DATABASE_URL")
    or "postgresql://postgres@127.0.0.1:5432/test"
)
START_TIMEOUT = 90.0  # seconds; an embedded PostgreSQL's first start runs initdb
STOP_TIMEOUT = 30.0  # seconds for a graceful stop before the process is killed
HEALTH_PROBE = 1.0  # seconds each health probe may wait for the channel
# Probe a server that is still starting often: gRPC's default reconnect backoff grows to minutes.
PROBE_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]


def executable() -> str:
    configured = os.environ.get("USAGE_SERVICE_BIN", "")
    if configured:
        return configured
    found = shutil.which("usage-service") or shutil.which(
        "usage-service", path=str(pathlib.Path(sys.executable).parent)
    )
    if not found:
        raise RuntimeError("usage-service not found: set USAGE_SERVICE_BIN or install the server")
    return found


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it; it stays free unless reused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _reachable(dsn: str) -> bool:
    parts = urllib.parse.urlsplit(dsn)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), 2):
            return True
    except OSError:
        return False


def _with_database(dsn: str, name: str) -> str:
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(dsn)._replace(path=f"/{name}"))


def _admin(dsn: str, sql: str) -> None:
    """Runs one statement as the administrator: with asyncpg when installed, else with psql."""
    try:
        import asyncio

        import asyncpg
    except ImportError:
        psql = shutil.which("psql")
        if psql is None:
            raise RuntimeError("need asyncpg or psql to create the test database") from None
        subprocess.run([psql, dsn, "-v", "ON_ERROR_STOP=1", "-c", sql], check=True, timeout=60)
        return

    async def run() -> None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@contextlib.contextmanager
def database(tmp: pathlib.Path) -> Iterator[dict[str, str]]:
    """The environment that gives a server a fresh database (one per test session)."""
    if _reachable(ADMIN_DSN):
        name = f"usage_client_test_{uuid.uuid4().hex[:12]}"
        _admin(ADMIN_DSN, f'CREATE DATABASE "{name}"')
        try:
            yield {"DATABASE_URL": _with_database(ADMIN_DSN, name)}
        finally:
            with contextlib.suppress(Exception):
                _admin(ADMIN_DSN, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    else:
        yield {"USAGE_DATA_DIR": str(tmp / "data")}


class Server:
    """One `usage-service serve` process listening on 127.0.0.1:`port`."""

    def __init__(self, env: Mapping[str, str], port: int, log: pathlib.Path) -> None:
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.log = log
        self.database_env = dict(env)
        self._env = {
            **os.environ,
            **env,
            "USAGE_GRPC_ADDRESS": self.address,
            "USAGE_PLANS_FILE": str(PLANS_FILE),
        }
        if "DATABASE_URL" not in env:
            self._env.pop("DATABASE_URL", None)
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            return subprocess.Popen(
                [executable(), "serve"], env=self._env, stdout=out, stderr=subprocess.STDOUT
            )

    def replica(self, log: pathlib.Path) -> Server:
        """Another server process on the same database, on a port of its own (not yet serving:
        call wait_serving)."""
        return Server(self.database_env, free_port(), log)

    def start(self) -> None:
        """Starts the process again (same port, same database) after `stop`."""
        if self.proc.poll() is None:
            raise RuntimeError("already running")
        self.proc = self._spawn()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_serving(self, timeout: float = START_TIMEOUT) -> None:
        """Returns once the health service answers SERVING; fails after `timeout` seconds or
        as soon as the process exits."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address, options=PROBE_OPTIONS) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"usage-service exited with {self.proc.returncode}:\n" + self.output()
                    )
                try:
                    answer = health.Check(
                        health_pb2.HealthCheckRequest(), timeout=HEALTH_PROBE, wait_for_ready=True
                    )
                except grpc.RpcError:
                    continue  # not listening yet: the probe waited for the channel
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        self.stop()
        raise RuntimeError(f"usage-service not serving after {timeout}s:\n" + self.output())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
