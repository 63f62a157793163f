"""When and how long to wait before a call is tried again.

Every call the client makes is safe to repeat: writes carry an idempotency key that stays the same
across attempts (the service answers a repeat with the original event or grant and
duplicate=True), and the other calls are reads, whole-record upserts or grant voids (voiding twice
changes nothing more). So a failure that may be temporary is retried with capped exponential
backoff and jitter.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable

import grpc

log = logging.getLogger("usage_client")

# UNAVAILABLE: the server or its database cannot be reached. DEADLINE_EXCEEDED: the outcome of the
# attempt is unknown. ABORTED: a concurrent write conflicted (the service asks for a retry).
RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
)
_MAX_EXPONENT = 64  # keeps multiplier ** n finite


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter.

    The pause before retry n (n = 1 for the second attempt) is
    min(max_backoff, initial_backoff * multiplier ** (n - 1)), of which a random fraction of up to
    `jitter` is taken off, so that clients that failed together do not retry together.
    """

    max_attempts: int = 5  # including the first; 1 turns retries off
    initial_backoff: float = 0.2  # seconds
    max_backoff: float = 5.0  # seconds
    multiplier: float = 2.0
    jitter: float = 0.5  # 0: no randomness; 1: anywhere between 0 and the full pause
    retryable_codes: frozenset[grpc.StatusCode] = RETRYABLE_CODES

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, not {self.max_attempts}")
        if not 0 <= self.initial_backoff <= self.max_backoff:
            raise ValueError("need 0 <= initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, not {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within [0, 1], not {self.jitter}")

    @classmethod
    def disabled(cls) -> RetryPolicy:
        return cls(max_attempts=1)

    def should_retry(self, code: grpc.StatusCode, attempt: int) -> bool:
        """Whether a call whose attempt number `attempt` (1-based) failed with `code` goes on."""
        return attempt < self.max_attempts and code in self.retryable_codes

    def backoff(self, retry: int, uniform: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number `retry` (1-based); `uniform` yields [0, 1)."""
        exponent = min(max(retry - 1, 0), _MAX_EXPONENT)
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier**exponent)
        return ceiling * (1 - self.jitter * uniform())


def log_retry(
    method: str, attempt: int, code: grpc.StatusCode, delay: float, reason: str = ""
) -> None:
    log.warning(
        "%s: attempt %d failed with %s%s; retrying in %.3fs",
        method,
        attempt,
        code.name,
        f" [{reason}]" if reason else "",
        delay,
        extra={
            "action": "retry",
            "method": method,
            "attempt": attempt,
            "code": code.name,
            "reason": reason,
        },
    )
