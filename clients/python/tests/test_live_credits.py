"""Prepaid credits through both facades, against the live server.

The `prepaid` plan of plans.toml: `tokens` burns grants and allows no usage beyond them, with a
plan grant of 100 tokens a period at priority 5 (top-ups at priority 0 burn first); `calls` burns
grants and bills the rest as overage, with a soft limit of 20 and a ceiling of 30.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid

import pytest
from support import new_customer

import usage_client
from usage_client import (
    CreateGrantResult,
    DecisionRule,
    EntitlementReason,
    GrantSource,
    GrantState,
    UsageEvent,
    idempotency_key,
)


def key() -> str:
    return idempotency_key("credit-test", uuid.uuid4().hex)


def test_a_top_up_pays_for_consumption_then_is_listed_and_voided(
    client: usage_client.UsageClient,
) -> None:
    customer = new_customer(client, plan_id="prepaid")
    cid = customer.customer_id
    expires = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=10)
    k = key()
    created = client.create_grant(cid, "tokens", 500, idempotency_key=k, expire_time=expires)
    top_up = created.grant
    assert created.duplicate is False and top_up.grant_id
    assert (top_up.customer_id, top_up.feature, top_up.amount, top_up.priority) == (
        cid,
        "tokens",
        500,
        0,
    )
    assert (top_up.source, top_up.state, top_up.idempotency_key) == (
        GrantSource.TOP_UP,
        GrantState.ACTIVE,
        k,
    )
    assert (top_up.burned, top_up.remaining, top_up.forfeited) == (0, 500, 0)
    assert (top_up.expire_time, top_up.void_time) == (expires, None)
    assert top_up.effective_time == top_up.create_time <= dt.datetime.now(dt.UTC)
    # The same key again: the original grant, nothing new granted.
    again = client.create_grant(cid, "tokens", 500, idempotency_key=k, expire_time=expires)
    assert again == CreateGrantResult(top_up, duplicate=True)

    # The top-up (priority 0) pays before the plan's grant (priority 5).
    spent = client.check_entitlement(cid, "tokens", 300, consume=True, idempotency_key=key())
    assert spent.allowed and spent.reason is EntitlementReason.WITHIN_LIMIT
    assert (spent.used, spent.covered, spent.balance) == (300, 300, 300)
    assert spent.rule == DecisionRule(
        plan_id="prepaid", feature="tokens", enforcement="hard", billing="prepaid", overage=False
    )
    # No overage on this feature: what the grants cannot cover is denied.
    denied = client.check_entitlement(cid, "tokens", 301, consume=True, idempotency_key=key())
    assert not denied.allowed and denied.reason is EntitlementReason.BALANCE_EXHAUSTED
    assert (denied.balance, denied.event_id, denied.used) == (300, None, 300)

    listed = client.list_grants(cid)
    assert [(g.source, g.priority, g.burned, g.remaining) for g in listed] == [
        (GrantSource.TOP_UP, 0, 300, 200),
        (GrantSource.PLAN, 5, 0, 100),
    ]
    assert listed[0].grant_id == top_up.grant_id
    plan_grant = listed[1]
    assert plan_grant.idempotency_key.startswith("plan:tokens:")
    assert (plan_grant.effective_time, plan_grant.expire_time) == (
        customer.current_period_start_time,
        customer.current_period_end_time,
    )
    assert client.list_grants(cid, "calls") == []

    tokens = client.get_usage_summary(cid, "tokens").meter("tokens")
    assert (tokens.billing, tokens.granted, tokens.burned, tokens.balance) == (
        "prepaid",
        600,
        300,
        300,
    )
    assert (tokens.used, tokens.covered, tokens.billable_overage, tokens.ceiling) == (
        300,
        300,
        0,
        None,
    )
    assert tokens.next_expire_time == expires

    voided = client.void_grant(cid, top_up.grant_id)
    assert voided.voided == 200
    assert (voided.grant.state, voided.grant.burned, voided.grant.remaining) == (
        GrantState.VOIDED,
        300,
        0,
    )
    assert voided.grant.forfeited == 200 and voided.grant.void_time is not None
    assert client.void_grant(cid, top_up.grant_id).voided == 0  # voiding twice removes nothing
    assert [g.grant_id for g in client.list_grants(cid)] == [plan_grant.grant_id]
    everything = client.list_grants(cid, include_inactive=True)
    assert [(g.grant_id, g.state) for g in everything] == [
        (top_up.grant_id, GrantState.VOIDED),
        (plan_grant.grant_id, GrantState.ACTIVE),
    ]
    after = client.get_usage_summary(cid, "tokens").meter("tokens")
    assert (after.balance, after.covered) == (100, 300)
    assert after.next_expire_time == customer.current_period_end_time


def test_a_denied_consume_covers_nothing(client: usage_client.UsageClient) -> None:
    cid = new_customer(client, plan_id="prepaid").customer_id
    client.create_grant(cid, "tokens", 50, idempotency_key=key())
    denied = client.check_entitlement(cid, "tokens", 500, consume=True, idempotency_key=key())
    assert not denied.allowed and denied.reason is EntitlementReason.BALANCE_EXHAUSTED
    assert denied.event_id is None and denied.balance == 150  # nothing was burned
    assert denied.covered == 0  # the call consumed nothing, so grants paid for nothing


def test_an_arrears_feature_has_no_balance(
    client: usage_client.UsageClient, customer: usage_client.Customer
) -> None:
    check = client.check_entitlement(customer.customer_id, "tokens", 10)
    assert (check.balance, check.covered) == (None, 0)
    assert check.rule is not None
    assert (check.rule.billing, check.rule.overage, check.rule.ceiling) == ("arrears", False, None)
    tokens = client.get_usage_summary(customer.customer_id).meter("tokens")
    assert (tokens.billing, tokens.granted, tokens.balance, tokens.next_expire_time) == (
        "arrears",
        0,
        0,
        None,
    )


async def test_async_grants_cover_usage_and_the_rest_is_overage_up_to_the_ceiling(
    client: usage_client.UsageClient, aclient: usage_client.AsyncUsageClient
) -> None:
    # A customer with a provider: the usage the grants do not cover is billed as overage.
    customer = dataclasses.replace(
        new_customer(client, plan_id="prepaid"),
        provider=usage_client.Provider.STRIPE,
        provider_customer_id="cus_stripe_credits",
    )
    cid = (await aclient.upsert_customer(customer)).customer_id
    created = await aclient.create_grant(cid, "calls", 2, idempotency_key=key(), priority=1)
    assert (created.grant.amount, created.grant.priority, created.grant.expire_time) == (
        2,
        1,
        None,
    )
    # A count meter: each event takes one unit, so the third one is overage.
    await aclient.batch_record_usage([UsageEvent(cid, "calls", 1, key()) for _ in range(3)])
    calls = (await aclient.get_usage_summary(cid, "calls")).meter("calls")
    assert (calls.billing, calls.used, calls.covered, calls.billable_overage) == (
        "prepaid",
        3,
        2,
        1,
    )
    assert (calls.granted, calls.burned, calls.balance, calls.next_expire_time) == (2, 2, 0, None)
    assert (calls.limit, calls.ceiling, calls.unbilled) == (20, 30, 0)

    check = await aclient.check_entitlement(cid, "calls", 1)
    assert check.allowed and (check.balance, check.covered) == (0, 0)
    assert check.rule == DecisionRule(
        plan_id="prepaid",
        feature="calls",
        limit=20,
        enforcement="soft",
        billing="prepaid",
        overage=True,
        ceiling=30,
    )
    # Past the soft limit usage is allowed and flagged; past the ceiling it is denied.
    await aclient.batch_record_usage([UsageEvent(cid, "calls", 1, key()) for _ in range(22)])
    soft = await aclient.check_entitlement(cid, "calls", 1)
    assert soft.allowed and soft.reason is EntitlementReason.SOFT_LIMIT_EXCEEDED
    await aclient.batch_record_usage([UsageEvent(cid, "calls", 1, key()) for _ in range(5)])
    over = await aclient.check_entitlement(cid, "calls", 1)
    assert not over.allowed and over.reason is EntitlementReason.LIMIT_EXCEEDED

    # Spent: listed only with the inactive ones.
    assert await aclient.list_grants(cid, "calls") == []
    (spent,) = await aclient.list_grants(cid, "calls", include_inactive=True)
    assert (spent.grant_id, spent.state, spent.burned, spent.remaining, spent.forfeited) == (
        created.grant.grant_id,
        GrantState.SPENT,
        2,
        0,
        0,
    )
    voided = await aclient.void_grant(cid, spent.grant_id)
    assert voided.voided == 0


async def test_grant_errors_are_typed(
    client: usage_client.UsageClient, aclient: usage_client.AsyncUsageClient
) -> None:
    cid = new_customer(client, plan_id="prepaid").customer_id
    with pytest.raises(usage_client.InvalidArgument) as invalid:
        await aclient.create_grant(cid, "tokens", 0, idempotency_key="plan:mine")
    assert {v.field for v in invalid.value.field_violations} == {"amount", "idempotency_key"}
    k = key()
    await aclient.create_grant(cid, "tokens", 10, idempotency_key=k)
    with pytest.raises(usage_client.AlreadyExists):
        await aclient.create_grant(cid, "tokens", 11, idempotency_key=k)
    with pytest.raises(usage_client.NotFound):
        await aclient.void_grant(cid, str(uuid.uuid4()))
    with pytest.raises(usage_client.NotFound) as unknown:
        await aclient.list_grants(f"cus_{uuid.uuid4().hex}")
    assert unknown.value.reason == "CUSTOMER_NOT_FOUND"
    with pytest.raises(ValueError, match="expire_time"):
        await aclient.create_grant(
            cid, "tokens", 10, idempotency_key=key(), expire_time=dt.datetime(2030, 1, 1)
        )
