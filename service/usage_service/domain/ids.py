"""Identifiers the service gives: event ids (random UUIDs) and report ids."""

from __future__ import annotations

import os

_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def new_event_id() -> str:
    """A random (version 4) UUID as text, like `str(uuid.uuid4())`."""
    return new_event_ids(1)[0]


def new_event_ids(count: int) -> list[str]:
    """`count` random (version 4) UUIDs as text from one read of the OS's random source: a
    batch needs one per event, and each read releases the GIL to the gRPC poller thread."""
    h = os.urandom(16 * count).hex()
    return [
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-4{h[i + 13 : i + 16]}-"
        f"{_VARIANT[h[i + 16]]}{h[i + 17 : i + 20]}-{h[i + 20 : i + 32]}"
        for i in range(0, 32 * count, 32)
    ]


def new_report_id() -> str:
    return new_event_id()


def new_decision_id() -> str:
    return new_event_id()
