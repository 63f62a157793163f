"""Billing periods over the wire: rollover without a webhook, late and moving webhooks, the first
webhook racing usage, totals that cannot overflow, one `last` tie-break, replays for ever.
Each test ends with `verify` finding no difference."""

from __future__ import annotations

import asyncio
import calendar
import datetime as dt
import os
import subprocess

import grpc
import pytest
from conftest import Service
from google.protobuf import timestamp_pb2
from helpers import details, record
from process import PLANS_FILE, executable

from usage.v1 import customer_pb2, usage_pb2
from usage_service.storage import drain_queries, history

R = usage_pb2
C = customer_pb2
BIG = 2**62


async def verified(service: Service) -> None:
    differences = await history.verify(service.db)
    assert differences == [], [str(d) for d in differences]


async def upsert(
    service: Service,
    start: dt.datetime,
    end: dt.datetime,
    customer_id: str = "cus_1",
    interval: int = C.BILLING_INTERVAL_UNSPECIFIED,
    plan_id: str = "basic",
    status: int = C.SUBSCRIPTION_STATUS_ACTIVE,
    **fields: object,
) -> C.Customer:
    customer = C.Customer(
        customer_id=customer_id,
        plan_id=plan_id,
        subscription_status=status,
        billing_interval=interval,
        **fields,  # type: ignore[arg-type]
    )
    customer.current_period_start_time.FromDatetime(start)
    customer.current_period_end_time.FromDatetime(end)
    answer = await service.customers.UpsertCustomer(C.UpsertCustomerRequest(customer=customer))
    return answer.customer


def consume(quantity: int, key: str, feature: str = "tokens") -> R.CheckEntitlementRequest:
    return R.CheckEntitlementRequest(
        customer_id="cus_1", feature=feature, quantity=quantity, consume=True, idempotency_key=key
    )


async def used(service: Service, meter: str = "tokens") -> tuple[int, R.GetUsageSummaryResponse]:
    summary = await service.usage.GetUsageSummary(
        R.GetUsageSummaryRequest(customer_id="cus_1", meter=meter)
    )
    return summary.meters[0].used, summary


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=dt.UTC)  # type: ignore[misc]


def hours(n: float) -> dt.timedelta:
    return dt.timedelta(hours=n)


async def test_rollover_without_a_webhook_holds_the_hard_limit(service: Service) -> None:
    """Scenario 1: after the confirmed period ends and before the renewal webhook, consumes
    judge the projected period: five consumes of 800 against a hard limit of 1000 let one
    through. The webhook that confirms the projection an hour later changes no figure."""
    now = dt.datetime.now(dt.UTC)
    boundary = now - hours(1)
    await upsert(service, boundary - hours(24), boundary, interval=C.BILLING_INTERVAL_DAY)
    await service.usage.RecordUsage(record(quantity=900, key="old", when=boundary - hours(2)))
    answers = [await service.usage.CheckEntitlement(consume(800, f"c{i}")) for i in range(5)]
    assert [a.allowed for a in answers] == [True, False, False, False, False]
    first = answers[0]
    assert (first.used, first.remaining) == (800, 200)
    assert first.period_source == C.PERIOD_SOURCE_PROJECTED
    assert first.period_start_time.ToDatetime(dt.UTC) == boundary
    assert first.period_end_time.ToDatetime(dt.UTC) == boundary + hours(24)
    assert answers[1].reason == R.ENTITLEMENT_REASON_LIMIT_EXCEEDED
    assert (await used(service))[0] == 800

    check = await service.usage.CheckEntitlement(
        R.CheckEntitlementRequest(customer_id="cus_1", feature="tokens", quantity=300)
    )
    assert not check.allowed and check.period_source == C.PERIOD_SOURCE_PROJECTED

    confirmed = await upsert(service, boundary, boundary + hours(24))
    assert confirmed.current_period_source == C.PERIOD_SOURCE_CONFIRMED
    assert confirmed.billing_interval == C.BILLING_INTERVAL_DAY
    figure, summary = await used(service)
    assert figure == 800 and summary.period_source == C.PERIOD_SOURCE_CONFIRMED
    await verified(service)


