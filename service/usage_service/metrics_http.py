"""A minimal HTTP endpoint for Prometheus (`GET /metrics`), on the service's own event loop, so
the scrape-time database reads share the service's pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from usage_service import metrics
from usage_service.config import ConfigError

log = logging.getLogger(__name__)
REQUEST_TIMEOUT = 5.0  # seconds a scraper has to send its request
MAX_HEADER_BYTES = 16 * 1024
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def start(address: str, refresh: Callable[[], Awaitable[None]]) -> asyncio.Server:
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_HEADER_BYTES:
                raise ValueError("headers too large")
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if method not in ("GET", "HEAD"):
                await _answer(writer, 405, b"method not allowed\n", "text/plain")
            elif path.split("?", 1)[0] != "/metrics":
                await _answer(writer, 404, b"not found; try /metrics\n", "text/plain")
            else:
                await refresh()
                body = metrics.render()
                await _answer(writer, 200, b"" if method == "HEAD" else body, CONTENT_TYPE)
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    try:
        return await asyncio.start_server(handle, host, int(port), limit=MAX_HEADER_BYTES)
    except OSError as exc:
        raise ConfigError(
            f"USAGE_METRICS_ADDRESS: cannot listen on {address}: {exc.strerror or exc}"
        ) from None


def bound_port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


async def _answer(
    writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str
) -> None:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + body)
    await writer.drain()
