"""Prepaid features through the drain, against the five fake providers: each provider bills
exactly the usage grants did not pay for (recorded - covered), never an event grants paid for
whole, and nothing at all of a feature without overage; across a period rollover and for a late
event, which may burn only the grants still burnable when it is recorded."""

from __future__ import annotations

import datetime as dt
import tomllib
import uuid

import pytest
import test_drain
from conftest import PLANS_FILE, Service, differences
from fakes.world import CUSTOMERS, LEMON_ITEMS, Fakes
from helpers import record, wait_for
from test_drain import MakeDrain, drain_until_quiet, states, summary

from usage.v1 import credit_pb2, credit_pb2_grpc, customer_pb2, usage_pb2
from usage_service.domain import plans as plans_mod
from usage_service.domain.plans import Aggregation
from usage_service.settings import plans_file
from usage_service.storage import backlog

fakes = test_drain.fakes  # fixtures
make_drain = test_drain.make_drain

PROVIDERS = list(CUSTOMERS)  # stripe, lemon_squeezy, polar, dodo_payments, creem
ROLLOVER_IN = dt.timedelta(seconds=3)  # how soon the rollover test's first period ends

# Prepaid plans over the meters of tests/plans.toml (the ones the fakes know).
PREPAID_PLANS = """
[plans.prepaid]
name = "Prepaid, overage billed"
[plans.prepaid.features.tokens]
billing = "prepaid"
grant = { amount = 100 }
[plans.prepaid.features.calls]
billing = "prepaid"
grant = { amount = 3 }

[plans.capped]
name = "Prepaid, no overage"
[plans.capped.features.tokens]
billing = "prepaid"
overage = false
grant = { amount = 50 }
[plans.capped.features.calls]
billing = "prepaid"
overage = false
grant = { amount = 2 }
[plans.capped.features.storage]
included = 0
"""


@pytest.fixture
def plans() -> plans_mod.Plans:
    base = tomllib.loads(PLANS_FILE.read_text(encoding="utf-8"))
    extra = tomllib.loads(PREPAID_PLANS)["plans"]
    return plans_file.parse(
        {"meters": base["meters"], "plans": {**base["plans"], **extra}}, "test_credits_drain"
    )


async def add_customer(
    service: Service,
    provider: str,
    plan_id: str,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
) -> str:
    """The provider's test customer of fakes.world, on `plan_id`."""
    c = CUSTOMERS[provider]
    await service.add_customer(
        c.customer_id,
        plan_id=plan_id,
        start=start,
        end=end,
        provider=c.provider,
        provider_customer_id=c.provider_customer_id,
        subscription_items=c.subscription_items,
    )
    return c.customer_id


async def use(
    service: Service,
    customer_id: str,
    meter: str,
    quantities: list[int],
    when: dt.datetime | None = None,
) -> list[str]:
    """Records one event per quantity, one call each (so they burn in this order)."""
    out = []
    for q in quantities:
        answer = await service.usage.RecordUsage(
            record(customer_id, meter, q, uuid.uuid4().hex, when)
        )
        out.append(answer.event_id)
    return out


async def top_up(service: Service, customer_id: str, feature: str, amount: int) -> dt.datetime:
    """A top-up grant that never expires, effective now: its effective time."""
    credit = credit_pb2_grpc.CreditServiceStub(service.channel)
    answer = await credit.CreateGrant(
        credit_pb2.CreateGrantRequest(
            customer_id=customer_id, feature=feature, amount=amount, idempotency_key="pack-1"
        )
    )
    effective: dt.datetime = answer.grant.effective_time.ToDatetime(dt.UTC)
    return effective


