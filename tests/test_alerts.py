"""Threshold alerts on a real PostgreSQL and a real gRPC server: each crossing is recorded once
per customer, feature, period and threshold (an alert row, a 'threshold' change in the log and
a webhook in the outbox, together), however calls and alerters race, and again next period."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import grpc
import pytest
from alerts_support import (
    alert_plans,
    alerter,
    count,
    eventually,
    pool,
    running,
    threshold_changes,
)
from conftest import Service
from helpers import record

from usage.v1 import usage_pb2
from usage_service.domain.plans import Plans
from usage_service.storage import alerts, changes


@pytest.fixture(scope="module")
def plans() -> Plans:
    return alert_plans()


async def alert_rows(db: object, customer_id: str = "cus_1") -> list[tuple[object, ...]]:
    rows = await alerts.alerts_of(db, customer_id)  # type: ignore[arg-type]
    return [(r["feature"], r["threshold"], r["amount"], r["used"]) for r in rows]


async def test_a_crossing_is_recorded_once_with_its_change_and_webhook(
    service: Service, plans: Plans, dsn: str
) -> None:
    await service.add_customer()
    async with pool(dsn) as db:
        a = alerter(db, plans)
        await service.usage.RecordUsage(record(quantity=799, key="a"))
        assert await a.catch_up() == 0
        await service.usage.RecordUsage(record(quantity=1, key="b"))
        assert await a.catch_up() == 1
        await service.usage.RecordUsage(record(quantity=100, key="c"))
        assert await a.catch_up() == 0

        [row] = await alerts.alerts_of(db, "cus_1")
        assert await alert_rows(db) == [("tokens", "80% of limit", 800, 800)]
        alert_id = str(row["alert_id"])
        [logged] = await threshold_changes(db, "cus_1")
        assert logged.change.detail == {
            "alert_id": alert_id,
            "feature": "tokens",
            "threshold": "80% of limit",
            "amount": 800,
            "used": 800,
        }
        assert logged.change.figures["tokens"].quantity_sum == 800
        bounds = (row["period_start"], row["period_end"])
        assert (logged.change.period_start, logged.change.period_end) == bounds
        [waiting] = await alerts.webhooks(db)
        event = json.loads(waiting["body"])
        assert event == {
            "id": alert_id,
            "type": "usage.threshold_crossed",
            "created": event["created"],
            "data": {
                "customer_id": "cus_1",
                "feature": "tokens",
                "threshold": "80% of limit",
                "amount": 800,
                "used": 800,
                "period_start": bounds[0].isoformat().replace("+00:00", "Z"),
                "period_end": bounds[1].isoformat().replace("+00:00", "Z"),
                "version": logged.version,
            },
        }
        assert abs(event["created"] - row["created_at"].timestamp()) < 1
        # the cursor is past the alert's own change: nothing is left to read
        assert not await alerts.is_due(db, "cus_1")

        await service.usage.RecordUsage(record(quantity=100, key="d"))  # 1000: the limit
        assert await a.catch_up() == 1
        assert await alert_rows(db) == [
            ("tokens", "80% of limit", 800, 800),
            ("tokens", "100% of limit", 1000, 1000),
        ]
        assert len(await threshold_changes(db, "cus_1")) == 2
        assert await count(db, "usage_webhook_outbox") == 2


async def test_one_change_past_two_thresholds_raises_both_lowest_first(
    service: Service, plans: Plans, dsn: str
) -> None:
    await service.add_customer()
    await service.usage.RecordUsage(record(quantity=1000, key="all"))
    async with pool(dsn) as db:
        assert await alerter(db, plans).catch_up() == 2
        logged = await threshold_changes(db, "cus_1")
        assert [c.change.detail["threshold"] for c in logged] == ["80% of limit", "100% of limit"]
        assert logged[1].version == logged[0].version + 1


async def race(service: Service, dsn: str, plans: Plans, calls: list[object]) -> None:
    """Runs the calls at once while three alerters (each with its own pool, as replicas) follow
    the log on notifications; returns once every change has been checked."""
    async with pool(dsn) as a, pool(dsn) as b, pool(dsn) as c:
        async with (
            running(alerter(a, plans)),
            running(alerter(b, plans)),
            running(alerter(c, plans)),
        ):
            await asyncio.gather(*calls)  # type: ignore[arg-type]
            await eventually(lambda: _checked(a))


async def _checked(db: object) -> bool:
    return not await alerts.is_due(db, "cus_1")  # type: ignore[arg-type]


@pytest.mark.parametrize("attempt", range(2))
async def test_64_concurrent_consumes_across_80_percent_raise_one_alert(
    service: Service, plans: Plans, dsn: str, attempt: int
) -> None:
    await service.add_customer()
    await service.usage.RecordUsage(record(quantity=500, key="base"))
    consumes = [
        service.usage.CheckEntitlement(
            usage_pb2.CheckEntitlementRequest(
                customer_id="cus_1",
                feature="tokens",
                quantity=7,
                consume=True,
                idempotency_key=f"c{i}",
            )
        )
        for i in range(64)
    ]  # 500 + 64 * 7 = 948: past 800, short of 1000
    await race(service, dsn, plans, consumes)
    assert await alert_rows(service.db) == [("tokens", "80% of limit", 800, _used_at(500, 7, 800))]
    assert await count(service.db, "usage_webhook_outbox") == 1
    async with pool(dsn) as db:
        assert len(await threshold_changes(db, "cus_1")) == 1


def _used_at(base: int, step: int, amount: int) -> int:
    """The first total at or past `amount` of `base` plus steps of `step`."""
    return base + -(-(amount - base) // step) * step


@pytest.mark.parametrize("attempt", range(2))
async def test_64_concurrent_records_across_80_percent_raise_one_alert(
    service: Service, plans: Plans, dsn: str, attempt: int
) -> None:
    await service.add_customer()
    records = [service.usage.RecordUsage(record(quantity=15, key=f"r{i}")) for i in range(64)]
    await race(service, dsn, plans, records)  # 64 * 15 = 960
    # records may commit together (group commit): the crossing total is a multiple of 15
    [(feature, threshold, amount, used)] = await alert_rows(service.db)
    assert (feature, threshold, amount) == ("tokens", "80% of limit", 800)
    assert 800 <= used <= 960 and used % 15 == 0
    assert await count(service.db, "usage_webhook_outbox") == 1
    async with pool(dsn) as db:
        assert len(await threshold_changes(db, "cus_1")) == 1


async def test_a_new_period_re_arms_every_threshold(
    service: Service, plans: Plans, dsn: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    first = (now - dt.timedelta(days=1), now + dt.timedelta(days=29))
    await service.add_customer(start=first[0], end=first[1])
    await service.usage.RecordUsage(record(quantity=850, key="a", when=now - dt.timedelta(hours=1)))
    async with pool(dsn) as db:
        a = alerter(db, plans)
        assert await a.catch_up() == 1
        # the renewal webhook: the next period began half an hour ago
        second = now - dt.timedelta(minutes=30)
        await service.add_customer(start=second, end=second + dt.timedelta(days=30))
        await service.usage.RecordUsage(record(quantity=820, key="b"))
        assert await a.catch_up() == 1
        rows = await alerts.alerts_of(db, "cus_1")
        assert [(r["threshold"], r["used"]) for r in rows] == [
            ("80% of limit", 850),
            ("80% of limit", 820),
        ]
        assert [r["period_start"] for r in rows] == [first[0], second]
        await service.usage.RecordUsage(record(quantity=10, key="c"))
        assert await a.catch_up() == 0


async def test_a_late_event_in_a_period_already_over_raises_nothing(
    service: Service, plans: Plans, dsn: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    await service.add_customer(start=now - dt.timedelta(days=1), end=now + dt.timedelta(days=29))
    second = now - dt.timedelta(minutes=30)
    await service.add_customer(start=second, end=second + dt.timedelta(days=30))
    late = record(quantity=900, key="late", when=now - dt.timedelta(hours=2))
    await service.usage.RecordUsage(late)
    async with pool(dsn) as db:
        a = alerter(db, plans)
        assert await a.catch_up() == 0
        [usage] = [c for c in await changes.since(db, "cus_1", 0, 100) if c.change.kind == "usage"]
        assert usage.change.period_end == second  # counted in the period that had ended
        await service.usage.RecordUsage(record(quantity=900, key="now"))
        assert await a.catch_up() == 1
        assert [r["period_start"] for r in await alerts.alerts_of(db, "cus_1")] == [second]


async def test_a_plan_change_is_judged_by_the_new_plan(
    service: Service, plans: Plans, dsn: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    period = {"start": now - dt.timedelta(days=1), "end": now + dt.timedelta(days=29)}
    await service.add_customer(plan_id="quiet", **period)
    await service.usage.RecordUsage(record(quantity=900, key="a"))
    async with pool(dsn) as db:
        a = alerter(db, plans)
        assert await a.catch_up() == 0  # a plan without thresholds
        assert not await alerts.is_due(db, "cus_1")
        await service.add_customer(plan_id="basic", **period)
        assert await a.catch_up() == 1
        assert await alert_rows(db) == [("tokens", "80% of limit", 800, 900)]
        kinds = [c.change.kind for c in await changes.since(db, "cus_1", 0, 100)]
        assert kinds[-2:] == ["customer", "threshold"]


async def test_usage_is_judged_by_the_plan_it_was_recorded_under(
    service: Service, plans: Plans, dsn: str
) -> None:
    """Usage past a threshold, then a move to a plan without thresholds, both before the
    alerter reads them: the usage still alerts, and later usage under the new plan does not."""
    now = dt.datetime.now(dt.UTC)
    period = {"start": now - dt.timedelta(days=1), "end": now + dt.timedelta(days=29)}
    await service.add_customer(plan_id="basic", **period)
    await service.usage.RecordUsage(record(quantity=900, key="a"))
    await service.add_customer(plan_id="quiet", **period)
    await service.usage.RecordUsage(record(quantity=100, key="b"))  # 1000: the limit
    async with pool(dsn) as db:
        assert await alerter(db, plans).catch_up() == 1
        assert await alert_rows(db) == [("tokens", "80% of limit", 800, 900)]


async def test_each_feature_has_its_own_thresholds(
    service: Service, plans: Plans, dsn: str
) -> None:
    await service.add_customer()
    calls = [record(meter="calls", quantity=1, key=f"k{i}") for i in range(10)]
    await service.usage.BatchRecordUsage(usage_pb2.BatchRecordUsageRequest(requests=calls))
    async with pool(dsn) as db:
        assert await alerter(db, plans).catch_up() == 1
        assert await alert_rows(db) == [("calls", "100% of included", 10, 10)]


async def take(
    call: grpc.aio.UnaryStreamCall[usage_pb2.WatchUsageRequest, usage_pb2.WatchUsageResponse],
    n: int,
) -> list[usage_pb2.WatchUsageResponse]:
    out = []
    async with asyncio.timeout(30):
        async for message in call:
            out.append(message)
            if len(out) == n:
                return out
    return out


async def test_watchers_get_each_crossing_and_a_later_watcher_resumes_to_it(
    service: Service, plans: Plans, dsn: str
) -> None:
    await service.add_customer()
    kinds = usage_pb2.UsageChangeKind
    async with pool(dsn) as db:
        async with running(alerter(db, plans)):
            call = service.usage.WatchUsage(usage_pb2.WatchUsageRequest(customer_id="cus_1"))
            [snapshot] = await take(call, 1)
            await service.usage.RecordUsage(record(quantity=800, key="a"))
            usage, crossed = await take(call, 2)
            call.cancel()
            assert [kinds.Name(m.kind) for m in (snapshot, usage, crossed)] == [
                "USAGE_CHANGE_KIND_SNAPSHOT",
                "USAGE_CHANGE_KIND_USAGE",
                "USAGE_CHANGE_KIND_THRESHOLD",
            ]
            [row] = await alerts.alerts_of(db, "cus_1")
            t = crossed.threshold
            assert (t.alert_id, t.feature, t.threshold, t.amount, t.used) == (
                str(row["alert_id"]),
                "tokens",
                "80% of limit",
                800,
                800,
            )
            # no one watches: the next crossing is recorded all the same
            await service.usage.RecordUsage(record(quantity=200, key="b"))
            await eventually(lambda: _alerts(db, 2))
        resumed = service.usage.WatchUsage(
            usage_pb2.WatchUsageRequest(customer_id="cus_1", resume_after_version=crossed.version)
        )
        usage, crossed = await take(resumed, 2)
        resumed.cancel()
        assert kinds.Name(crossed.kind) == "USAGE_CHANGE_KIND_THRESHOLD"
        assert (crossed.threshold.threshold, crossed.threshold.used) == ("100% of limit", 1000)


async def test_notifications_wake_the_alerter_and_it_listens_again_when_cut_off(
    service: Service, plans: Plans, dsn: str
) -> None:
    """The alerter looks at every customer only once a minute here: alerts that come sooner
    came from a notification, including after its listening connection was killed."""
    await service.add_customer()
    async with pool(dsn) as db, running(alerter(db, plans)) as a:
        await service.usage.RecordUsage(record(quantity=800, key="a"))
        await eventually(lambda: _alerts(db, 1))
        killed = await _listener(service)
        await service.db.execute("SELECT pg_terminate_backend($1::integer)", killed)
        await eventually(lambda: _listening_again(service, a, killed))
        await service.usage.RecordUsage(record(quantity=200, key="b"))
        await eventually(lambda: _alerts(db, 2))


async def _alerts(db: object, n: int) -> bool:
    return await count(db, "usage_alerts") == n  # type: ignore[arg-type]


async def _listener(service: Service) -> int:
    pid = await service.db.fetchval(
        "SELECT pid FROM pg_stat_activity"
        " WHERE datname = current_database() AND query LIKE 'LISTEN%'"
    )
    assert pid is not None
    return int(pid)


async def _listening_again(service: Service, a: object, killed: int) -> bool:
    if not a.listening.is_set():  # type: ignore[attr-defined]
        return False
    pid = await service.db.fetchval(
        "SELECT pid FROM pg_stat_activity"
        " WHERE datname = current_database() AND query LIKE 'LISTEN%' AND pid <> $1",
        killed,
    )
    return pid is not None
