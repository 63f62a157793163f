"""WatchUsage: a snapshot, then every committed change in order, resumable without gaps."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from conftest import Service
from helpers import details, record

from usage.v1 import customer_pb2, usage_pb2, usage_pb2_grpc
from usage_service.api import watch as watch_api
from usage_service.api.errors import ApiError
from usage_service.api.server import Running, start_server
from usage_service.domain import plans as plans_mod
from usage_service.storage import changes, connections, store
from usage_service.storage import watch as watch_store

WAIT = 30.0  # seconds a test waits for a message at most


def watch(
    service: Service, customer_id: str = "cus_1", **fields: object
) -> grpc.aio.UnaryStreamCall[usage_pb2.WatchUsageRequest, usage_pb2.WatchUsageResponse]:
    return service.usage.WatchUsage(
        usage_pb2.WatchUsageRequest(customer_id=customer_id, **fields)  # type: ignore[arg-type]
    )


async def take(
    stream: AsyncIterator[usage_pb2.WatchUsageResponse], count: int
) -> list[usage_pb2.WatchUsageResponse]:
    out = []
    async with asyncio.timeout(WAIT):
        async for message in stream:
            out.append(message)
            if len(out) == count:
                break
    return out


async def until(condition: Callable[[], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "the condition never held"
        await asyncio.sleep(0.01)


def used(message: usage_pb2.WatchUsageResponse) -> dict[str, int]:
    return {m.meter: m.used for m in message.meters}


async def test_a_snapshot_then_each_change_in_order(service: Service) -> None:
    await service.add_customer()
    await service.usage.RecordUsage(record(quantity=5, key="before"))
    call = watch(service)
    stream = call.__aiter__()
    (snap,) = await take(stream, 1)
    assert snap.kind == usage_pb2.USAGE_CHANGE_KIND_SNAPSHOT
    assert snap.snapshot_reason == usage_pb2.SNAPSHOT_REASON_INITIAL
    assert snap.plan_id == "basic"
    assert used(snap)["tokens"] == 5
    for i in range(5):
        await service.usage.RecordUsage(record(quantity=1, key=f"k{i}"))
    changes = await take(stream, 5)
    assert [m.kind for m in changes] == [usage_pb2.USAGE_CHANGE_KIND_USAGE] * 5
    assert [used(m)["tokens"] for m in changes] == [6, 7, 8, 9, 10]
    versions = [snap.version] + [m.version for m in changes]
    assert versions == sorted(set(versions))  # strictly increasing
    assert all(list(used(m)) == ["tokens"] for m in changes)  # only the meter that changed
    call.cancel()


async def test_resume_misses_nothing_and_repeats_nothing(service: Service) -> None:
    await service.add_customer()
    call = watch(service)
    stream = call.__aiter__()
    (snap,) = await take(stream, 1)
    await service.usage.RecordUsage(record(quantity=1, key="a"))
    (first,) = await take(stream, 1)
    call.cancel()
    # Committed while nobody watches.
    for i in range(3):
        await service.usage.RecordUsage(record(quantity=10, key=f"gap{i}"))
    again = watch(service, resume_after_version=first.version)
    got = await take(again.__aiter__(), 3)
    assert [m.version for m in got] == [first.version + 1, first.version + 2, first.version + 3]
    assert [used(m)["tokens"] for m in got] == [11, 21, 31]
    assert all(m.kind == usage_pb2.USAGE_CHANGE_KIND_USAGE for m in got)
    again.cancel()
    assert snap.version < first.version


async def test_a_resume_from_a_version_never_given_starts_again_from_a_snapshot(
    service: Service,
) -> None:
    await service.add_customer()
    await service.usage.RecordUsage(record(quantity=3, key="a"))
    call = watch(service, resume_after_version=10_000)
    (snap,) = await take(call.__aiter__(), 1)
    assert snap.kind == usage_pb2.USAGE_CHANGE_KIND_SNAPSHOT
    assert snap.snapshot_reason == usage_pb2.SNAPSHOT_REASON_RESUME_TOO_OLD
    assert used(snap)["tokens"] == 3
    call.cancel()


async def test_a_resume_past_forgotten_changes_says_so(service: Service) -> None:
    await service.add_customer()  # version 1; the usage: versions 2, 3 and 4
    for i in range(3):
        await service.usage.RecordUsage(record(quantity=1, key=f"k{i}"))
    await service.db.execute("DELETE FROM usage_changes WHERE version <= 3")
    call = watch(service, resume_after_version=0)
    (snap,) = await take(call.__aiter__(), 1)
    assert snap.snapshot_reason == usage_pb2.SNAPSHOT_REASON_RESUME_TOO_OLD
    assert used(snap)["tokens"] == 3
    call.cancel()
    later = watch(service, resume_after_version=3)  # version 4 is kept: no snapshot needed
    await service.usage.RecordUsage(record(quantity=1, key="k9"))
    got = await take(later.__aiter__(), 2)
    assert [used(m)["tokens"] for m in got] == [3, 4]
    later.cancel()


async def test_only_the_meters_asked_for(service: Service) -> None:
    await service.add_customer()
    call = watch(service, meters=["calls"])
    stream = call.__aiter__()
    (snap,) = await take(stream, 1)
    assert list(used(snap)) == ["calls"]
    await service.usage.RecordUsage(record(meter="tokens", quantity=1, key="t"))
    await service.usage.RecordUsage(record(meter="calls", quantity=1, key="c"))
    (change,) = await take(stream, 1)  # the tokens change is not sent
    assert used(change) == {"calls": 1}
    assert change.version == snap.version + 2
    call.cancel()


async def test_plan_and_status_changes_arrive_too(service: Service) -> None:
    await service.add_customer()
    call = watch(service)
    stream = call.__aiter__()
    await take(stream, 1)
    await service.add_customer(plan_id="metered")
    (change,) = await take(stream, 1)
    assert change.kind == usage_pb2.USAGE_CHANGE_KIND_CUSTOMER
    assert change.plan_id == "metered"
    await service.add_customer(status=customer_pb2.SUBSCRIPTION_STATUS_CANCELED)
    (change,) = await take(stream, 1)
    assert change.subscription_status == customer_pb2.SUBSCRIPTION_STATUS_CANCELED
    call.cancel()


BOUNDARY = 6.0  # seconds from the start of a test to the end of its customer's period


async def daily_customer(service: Service) -> dt.datetime:
    """A customer on daily periods, the current one ending BOUNDARY seconds from now."""
    end = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=BOUNDARY)
    await service.add_customer(
        start=end - dt.timedelta(days=1),
        end=end,
        billing_interval=customer_pb2.BILLING_INTERVAL_DAY,
        billing_interval_count=1,
    )
    return end


async def test_a_period_that_ends_while_watched_rolls_over_by_itself(service: Service) -> None:
    end = await daily_customer(service)
    await service.usage.RecordUsage(record(quantity=4, key="old"))
    call = watch(service)
    stream = call.__aiter__()
    (snap,) = await take(stream, 1)
    assert used(snap)["tokens"] == 4
    (rolled,) = await take(stream, 1)  # no call made: the boundary passed
    assert rolled.kind == usage_pb2.USAGE_CHANGE_KIND_ROLLOVER
    assert rolled.version == snap.version + 1
    assert rolled.period_start_time.ToDatetime(dt.UTC) == end
    assert used(rolled)["tokens"] == 0
    await service.usage.RecordUsage(record(quantity=2, key="new"))
    (change,) = await take(stream, 1)
    assert (change.kind, used(change)["tokens"]) == (usage_pb2.USAGE_CHANGE_KIND_USAGE, 2)
    await service.usage.RecordUsage(
        record(quantity=1, key="late", when=end - dt.timedelta(minutes=1))
    )
    (late,) = await take(stream, 1)  # a late event: its own period's figures, with that period
    assert late.kind == usage_pb2.USAGE_CHANGE_KIND_USAGE
    assert late.period_end_time.ToDatetime(dt.UTC) == end
    assert used(late)["tokens"] == 5
    call.cancel()


async def test_the_first_usage_of_a_period_nobody_watched_begin_is_its_rollover(
    service: Service,
) -> None:
    end = await daily_customer(service)
    call = watch(service)
    (snap,) = await take(call.__aiter__(), 1)
    call.cancel()
    await asyncio.sleep((end - dt.datetime.now(dt.UTC)).total_seconds())  # wall time must pass
    await service.usage.RecordUsage(record(quantity=2, key="new"))
    again = watch(service, resume_after_version=snap.version)
    (change,) = await take(again.__aiter__(), 1)
    assert change.kind == usage_pb2.USAGE_CHANGE_KIND_ROLLOVER
    assert change.version == snap.version + 1
    assert change.period_start_time.ToDatetime(dt.UTC) == end
    assert used(change)["tokens"] == 2
    again.cancel()


async def test_an_unknown_customer_or_meter_is_refused(service: Service) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await take(watch(service, "nobody").__aiter__(), 1)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await take(watch(service, "cus_1", meters=["ghost"]).__aiter__(), 1)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "meters[0]" in details(caught.value).fields


async def test_concurrent_writers_reach_the_watcher_in_commit_order(service: Service) -> None:
    await service.add_customer()
    call = watch(service)
    stream = call.__aiter__()
    (snap,) = await take(stream, 1)
    await asyncio.gather(
        *(service.usage.RecordUsage(record(quantity=1, key=f"k{i}")) for i in range(40))
    )
    # Group commit may write several calls in one transaction: one change each.
    got: list[usage_pb2.WatchUsageResponse] = []
    async with asyncio.timeout(WAIT):
        async for message in stream:
            got.append(message)
            if used(message)["tokens"] == 40:
                break
    assert [m.version for m in got] == list(range(snap.version + 1, snap.version + 1 + len(got)))
    figures = [used(m)["tokens"] for m in got]
    assert figures == sorted(set(figures))  # each commit adds to the one before
    call.cancel()


@contextlib.asynccontextmanager
async def replica(
    dsn: str, plans: plans_mod.Plans
) -> AsyncIterator[tuple[Running, usage_pb2_grpc.UsageServiceStub]]:
    """Another server on the same database."""
    st = store.Store(await connections.create_pool(dsn, 5))
    running = await start_server(st, plans, "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield running, usage_pb2_grpc.UsageServiceStub(channel)
    finally:
        await running.stop(0)
        await st.close()


async def test_a_change_through_one_replica_reaches_a_watcher_on_another(
    service: Service, dsn: str, plans: plans_mod.Plans
) -> None:
    await service.add_customer()
    async with replica(dsn, plans) as (_, other):
        call = other.WatchUsage(usage_pb2.WatchUsageRequest(customer_id="cus_1"))
        stream = call.__aiter__()
        (snap,) = await take(stream, 1)
        for i in range(10):  # recorded through the first server
            await service.usage.RecordUsage(record(quantity=1, key=f"k{i}"))
        got = await take(stream, 10)
        assert [m.version for m in got] == list(range(snap.version + 1, snap.version + 11))
        assert used(got[-1])["tokens"] == 10
        call.cancel()


async def test_a_restart_ends_the_stream_and_a_resume_on_the_next_server_misses_nothing(
    service: Service, dsn: str, plans: plans_mod.Plans
) -> None:
    await service.add_customer()
    async with replica(dsn, plans) as (first, first_stub):
        call = first_stub.WatchUsage(usage_pb2.WatchUsageRequest(customer_id="cus_1"))
        stream = call.__aiter__()
        (snap,) = await take(stream, 1)
        await service.usage.RecordUsage(record(quantity=1, key="a"))
        (seen,) = await take(stream, 1)
        await first.stop(5)  # a deploy: the stream ends at once, and says why
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await take(stream, 1)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert details(caught.value).reason == "SERVER_SHUTTING_DOWN"
    for i in range(3):  # while no server of the watcher's is up
        await service.usage.RecordUsage(record(quantity=1, key=f"gap{i}"))
    async with replica(dsn, plans) as (_, second):
        call = second.WatchUsage(
            usage_pb2.WatchUsageRequest(customer_id="cus_1", resume_after_version=seen.version)
        )
        got = await take(call.__aiter__(), 3)
        assert [m.version for m in got] == [seen.version + 1, seen.version + 2, seen.version + 3]
        assert [used(m)["tokens"] for m in got] == [2, 3, 4]
        call.cancel()
    assert snap.version < seen.version


async def test_a_caller_that_stops_reading_does_not_slow_the_others(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch_store, "QUEUE", 8)  # readers fall behind their queues at once
    await service.add_customer()
    stuck = watch(service)  # not read until the end
    stuck_stream = stuck.__aiter__()
    await take(stuck_stream, 1)
    reader = watch(service)
    reader_stream = reader.__aiter__()
    (snap,) = await take(reader_stream, 1)
    count = 1500
    reading = asyncio.create_task(take(reader_stream, count))  # reads as they come
    for i in range(count):
        await service.usage.RecordUsage(record(quantity=1, key=f"k{i}"))
    got = await reading  # the reader got every change, in order, while the other read nothing
    assert [m.version for m in got] == list(range(snap.version + 1, snap.version + 1 + count))
    reader.cancel()
    # The one that stopped reading gets each change too, in order, once it reads (whether gRPC
    # held them for it, or its changes waited in the log while its queue was full).
    late = await take(stuck_stream, count)
    assert [m.version for m in late] == [m.version for m in got]
    stuck.cancel()


async def test_a_caller_that_reads_nothing_for_too_long_is_ended() -> None:
    """A write the caller never takes (its connection full) ends the stream with SLOW_CONSUMER
    once SLOW_AFTER passes, and frees the watcher for its resume."""

    class Stuck:
        async def write(self, message: object) -> None:
            await asyncio.Event().wait()  # the caller's window never opens

    with pytest.raises(ApiError) as caught:
        async with asyncio.timeout(WAIT):
            await watch_api._write(Stuck(), usage_pb2.WatchUsageResponse(), after=0.05)  # type: ignore[arg-type]
    assert caught.value.reason == "SLOW_CONSUMER"


async def test_one_caller_may_hold_only_so_many_streams(
    service: Service, dsn: str, plans: plans_mod.Plans
) -> None:
    await service.add_customer()
    async with replica(dsn, plans) as (running, stub):
        running.interceptor.max_watches_per_caller = 2
        request = usage_pb2.WatchUsageRequest(customer_id="cus_1")
        calls = [stub.WatchUsage(request), stub.WatchUsage(request)]
        for call in calls:
            await take(call.__aiter__(), 1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await take(stub.WatchUsage(request).__aiter__(), 1)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details(caught.value).reason == "TOO_MANY_WATCHES"
        calls[0].cancel()
        await until(lambda: sum(running.interceptor.watches.values()) == 1)
        third = stub.WatchUsage(request)
        await take(third.__aiter__(), 1)
        third.cancel()
        calls[1].cancel()


async def test_a_gap_in_the_log_is_never_passed_over(service: Service) -> None:
    await service.add_customer()  # version 1; the usage: versions 2, 3 and 4
    for i in range(3):
        await service.usage.RecordUsage(record(quantity=1, key=f"k{i}"))
    await service.db.execute("DELETE FROM usage_changes WHERE version = 3")  # lost, say
    call = watch(service, resume_after_version=1)
    got = await take(call.__aiter__(), 2)
    assert [(m.version, m.kind) for m in got] == [
        (2, usage_pb2.USAGE_CHANGE_KIND_USAGE),
        (4, usage_pb2.USAGE_CHANGE_KIND_SNAPSHOT),  # not version 4 as if 3 had not happened
    ]
    assert got[1].snapshot_reason == usage_pb2.SNAPSHOT_REASON_RESUME_TOO_OLD
    assert used(got[1])["tokens"] == 3
    call.cancel()


async def test_old_changes_are_forgotten_oldest_first(service: Service) -> None:
    await service.add_customer()  # version 1; the usage: versions 2, 3 and 4
    for i in range(3):
        await service.usage.RecordUsage(record(quantity=1, key=f"k{i}"))
    now = dt.datetime.now(dt.UTC)
    old = now - dt.timedelta(days=30)
    # Version 3 was stamped by a replica whose clock was ahead.
    await service.db.execute(
        "UPDATE usage_changes SET committed_at = "
        "CASE WHEN version = 3 THEN $1::timestamptz ELSE $2::timestamptz END",
        now,
        old,
    )
    assert await changes.forget(service.db, now - dt.timedelta(days=1), 1) == 2
    kept = await service.db.fetch("SELECT version FROM usage_changes ORDER BY version")
    assert [r["version"] for r in kept] == [3, 4]  # 4 is old, but 3 is kept: no gap


async def test_a_change_among_too_many_customers_to_name_still_reaches_its_watcher(
    service: Service,
) -> None:
    await service.add_customer()
    names = [f"customer-with-a-long-name-{i:04d}" for i in range(399)]
    for name in names:
        await service.add_customer(name)
    call = watch(service)
    stream = call.__aiter__()
    (snap,) = await take(stream, 1)
    # One transaction over 400 customers: too many ids for one NOTIFY, which then says '*'.
    others = [record(customer_id=name, key="k") for name in names]
    await service.usage.BatchRecordUsage(
        usage_pb2.BatchRecordUsageRequest(requests=[*others, record(quantity=7, key="mine")])
    )
    (change,) = await take(stream, 1)
    assert (change.version, used(change)["tokens"]) == (snap.version + 1, 7)
    call.cancel()


def test_a_notification_names_its_customers_or_any() -> None:
    assert changes.notified('["a", "b:c"]') == ["a", "b:c"]
    assert changes.notified("*") is None
    assert changes.notified("not json") is None