def billed(fakes: Fakes, plans: plans_mod.Plans, provider: str) -> dict[str, int]:
    """What the fake provider bills the provider's test customer, per meter it received anything
    for: units for sum meters, events for count meters, the value billed for max meters."""
    c = CUSTOMERS[provider]
    out: dict[str, int] = {}
    if provider == "stripe":
        totals, counts = fakes.stripe.totals(), fakes.stripe.counts()
        for meter in plans.meters.values():
            key = (c.provider_customer_id, meter.stripe.event_name)
            if key not in totals:
                continue
            if meter.aggregation is Aggregation.SUM:
                out[meter.name] = totals[key]
            elif meter.aggregation is Aggregation.COUNT:
                out[meter.name] = counts[key]
            else:
                out[meter.name] = fakes.stripe.last(*key) or 0
        return out
    if provider == "lemon_squeezy":
        items = {item: meter for meter, item in LEMON_ITEMS.items()}
        for item, action, quantity in fakes.lemon_squeezy.records:
            meter = items[item]
            out[meter] = quantity if action == "set" else out.get(meter, 0) + quantity
        return out
    fake = getattr(fakes, provider)
    names = {getattr(m, provider).event_name: m.name for m in plans.meters.values()}
    for (customer, name), value in fake.totals().items():
        if customer == c.provider_customer_id:
            out[names[name]] = value
    return out


def received(fakes: Fakes, provider: str) -> set[str] | None:
    """The ids of the events a per-event provider received (None for the others)."""
    if provider in ("stripe", "lemon_squeezy"):
        return None
    return set(getattr(fakes, provider).accepted)


def figures(m: usage_pb2.MeterUsage) -> dict[str, int | str]:
    names = ("used", "covered", "billable_overage", "reported", "pending", "failed", "unbilled")
    out: dict[str, int | str] = {n: getattr(m, n) for n in names}
    out.update(billing=m.billing, balance=m.balance)
    return out


