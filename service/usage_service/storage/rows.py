"""Rows to domain records, and reads shared by the store and the period history."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, TypeAlias

import asyncpg

from usage_service import domain
from usage_service.domain import periods
from usage_service.storage import queries

Conn: TypeAlias = "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"


# Enum members by stored value: a dict lookup per row instead of an enum call (the check path
# builds a customer per call).
_STATUSES = {s.value: s for s in domain.SubscriptionStatus}
_INTERVALS = {i.value: i for i in periods.Interval}
_PROVIDERS = {p.value: p for p in domain.Provider}


def customer_from_row(row: asyncpg.Record) -> domain.Customer | None:
    """The customer of a row; None for a placeholder (a customer known only by its usage)."""
    if not row["plan_id"]:
        return None
    start, end = row["period_start"], row["period_end"]
    return domain.Customer(
        customer_id=row["customer_id"],
        plan_id=row["plan_id"],
        subscription_status=_STATUSES[row["subscription_status"]],
        period_start=start,
        period_end=end,
        cadence=periods.Cadence(
            _INTERVALS[row["billing_interval"]],
            row["billing_interval_count"],
            row["billing_anchor"] or end,
        ),
        provider=_PROVIDERS[row["provider"]],
        provider_customer_id=row["provider_customer_id"],
        subscription_items=dict(_json(row["subscription_items"])),
    )


def _json(value: Any) -> Any:
    """A jsonb value: decoded by the pool's codec, or text from a connection without it."""
    return json.loads(value) if isinstance(value, str) else value


def last_confirmed_from_row(row: asyncpg.Record) -> list[periods.Stored]:
    """A customer's last confirmed period with its cadence, as a one-period history; none for a
    placeholder."""
    if not row["plan_id"]:
        return []
    end = row["period_end"]
    cadence = periods.Cadence(
        _INTERVALS[row["billing_interval"]],
        row["billing_interval_count"],
        row["billing_anchor"] or end,
    )
    return [periods.Stored(row["period_start"], end, cadence)]


def stored_from_row(row: asyncpg.Record) -> periods.Stored:
    return periods.Stored(
        row["period_start"],
        row["period_end"],
        periods.Cadence(
            periods.Interval(row["billing_interval"]),
            row["billing_interval_count"],
            row["billing_anchor"],
        ),
    )


def totals_from_row(row: asyncpg.Record) -> domain.Totals:
    return domain.Totals(
        event_count=row["event_count"],
        quantity_sum=row["quantity_sum"],
        quantity_max=row["quantity_max"],
        last_quantity=row["last_quantity"],
        last_event_time=row["last_event_time"],
        last_seq=row["last_seq"],
        reported_count=row["reported_count"],
        reported_sum=row["reported_sum"],
        failed_count=row["failed_count"],
        failed_sum=row["failed_sum"],
        unbilled_count=row["unbilled_count"],
        unbilled_sum=row["unbilled_sum"],
        covered_count=row["covered_count"],
        covered_sum=row["covered_sum"],
    )


async def stored_periods(
    conn: Conn | asyncpg.Pool, customer_ids: Sequence[str]
) -> dict[str, list[periods.Stored]]:
    """Customers' confirmed periods, oldest first (read one customer at a time)."""
    out: dict[str, list[periods.Stored]] = defaultdict(list)
    for customer_id in customer_ids:
        for row in await conn.fetch(queries.STORED_PERIODS, customer_id):
            out[customer_id].append(stored_from_row(row))
    return out
