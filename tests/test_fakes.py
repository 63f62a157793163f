"""The fake providers' own plumbing: a request cut short by its sender is dropped unread, never
recorded as something our client sent."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from fakes.stripe import KEY, FakeStripe


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    server = FakeStripe().start()
    yield server
    server.stop()


def cut_short(fake: FakeStripe, data: bytes) -> bytes:
    """Sends `data`, closes the sending side as a killed client would, and waits until the fake
    has closed the connection; returns what it answered."""
    host, port = fake.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
    return answer


HEAD = (
    "POST /v1/billing/meter_events HTTP/1.1\r\nHost: stripe\r\n"
    f"Authorization: Bearer {KEY}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
)


@pytest.mark.parametrize(
    "data",
    [
        HEAD + "Content-Length: 100\r\n\r\nevent_name=llm_tokens&pay",  # body cut short
        HEAD,  # headers cut short: no blank line, so no Content-Length either
        HEAD[:40],  # the request line alone
    ],
    ids=["body", "headers", "request-line"],
)
def test_a_request_cut_short_is_dropped_not_a_violation(fake: FakeStripe, data: str) -> None:
    assert cut_short(fake, data.encode()) == b""  # no answer: the connection is just closed
    assert fake.calls == [] and fake.violations == []