async def covered_by_event(service: Service, ids: list[str]) -> list[int]:
    rows = await service.db.fetch(
        "SELECT event_id::text, covered FROM usage_events WHERE event_id = ANY($1::uuid[])", ids
    )
    by_id = {r["event_id"]: r["covered"] for r in rows}
    return [by_id[i] for i in ids]


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_only_the_uncovered_part_of_prepaid_usage_is_billed(
    provider: str,
    service: Service,
    fakes: Fakes,
    make_drain: MakeDrain,
    plans: plans_mod.Plans,
    dsn: str,
) -> None:
    customer = await add_customer(service, provider, "prepaid")
    await top_up(service, customer, "tokens", 10)  # burns after the plan's grant (it expires)
    # plan grant 100 + top-up 10: 40 and 50 covered whole, 30 in part (20), 25 not at all
    tokens = await use(service, customer, "tokens", [40, 50, 30, 25])
    calls = await use(service, customer, "calls", [1] * 5)  # plan grant 3: two are billed
    await drain_until_quiet([await make_drain()], service.db)

    assert fakes.violations() == []
    assert billed(fakes, plans, provider) == {"tokens": 10 + 25, "calls": 2}
    sent = received(fakes, provider)
    if sent is not None:
        assert sent == {tokens[2], tokens[3], calls[3], calls[4]}
    assert await covered_by_event(service, tokens) == [40, 50, 20, 0]
    assert await states(service.db, customer) == {"covered": 2 + 3, "reported": 2 + 2}
    meters = await summary(service, customer)
    assert figures(meters["tokens"]) == {
        "used": 145,
        "covered": 110,
        "billable_overage": 35,
        "reported": 35,
        "pending": 0,
        "failed": 0,
        "unbilled": 0,
        "billing": "prepaid",
        "balance": 0,
    }
    assert figures(meters["calls"]) == {
        "used": 5,
        "covered": 3,
        "billable_overage": 2,
        "reported": 2,
        "pending": 0,
        "failed": 0,
        "unbilled": 0,
        "billing": "prepaid",
        "balance": 0,
    }
    assert (meters["calls"].granted, meters["calls"].burned) == (3, 3)
    assert meters["tokens"].billable_overage == billed(fakes, plans, provider)["tokens"]
    assert await differences(dsn) == []


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_prepaid_feature_without_overage_is_never_billed(
    provider: str,
    service: Service,
    fakes: Fakes,
    make_drain: MakeDrain,
    plans: plans_mod.Plans,
    dsn: str,
) -> None:
    customer = await add_customer(service, provider, "capped")
    tokens = await use(service, customer, "tokens", [30, 30, 10])  # grant 50: 30 + 20 covered
    await use(service, customer, "calls", [1] * 3)  # grant 2: one beyond it
    (arrears,) = await use(service, customer, "storage", [7])  # billed in arrears: sent whole
    drain = await make_drain()
    await drain_until_quiet([drain], service.db)
    await drain.cycle()  # nothing left to claim, nothing sent

    assert fakes.violations() == []
    assert billed(fakes, plans, provider) == {"storage": 7}
    sent = received(fakes, provider)
    if sent is not None:
        assert sent == {arrears}
    assert await covered_by_event(service, tokens) == [30, 20, 0]
    assert await states(service.db, customer) == {
        "covered": 1 + 2,
        "unbilled": 2 + 1,
        "reported": 1,
    }
    meters = await summary(service, customer)
    assert figures(meters["tokens"]) == {
        "used": 70,
        "covered": 50,
        "billable_overage": 0,
        "reported": 0,
        "pending": 0,
        "failed": 0,
        "unbilled": 20,
        "billing": "prepaid",
        "balance": 0,
    }
    assert figures(meters["calls"]) == {
        "used": 3,
        "covered": 2,
        "billable_overage": 0,
        "reported": 0,
        "pending": 0,
        "failed": 0,
        "unbilled": 1,
        "billing": "prepaid",
        "balance": 0,
    }
    assert (meters["tokens"].granted, meters["tokens"].burned) == (50, 50)
    assert (meters["calls"].granted, meters["calls"].burned) == (2, 2)
    assert (meters["storage"].reported, meters["storage"].pending) == (1, 0)
    assert await differences(dsn) == []


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_across_a_rollover_and_a_late_event_only_uncovered_usage_is_billed(
    provider: str,
    service: Service,
    fakes: Fakes,
    make_drain: MakeDrain,
    plans: plans_mod.Plans,
    dsn: str,
) -> None:
    now = dt.datetime.now(dt.UTC)
    rollover = now + ROLLOVER_IN  # the first period's end: its plan grant expires then
    start = now - dt.timedelta(days=1)
    customer = await add_customer(service, provider, "prepaid", start, rollover)
    topped_up = await top_up(service, customer, "tokens", 20)  # never expires
    # The first period: its plan grant (100, burned first: it expires) covers 60 + 30; three
    # of the four calls are covered.
    first_tokens = await use(service, customer, "tokens", [60, 30])
    first_calls = await use(service, customer, "calls", [1] * 4)
    assert dt.datetime.now(dt.UTC) < rollover, "too slow: the first period ended while recording"
    assert topped_up < rollover
    drain = await make_drain()
    await drain_until_quiet([drain], service.db)
    assert billed(fakes, plans, provider) == {"calls": 1}

    async def rolled_over() -> bool:
        return dt.datetime.now(dt.UTC) >= rollover

    await wait_for(rolled_over, "the first period to end")
    # The webhook of the next period; its plan grant (100) is made on first use.
    await add_customer(service, provider, "prepaid", rollover, rollover + dt.timedelta(days=30))
    (a,) = await use(service, customer, "tokens", [70])  # the next period's grant: 30 left
    # A late event, timed in the first period: that period's grant (10 left) has expired and
    # the next one's is not effective at its time; only the top-up pays, 20 of 25.
    late = rollover - dt.timedelta(milliseconds=1)
    (late_tokens,) = await use(service, customer, "tokens", [25], late)
    (late_call,) = await use(service, customer, "calls", [1], late)  # no grant: billed
    (b,) = await use(service, customer, "tokens", [50])  # the grant's last 30; 20 billed
    next_calls = await use(service, customer, "calls", [1] * 2)  # covered (grant 3)
    await drain_until_quiet([drain], service.db)

    assert fakes.violations() == []
    assert billed(fakes, plans, provider) == {"tokens": 5 + 20, "calls": 1 + 1}
    sent = received(fakes, provider)
    if sent is not None:
        assert sent == {first_calls[3], late_tokens, late_call, b}
    if provider == "stripe":  # Stripe sums by time: each period holds its own overage
        event_name = plans.meters["tokens"].stripe.event_name
        assert fakes.stripe.summed("cus_s", event_name, start, rollover) == 5
        assert fakes.stripe.summed("cus_s", event_name, rollover) == 20
    tokens = [*first_tokens, a, late_tokens, b]
    assert await covered_by_event(service, tokens) == [60, 30, 70, 20, 30]
    calls = [*first_calls, late_call, *next_calls]
    assert await covered_by_event(service, calls) == [1, 1, 1, 0, 0, 1, 1]
    ended = await service.db.fetchrow(
        """SELECT quantity_sum, covered_sum, reported_sum FROM usage_totals
           WHERE customer_id = $1 AND meter = 'tokens' AND period_end = $2""",
        customer,
        rollover,
    )
    assert ended is not None and tuple(ended) == (115, 110, 5)
    meters = await summary(service, customer)  # the current period: the next one
    assert figures(meters["tokens"]) == {
        "used": 120,
        "covered": 100,
        "billable_overage": 20,
        "reported": 20,
        "pending": 0,
        "failed": 0,
        "unbilled": 0,
        "billing": "prepaid",
        "balance": 0,
    }
    assert figures(meters["calls"]) == {
        "used": 2,
        "covered": 2,
        "billable_overage": 0,
        "reported": 0,
        "pending": 0,
        "failed": 0,
        "unbilled": 0,
        "billing": "prepaid",
        "balance": 1,
    }
    assert (meters["calls"].granted, meters["calls"].burned) == (3, 2)
    credit = credit_pb2_grpc.CreditServiceStub(service.channel)
    listed = await credit.ListGrants(
        credit_pb2.ListGrantsRequest(customer_id=customer, feature="tokens", include_inactive=True)
    )
    first_plan = [g for g in listed.grants if g.expire_time.ToDatetime(dt.UTC) == rollover]
    assert [(g.burned, g.forfeited) for g in first_plan] == [(90, 10)]  # never burned late
    assert await differences(dsn) == []


