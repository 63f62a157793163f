"""watch_usage against the live server: a snapshot then every change; a connection cut, a
server restart and a reader too slow for the service are resumed with nothing missed or
repeated; refusals raise at once."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from conftest import RetryLog
from proxy import Proxy
from server import Server
from support import FAST_RECONNECT, PATIENT, new_customer

import usage_client
from usage_client import SnapshotReason, UsageChange, UsageChangeKind, idempotency_key

WAIT = 60.0  # seconds a test waits for what it expects
SLOW_AFTER = 30.0  # seconds: the service ends a stream whose caller read nothing for this long
FILL = 1200  # changes: more than the stream's HTTP/2 window (64 KiB, about 750 of them) holds


def key() -> str:
    return idempotency_key("watch-test", uuid.uuid4().hex)


def tokens(change: UsageChange) -> int:
    return change.meter("tokens").used


async def next_within(watch: AsyncIterator[UsageChange]) -> UsageChange:
    async with asyncio.timeout(WAIT):
        return await anext(watch)


class Collected:
    """What a watch yields, read by a task of the test's event loop."""

    def __init__(self, watch: AsyncIterator[UsageChange]) -> None:
        self.changes: list[UsageChange] = []
        self._grown = asyncio.Condition()
        self._watch = watch
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for change in self._watch:
            async with self._grown:
                self.changes.append(change)
                self._grown.notify_all()

    async def reach(self, count: int) -> list[UsageChange]:
        async with asyncio.timeout(WAIT), self._grown:
            await self._grown.wait_for(lambda: len(self.changes) >= count or self.task.done())
        if self.task.done():
            self.task.result()  # raises what ended the watch
        assert len(self.changes) >= count
        return self.changes

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def assert_each_change_once(changes: list[UsageChange], quantities: list[int]) -> None:
    """A snapshot at 0 tokens, then one USAGE change per record, in order, with its total."""
    snapshot, *rest = changes
    assert snapshot.kind is UsageChangeKind.SNAPSHOT
    assert tokens(snapshot) == 0
    assert [c.version for c in rest] == list(
        range(snapshot.version + 1, snapshot.version + 1 + len(quantities))
    )
    assert {c.kind for c in rest} == {UsageChangeKind.USAGE}
    totals = [sum(quantities[: i + 1]) for i in range(len(quantities))]
    assert [tokens(c) for c in rest] == totals


async def test_a_snapshot_then_each_change_only_the_meters_asked_for_and_a_resume(
    client: usage_client.UsageClient, aclient: usage_client.AsyncUsageClient
) -> None:
    customer = new_customer(client)
    cid = customer.customer_id
    watch = aclient.watch_usage(cid)
    snapshot = await next_within(watch)
    assert snapshot.kind is UsageChangeKind.SNAPSHOT
    assert snapshot.snapshot_reason is SnapshotReason.INITIAL
    assert (snapshot.plan_id, snapshot.subscription_status) == (
        "starter",
        usage_client.SubscriptionStatus.ACTIVE,
    )
    assert (snapshot.period_start_time, snapshot.period_end_time) == (
        customer.current_period_start_time,
        customer.current_period_end_time,
    )
    assert snapshot.commit_time is not None and snapshot.threshold is None
    assert {m.meter: m.used for m in snapshot.meters} == {"tokens": 0, "calls": 0}

    await aclient.record_usage(cid, "tokens", 7, idempotency_key=key())
    await aclient.record_usage(cid, "calls", 1, idempotency_key=key())
    first, second = await next_within(watch), await next_within(watch)
    await watch.aclose()
    assert (first.version, first.kind) == (snapshot.version + 1, UsageChangeKind.USAGE)
    assert first.snapshot_reason is SnapshotReason.UNSPECIFIED
    assert [(m.meter, m.used, m.limit) for m in first.meters] == [("tokens", 7, 5000)]
    assert [(m.meter, m.used) for m in second.meters] == [("calls", 1)]

    # Only calls, after the first change: the second one, and nothing before it.
    calls = aclient.watch_usage(cid, meters=["calls"], resume_after_version=first.version)
    again = await next_within(calls)
    await calls.aclose()
    assert again == second