async def test_a_confirming_webhook_rewrites_no_totals_row(service: Service) -> None:
    """A late webhook confirming the projected period touches no totals row at all."""
    now = dt.datetime.now(dt.UTC)
    boundary = now - hours(3)
    await upsert(service, boundary - hours(24), boundary, interval=C.BILLING_INTERVAL_DAY)
    await service.usage.RecordUsage(record(quantity=5, key="a", when=boundary - hours(1)))
    await service.usage.RecordUsage(record(quantity=7, key="b", when=boundary + hours(1)))
    before = await service.db.fetch("SELECT xmin::text, * FROM usage_totals ORDER BY 2, 3, 4")
    await upsert(service, boundary, boundary + hours(24))
    after = await service.db.fetch("SELECT xmin::text, * FROM usage_totals ORDER BY 2, 3, 4")
    assert [tuple(r) for r in before] == [tuple(r) for r in after]
    await verified(service)


async def test_a_moving_webhook_rebuilds_exactly_the_changed_periods(service: Service) -> None:
    """A plan change with a new anchor: the periods from its start on are rewritten; the totals
    of earlier periods are left as they were."""
    now = dt.datetime.now(dt.UTC)
    start = now - hours(72)
    await upsert(service, start, start + hours(24), interval=C.BILLING_INTERVAL_DAY)
    for i, at in enumerate([start + hours(1), start + hours(30), now - hours(2), now]):
        await service.usage.RecordUsage(record(quantity=10**i, key=f"k{i}", when=at))
    first = await service.db.fetchrow(
        "SELECT xmin::text, * FROM usage_totals WHERE period_start = $1", start
    )
    # a new anchor half-way through the third day
    anchor = start + hours(60)
    await upsert(service, anchor, anchor + hours(24 * 7), interval=C.BILLING_INTERVAL_WEEK)
    assert first == await service.db.fetchrow(
        "SELECT xmin::text, * FROM usage_totals WHERE period_start = $1", start
    )
    figure, summary = await used(service)
    assert figure == 100 + 1000 and summary.period_start_time.ToDatetime(dt.UTC) == anchor
    rows = await service.db.fetch(
        "SELECT period_start, period_end, quantity_sum FROM usage_totals ORDER BY 1"
    )
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (start, start + hours(24), 1),
        (start + hours(24), start + hours(48), 10),
        (anchor, anchor + hours(24 * 7), 1100),
    ]
    await verified(service)


async def test_usage_racing_the_first_webhook_is_all_counted(service: Service) -> None:
    """Scenario 2: RecordUsage racing a customer's first UpsertCustomer loses no count."""
    now = dt.datetime.now(dt.UTC)
    for trial in range(10):
        customer = f"race{trial}"
        calls = [
            service.usage.RecordUsage(record(customer_id=customer, key=f"k{i}")) for i in range(30)
        ]
        calls.insert(15, upsert(service, now - hours(1), now + hours(23), customer_id=customer))
        calls += [
            service.usage.RecordUsage(record(customer_id=customer, key=f"j{i}")) for i in range(30)
        ]
        await asyncio.gather(*calls)
        summary = await service.usage.GetUsageSummary(
            R.GetUsageSummaryRequest(customer_id=customer, meter="tokens")
        )
        assert summary.meters[0].used == 60, trial
    await verified(service)


