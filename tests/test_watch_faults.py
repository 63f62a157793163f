"""WatchUsage against the paths that write figures and a log read that fails."""

from __future__ import annotations

import asyncio

import asyncpg
from conftest import Service
from helpers import lock_waiters, record, wait_for
from test_watch import replica, take, used, watch

from usage.v1 import usage_pb2
from usage_service.domain import plans as plans_mod


async def test_a_consume_reaches_the_watcher(service: Service) -> None:
    await service.add_customer()
    call = watch(service)
    stream = call.__aiter__()
    (snap,) = await take(stream, 1)
    answer = await service.usage.CheckEntitlement(
        usage_pb2.CheckEntitlementRequest(
            customer_id="cus_1", feature="tokens", quantity=3, consume=True, idempotency_key="c1"
        )
    )
    assert answer.allowed
    await service.usage.RecordUsage(record(quantity=1, key="after"))
    (first,) = await take(stream, 1)
    # The consume is a change of its own, before the record's, and the figures add up.
    assert (first.version, used(first)["tokens"]) == (snap.version + 1, 3)
    got = [first, *await take(stream, 1)]
    assert [used(m)["tokens"] for m in got] == [3, 4]
    summary = await service.usage.GetUsageSummary(
        usage_pb2.GetUsageSummaryRequest(customer_id="cus_1")
    )
    assert {m.meter: m.used for m in summary.meters}["tokens"] == used(got[-1])["tokens"]
    call.cancel()


async def test_a_read_that_fails_is_tried_again_without_waiting_for_another_change(
    service: Service, dsn: str, plans: plans_mod.Plans
) -> None:
    """The hub's read of the log fails once (here: a lock it waits for too long); the change it
    was reading reaches the watcher anyway, with no other change to wake it."""
    await service.add_customer()
    timeout_dsn = f"{dsn}{'&' if '?' in dsn else '?'}lock_timeout=300"
    async with replica(timeout_dsn, plans) as (_, other):
        call = other.WatchUsage(usage_pb2.WatchUsageRequest(customer_id="cus_1"))
        stream = call.__aiter__()
        (snap,) = await take(stream, 1)
        head, table = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
        try:
            head_tx, table_tx = head.transaction(), table.transaction()
            await head_tx.start()
            await table_tx.start()
            # the writer's change will take this version: it waits on this uncommitted row
            await head.execute(
                "INSERT INTO usage_changes (customer_id, version, kind, committed_at, figures)"
                " VALUES ('cus_1', $1, 'usage', now(), '{}')",
                snap.version + 1,
            )
            writing = asyncio.ensure_future(service.usage.RecordUsage(record(quantity=2)))
            await wait_for(lambda: _waiters(service, 1), "the writer to wait for its version")
            # Queued behind the writer (which holds the log table): granted when it commits.
            locking = asyncio.create_task(
                table.execute("LOCK TABLE usage_changes IN ACCESS EXCLUSIVE MODE")
            )
            await wait_for(lambda: _waiters(service, 2), "the table lock to queue")
            await head_tx.rollback()
            await writing
            await locking
            # The hub, notified, reads the log, waits for the table and gives up.
            await wait_for(lambda: _waiters(service, 1), "the hub's read to wait")
            await wait_for(lambda: _waiters(service, 0), "the hub's read to fail")
            await table_tx.rollback()
        finally:
            await head.close()
            await table.close()
        (got,) = await take(stream, 1)
        assert (got.version, used(got)["tokens"]) == (snap.version + 1, 2)
        call.cancel()


async def _waiters(service: Service, count: int) -> bool:
    return await lock_waiters(service.db) == count
