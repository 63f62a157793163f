"""RetryPolicy: capped exponential backoff with jitter, and which failures are retried."""

from __future__ import annotations

import grpc
import pytest

from usage_client import RETRYABLE_CODES, RetryPolicy


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0, jitter=0.0)
    assert [policy.backoff(n) for n in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1, 1])
    assert policy.backoff(10_000) == 1.0  # no overflow however long it goes on


def test_jitter_takes_off_at_most_its_fraction() -> None:
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=1.0, jitter=0.5)
    assert policy.backoff(1, uniform=lambda: 0.0) == 1.0
    assert policy.backoff(1, uniform=lambda: 0.999999) == pytest.approx(0.5, abs=1e-5)
    samples = {policy.backoff(1) for _ in range(200)}
    assert all(0.5 <= s <= 1.0 for s in samples)
    assert len(samples) > 100  # really random


def test_transient_codes_are_retried_until_attempts_run_out() -> None:
    policy = RetryPolicy(max_attempts=3)
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        assert code in RETRYABLE_CODES
        assert policy.should_retry(code, 1)
        assert policy.should_retry(code, 2)
        assert not policy.should_retry(code, 3)


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.PERMISSION_DENIED,
    ],
)
def test_answers_are_not_retried(code: grpc.StatusCode) -> None:
    assert not RetryPolicy().should_retry(code, 1)


def test_disabled_never_retries() -> None:
    assert not RetryPolicy.disabled().should_retry(grpc.StatusCode.UNAVAILABLE, 1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"initial_backoff": -1},
        {"initial_backoff": 2, "max_backoff": 1},
        {"multiplier": 0.5},
        {"jitter": 1.5},
    ],
)
def test_nonsense_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
