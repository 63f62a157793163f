"""Group commit: concurrent RecordUsage calls share one transaction and one commit, yet each
caller keeps its own answer (duplicate, ALREADY_EXISTS, an out-of-range total) as if alone."""

from __future__ import annotations

import asyncio
import datetime as dt

import grpc
import pytest
from conftest import Service
from helpers import details, logged_store, record

from usage.v1 import usage_pb2
from usage_service import domain
from usage_service.domain import errors, ids, periods
from usage_service.storage import connections, history, idempotency, store

INT64_MAX = 2**63 - 1


def _event(
    key: str, quantity: int = 1, customer: str = "c", meter: str = "tokens"
) -> domain.UsageEvent:
    return domain.UsageEvent(
        event_id=ids.new_event_id(),
        customer_id=customer,
        meter=meter,
        quantity=quantity,
        idempotency_key=key,
        event_time=dt.datetime.now(dt.UTC),
        properties={},
        payload_hash=domain.payload_hash(meter, quantity, None, {}),
    )


async def test_concurrent_calls_share_statements_and_all_are_stored(dsn: str) -> None:
    statements: list[str] = []
    st = await logged_store(dsn, statements)
    try:
        await st.submit([_event("warm-up")])
        statements.clear()
        answers = await asyncio.gather(*(st.submit([_event(f"k{i}", i)]) for i in range(200)))
        inserts = [s for s in statements if "INSERT INTO usage_events" in s]
        commits = [s for s in statements if s.strip().upper() == "COMMIT;"]
        # Two flushes start at once with the first callers; the rest wait for one of them.
        assert 1 <= len(inserts) <= 4, len(inserts)
        assert len(commits) == len(inserts)
        assert all(not a[0].duplicate for a in answers)
        ids = {a[0].event_id for a in answers}
        stored = {str(r[0]) for r in await st.pool.fetch("SELECT event_id FROM usage_events")}
        assert ids <= stored and len(ids) == 200
    finally:
        await st.close()


async def test_each_request_in_a_group_is_judged_alone_and_in_order(dsn: str) -> None:
    st = store.Store(await connections.create_pool(dsn))
    try:
        (taken,) = await st.record([_event("taken", 5)])
        failing_batch = [_event("shared", 1), _event("taken", 6)]  # conflicts on its 2nd item
        later_same_key = [_event("shared", 1)]  # must not lean on the failed batch's event
        first = [_event("twice", 1)]
        second_other_payload = [_event("twice", 2)]
        retry_of_stored = [_event("taken", 5)]
        plain = [_event("plain", 3)]
        answers = await st.record_many(
            [failing_batch, later_same_key, first, second_other_payload, retry_of_stored, plain]
        )
        assert isinstance(answers[0], errors.KeyConflict)
        assert (answers[0].index, answers[0].event_id) == (1, taken.event_id)
        assert answers[1] == [idempotency.Recorded(later_same_key[0].event_id, duplicate=False)]
        assert answers[2] == [idempotency.Recorded(first[0].event_id, duplicate=False)]
        assert isinstance(answers[3], errors.KeyConflict)
        assert answers[3].event_id == first[0].event_id
        assert answers[4] == [idempotency.Recorded(taken.event_id, duplicate=True)]
        assert answers[5] == [idempotency.Recorded(plain[0].event_id, duplicate=False)]
        rows = await st.pool.fetch("SELECT idempotency_key, quantity FROM usage_events")
        assert sorted((r[0], r[1]) for r in rows) == [
            ("plain", 3),
            ("shared", 1),
            ("taken", 5),
            ("twice", 1),
        ]
    finally:
        await st.close()


async def test_a_total_out_of_range_fails_only_its_own_caller(dsn: str) -> None:
    st = store.Store(await connections.create_pool(dsn))
    try:
        now = dt.datetime.now(dt.UTC)
        start, end = now - dt.timedelta(days=1), now + dt.timedelta(days=1)
        await st.upsert_customer(
            domain.Customer(
                "c",
                "basic",
                domain.SubscriptionStatus.ACTIVE,
                start,
                end,
                periods.Cadence(periods.Interval.DAY, 2, end),
            ),
            history.CadenceRequest(),
            now,
        )
        await st.record([_event("big", INT64_MAX)])
        ok = [_event("ok", 1, customer="other")]
        overflow = [_event("over", 1)]
        answers = await st.record_isolated([ok, overflow])
        assert answers[0] == [idempotency.Recorded(ok[0].event_id, duplicate=False)]
        assert isinstance(answers[1], errors.TotalOutOfRange) and answers[1].index == 0
        keys = {r[0] for r in await st.pool.fetch("SELECT idempotency_key FROM usage_events")}
        assert keys == {"big", "ok"}
    finally:
        await st.close()


async def test_concurrent_rpcs_with_one_conflicting_key_fail_only_that_caller(
    service: Service,
) -> None:
    await service.add_customer()
    first = await service.usage.RecordUsage(record(quantity=5, key="taken"))
    calls = [record(quantity=1, key=f"k{i}") for i in range(100)]
    calls.insert(50, record(quantity=9, key="taken"))
    calls.insert(70, record(quantity=5, key="taken"))
    results = await asyncio.gather(
        *(service.usage.RecordUsage(c) for c in calls), return_exceptions=True
    )
    conflict = results[50]
    assert isinstance(conflict, grpc.aio.AioRpcError)
    d = details(conflict)
    assert d.code == grpc.StatusCode.ALREADY_EXISTS and d.metadata["event_id"] == first.event_id
    rest = [r for i, r in enumerate(results) if i != 50]
    assert all(isinstance(r, usage_pb2.RecordUsageResponse) for r in rest), rest[:3]
    replay = results[70]
    assert isinstance(replay, usage_pb2.RecordUsageResponse)
    assert replay.duplicate and replay.event_id == first.event_id
    assert await service.count_events() == 101
    summary = await service.usage.GetUsageSummary(
        usage_pb2.GetUsageSummaryRequest(customer_id="cus_1", meter="tokens")
    )
    assert summary.meters[0].used == 5 + 100


@pytest.mark.parametrize("attempt", range(2))
async def test_totals_stay_exact_when_the_period_moves_during_a_burst(
    service: Service, attempt: int
) -> None:
    """UpsertCustomer rebuilds totals under the customer's row lock; group commits hold that
    row FOR SHARE, so no event is counted twice or lost from the new period's totals."""
    now = dt.datetime.now(dt.UTC)
    await service.add_customer(start=now - dt.timedelta(hours=1))
    calls = [
        asyncio.ensure_future(service.usage.RecordUsage(record(quantity=1, key=f"k{i}")))
        for i in range(300)
    ]
    await asyncio.wait(calls[:20])
    await service.add_customer(start=now - dt.timedelta(hours=2))
    await asyncio.gather(*calls)
    row = await service.db.fetchrow(
        "SELECT t.quantity_sum, (SELECT count(*) FROM usage_events) AS n "
        "FROM usage_totals t JOIN customers c USING (customer_id) "
        "WHERE t.period_start = c.period_start AND t.meter = 'tokens'"
    )
    assert row is not None and row["quantity_sum"] == row["n"] == 300
