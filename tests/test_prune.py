"""`usage-service prune`: deletes reported events of past periods in bounded batches; totals and
everything not yet reported stay."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess

import grpc
import pytest
from conftest import Service
from helpers import RECOUNT_DRAIN_COUNTERS, details, record
from process import PLANS_FILE, executable

from usage.v1 import usage_pb2


@pytest.mark.process
async def test_prune_deletes_only_old_reported_events_and_keeps_totals(
    service: Service, dsn: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(days=1)
    await service.add_customer("cus_1", start=start, end=now + dt.timedelta(days=29))
    old = now - dt.timedelta(days=60)
    for i in range(7):  # a past period's events
        await service.usage.RecordUsage(record(key=f"old{i}", quantity=2, when=old))
    for i in range(3):  # this period's
        await service.usage.RecordUsage(record(key=f"new{i}", quantity=5))
    # Six of the old events were reported 40 days ago; one failed. This period's were reported.
    await service.db.execute(
        "UPDATE usage_events SET report_state = 'reported', recorded_at = $1 "
        "WHERE idempotency_key = ANY($2::text[])",
        now - dt.timedelta(days=40),
        [f"old{i}" for i in range(6)] + [f"new{i}" for i in range(3)],
    )
    await service.db.execute(
        "UPDATE usage_events SET report_state = 'failed', recorded_at = $1 "
        "WHERE idempotency_key = 'old6'",
        now - dt.timedelta(days=40),
    )
    await service.db.execute(RECOUNT_DRAIN_COUNTERS)
    summary = usage_pb2.GetUsageSummaryRequest(customer_id="cus_1")
    before = await service.usage.GetUsageSummary(summary)
    totals_before = await service.db.fetch("SELECT * FROM usage_totals ORDER BY period_start")

    run = await asyncio.to_thread(
        subprocess.run,
        [*executable(), "prune", "--older-than", "30", "--batch-size", "4"],
        env={**os.environ, "DATABASE_URL": dsn, "USAGE_PLANS_FILE": str(PLANS_FILE)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "pruned 6 reported events" in run.stdout

    left = {r[0] for r in await service.db.fetch("SELECT idempotency_key FROM usage_events")}
    assert left == {"old6", "new0", "new1", "new2"}
    assert await service.usage.GetUsageSummary(summary) == before
    assert await service.db.fetch("SELECT * FROM usage_totals ORDER BY period_start") == (
        totals_before
    )
    # Moving the period on rebuilds its totals from events: those were never pruned.
    await service.add_customer("cus_1", start=start, end=now + dt.timedelta(days=30))
    after = await service.usage.GetUsageSummary(summary)
    assert [m.used for m in after.meters] == [m.used for m in before.meters]
    # The pruned periods are closed: no webhook may move their boundaries.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.add_customer("cus_1", start=old, end=now + dt.timedelta(days=30))
    d = details(caught.value)
    assert (d.code, d.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PERIODS_PRUNED")
    assert await service.db.fetch("SELECT * FROM usage_totals ORDER BY period_start") != []
    lifetime = await service.db.fetchrow("SELECT * FROM usage_lifetime WHERE meter = 'tokens'")
    assert (lifetime["pruned_count"], lifetime["pruned_sum"]) == (6, 12)

    refused = await asyncio.to_thread(
        subprocess.run,
        [*executable(), "prune", "--older-than", "0"],
        env={**os.environ, "DATABASE_URL": dsn},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
