"""What the drain hands an adapter, and what an adapter answers.

    Outcome
     +-- Delivered    the provider holds the report (2xx, or "already have it": duplicate=True)
     +-- Retry        nothing known to be stored, or unknown: send the same report again later
     +-- Failed       permanent: park every event of the report with the provider's reason
     +-- Rejected     permanent for the named events only; every other event is delivered
     +-- Checkpoint   save this adapter state with the report, then call send again

Adapters know nothing of the database: they get a Report and answer one Outcome. Each adapter maps
provider answers to an Outcome in exactly one place; the drain branches on the Outcome only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

from usage_service import domain

RETRY_STATUSES = frozenset({408, 409, 425, 429})  # and every 5xx
MAX_RETRY_AFTER = 3600.0  # seconds; a longer Retry-After is treated as this


@dataclasses.dataclass(frozen=True)
class Delivered:
    duplicate: bool = False  # the provider already had it


@dataclasses.dataclass(frozen=True)
class Retry:
    reason: str
    after: float | None = None  # seconds, from Retry-After; None: the drain's backoff decides


@dataclasses.dataclass(frozen=True)
class Failed:
    reason: str


@dataclasses.dataclass(frozen=True)
class Rejected:
    reasons: Mapping[str, str]  # event_id -> the provider's reason


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    state: Mapping[str, Any]
    hold: float = 0.0  # seconds from the save the drain must hold the lease (the send may land)


@dataclasses.dataclass(frozen=True)
class Reporting:
    """How an adapter wants its events grouped into reports; each adapter declares its own, so
    the drain never names a provider.

    Lane providers take one collapsed record per customer, meter and period (the report's value
    is the sum, count, max or last value); the others take batches of events, one provider event
    per usage event."""

    lanes: bool
    batch: int = 100  # batch providers: events per report, one provider call
    count_batch: int | None = None  # lanes, count meters: events per report (None: no cap)
    max_value: int = domain.MAX_TOTAL  # lanes, sum meters: the largest value of one report
    # lanes: the time a figure is stated at, from (when, period start, period end); None: none
    stated: Callable[[dt.datetime, dt.datetime, dt.datetime], dt.datetime] | None = None
    resend_window: dt.timedelta | None = None  # first sent longer ago: parked, not re-sent
    too_old: str = ""  # the reason such a report is parked with


Outcome: TypeAlias = Delivered | Retry | Failed | Rejected | Checkpoint


def retryable(status: int) -> bool:
    return status in RETRY_STATUSES or status >= 500


def retry_after(headers: Mapping[str, str], now: dt.datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), if any."""
    text = (headers.get("retry-after") or headers.get("Retry-After") or "").strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = (when - (now or dt.datetime.now(dt.UTC))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def iso(when: dt.datetime) -> str:
    """ISO-8601 in UTC with a Z, milliseconds kept."""
    text = when.astimezone(dt.UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")
