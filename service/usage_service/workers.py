"""`serve --workers N`: N server processes sharing one port through SO_REUSEPORT.

One Python process serves on one core at most (its event loop holds the GIL), so on a host with
more cores each worker is a separate `usage-service serve` process. They bind the same address
with SO_REUSEPORT, and the kernel spreads new connections across them. Workers share nothing
but the database: group commit, the drain and idempotency all work across processes already.
The parent only starts them, prints the address once every worker listens, passes SIGTERM and
SIGINT on, and exits with the first non-zero status of a worker.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping

from usage_service.settings import ConfigError
from usage_service.settings.environment import Settings

REUSE_PORT_ENV = "USAGE_REUSE_PORT"  # set for each worker: bind with SO_REUSEPORT
WORKER_ENV = "USAGE_WORKER"  # set for each worker: its index, 0..N-1
START_TIMEOUT = 120.0  # seconds for every worker to listen


def _reserve(address: str) -> tuple[socket.socket, str, int]:
    """Binds (without listening) a SO_REUSEPORT socket on `address`, so that port 0 becomes a
    concrete port the workers can share and nothing else takes it while they start."""
    host, _, port = address.rpartition(":")
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((bare, int(port)))
    return sock, host, sock.getsockname()[1]


def _metrics_address(address: str, index: int) -> str:
    """Worker i serves metrics on the given port + i (port 0 stays 0: each picks its own)."""
    if not address:
        return ""
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) + index}" if int(port) else address


def serve(settings: Settings, workers: int) -> int:
    """Each worker is started with this process's environment (already checked into
    `settings`), its own address and metrics port added."""
    if not settings.database.url:
        raise ConfigError("serve --workers needs DATABASE_URL (one database for every worker)")
    reserved, host, port = _reserve(settings.grpc_address)
    base: Mapping[str, str] = {**os.environ, "USAGE_GRPC_ADDRESS": f"{host}:{port}"}
    procs: list[subprocess.Popen[str]] = []
    listening = threading.Semaphore(0)
    announced = [False] * workers
    for i in range(workers):
        env = {
            **base,
            REUSE_PORT_ENV: "1",
            WORKER_ENV: str(i),
            "USAGE_METRICS_ADDRESS": _metrics_address(settings.metrics_address, i),
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "usage_service", "serve"],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        threading.Thread(target=_relay, args=(proc, i, announced, listening), daemon=True).start()

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        started = all(listening.acquire(timeout=START_TIMEOUT) for _ in procs)
        if started and all(announced):
            print(f"usage-service listening on {host}:{port} ({workers} workers)", flush=True)
        else:
            forward(signal.SIGTERM, None)
    finally:
        reserved.close()
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)


def _relay(
    proc: subprocess.Popen[str], index: int, announced: list[bool], listening: threading.Semaphore
) -> None:
    """Copies a worker's output to ours; its own address line is counted, not copied."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("usage-service listening on ") and not announced[index]:
            announced[index] = True
            listening.release()
            continue
        sys.stdout.write(line)
        sys.stdout.flush()
    if not announced[index]:  # died before listening: stop waiting for it
        listening.release()
