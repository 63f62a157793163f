"""CustomerService: upsert, get, and validation."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from conftest import Service
from helpers import details

from usage.v1 import customer_pb2


@pytest.mark.quick
async def test_upsert_then_get_round_trips_every_field(service: Service) -> None:
    saved = await service.add_customer(
        "cus_9",
        provider=customer_pb2.PROVIDER_LEMON_SQUEEZY,
        provider_customer_id="ls_1",
        subscription_items={"tokens": "si_1"},
    )
    got = await service.customers.GetCustomer(customer_pb2.GetCustomerRequest(customer_id="cus_9"))
    assert got.customer == saved
    assert got.customer.subscription_items == {"tokens": "si_1"}
    assert got.customer.provider == customer_pb2.PROVIDER_LEMON_SQUEEZY


async def test_upsert_replaces(service: Service) -> None:
    await service.add_customer(plan_id="basic")
    await service.add_customer(plan_id="metered", status=customer_pb2.SUBSCRIPTION_STATUS_PAUSED)
    got = await service.customers.GetCustomer(customer_pb2.GetCustomerRequest(customer_id="cus_1"))
    assert got.customer.plan_id == "metered"
    assert got.customer.subscription_status == customer_pb2.SUBSCRIPTION_STATUS_PAUSED


async def test_unknown_customer_is_not_found(service: Service) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.customers.GetCustomer(customer_pb2.GetCustomerRequest(customer_id="x"))
    d = details(caught.value)
    assert d.code == grpc.StatusCode.NOT_FOUND
    assert (d.reason, d.domain, d.metadata) == (
        "CUSTOMER_NOT_FOUND",
        "usage.v1",
        {"customer_id": "x"},
    )


async def test_invalid_customer_lists_every_field_and_changes_nothing(service: Service) -> None:
    now = dt.datetime.now(dt.UTC)
    customer = customer_pb2.Customer(
        customer_id="",
        plan_id="gold",
        subscription_items={"nope": "si"},
        provider_customer_id="p" * 256,
    )
    customer.current_period_start_time.FromDatetime(now)
    customer.current_period_end_time.FromDatetime(now - dt.timedelta(days=1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.customers.UpsertCustomer(
            customer_pb2.UpsertCustomerRequest(customer=customer)
        )
    d = details(caught.value)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(d.fields) == {
        "customer.customer_id",
        "customer.plan_id",
        "customer.subscription_status",
        "customer.provider_customer_id",
        "customer.current_period_end_time",
        "customer.subscription_items['nope']",
    }
    assert await service.db.fetchval("SELECT count(*) FROM customers") == 0


async def test_missing_customer_and_period(service: Service) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.customers.UpsertCustomer(customer_pb2.UpsertCustomerRequest())
    assert set(details(caught.value).fields) == {"customer"}
    bare = customer_pb2.Customer(
        customer_id="c",
        plan_id="basic",
        subscription_status=customer_pb2.SUBSCRIPTION_STATUS_ACTIVE,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.customers.UpsertCustomer(customer_pb2.UpsertCustomerRequest(customer=bare))
    assert set(details(caught.value).fields) == {
        "customer.current_period_start_time",
        "customer.current_period_end_time",
    }
