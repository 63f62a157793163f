"""Run `usage-service` as a real process, for tests that need signals or several replicas."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

PLANS_FILE = pathlib.Path(__file__).with_name("plans.toml")
START_TIMEOUT = 60.0  # seconds; an embedded PostgreSQL's first start runs initdb
# Set by conftest for each test: whether it is marked `process`, the tier that starts processes.
allowed = True


def executable() -> list[str]:
    if not allowed:
        raise RuntimeError("this test starts `usage-service`: mark it @pytest.mark.process")
    found = shutil.which("usage-service", path=str(pathlib.Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "usage_service.cli"]


class ServiceProcess:
    """`usage-service serve` on an ephemeral port; the address is read from its first line."""

    def __init__(self, env: Mapping[str, str]) -> None:
        full = {
            **os.environ,
            "USAGE_GRPC_ADDRESS": "127.0.0.1:0",
            "USAGE_PLANS_FILE": str(PLANS_FILE),
            **env,
        }
        self.proc = subprocess.Popen(
            [*executable(), "serve"],
            env=full,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output: list[str] = []
        self._ready = threading.Event()
        self.address = ""
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(START_TIMEOUT) or not self.address:
            self.kill()
            raise RuntimeError("service did not start:\n" + "".join(self.output))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:  # closed once the process is gone
            for line in self.proc.stdout:
                self.output.append(line)
                if line.startswith("usage-service listening on "):
                    self.address = line.split()[-1]
                    self._ready.set()
        self._ready.set()

    def health(self, service: str = "") -> int:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            return int(answer.status)

    def terminate(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
