"""Fixtures: one live `usage-service serve` per session (see server.py), clients, customers."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import AsyncIterator, Iterator

import pytest
from server import Server, database, free_port
from support import new_customer

import usage_client


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("usage-service")
    with database(tmp) as env:
        server = Server(env, free_port(), tmp / "server.log")
        try:
            server.wait_serving()
            yield server
        finally:
            server.stop()


@pytest.fixture
def target(service: Server) -> str:
    if service.proc.poll() is not None:  # a failed test left it stopped
        service.start()
        service.wait_serving()
    return service.address


@pytest.fixture
def client(target: str) -> Iterator[usage_client.UsageClient]:
    with usage_client.UsageClient(target) as c:
        yield c


@pytest.fixture
async def aclient(target: str) -> AsyncIterator[usage_client.AsyncUsageClient]:
    async with usage_client.AsyncUsageClient(target) as c:
        yield c


@pytest.fixture
def customer(client: usage_client.UsageClient) -> usage_client.Customer:
    """A new ACTIVE customer on the `starter` plan, in the middle of its billing period."""
    return new_customer(client)


@dataclasses.dataclass
class Retry:
    method: str
    attempt: int
    code: str
    reason: str = ""  # the ErrorInfo reason, when the service gave one


class RetryLog(logging.Handler):
    """Collects the client's retry log records; `first` is set by the first one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.retries: list[Retry] = []
        self.first = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "action", None) == "retry":
            self.retries.append(
                Retry(
                    record.method,  # type: ignore[attr-defined]
                    record.attempt,  # type: ignore[attr-defined]
                    record.code,  # type: ignore[attr-defined]
                    getattr(record, "reason", ""),
                )
            )
            self.first.set()


@pytest.fixture
def retries() -> Iterator[RetryLog]:
    handler = RetryLog()
    logger = logging.getLogger("usage_client")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
