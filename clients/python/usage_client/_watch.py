"""Where a watch stands, and whether (and when) a stream that ended is resumed.

WatchUsage streams are long-lived and end for reasons that say nothing about the watch itself:
a dropped connection or a server going away (UNAVAILABLE, e.g. reason SERVER_SHUTTING_DOWN), or a
caller that read too slowly (RESOURCE_EXHAUSTED, reason SLOW_CONSUMER). Such an end is resumed with
`resume_after_version` = the last version yielded, so the server sends every later change once,
in order. The policy's retryable codes and SLOW_CONSUMER are resumed; anything else (NOT_FOUND,
INVALID_ARGUMENT, PERMISSION_DENIED, other RESOURCE_EXHAUSTED reasons such as TOO_MANY_WATCHES...)
is raised as its UsageError.

The policy's `max_attempts` bounds the attempts in a row that end without a sign the stream
worked: a message, or having stayed open for STEADY seconds. So a watch that is resumed now and
then lives on, and one whose server stays away raises Unavailable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grpc
from usage.v1 import usage_pb2

from usage_client import _convert
from usage_client import _errors as errors
from usage_client import _types as types
from usage_client._retry import RetryPolicy, log_retry

METHOD = "WatchUsage"
STEADY = 5.0  # seconds: a stream open this long had connected; its end starts the count anew
SLOW_CONSUMER = "SLOW_CONSUMER"


def resumable(policy: RetryPolicy, error: errors.UsageError) -> bool:
    """Whether a stream that ended with `error` is resumed (attempts left aside)."""
    if error.code in policy.retryable_codes:
        return True
    return error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == SLOW_CONSUMER


@dataclasses.dataclass
class Watch:
    """The state of one `watch_usage` iteration, shared by the blocking and asyncio clients."""

    customer_id: str
    meters: tuple[str, ...]
    last_version: int | None  # the last version yielded (or the caller's starting point)
    policy: RetryPolicy
    failures: int = 0  # attempts in a row that ended without a sign the stream worked

    @classmethod
    def start(
        cls,
        customer_id: str,
        meters: Sequence[str],
        resume_after_version: int | None,
        policy: RetryPolicy,
    ) -> Watch:
        if isinstance(meters, str):
            raise TypeError("meters is a sequence of meter names, not one string")
        return cls(customer_id, tuple(meters), resume_after_version, policy)

    def request(self) -> usage_pb2.WatchUsageRequest:
        """The request of the next attempt: from the last version yielded, if any."""
        return _convert.watch_request(self.customer_id, self.meters, self.last_version)

    def received(self, message: usage_pb2.WatchUsageResponse) -> types.UsageChange:
        change = _convert.usage_change(message)
        self.last_version = change.version
        self.failures = 0
        return change

    def ended(self, exc: grpc.RpcError, open_for: float) -> float:
        """Seconds to wait before resuming a stream that failed with `exc` after `open_for`
        seconds; raises its UsageError when it is not to be resumed."""
        if open_for >= STEADY:
            self.failures = 0
        self.failures += 1
        error = errors.from_rpc_error(exc, self.failures)
        if self.failures >= self.policy.max_attempts or not resumable(self.policy, error):
            raise error from exc
        delay = self.policy.backoff(self.failures)
        log_retry(METHOD, self.failures, error.code, delay, error.reason)
        return delay