async def test_the_summary_counts_a_spent_top_up_in_granted_and_burned(service: Service) -> None:
    await service.add_customer("c_none", plan_id="prepaid")  # no provider: nothing to drain
    await top_up(service, "c_none", "tokens", 10)
    await use(service, "c_none", "tokens", [105])  # the plan's 100, then 5 of the top-up
    before = (await summary(service, "c_none"))["tokens"]
    assert (before.granted, before.burned, before.balance) == (110, 105, 5)
    await use(service, "c_none", "tokens", [5])  # the top-up's last 5
    after = (await summary(service, "c_none"))["tokens"]
    assert (after.granted, after.burned, after.balance) == (110, 110, 0)


async def test_a_period_ended_early_by_a_webhook_takes_its_plan_grant_with_it(
    service: Service,
) -> None:
    now = dt.datetime.now(dt.UTC)
    customer = await add_customer(service, "stripe", "prepaid", now - dt.timedelta(days=1))
    await use(service, customer, "tokens", [60])  # this period's plan grant: 40 left
    renewed = dt.datetime.now(dt.UTC)  # the subscription renews early: a new period from now
    await add_customer(service, "stripe", "prepaid", renewed, renewed + dt.timedelta(days=30))
    await use(service, customer, "tokens", [150])  # the new period's grant pays 100 of it
    tokens = (await summary(service, customer))["tokens"]
    assert (tokens.covered, tokens.billable_overage, tokens.pending) == (100, 50, 50)


async def test_parked_prepaid_usage_is_billed_its_uncovered_part_once_requeued(
    service: Service, fakes: Fakes, make_drain: MakeDrain, plans: plans_mod.Plans, dsn: str
) -> None:
    customer = "c_stripe"  # no Stripe customer id yet: its reports are refused, events parked
    await service.add_customer(customer, plan_id="prepaid", provider=customer_pb2.PROVIDER_STRIPE)
    await use(service, customer, "tokens", [80, 50])  # 100 covered: 30 to bill
    drain = await make_drain()
    await drain_until_quiet([drain], service.db)
    parked = (await summary(service, customer))["tokens"]
    figures_parked = (parked.covered, parked.failed, parked.pending, parked.billable_overage)
    assert figures_parked == (100, 30, 0, 30)
    assert fakes.stripe.events == {}

    await add_customer(service, "stripe", "prepaid")  # now with its Stripe customer id
    assert await backlog.Backlog(service.db).requeue("stripe") == 1
    await drain_until_quiet([drain], service.db)
    assert billed(fakes, plans, "stripe") == {"tokens": 30}
    settled = (await summary(service, customer))["tokens"]
    assert (settled.covered, settled.reported, settled.failed, settled.pending) == (100, 30, 0, 0)
    assert fakes.violations() == []
    assert await differences(dsn) == []
