"""What a provider holds for one customer, meter and period: the question a reconciliation asks
each provider's adapter, and the answer it gets.

An adapter reads the provider's own figure back (it knows nothing of the database) and answers
in the meter's units: a sum, a count, a maximum or a last value, as the meter aggregates.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Protocol

from usage_service.domain.plans import Meter
from usage_service.domain.reports import Sent


@dataclasses.dataclass(frozen=True)
class Query:
    customer_id: str
    provider_customer_id: str  # the customer's id at the provider (may be empty)
    subscription_item: str  # Lemon Squeezy: the item for this meter (may be empty)
    meter: Meter
    start: dt.datetime  # the period, [start, end)
    end: dt.datetime
    sent: tuple[Sent, ...]  # the events reported to this provider in the period


@dataclasses.dataclass(frozen=True)
class Held:
    """The provider's figure for the period, or None when it cannot be told (`why` says why).

    Per-event providers also name the events they were sent but do not hold (`missing`) and
    the ones they count that were sent more than once or never by us (`extra`)."""

    value: int | None
    why: str = ""
    missing: tuple[str, ...] = ()  # event ids
    extra: int = 0  # in the meter's units


class ReadBack(Protocol):
    async def held(self, query: Query) -> Held: ...
