"""What the drain reports to a provider: the events of one report, and the report itself, and what
a provider was sent (for reconciliation)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import Any

from usage_service import domain

LANE_SEPARATOR = "\x1f"  # chr(31) in SQL


@dataclasses.dataclass(frozen=True)
class ReportEvent:
    """One usage event as captured in a report, with the customer's provider details."""

    event_id: str
    customer_id: str
    meter: str
    quantity: int
    event_time: dt.datetime
    properties: Mapping[str, str]
    provider_customer_id: str  # Stripe cus_..., Polar / Dodo / Creem customer id; may be empty
    subscription_item: str  # Lemon Squeezy subscription item id for this meter; may be empty


@dataclasses.dataclass(frozen=True)
class Report:
    """What is sent as one unit, under a stable identifier stored before the first send: the
    events of one customer (its key is (customer_id, report_id)). Per-event providers get several
    customers' reports in one call.

    Lane reports (Stripe, Lemon Squeezy) hold one customer's events of one meter and period, and
    `value` is what a collapsed record carries: the sum (sum meters), the event count (count
    meters) or the period's max / latest value (max / last meters)."""

    report_id: str
    provider: domain.Provider
    events: tuple[ReportEvent, ...]
    value: int = 0
    checkpoint: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    attempts: int = 0
    first_sent_at: dt.datetime | None = None
    stated_at: dt.datetime | None = None  # Stripe max / last: when the figure is stated
    customer_id: str = ""  # whose events these are

    @property
    def key(self) -> tuple[str, str]:
        """(customer_id, report_id): the report's key in storage."""
        return self.customer_id, self.report_id


@dataclasses.dataclass(frozen=True)
class Sent:
    """One usage event reported to the provider, as a per-event provider knows it."""

    event_id: str
    quantity: int
    event_time: dt.datetime


def lane(provider: domain.Provider, customer_id: str, meter: str) -> str:
    return LANE_SEPARATOR.join((provider.value, customer_id, meter))
