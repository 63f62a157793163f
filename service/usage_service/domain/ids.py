"""Identifiers the service gives: event ids (random UUIDs) and report ids."""

from __future__ import annotations

import os

_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def new_event_id() -> str:
    """A random (version 4) UUID as text, like `str(uuid.uuid4())`."""
    return new_event_ids(1)[0]


def new_event_ids(count: int) -> list[str]:
    """`count` random (version 4) UUIDs as text."""
    h = _random(16 * count).hex()
    return [
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-4{h[i + 13 : i + 16]}-"
        f"{_VARIANT[h[i + 16]]}{h[i + 17 : i + 20]}-{h[i + 20 : i + 32]}"
        for i in range(0, 32 * count, 32)
    ]


_POOL_BYTES = 4096  # read from the OS's random source at once: each read releases the GIL to
# the gRPC poller thread, so a read per id would cost a thread switch per call


class _Pool:
    """Random bytes read ahead from the OS, for this process only (a forked child reads its
    own: it must never hand out the ids its parent does)."""

    def __init__(self) -> None:
        self.pid = 0
        self.data = b""
        self.at = 0


_pool = _Pool()


def _random(size: int) -> bytes:
    pool = _pool
    if pool.pid != os.getpid() or pool.at + size > len(pool.data):
        pool.pid, pool.data, pool.at = os.getpid(), os.urandom(max(size, _POOL_BYTES)), 0
    out = pool.data[pool.at : pool.at + size]
    pool.at += size
    return out


def new_report_id() -> str:
    return new_event_id()


def new_decision_id() -> str:
    return new_event_id()
