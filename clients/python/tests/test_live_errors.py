"""Errors from the live server arrive as typed exceptions with their google.rpc details."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from support import new_customer

import usage_client
from usage_client import UsageEvent, idempotency_key


def key() -> str:
    return idempotency_key("test", uuid.uuid4().hex)


def fields(error: usage_client.UsageError) -> set[str]:
    return {v.field for v in error.field_violations}


def test_invalid_record_names_each_field_and_stores_nothing(
    client: usage_client.UsageClient, customer: usage_client.Customer
) -> None:
    with pytest.raises(usage_client.InvalidArgument) as caught:
        client.record_usage(customer.customer_id, "tokens", -5, idempotency_key="")
    error = caught.value
    assert (error.reason, error.domain) == ("INVALID_REQUEST", "usage.v1")
    assert fields(error) == {"quantity", "idempotency_key"}
    assert all(v.description for v in error.field_violations)
    assert error.attempts == 1  # an answer is never retried
    assert client.get_usage_summary(customer.customer_id).meter("tokens").used == 0


def test_event_time_too_far_in_the_future(
    client: usage_client.UsageClient, customer: usage_client.Customer
) -> None:
    with pytest.raises(usage_client.InvalidArgument) as caught:
        client.record_usage(
            customer.customer_id,
            "tokens",
            1,
            idempotency_key=key(),
            event_time=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
        )
    assert fields(caught.value) == {"event_time"}


def test_one_bad_batch_item_names_its_index_and_stores_nothing(
    client: usage_client.UsageClient, customer: usage_client.Customer
) -> None:
    cid = customer.customer_id
    good = [UsageEvent(cid, "tokens", 5, key()) for _ in range(3)]
    bad = UsageEvent(cid, "tokens", -1, key())
    with pytest.raises(usage_client.InvalidArgument) as caught:
        client.batch_record_usage([good[0], good[1], bad, good[2]])
    assert fields(caught.value) == {"requests[2].quantity"}
    assert client.get_usage_summary(cid).meter("tokens").used == 0
    # None of the good items was kept: recording them now is a first time.
    assert [r.duplicate for r in client.batch_record_usage(good)] == [False, False, False]


def test_an_unknown_meter_is_invalid(
    client: usage_client.UsageClient, customer: usage_client.Customer
) -> None:
    with pytest.raises(usage_client.InvalidArgument) as caught:
        client.record_usage(customer.customer_id, "no_such_meter", 1, idempotency_key=key())
    assert fields(caught.value) == {"meter"}


def test_consume_needs_a_key(
    client: usage_client.UsageClient, customer: usage_client.Customer
) -> None:
    with pytest.raises(usage_client.InvalidArgument) as caught:
        client.check_entitlement(customer.customer_id, "tokens", 1, consume=True)
    assert "idempotency_key" in fields(caught.value)


def test_a_reused_key_with_another_payload_already_exists(
    client: usage_client.UsageClient, customer: usage_client.Customer
) -> None:
    k = key()
    first = client.record_usage(customer.customer_id, "tokens", 10, idempotency_key=k)
    with pytest.raises(usage_client.AlreadyExists) as caught:
        client.record_usage(customer.customer_id, "tokens", 11, idempotency_key=k)
    error = caught.value
    assert (error.reason, error.domain) == ("IDEMPOTENCY_KEY_REUSED", "usage.v1")
    assert error.metadata.get("event_id") == first.event_id
    assert client.get_usage_summary(customer.customer_id).meter("tokens").used == 10


def test_unknown_customers_are_not_found(client: usage_client.UsageClient) -> None:
    nobody = f"cus_{uuid.uuid4().hex}"
    with pytest.raises(usage_client.NotFound) as caught:
        client.get_customer(nobody)
    assert (caught.value.reason, caught.value.domain) == ("CUSTOMER_NOT_FOUND", "usage.v1")
    with pytest.raises(usage_client.NotFound):
        client.get_usage_summary(nobody)


def test_unknown_decisions_are_not_found_and_ids_must_be_uuids(
    client: usage_client.UsageClient,
) -> None:
    with pytest.raises(usage_client.NotFound) as caught:
        client.get_decision(str(uuid.uuid4()))
    assert (caught.value.reason, caught.value.domain) == ("DECISION_NOT_FOUND", "usage.v1")
    with pytest.raises(usage_client.InvalidArgument) as invalid:
        client.get_decision("yesterday at 14:03")
    assert fields(invalid.value) == {"decision_id"}


def test_an_unknown_plan_is_invalid(client: usage_client.UsageClient) -> None:
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(usage_client.InvalidArgument) as caught:
        client.upsert_customer(
            usage_client.Customer(
                customer_id=f"cus_{uuid.uuid4().hex}",
                plan_id="no_such_plan",
                subscription_status=usage_client.SubscriptionStatus.ACTIVE,
                current_period_start_time=now,
                current_period_end_time=now + dt.timedelta(days=30),
            )
        )
    assert fields(caught.value) == {"customer.plan_id"}


async def test_async_errors_carry_the_same_details(
    aclient: usage_client.AsyncUsageClient, client: usage_client.UsageClient
) -> None:
    c = new_customer(client)
    with pytest.raises(usage_client.InvalidArgument) as invalid:
        await aclient.batch_record_usage(
            [UsageEvent(c.customer_id, "tokens", 1, key()), UsageEvent(c.customer_id, "", 1, "")]
        )
    assert fields(invalid.value) == {"requests[1].meter", "requests[1].idempotency_key"}
    k = key()
    await aclient.record_usage(c.customer_id, "tokens", 1, idempotency_key=k)
    with pytest.raises(usage_client.AlreadyExists) as exists:
        await aclient.record_usage(c.customer_id, "calls", 1, idempotency_key=k)
    assert exists.value.reason == "IDEMPOTENCY_KEY_REUSED"
    with pytest.raises(usage_client.NotFound) as missing:
        await aclient.get_customer(f"cus_{uuid.uuid4().hex}")
    assert missing.value.reason == "CUSTOMER_NOT_FOUND"
    assert isinstance(missing.value, usage_client.UsageError)


def test_contract_limits(client: usage_client.UsageClient, customer: usage_client.Customer) -> None:
    cid = customer.customer_id
    now = dt.datetime.now(dt.UTC)
    assert not client.record_usage(cid, "tokens", 0, idempotency_key="k" * 255).duplicate
    assert not client.record_usage(
        cid, "tokens", 1, idempotency_key=key(), event_time=now + dt.timedelta(minutes=4)
    ).duplicate
    with pytest.raises(usage_client.InvalidArgument) as long_key:
        client.record_usage(cid, "tokens", 1, idempotency_key="k" * 256)
    assert fields(long_key.value) == {"idempotency_key"}
    for size in (0, 1001):
        with pytest.raises(usage_client.InvalidArgument) as batch:
            client.batch_record_usage([UsageEvent(cid, "tokens", 1, key()) for _ in range(size)])
        assert fields(batch.value) == {"requests"}
    assert client.get_usage_summary(cid).meter("tokens").used == 1