async def test_acknowledged_usage_can_never_wedge_a_webhook(service: Service) -> None:
    """Scenario 3: events past the period end cannot make a later UpsertCustomer fail: an event
    that would take the customer's total for the meter past int64 is refused, whichever period
    it lands in, so no later change of boundaries can overflow a period."""
    now = dt.datetime.now(dt.UTC)
    boundary = now - hours(2)
    await upsert(service, boundary - hours(24), boundary, interval=C.BILLING_INTERVAL_DAY)
    await service.usage.RecordUsage(record(quantity=BIG, key="a", when=boundary - hours(1)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.usage.RecordUsage(record(quantity=BIG, key="b", when=now))
    d = details(caught.value)
    assert (d.code, d.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "TOTAL_OUT_OF_RANGE")
    assert "quantity" in d.fields
    await service.usage.RecordUsage(record(quantity=BIG - 1, key="c", when=now))
    # A yearly period now holds both events: still in range, and the webhook goes through.
    await upsert(service, boundary - hours(24), boundary - hours(24) + dt.timedelta(days=365))
    assert (await used(service))[0] == 2 * BIG - 1
    await upsert(service, boundary - hours(24), boundary, status=C.SUBSCRIPTION_STATUS_CANCELED)
    # A customer not created yet: the same bound holds before its first webhook.
    await service.usage.RecordUsage(record(customer_id="new", quantity=BIG, key="a"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.usage.RecordUsage(record(customer_id="new", quantity=BIG, key="b"))
    assert details(caught.value).reason == "TOTAL_OUT_OF_RANGE"
    await upsert(service, now - hours(1), now + hours(1), customer_id="new")
    # a consume (storage has no hard limit) is refused the same way, naming its quantity
    at_max = R.CheckEntitlementRequest(
        customer_id="new", feature="storage", quantity=BIG, consume=True, idempotency_key="s1"
    )
    assert (await service.usage.CheckEntitlement(at_max)).allowed
    at_max.idempotency_key = "s2"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.usage.CheckEntitlement(at_max)
    d = details(caught.value)
    assert (d.code, d.reason, list(d.fields)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "TOTAL_OUT_OF_RANGE",
        ["quantity"],
    )
    assert await service.count_events("new") == 2
    await verified(service)


async def test_last_breaks_ties_the_same_way_in_every_path(service: Service) -> None:
    """Scenario 4: a `last` meter fed events with equal times keeps the one accepted last (the
    batch's later item, the later call), before and after any rebuild."""
    now = dt.datetime.now(dt.UTC)
    start = now - hours(5)
    await upsert(service, start, start + hours(24), interval=C.BILLING_INTERVAL_DAY)
    at = now - hours(1)
    batch = [record(meter="seats", quantity=q, key=k, when=at) for q, k in [(3, "z"), (5, "a")]]
    await service.usage.BatchRecordUsage(R.BatchRecordUsageRequest(requests=batch))
    assert (await used(service, "seats"))[0] == 5
    await upsert(service, start - hours(1), start + hours(23))  # moves the boundaries: rebuild
    assert (await used(service, "seats"))[0] == 5
    await service.usage.RecordUsage(record(meter="seats", quantity=2, key="m", when=at))
    assert (await used(service, "seats"))[0] == 2
    await upsert(service, start, start + hours(24))  # and back: rebuilt again
    assert (await used(service, "seats"))[0] == 2
    await verified(service)


async def test_an_overlapping_webhook_never_claims_an_event_twice(service: Service) -> None:
    """Scenario 5: after a webhook gives a period overlapping an earlier one, the drain's claim
    sees each pending event once."""
    now = dt.datetime.now(dt.UTC)
    start = now - hours(48)
    stripe = {"provider": C.PROVIDER_STRIPE, "provider_customer_id": "cus_s"}
    await upsert(service, start, start + hours(24), interval=C.BILLING_INTERVAL_DAY, **stripe)
    for i in range(6):
        await service.usage.RecordUsage(record(quantity=1, key=f"k{i}", when=start + hours(8 * i)))
    await upsert(service, start + hours(12), start + hours(36), **stripe)  # overlaps
    await upsert(service, start + hours(6), start + hours(30), **stripe)  # and backwards
    async with service.db.acquire() as conn, conn.transaction():
        claimed = await conn.fetch(drain_queries.CLAIM_EVENTS, "cus_1", "stripe", 100)
        ids = [r["event_id"] for r in claimed]
        assert len(ids) == len(set(ids)) == 6
        assert all(r["period_start"] is not None for r in claimed)
    await verified(service)


async def test_a_consume_replay_is_a_replay_whatever_happened_since(service: Service) -> None:
    """Scenario 6: a consume retried with its key answers allowed, duplicate and the original
    event id, after the customer went PAST_DUE or its plan dropped the feature."""
    now = dt.datetime.now(dt.UTC)
    await upsert(service, now - hours(1), now + hours(23))
    first = await service.usage.CheckEntitlement(consume(2, "seat-1", feature="seats"))
    assert first.allowed and first.event_id
    await upsert(service, now - hours(1), now + hours(23), status=C.SUBSCRIPTION_STATUS_PAST_DUE)
    again = await service.usage.CheckEntitlement(consume(2, "seat-1", feature="seats"))
    assert (again.allowed, again.duplicate, again.event_id) == (True, True, first.event_id)
    fresh = await service.usage.CheckEntitlement(consume(2, "seat-2", feature="seats"))
    assert not fresh.allowed and fresh.reason == R.ENTITLEMENT_REASON_SUBSCRIPTION_INACTIVE
    await upsert(service, now - hours(1), now + hours(23), plan_id="metered")  # no seats
    again = await service.usage.CheckEntitlement(consume(2, "seat-1", feature="seats"))
    assert (again.allowed, again.duplicate, again.event_id) == (True, True, first.event_id)
    assert again.used == 2 and not again.HasField("limit")
    assert await service.count_events() == 1
    await verified(service)


async def test_a_batch_overflowing_by_itself_is_refused_naming_the_item(service: Service) -> None:
    """Scenario 7: a batch whose own events overflow int64 gets INVALID_ARGUMENT naming the
    item that passes the bound, and nothing is stored."""
    items = [record(quantity=q, key=f"k{i}") for i, q in enumerate([1, BIG, 5, BIG])]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.usage.BatchRecordUsage(R.BatchRecordUsageRequest(requests=items))
    d = details(caught.value)
    assert (d.code, d.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "TOTAL_OUT_OF_RANGE")
    assert list(d.fields) == ["requests[3].quantity"]
    assert await service.count_events() == 0
    # with a stored total: the item that passes it is named
    await service.usage.RecordUsage(record(quantity=BIG, key="stored"))
    items = [record(quantity=q, key=f"j{i}") for i, q in enumerate([1, 2, BIG])]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.usage.BatchRecordUsage(R.BatchRecordUsageRequest(requests=items))
    assert list(details(caught.value).fields) == ["requests[2].quantity"]
    assert await service.count_events() == 1
    await verified(service)


def month_end_boundaries(anchor: dt.datetime, count: int) -> list[dt.datetime]:
    """Boundaries of a monthly cadence, written out independently of the service's code."""
    out = []
    for k in range(count):
        year, month0 = divmod(anchor.month - 1 + k, 12)
        year += anchor.year
        day = min(anchor.day, calendar.monthrange(year, month0 + 1)[1])
        out.append(anchor.replace(year=year, month=month0 + 1, day=day))
    return out


@pytest.mark.parametrize("day", [31, 30, 29])
async def test_month_end_anchors_project_calendar_correct_periods(
    service: Service, day: int
) -> None:
    """A period anchored on the 29th to 31st, confirmed in January two years ago: every later
    period ends on that day or the month's last day, returning to it after short months, up to
    the one that contains now (Stripe's billing cycle anchor)."""
    now = dt.datetime.now(dt.UTC)
    anchor = utc(now.year - 2, 1, day, 9, 30)
    grid = month_end_boundaries(anchor, 40)
    await upsert(service, grid[0], grid[1])  # the cadence is inferred: monthly, on `day`
    got = await service.customers.GetCustomer(C.GetCustomerRequest(customer_id="cus_1"))
    c = got.customer
    assert (c.billing_interval, c.billing_interval_count) == (C.BILLING_INTERVAL_MONTH, 1)
    assert c.billing_cycle_anchor_time.ToDatetime(dt.UTC).day == day
    k = max(i for i, b in enumerate(grid) if b <= now)
    assert c.current_period_start_time.ToDatetime(dt.UTC) == grid[k]
    assert c.current_period_end_time.ToDatetime(dt.UTC) == grid[k + 1]
    assert c.current_period_source == C.PERIOD_SOURCE_PROJECTED
    # usage on each side of every boundary of the last two years lands in its own period
    requests = [
        record(quantity=1, key=f"{b.isoformat()}{side}", when=b + dt.timedelta(microseconds=side))
        for b in grid[1 : k + 1]
        for side in (-1, 0)
    ]
    await service.usage.BatchRecordUsage(R.BatchRecordUsageRequest(requests=requests))
    rows = await service.db.fetch(
        "SELECT period_start, period_end, quantity_sum FROM usage_totals ORDER BY 1"
    )
    assert [(r[0], r[1]) for r in rows] == [(grid[i], grid[i + 1]) for i in range(k + 1)]
    assert [r[2] for r in rows] == [1] + [2] * (k - 1) + [1]
    await verified(service)


async def test_a_yearly_cadence_from_29_february(service: Service) -> None:
    start, end = utc(2024, 2, 29, 12), utc(2025, 2, 28, 12)
    c = await upsert(service, start, end)
    assert c.billing_interval == C.BILLING_INTERVAL_YEAR
    assert c.billing_cycle_anchor_time.ToDatetime(dt.UTC) == start
    events = [utc(2026, 2, 28, 11), utc(2026, 2, 28, 12), utc(2025, 3, 1)]
    for i, at in enumerate(events):
        await service.usage.RecordUsage(record(key=f"k{i}", when=at))
    rows = await service.db.fetch("SELECT period_start, period_end FROM usage_totals ORDER BY 1")
    assert [(r[0], r[1]) for r in rows] == [
        (utc(2025, 2, 28, 12), utc(2026, 2, 28, 12)),
        (utc(2026, 2, 28, 12), utc(2027, 2, 28, 12)),
    ]
    await verified(service)


async def test_cadence_given_with_an_anchor(service: Service) -> None:
    """A short first period with Stripe's billing cycle anchor: periods follow the anchor."""
    c = await upsert(
        service,
        utc(2026, 1, 15),
        utc(2026, 1, 31),
        interval=C.BILLING_INTERVAL_MONTH,
        billing_cycle_anchor_time=_ts(utc(2025, 12, 31)),
    )
    assert c.billing_interval_count == 1
    await service.usage.RecordUsage(record(key="feb", when=utc(2026, 2, 27)))
    await service.usage.RecordUsage(record(key="apr", when=utc(2026, 4, 30, 1)))
    rows = await service.db.fetch("SELECT period_start, period_end FROM usage_totals ORDER BY 1")
    assert [(r[0], r[1]) for r in rows] == [
        (utc(2026, 1, 31), utc(2026, 2, 28)),
        (utc(2026, 4, 30), utc(2026, 5, 31)),
    ]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"billing_interval_count": 2}, "customer.billing_interval_count"),
        ({"billing_interval": 99}, "customer.billing_interval"),
        (
            {"billing_interval": C.BILLING_INTERVAL_YEAR, "billing_interval_count": 11},
            "customer.billing_interval_count",
        ),
    ],
)
async def test_a_bad_cadence_is_refused_and_changes_nothing(
    service: Service, fields: dict[str, int], field: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    customer = C.Customer(
        customer_id="cus_1", plan_id="basic", subscription_status=C.SUBSCRIPTION_STATUS_ACTIVE
    )
    customer.current_period_start_time.FromDatetime(now)
    customer.current_period_end_time.FromDatetime(now + hours(1))
    for name, value in fields.items():
        setattr(customer, name, value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.customers.UpsertCustomer(C.UpsertCustomerRequest(customer=customer))
    d = details(caught.value)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT and field in d.fields
    assert await service.db.fetchval("SELECT count(*) FROM customers") == 0


@pytest.mark.tampers
@pytest.mark.process
async def test_verify_reports_a_tampered_total(service: Service, dsn: str) -> None:
    now = dt.datetime.now(dt.UTC)
    await upsert(service, now - hours(1), now + hours(1))
    await service.usage.RecordUsage(record(quantity=4, key="a"))
    await verified(service)
    await service.db.execute("UPDATE usage_totals SET quantity_sum = quantity_sum + 1")
    # events counted nowhere, as an earlier release left events outside the stored period
    await service.db.execute("DELETE FROM usage_totals WHERE meter = 'calls'")
    await service.usage.RecordUsage(record(meter="calls", key="c", when=now - hours(3)))
    await service.db.execute("DELETE FROM usage_totals WHERE meter = 'calls'")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "DATABASE_URL": dsn, "USAGE_PLANS_FILE": str(PLANS_FILE)}
        return subprocess.run(
            [*executable(), "verify", *args], env=env, capture_output=True, text=True, timeout=60
        )

    found = await asyncio.to_thread(cli)
    assert found.returncode == 1, found.stderr
    lines = found.stdout.splitlines()
    assert len(lines) == 3 and lines[-1] == "verify: 2 differences"
    assert "tokens" in lines[0] and "quantity_sum 5, events say 4" in lines[0]
    assert "calls" in lines[1] and "1 events counted in no totals row" in lines[1]
    assert found.stderr.splitlines()[-1] == "verify: 1/1 customers"
    repaired = await asyncio.to_thread(cli, "--repair")
    assert repaired.returncode == 0 and "1 customers repaired" in repaired.stdout
    clean = await asyncio.to_thread(cli, "--customer", "cus_1")
    assert (clean.returncode, clean.stdout) == (0, "verify: 0 differences\n")
    assert (await used(service))[0] == 4


def _ts(when: dt.datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(when)
    return out
