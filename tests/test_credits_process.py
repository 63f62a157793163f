"""Prepaid credits end to end: a real `usage-service serve` process, its drain, a fake Polar."""

from __future__ import annotations

import asyncio
import datetime as dt
import pathlib
from collections.abc import Iterator

import grpc
import pytest
from conftest import differences
from fakes.world import POLAR_CUSTOMER, Fakes
from helpers import wait_for
from process import ServiceProcess

from usage.v1 import (
    credit_pb2,
    credit_pb2_grpc,
    customer_pb2,
    customer_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)

pytestmark = pytest.mark.process

PLANS = """
[meters.tokens]
aggregation = "sum"

[plans.credits.features.tokens]
billing = "prepaid"
limit = 500
enforcement = "soft"
ceiling = 600
[plans.credits.features.tokens.grant]
amount = 100
"""


@pytest.fixture
def fakes() -> Iterator[Fakes]:
    started = Fakes.start()
    yield started
    started.stop()


async def test_grants_burn_and_only_overage_reaches_the_provider_through_serve(
    dsn: str, fakes: Fakes, tmp_path: pathlib.Path
) -> None:
    plans = tmp_path / "plans.toml"
    plans.write_text(PLANS)
    env = {
        **fakes.env(timeout=2.0),
        "DATABASE_URL": dsn,
        "USAGE_PLANS_FILE": str(plans),
        "USAGE_DRAIN_INTERVAL_SECONDS": "0.1",
    }
    service = ServiceProcess(env)
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            customers = customer_pb2_grpc.CustomerServiceStub(channel)
            usage = usage_pb2_grpc.UsageServiceStub(channel)
            grants = credit_pb2_grpc.CreditServiceStub(channel)
            now = dt.datetime.now(dt.UTC)
            customer = customer_pb2.Customer(
                customer_id="c_polar",
                plan_id="credits",
                subscription_status=customer_pb2.SUBSCRIPTION_STATUS_ACTIVE,
                provider=customer_pb2.PROVIDER_POLAR,
                provider_customer_id=POLAR_CUSTOMER,
            )
            customer.current_period_start_time.FromDatetime(now - dt.timedelta(days=1))
            customer.current_period_end_time.FromDatetime(now + dt.timedelta(days=29))
            await customers.UpsertCustomer(customer_pb2.UpsertCustomerRequest(customer=customer))
            await grants.CreateGrant(
                credit_pb2.CreateGrantRequest(
                    customer_id="c_polar", feature="tokens", amount=50, idempotency_key="pack-1"
                )
            )

            async def consume(quantity: int, key: str) -> usage_pb2.CheckEntitlementResponse:
                answer = await usage.CheckEntitlement(
                    usage_pb2.CheckEntitlementRequest(
                        customer_id="c_polar",
                        feature="tokens",
                        quantity=quantity,
                        consume=True,
                        idempotency_key=key,
                    )
                )
                assert isinstance(answer, usage_pb2.CheckEntitlementResponse)
                return answer

            # 150 units of credit (plan 100, top-up 50), then 30 concurrent consumes of 20
            answers = await asyncio.gather(*(consume(20, f"k{i}") for i in range(30)))
            allowed = [a for a in answers if a.allowed]
            assert sum(a.covered for a in allowed) == 150
            assert len(allowed) == 30  # past the credits is overage, up to the ceiling (600)
            reasons = [a.reason for a in answers]
            assert reasons.count(usage_pb2.ENTITLEMENT_REASON_SOFT_LIMIT_EXCEEDED) == 5
            capped = await consume(1, "past-the-ceiling")
            assert not capped.allowed
            assert capped.reason == usage_pb2.ENTITLEMENT_REASON_LIMIT_EXCEEDED

            def billed() -> int:
                return fakes.polar.totals().get((POLAR_CUSTOMER, "tokens"), 0)

            async def tokens() -> usage_pb2.MeterUsage:
                summary = await usage.GetUsageSummary(
                    usage_pb2.GetUsageSummaryRequest(customer_id="c_polar")
                )
                (found,) = summary.meters
                assert isinstance(found, usage_pb2.MeterUsage)
                return found

            async def drained() -> bool:
                return (await tokens()).pending == 0

            await wait_for(drained, "the drain to settle the overage")
            settled = await tokens()
            assert (settled.used, settled.covered, settled.billable_overage) == (600, 150, 450)
            assert (settled.balance, settled.reported) == (0, 450)
            assert billed() == 450  # exactly the uncovered usage, once
    finally:
        assert service.terminate() == 0
    assert await differences(dsn) == []
