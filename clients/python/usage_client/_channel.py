"""Channel settings shared by the sync and async clients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_TIMEOUT = 5.0  # seconds: the deadline of each attempt of each call
# Reconnect quickly after the server was unreachable, so that a retry finds the channel up again
# (gRPC's own defaults wait 1 s first and up to 120 s between attempts to connect).
DEFAULT_CHANNEL_OPTIONS: Mapping[str, Any] = {
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 5_000,
}

ChannelOptions = Sequence[tuple[str, Any]]
Metadata = Sequence[tuple[str, str]]


def channel_options(extra: ChannelOptions) -> list[tuple[str, Any]]:
    """The defaults above, overridden by the caller's options."""
    merged = dict(DEFAULT_CHANNEL_OPTIONS)
    merged.update(dict(extra))
    return sorted(merged.items())


def check_timeout(timeout: float) -> float:
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, not {timeout}")
    return timeout
