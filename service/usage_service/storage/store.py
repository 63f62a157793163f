"""The core's storage port: customers, usage events and running totals, over an asyncpg pool."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import TypeAlias

import asyncpg

from usage_service import domain
from usage_service.storage import queries

DEFAULT_POOL_SIZE = 10  # connections
Conn: TypeAlias = "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"


class KeyConflict(Exception):
    """An idempotency key already names an event with another payload."""

    def __init__(self, index: int, event_id: str) -> None:
        super().__init__(f"item {index}: idempotency key already used with another payload")
        self.index = index
        self.event_id = event_id


@dataclasses.dataclass(frozen=True)
class Recorded:
    event_id: str
    duplicate: bool


@dataclasses.dataclass(frozen=True)
class Consumed:
    """The outcome of a check-and-consume. For a replayed key, `decision` is None and `totals`
    already hold the earlier consumption."""

    customer: domain.Customer | None
    decision: domain.Decision | None
    totals: domain.Totals = dataclasses.field(default_factory=domain.Totals)
    event_id: str = ""
    duplicate: bool = False


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(dsn: str, size: int = DEFAULT_POOL_SIZE) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn, min_size=1, max_size=size, init=_init_connection, command_timeout=30
    )
    assert pool is not None
    return pool


def customer_from_row(row: asyncpg.Record) -> domain.Customer:
    return domain.Customer(
        customer_id=row["customer_id"],
        plan_id=row["plan_id"],
        subscription_status=domain.SubscriptionStatus(row["subscription_status"]),
        period_start=row["period_start"],
        period_end=row["period_end"],
        provider=domain.Provider(row["provider"]),
        provider_customer_id=row["provider_customer_id"],
        subscription_items=dict(row["subscription_items"]),
    )


def totals_from_row(row: asyncpg.Record) -> domain.Totals:
    return domain.Totals(
        event_count=row["event_count"],
        quantity_sum=row["quantity_sum"],
        quantity_max=row["quantity_max"],
        last_quantity=row["last_quantity"],
        last_event_time=row["last_event_time"],
        reported_count=row["reported_count"],
        reported_sum=row["reported_sum"],
        failed_count=row["failed_count"],
        failed_sum=row["failed_sum"],
    )


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def close(self) -> None:
        await self.pool.close()

    # --- customers ---

    async def get_customer(self, customer_id: str) -> domain.Customer | None:
        row = await self.pool.fetchrow(queries.GET_CUSTOMER, customer_id)
        return customer_from_row(row) if row else None

    async def upsert_customer(self, c: domain.Customer) -> domain.Customer:
        """Writes the customer; when its period is new or changed, rebuilds that period's totals
        from the events already recorded in it (usage may arrive before the webhook)."""
        async with self.pool.acquire() as conn, conn.transaction():
            before = await conn.fetchrow(queries.GET_CUSTOMER_FOR_UPDATE, c.customer_id)
            row = await conn.fetchrow(
                queries.UPSERT_CUSTOMER,
                c.customer_id,
                c.plan_id,
                c.subscription_status.value,
                c.period_start,
                c.period_end,
                c.provider.value,
                c.provider_customer_id,
                dict(c.subscription_items),
            )
            if before is None or (before["period_start"], before["period_end"]) != (
                c.period_start,
                c.period_end,
            ):
                await conn.execute(queries.CLEAR_PERIOD_TOTALS, c.customer_id, c.period_start)
                await conn.execute(
                    queries.RECOMPUTE_PERIOD_TOTALS, c.customer_id, c.period_start, c.period_end
                )
        assert row is not None
        return customer_from_row(row)

    # --- usage ---

    async def record(self, events: Sequence[domain.UsageEvent]) -> list[Recorded]:
        """Stores events in one transaction, answering per event in order. A key seen before
        (in this call or earlier) with the same payload is a duplicate; with another payload it
        raises KeyConflict and nothing is stored."""
        first: dict[tuple[str, str], int] = {}
        for i, e in enumerate(events):
            key = (e.customer_id, e.idempotency_key)
            j = first.setdefault(key, i)
            if j != i and events[j].payload_hash != e.payload_hash:
                raise KeyConflict(i, events[j].event_id)
        # Rows go in key order, so concurrent writers take unique-index locks in one order.
        fresh = sorted(
            (events[i] for i in first.values()), key=lambda e: (e.customer_id, e.idempotency_key)
        )
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(queries.LOCK_CUSTOMERS, sorted({e.customer_id for e in fresh}))
            customers = {r["customer_id"]: customer_from_row(r) for r in rows}
            inserted_rows = await conn.fetch(
                queries.INSERT_EVENTS,
                [e.event_id for e in fresh],
                [e.customer_id for e in fresh],
                [e.idempotency_key for e in fresh],
                [e.meter for e in fresh],
                [e.quantity for e in fresh],
                [e.event_time for e in fresh],
                [json.dumps(dict(e.properties)) for e in fresh],
                [e.payload_hash for e in fresh],
            )
            inserted = {str(r["event_id"]) for r in inserted_rows}
            original: dict[tuple[str, str], tuple[str, bytes]] = {
                (e.customer_id, e.idempotency_key): (e.event_id, e.payload_hash)
                for e in fresh
                if e.event_id in inserted
            }
            missing = [e for e in fresh if e.event_id not in inserted]
            if missing:
                for r in await conn.fetch(
                    queries.EXISTING_EVENTS,
                    [e.customer_id for e in missing],
                    [e.idempotency_key for e in missing],
                ):
                    key = (r["customer_id"], r["idempotency_key"])
                    original[key] = (str(r["event_id"]), bytes(r["payload_hash"]))
            answers = []
            for i, e in enumerate(events):
                event_id, digest = original[(e.customer_id, e.idempotency_key)]
                if digest != e.payload_hash:
                    raise KeyConflict(i, event_id)
                answers.append(Recorded(event_id, duplicate=event_id != e.event_id))
            await self._add_totals(conn, customers, [e for e in fresh if e.event_id in inserted])
        return answers

    async def _add_totals(
        self,
        conn: Conn,
        customers: Mapping[str, domain.Customer],
        events: Sequence[domain.UsageEvent],
    ) -> None:
        groups: dict[tuple[str, str], list[domain.UsageEvent]] = defaultdict(list)
        for e in events:
            customer = customers.get(e.customer_id)
            if customer is not None and customer.in_period(e.event_time):
                groups[(e.customer_id, e.meter)].append(e)
        if not groups:
            return
        keys = sorted(groups)
        folded = [domain.fold(groups[k]) for k in keys]
        periods = [customers[c] for c, _ in keys]
        await conn.execute(
            queries.ADD_TOTALS,
            [c for c, _ in keys],
            [m for _, m in keys],
            [p.period_start for p in periods],
            [p.period_end for p in periods],
            [t.event_count for t in folded],
            [t.quantity_sum for t in folded],
            [t.quantity_max for t in folded],
            [t.last_quantity for t in folded],
            [t.last_event_time for t in folded],
        )

    async def period_totals(self, customer: domain.Customer) -> dict[str, domain.Totals]:
        rows = await self.pool.fetch(
            queries.PERIOD_TOTALS, customer.customer_id, customer.period_start
        )
        return {r["meter"]: totals_from_row(r) for r in rows}

    async def meter_totals(self, customer: domain.Customer, meter: str) -> domain.Totals:
        row = await self.pool.fetchrow(
            queries.METER_TOTALS, customer.customer_id, meter, customer.period_start
        )
        return totals_from_row(row) if row else domain.Totals()

    async def consume(
        self,
        event: domain.UsageEvent,
        gate: Callable[[domain.Customer | None], domain.Decision | None],
        decide: Callable[[domain.Customer, domain.Totals], domain.Decision],
    ) -> Consumed:
        """Check-and-consume in one transaction holding the totals row's lock, so no two
        callers can both take the last units. `gate` may deny before any lock on usage;
        `decide` judges the locked totals. A key consumed before answers as a duplicate."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(queries.GET_CUSTOMER_FOR_SHARE, event.customer_id)
            customer = customer_from_row(row) if row else None
            denial = gate(customer)
            if denial is not None or customer is None:
                return Consumed(customer, denial)
            locked = await conn.fetchrow(
                queries.LOCK_TOTALS,
                customer.customer_id,
                event.meter,
                customer.period_start,
                customer.period_end,
            )
            assert locked is not None
            totals = totals_from_row(locked)
            seen = await conn.fetchrow(
                queries.EVENT_BY_KEY, event.customer_id, event.idempotency_key
            )
            if seen is not None:
                if bytes(seen["payload_hash"]) != event.payload_hash:
                    raise KeyConflict(0, str(seen["event_id"]))
                return Consumed(customer, None, totals, str(seen["event_id"]), duplicate=True)
            decision = decide(customer, totals)
            if not decision.allowed:
                return Consumed(customer, decision, totals)
            result = await self._insert_one(conn, customer, event)
            if result.duplicate:
                return Consumed(customer, None, totals, result.event_id, duplicate=True)
            return Consumed(customer, decision, totals, result.event_id)

    async def _insert_one(
        self, conn: Conn, customer: domain.Customer, e: domain.UsageEvent
    ) -> Recorded:
        rows = await conn.fetch(
            queries.INSERT_EVENTS,
            [e.event_id],
            [e.customer_id],
            [e.idempotency_key],
            [e.meter],
            [e.quantity],
            [e.event_time],
            [json.dumps(dict(e.properties))],
            [e.payload_hash],
        )
        if not rows:  # a concurrent RecordUsage took the key between our check and insert
            seen = await conn.fetchrow(queries.EVENT_BY_KEY, e.customer_id, e.idempotency_key)
            assert seen is not None
            if bytes(seen["payload_hash"]) != e.payload_hash:
                raise KeyConflict(0, str(seen["event_id"]))
            return Recorded(str(seen["event_id"]), duplicate=True)
        await self._add_totals(conn, {customer.customer_id: customer}, [e])
        return Recorded(e.event_id, duplicate=False)


def new_event_id() -> str:
    return str(uuid.uuid4())