async def test_a_grant_is_a_credit_change_of_its_meter_balance(
    client: usage_client.UsageClient, aclient: usage_client.AsyncUsageClient
) -> None:
    cid = new_customer(client, plan_id="prepaid").customer_id
    watch = aclient.watch_usage(cid, meters=["tokens"])
    snapshot = await next_within(watch)
    # The plan's grant of the period counts before it is made.
    assert [(m.meter, m.billing, m.balance) for m in snapshot.meters] == [
        ("tokens", "prepaid", 100)
    ]
    created = await aclient.create_grant(cid, "tokens", 40, idempotency_key=key())
    granted = await next_within(watch)
    await aclient.void_grant(cid, created.grant.grant_id)
    voided = await next_within(watch)
    await watch.aclose()
    assert (granted.kind, voided.kind) == (UsageChangeKind.CREDIT, UsageChangeKind.CREDIT)
    assert snapshot.version < granted.version < voided.version
    assert [(m.meter, m.balance, m.granted) for m in granted.meters] == [("tokens", 140, 140)]
    assert [(m.meter, m.balance) for m in voided.meters] == [("tokens", 100)]


async def test_a_cut_connection_is_resumed_with_nothing_missed_or_repeated(
    service: Server,
    client: usage_client.UsageClient,
    aclient: usage_client.AsyncUsageClient,
    retries: RetryLog,
) -> None:
    cid = new_customer(client).customer_id
    proxy = Proxy("127.0.0.1", service.port)
    await proxy.start()
    quantities = list(range(1, 16))
    async with usage_client.AsyncUsageClient(
        proxy.address, retry=PATIENT, channel_options=FAST_RECONNECT
    ) as watcher:
        seen = Collected(watcher.watch_usage(cid))
        try:
            await seen.reach(1)
            for q in quantities[:5]:
                await aclient.record_usage(cid, "tokens", q, idempotency_key=key())
            await seen.reach(6)
            await proxy.cut()
            for q in quantities[5:10]:  # while the watcher cannot reach the server
                await aclient.record_usage(cid, "tokens", q, idempotency_key=key())
            # The watcher noticed: its stream ended and it is trying again.
            assert await asyncio.to_thread(retries.first.wait, WAIT)
            assert len(seen.changes) == 6
            await proxy.restore()
            for q in quantities[10:]:
                await aclient.record_usage(cid, "tokens", q, idempotency_key=key())
            changes = await seen.reach(16)
        finally:
            await seen.stop()
            await proxy.close()
    assert_each_change_once(changes, quantities)
    assert tokens(changes[-1]) == (await aclient.get_usage_summary(cid)).meter("tokens").used
    assert {(r.method, r.code) for r in retries.retries} == {("WatchUsage", "UNAVAILABLE")}
    assert proxy.connections >= 2  # it connected again


