"""Every RPC through both facades, against the live server."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid

import pytest
from support import new_customer

import usage_client
from usage_client import EntitlementReason, SubscriptionStatus, UsageEvent, idempotency_key


def key() -> str:
    return idempotency_key("test", uuid.uuid4().hex)


def test_upsert_and_get_customer_round_trip(client: usage_client.UsageClient) -> None:
    start = dt.datetime.now(dt.UTC).replace(microsecond=123456) - dt.timedelta(days=3)
    end = start + dt.timedelta(weeks=1)
    sent = usage_client.Customer(
        customer_id=f"cus_{uuid.uuid4().hex}",
        plan_id="starter",
        subscription_status=SubscriptionStatus.TRIALING,
        current_period_start_time=start,
        current_period_end_time=end,
        provider=usage_client.Provider.LEMON_SQUEEZY,
        provider_customer_id="ls_123",
        subscription_items={"tokens": "si_1", "calls": "si_2"},
    )
    # The answer adds the cadence inferred from the period (a week) and says it is confirmed.
    answered = dataclasses.replace(
        sent,
        billing_interval=usage_client.BillingInterval.WEEK,
        billing_interval_count=1,
        billing_cycle_anchor_time=end,
        current_period_source=usage_client.PeriodSource.CONFIRMED,
    )
    assert client.upsert_customer(sent) == answered
    assert client.get_customer(sent.customer_id) == answered
    # Upsert replaces.
    changed = usage_client.Customer(
        customer_id=sent.customer_id,
        plan_id="unlimited",
        subscription_status=SubscriptionStatus.CANCELED,
        current_period_start_time=start,
        current_period_end_time=end,
    )
    changed_answer = dataclasses.replace(
        answered,
        plan_id="unlimited",
        subscription_status=SubscriptionStatus.CANCELED,
        provider=usage_client.Provider.UNSPECIFIED,
        provider_customer_id="",
        subscription_items={},
    )
    assert client.upsert_customer(changed) == changed_answer
    fetched = client.get_customer(sent.customer_id)
    assert fetched == changed_answer
    assert fetched.current_period_start_time.tzinfo is not None


def test_a_period_past_its_end_is_projected(client: usage_client.UsageClient) -> None:
    """The answer names the period containing now: past the confirmed one, projected."""
    end = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1)
    sent = usage_client.Customer(
        customer_id=f"cus_{uuid.uuid4().hex}",
        plan_id="starter",
        subscription_status=SubscriptionStatus.ACTIVE,
        current_period_start_time=end - dt.timedelta(days=1),
        current_period_end_time=end,
        billing_interval=usage_client.BillingInterval.DAY,
    )
    got = client.upsert_customer(sent)
    assert got.current_period_source is usage_client.PeriodSource.PROJECTED
    assert (got.current_period_start_time, got.current_period_end_time) == (
        end,
        end + dt.timedelta(days=1),
    )


def test_record_usage_once_per_key(
    client: usage_client.UsageClient, customer: usage_client.Customer
) -> None:
    k = key()
    first = client.record_usage(customer.customer_id, "tokens", 120, idempotency_key=k)
    again = client.record_usage(customer.customer_id, "tokens", 120, idempotency_key=k)
    assert first.duplicate is False and first.event_id
    assert again == usage_client.RecordResult(first.event_id, True)
    tokens = client.get_usage_summary(customer.customer_id).meter("tokens")
    assert tokens.used == 120
    # No provider: the usage is unbilled (never reported), not pending.
    assert (tokens.unbilled, tokens.pending, tokens.reported, tokens.failed) == (120, 0, 0, 0)


def test_record_usage_with_time_and_properties(
    client: usage_client.UsageClient, customer: usage_client.Customer
) -> None:
    when = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=3)
    result = client.record_usage(
        customer.customer_id,
        "calls",
        1,
        idempotency_key=key(),
        event_time=when,
        properties={"endpoint": "/v1/complete"},
    )
    assert result.duplicate is False
    assert client.get_usage_summary(customer.customer_id, "calls").meter("calls").used == 1


def test_batch_reports_duplicates_per_item_in_order(
    client: usage_client.UsageClient, customer: usage_client.Customer
) -> None:
    cid = customer.customer_id
    earlier = client.record_usage(cid, "tokens", 10, idempotency_key="earlier")
    k = key()
    results = client.batch_record_usage(
        [
            UsageEvent(cid, "tokens", 1, k),
            UsageEvent(cid, "tokens", 10, "earlier"),
            UsageEvent(cid, "tokens", 1, k),
            UsageEvent(cid, "calls", 1, key(), properties={"a": "b"}),
        ]
    )
    assert [r.duplicate for r in results] == [False, True, True, False]
    assert results[1].event_id == earlier.event_id
    assert results[2].event_id == results[0].event_id
    assert len({results[0].event_id, results[1].event_id, results[3].event_id}) == 3
    summary = client.get_usage_summary(cid)
    assert summary.meter("tokens").used == 11
    assert summary.meter("calls").used == 1


def test_check_without_consume_changes_nothing(
    client: usage_client.UsageClient, customer: usage_client.Customer
) -> None:
    cid = customer.customer_id
    client.record_usage(cid, "tokens", 900, idempotency_key=key())
    check = client.check_entitlement(cid, "tokens", 100)
    assert check.allowed and check.reason is EntitlementReason.WITHIN_LIMIT
    assert (check.used, check.included, check.limit, check.remaining) == (900, 1000, 5000, 4100)
    assert check.event_id is None and check.duplicate is False
    assert check.period_start_time == customer.current_period_start_time
    assert check.period_end_time == customer.current_period_end_time
    assert check.period_source is usage_client.PeriodSource.CONFIRMED
    assert client.get_usage_summary(cid).meter("tokens").used == 900


def test_consume_is_recorded_once_and_stops_at_the_hard_limit(
    client: usage_client.UsageClient, customer: usage_client.Customer
) -> None:
    cid = customer.customer_id
    k = key()
    first = client.check_entitlement(cid, "tokens", 4000, consume=True, idempotency_key=k)
    assert first.allowed and first.event_id and not first.duplicate
    assert (first.used, first.remaining) == (4000, 1000)
    again = client.check_entitlement(cid, "tokens", 4000, consume=True, idempotency_key=k)
    assert again.duplicate and again.event_id == first.event_id and again.used == 4000
    over = client.check_entitlement(cid, "tokens", 1001, consume=True, idempotency_key=key())
    assert not over.allowed and over.reason is EntitlementReason.LIMIT_EXCEEDED
    assert over.event_id is None and over.used == 4000
    summary = client.get_usage_summary(cid, "tokens")
    assert [m.meter for m in summary.meters] == ["tokens"]
    assert (summary.meters[0].used, summary.meters[0].overage) == (4000, 3000)


def test_a_consumed_decision_is_kept_as_answered(
    client: usage_client.UsageClient, customer: usage_client.Customer
) -> None:
    cid = customer.customer_id
    before = dt.datetime.now(dt.UTC)
    k = key()
    first = client.check_entitlement(cid, "tokens", 700, consume=True, idempotency_key=k)
    assert first.allowed and first.decision_id and first.totals_version > 0
    assert first.as_of_time is not None and before <= first.as_of_time <= dt.datetime.now(dt.UTC)
    assert first.rule == usage_client.DecisionRule(
        plan_id="starter",
        feature="tokens",
        included=1000,
        limit=5000,
        enforcement="hard",
        billing="arrears",
    )
    kept = client.get_decision(first.decision_id)
    assert kept == usage_client.Decision(
        decision_id=first.decision_id,
        customer_id=cid,
        feature="tokens",
        quantity=700,
        consume=True,
        response=first,
    )
    replay = client.check_entitlement(cid, "tokens", 700, consume=True, idempotency_key=k)
    assert replay.duplicate and replay.decision_id == first.decision_id
    # A plain check reads the version the consume committed; an allowed one is not kept.
    check = client.check_entitlement(cid, "tokens", 1)
    assert check.totals_version == first.totals_version and check.decision_id is None


def test_check_reasons(client: usage_client.UsageClient, customer: usage_client.Customer) -> None:
    cid = customer.customer_id
    sso = client.check_entitlement(cid, "sso")
    assert sso.allowed and sso.reason is EntitlementReason.FEATURE_ENABLED
    seats = client.check_entitlement(cid, "seats", 1)
    assert not seats.allowed and seats.reason is EntitlementReason.FEATURE_NOT_IN_PLAN
    for n in range(25):
        client.record_usage(cid, "calls", 1, idempotency_key=f"call-{n}")
    soft = client.check_entitlement(cid, "calls", 1)
    assert soft.allowed and soft.reason is EntitlementReason.SOFT_LIMIT_EXCEEDED
    assert (soft.used, soft.limit, soft.remaining) == (25, 20, 0)
    nobody = client.check_entitlement(f"cus_{uuid.uuid4().hex}", "tokens", 1)
    assert not nobody.allowed and nobody.reason is EntitlementReason.CUSTOMER_NOT_FOUND
    assert nobody.period_start_time is None and nobody.limit is None


def test_inactive_subscription_is_denied(client: usage_client.UsageClient) -> None:
    cancelled = new_customer(client, status=SubscriptionStatus.CANCELED)
    check = client.check_entitlement(cancelled.customer_id, "tokens", 1)
    assert not check.allowed and check.reason is EntitlementReason.SUBSCRIPTION_INACTIVE


def test_summary_of_an_unlimited_plan(client: usage_client.UsageClient) -> None:
    c = new_customer(client, plan_id="unlimited")
    client.record_usage(c.customer_id, "tokens", 250, idempotency_key=key())
    summary = client.get_usage_summary(c.customer_id)
    assert (summary.customer_id, summary.plan_id) == (c.customer_id, "unlimited")
    assert summary.subscription_status is SubscriptionStatus.ACTIVE
    assert summary.period_start_time == c.current_period_start_time
    assert summary.period_end_time == c.current_period_end_time
    assert summary.period_source is usage_client.PeriodSource.CONFIRMED
    tokens = summary.meter("tokens")
    assert (tokens.used, tokens.included, tokens.limit, tokens.remaining) == (250, 100, None, None)
    assert (tokens.overage, tokens.aggregation, tokens.unit) == (150, "sum", "tokens")
    assert summary.meter("seats").aggregation == "last"
    with pytest.raises(KeyError):
        summary.meter("calls")


async def test_async_facade_covers_every_rpc(aclient: usage_client.AsyncUsageClient) -> None:
    now = dt.datetime.now(dt.UTC)
    c = usage_client.Customer(
        customer_id=f"cus_{uuid.uuid4().hex}",
        plan_id="starter",
        subscription_status=SubscriptionStatus.ACTIVE,
        current_period_start_time=now - dt.timedelta(hours=1),
        current_period_end_time=now + dt.timedelta(days=30),
        provider=usage_client.Provider.STRIPE,
        provider_customer_id="cus_stripe_1",
    )
    # 30 days and an hour is no whole period of any cadence: a new customer is monthly, anchored
    # on the period's end; now lies inside the period sent, so it is confirmed.
    answered = dataclasses.replace(
        c,
        billing_interval=usage_client.BillingInterval.MONTH,
        billing_interval_count=1,
        billing_cycle_anchor_time=c.current_period_end_time,
        current_period_source=usage_client.PeriodSource.CONFIRMED,
    )
    assert await aclient.upsert_customer(c) == answered
    assert await aclient.get_customer(c.customer_id) == answered
    k = key()
    recorded = await aclient.record_usage(c.customer_id, "tokens", 50, idempotency_key=k)
    assert not recorded.duplicate
    batch = await aclient.batch_record_usage(
        [UsageEvent(c.customer_id, "tokens", 50, k), UsageEvent(c.customer_id, "tokens", 7, key())]
    )
    assert [r.duplicate for r in batch] == [True, False]
    assert batch[0].event_id == recorded.event_id
    check = await aclient.check_entitlement(
        c.customer_id, "tokens", 3, consume=True, idempotency_key=key()
    )
    assert check.allowed and check.used == 60 and check.event_id
    assert check.period_source is usage_client.PeriodSource.CONFIRMED
    assert check.decision_id is not None
    kept = await aclient.get_decision(check.decision_id)
    assert (kept.customer_id, kept.feature, kept.quantity) == (c.customer_id, "tokens", 3)
    assert kept.response == check
    summary = await aclient.get_usage_summary(c.customer_id)
    assert summary.period_source is usage_client.PeriodSource.CONFIRMED
    tokens = summary.meter("tokens")
    assert tokens.used == 60
    # A provider: the usage is pending or reported (the drain may have run), never unbilled.
    assert tokens.pending + tokens.reported == 60
    assert (tokens.unbilled, tokens.failed) == (0, 0)
