"""Two real `usage-service serve` processes on one database: a cancel through one stops the
other's checks from passing within the read model's bound (bench/freshness.py measures the
same over many trials)."""

from __future__ import annotations

import time

import grpc
import pytest
from process import ServiceProcess
from test_read_model import ACTIVE, CANCELED, MAX_LAG, check, customer

from usage.v1 import customer_pb2_grpc, usage_pb2, usage_pb2_grpc

pytestmark = pytest.mark.process
TRIALS = 20


async def test_a_cancel_through_one_replica_stops_the_others_checks_within_the_bound(
    dsn: str,
) -> None:
    a = ServiceProcess({"DATABASE_URL": dsn})
    try:
        b = ServiceProcess({"DATABASE_URL": dsn})
        try:
            async with (
                grpc.aio.insecure_channel(a.address) as ca,
                grpc.aio.insecure_channel(b.address) as cb,
            ):
                customers = customer_pb2_grpc.CustomerServiceStub(ca)
                checks = usage_pb2_grpc.UsageServiceStub(cb)
                await customers.UpsertCustomer(customer())
                started = time.monotonic()
                while True:
                    sent = time.monotonic()
                    if (await checks.CheckEntitlement(check())).allowed:
                        break
                    assert sent - started < MAX_LAG
                lags = []
                for i in range(TRIALS):
                    allowed = i % 2 == 1
                    before = await checks.CheckEntitlement(check())  # B keeps this answer
                    assert before.allowed != allowed
                    status = ACTIVE if allowed else CANCELED
                    await customers.UpsertCustomer(customer(status=status))
                    acknowledged = time.monotonic()
                    while True:
                        sent = time.monotonic()
                        answer = await checks.CheckEntitlement(check())
                        if answer.allowed == allowed:
                            break
                        # the guarantee: a check started past the bound sees the change
                        assert sent - acknowledged < MAX_LAG, "B was stale past the bound"
                    lags.append(time.monotonic() - acknowledged)
                    if not allowed:
                        reason = usage_pb2.ENTITLEMENT_REASON_SUBSCRIPTION_INACTIVE
                        assert answer.reason == reason
                    for _ in range(3):  # and stays so
                        assert (await checks.CheckEntitlement(check())).allowed == allowed
                assert max(lags) < 2 * MAX_LAG  # generous: the machine is shared
        finally:
            assert b.terminate() == 0
    finally:
        assert a.terminate() == 0