def test_a_restart_is_resumed_on_the_next_server_with_nothing_missed_or_repeated(
    service: Server,
    client: usage_client.UsageClient,
    retries: RetryLog,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The blocking client across a graceful restart (SERVER_SHUTTING_DOWN), with usage recorded
    through another replica while the watcher's server is down."""
    cid = new_customer(client).customer_id
    quantities = list(range(1, 10))
    changes: list[UsageChange] = []
    grown = threading.Condition()
    failed: list[BaseException] = []

    def read(watch: Iterator[UsageChange]) -> None:
        try:
            for change in watch:
                with grown:
                    changes.append(change)
                    grown.notify_all()
                if len(changes) == 1 + len(quantities):
                    return
        except BaseException as exc:
            failed.append(exc)
            with grown:
                grown.notify_all()

    def reach(count: int) -> None:
        with grown:
            assert grown.wait_for(lambda: len(changes) >= count or failed, WAIT)
        assert not failed, failed

    replica = service.replica(tmp_path_factory.mktemp("replica") / "server.log")
    watcher = usage_client.UsageClient(
        service.address, retry=PATIENT, channel_options=FAST_RECONNECT
    )
    reader = threading.Thread(target=read, args=(watcher.watch_usage(cid),), daemon=True)
    try:
        reader.start()
        reach(1)
        for q in quantities[:3]:
            client.record_usage(cid, "tokens", q, idempotency_key=key())
        reach(4)
        replica.wait_serving()
        service.stop()  # SIGTERM: the stream ends with SERVER_SHUTTING_DOWN
        with usage_client.UsageClient(replica.address) as other:
            for q in quantities[3:6]:
                other.record_usage(cid, "tokens", q, idempotency_key=key())
            assert retries.first.wait(WAIT)
            service.start()
            service.wait_serving()
            for q in quantities[6:]:
                other.record_usage(cid, "tokens", q, idempotency_key=key())
        reach(1 + len(quantities))
        reader.join(WAIT)
        assert not reader.is_alive()
    finally:
        watcher.close()
        replica.stop()
        if service.proc.poll() is not None:
            service.start()
        service.wait_serving()
    assert_each_change_once(changes, quantities)
    first = retries.retries[0]
    assert (first.method, first.code, first.reason) == (
        "WatchUsage",
        "UNAVAILABLE",
        "SERVER_SHUTTING_DOWN",
    )


async def test_a_reader_too_slow_is_resumed_with_nothing_missed_or_repeated(
    target: str,
    client: usage_client.UsageClient,
    aclient: usage_client.AsyncUsageClient,
    retries: RetryLog,
) -> None:
    cid = new_customer(client).customer_id
    # A plain HTTP/2 window (not grown by bandwidth probes), so that not reading fills it.
    async with usage_client.AsyncUsageClient(
        target, channel_options=[("grpc.http2.bdp_probe", 0)]
    ) as slow:
        watch = slow.watch_usage(cid, meters=["tokens"])
        snapshot = await next_within(watch)
        for _ in range(FILL):
            await aclient.record_usage(cid, "tokens", 1, idempotency_key=key())
        # The loop reads nothing for longer than the service waits: the window is full since
        # before the last record, so the stream ends with SLOW_CONSUMER meanwhile.
        await asyncio.sleep(SLOW_AFTER + 3)
        changes: list[UsageChange] = []
        async with asyncio.timeout(WAIT):
            while len(changes) < FILL:
                changes.append(await anext(watch))
        await watch.aclose()
    assert [c.version for c in changes] == list(
        range(snapshot.version + 1, snapshot.version + 1 + FILL)
    )
    assert [tokens(c) for c in changes] == list(range(1, FILL + 1))
    assert [(r.method, r.code, r.reason) for r in retries.retries] == [
        ("WatchUsage", "RESOURCE_EXHAUSTED", "SLOW_CONSUMER")
    ]


def test_an_unknown_customer_raises_at_once(
    client: usage_client.UsageClient, retries: RetryLog
) -> None:
    with pytest.raises(usage_client.NotFound) as caught:
        next(client.watch_usage(f"cus_{uuid.uuid4().hex}"))
    assert (caught.value.reason, caught.value.attempts) == ("CUSTOMER_NOT_FOUND", 1)
    assert retries.retries == []


async def test_an_unknown_customer_or_meter_raises_at_once_async(
    client: usage_client.UsageClient, aclient: usage_client.AsyncUsageClient, retries: RetryLog
) -> None:
    with pytest.raises(usage_client.NotFound):
        await next_within(aclient.watch_usage(f"cus_{uuid.uuid4().hex}"))
    cid = new_customer(client).customer_id
    with pytest.raises(usage_client.InvalidArgument) as caught:
        await next_within(aclient.watch_usage(cid, meters=["tokens", "no_such_meter"]))
    assert [v.field for v in caught.value.field_violations] == ["meters[1]"]
    assert retries.retries == []
