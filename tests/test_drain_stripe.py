"""The drain against the fake Stripe: what Stripe would bill per period equals what the service
says it reported, late events and huge values included."""

from __future__ import annotations

import datetime as dt

import asyncpg
import test_drain
from conftest import Service
from fakes import event
from fakes.base import Fault
from fakes.world import Fakes
from test_drain import MakeDrain, add_customers, drain_until_quiet, record_many, states, summary

from usage.v1 import customer_pb2
from usage_service import domain
from usage_service.domain import plans, reports
from usage_service.drain.reports import build_reports
from usage_service.providers.lemon_squeezy import LemonSqueezy
from usage_service.providers.stripe_meters import StripeMeters
from usage_service.storage import drain_store

STRIPE = domain.Provider.STRIPE
STRIPE_MAX = 999_999_999_999_999  # the largest value of a Stripe meter event (15 digits)
fakes = test_drain.fakes  # fixtures
make_drain = test_drain.make_drain


async def periods(db: asyncpg.Pool, customer_id: str, meter: str) -> list[asyncpg.Record]:
    return list(
        await db.fetch(
            "SELECT * FROM usage_totals WHERE customer_id = $1 AND meter = $2 "
            "ORDER BY period_start",
            customer_id,
            meter,
        )
    )


async def test_a_late_peak_on_a_max_meter_is_what_stripe_holds(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    await add_customers(service, ["stripe"])
    now = dt.datetime.now(dt.UTC)
    d = await make_drain()
    await record_many(service, "c_stripe", "storage", [10], now - dt.timedelta(seconds=10))
    await drain_until_quiet([d], service.db)
    late = now - dt.timedelta(hours=1)  # recorded after the report of 10, timed before it
    await record_many(service, "c_stripe", "storage", [50], late)
    await drain_until_quiet([d], service.db)

    (period,) = await periods(service.db, "c_stripe", "storage")
    start, end = period["period_start"], period["period_end"]
    assert fakes.stripe.last("cus_s", "storage", start, end) == 50
    assert (await summary(service, "c_stripe"))["storage"].used == 50
    assert fakes.violations() == []


async def test_a_late_event_of_an_ended_period_is_billed_at_that_periods_figure(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    now = dt.datetime.now(dt.UTC)
    await add_ended_customer(service, now)
    d = await make_drain()
    await record_many(service, "c_stripe", "storage", [10], now - dt.timedelta(days=3))
    await record_many(service, "c_stripe", "seats", [4], now - dt.timedelta(days=3))
    await drain_until_quiet([d], service.db)
    await record_many(service, "c_stripe", "storage", [50], now - dt.timedelta(days=15))
    await record_many(service, "c_stripe", "seats", [2], now - dt.timedelta(days=15))
    await record_many(service, "c_stripe", "storage", [7], now - dt.timedelta(minutes=1))
    await drain_until_quiet([d], service.db)

    ended, current = await periods(service.db, "c_stripe", "storage")
    assert ended["period_end"] <= now < current["period_end"]
    stripe = fakes.stripe
    assert stripe.last("cus_s", "storage", ended["period_start"], ended["period_end"]) == 50
    assert stripe.last("cus_s", "storage", current["period_start"], current["period_end"]) == 7
    (seats,) = await periods(service.db, "c_stripe", "seats")
    assert stripe.last("cus_s", "seats", seats["period_start"], seats["period_end"]) == 4
    assert fakes.violations() == []


async def test_one_customers_huge_usage_never_blocks_another_stripe_customer(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    await add_customers(service, ["stripe"])
    for customer, stripe_id in (("c_huge", "cus_huge"), ("c_big", "cus_big")):
        await service.add_customer(
            customer, provider=customer_pb2.PROVIDER_STRIPE, provider_customer_id=stripe_id
        )
    backdated = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    # Together the largest int64: acknowledged, and more than Stripe takes in 10 meter events.
    await record_many(service, "c_huge", "tokens", [2**62, 2**62 - 1], backdated)
    await record_many(service, "c_huge", "storage", [2**62], backdated)
    await record_many(service, "c_big", "tokens", [2 * STRIPE_MAX + 1], backdated)
    await record_many(service, "c_stripe", "tokens", [5, 7], backdated)
    await record_many(service, "c_stripe", "storage", [30])
    d = await make_drain()
    await drain_until_quiet([d], service.db)

    assert await states(service.db, "c_stripe") == {"reported": 3}
    assert fakes.stripe.totals()[("cus_s", "llm_tokens")] == 12
    assert fakes.stripe.last("cus_s", "storage") == 30
    assert fakes.stripe.totals()[("cus_big", "llm_tokens")] == 2 * STRIPE_MAX + 1
    assert await states(service.db, "c_big") == {"reported": 1}
    assert await states(service.db, "c_huge") == {"failed": 3}
    reasons = await service.db.fetch(
        "SELECT DISTINCT last_error FROM usage_events WHERE customer_id = 'c_huge'"
    )
    assert reasons and all("15 digits" in r["last_error"] for r in reasons)
    assert not any(e.customer == "cus_huge" for e in fakes.stripe.events.values())
    assert fakes.violations() == []


def test_lane_reports_never_carry_a_value_past_a_bigint_or_15_digits(plans: plans.Plans) -> None:
    period = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    items = [
        drain_store.Claimed(event(customer_id=c, quantity=q), period, None)
        for c, q in (("a", 2**62), ("a", 2**62), ("b", 6 * 10**14), ("b", 6 * 10**14))
    ]
    stripe = {
        r.lane: r.value for r in build_reports(STRIPE, StripeMeters.reporting, plans.meters, items)
    }
    assert stripe == {
        reports.lane(STRIPE, "a", "tokens"): 2**62,  # alone: the adapter parks it
        reports.lane(STRIPE, "b", "tokens"): 6 * 10**14,  # the next waits its turn
    }
    lemon = domain.Provider.LEMON_SQUEEZY
    values = [r.value for r in build_reports(lemon, LemonSqueezy.reporting, plans.meters, items)]
    assert values == [2**62, 12 * 10**14]


async def test_stripe_holds_per_period_what_the_service_says_it_reported(
    service: Service, fakes: Fakes, make_drain: MakeDrain
) -> None:
    now = dt.datetime.now(dt.UTC)
    await add_ended_customer(service, now)
    d = await make_drain()
    # two in the ended period, two in the current one
    days = [
        dt.timedelta(days=19),
        dt.timedelta(days=10),
        dt.timedelta(days=1),
        dt.timedelta(hours=2),
    ]
    for round_, (tokens, storage) in enumerate((([5, 6], [40, 10]), ([7, 8], [60, 20]))):
        for ago in days if round_ == 0 else reversed(days):  # late events in round 2
            when = now - ago - dt.timedelta(minutes=round_)
            await record_many(service, "c_stripe", "tokens", tokens, when)
            await record_many(service, "c_stripe", "storage", storage, when)
        fakes.stripe.inject(
            Fault("status", 500, body={"error": {"type": "api_error", "message": "boom"}}),
            Fault("drop"),
            Fault("status", 429, {"Retry-After": "0"}, {"error": {"message": "slow"}}),
        )
        await drain_until_quiet([d], service.db)

    stripe = fakes.stripe
    sums = await periods(service.db, "c_stripe", "tokens")
    peaks = await periods(service.db, "c_stripe", "storage")
    assert len(sums) == len(peaks) == 2
    for row in sums:
        billed = stripe.summed("cus_s", "llm_tokens", row["period_start"], row["period_end"])
        assert billed == row["reported_sum"] == row["quantity_sum"] == 2 * (5 + 6 + 7 + 8)
    for row in peaks:
        billed = stripe.last("cus_s", "storage", row["period_start"], row["period_end"])
        assert row["reported_count"] == row["event_count"] == 8
        assert billed == row["quantity_max"] == 60
    current = await summary(service, "c_stripe")
    (now_sum,) = [r for r in sums if r["period_start"] <= now < r["period_end"]]
    assert (current["tokens"].reported, current["tokens"].pending) == (now_sum["reported_sum"], 0)
    assert (current["storage"].used, current["storage"].pending) == (60, 0)
    assert fakes.violations() == []


async def add_ended_customer(service: Service, now: dt.datetime) -> None:
    """The Stripe customer, its confirmed period [now - 20 days, now - 2 days) ended."""
    await service.add_customer(
        "c_stripe",
        start=now - dt.timedelta(days=20),
        end=now - dt.timedelta(days=2),
        provider=customer_pb2.PROVIDER_STRIPE,
        provider_customer_id="cus_s",
    )
