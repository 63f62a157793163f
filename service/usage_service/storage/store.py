"""The core's storage port: customers, usage events and running totals, over an asyncpg pool."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, TypeAlias

import asyncpg

from usage_service import domain
from usage_service.storage import coalesce, queries

DEFAULT_POOL_SIZE = 10  # connections
MAX_RECORD_ROUNDS = 10  # transactions tried for one group before answering CONCURRENCY_CONFLICT
Key: TypeAlias = tuple[str, str]  # (customer_id, idempotency_key)
# Failures of the database as a whole: a group that meets one fails whole, never retried item
# by item (every caller retries with its own key).
_DATABASE_DOWN = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
)
Conn: TypeAlias = "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"


class KeyConflict(Exception):
    """An idempotency key already names an event with another payload."""

    def __init__(self, index: int, event_id: str) -> None:
        super().__init__(f"item {index}: idempotency key already used with another payload")
        self.index = index
        self.event_id = event_id


class Recorded(NamedTuple):  # a tuple: a batch makes one per event
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


async def init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool connections carry no session state (no SET, LISTEN, cursors or session advisory
    locks), so the default reset query on release would be a round trip for nothing. asyncpg
    still rolls back a transaction left open before this is called."""


async def create_pool(dsn: str, size: int = DEFAULT_POOL_SIZE) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=size,
        init=init_connection,
        reset=_keep_session,
        command_timeout=30,
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


class _Replan(Exception):
    """A key turned out to be taken by another payload: roll back and judge the group again."""


def _resolve(
    requests: Sequence[Sequence[domain.UsageEvent]], known: Mapping[Key, tuple[str, bytes]]
) -> tuple[list[list[Recorded] | KeyConflict], list[domain.UsageEvent]]:
    """Judges requests in order, as if each ran alone after the ones before it: `known` holds
    stored events (key -> event_id, payload hash). Returns each request's answers (or its key
    conflict: the request stores nothing) and the events to insert, in key order."""
    winners = dict(known)
    answers: list[list[Recorded] | KeyConflict] = []
    fresh: list[domain.UsageEvent] = []
    for events in requests:
        mine: dict[Key, tuple[str, bytes]] = {}
        out: list[Recorded] = []
        new: list[domain.UsageEvent] = []
        conflict: KeyConflict | None = None
        for i, e in enumerate(events):
            key = (e.customer_id, e.idempotency_key)
            seen = mine.get(key) or winners.get(key)
            if seen is None:
                mine[key] = (e.event_id, e.payload_hash)
                new.append(e)
                out.append(Recorded(e.event_id, duplicate=False))
            elif seen[1] != e.payload_hash:
                conflict = KeyConflict(i, seen[0])
                break
            else:
                out.append(Recorded(seen[0], duplicate=True))
        if conflict is not None:
            answers.append(conflict)
            continue
        winners.update(mine)
        fresh.extend(new)
        answers.append(out)
    # Rows go in key order, so concurrent writers take unique-index locks in one order.
    fresh.sort(key=lambda e: (e.customer_id, e.idempotency_key))
    return answers, fresh


class Store:
    def __init__(self, pool: asyncpg.Pool, group_commit: bool = True) -> None:
        self.pool = pool
        self.group_commit = group_commit
        self._writes: coalesce.Coalescer[
            Sequence[domain.UsageEvent], list[Recorded] | KeyConflict
        ] = coalesce.Coalescer(self.record_isolated, weight=len)
        self._reads: coalesce.Coalescer[
            tuple[str, str], tuple[domain.Customer | None, domain.Totals]
        ] = coalesce.Coalescer(self.check_read_many, max_items=1000)

    async def close(self) -> None:
        await self._writes.close()
        await self._reads.close()
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

    async def submit(self, events: Sequence[domain.UsageEvent]) -> list[Recorded]:
        """`record`, coalesced with concurrent callers into one transaction (group commit):
        answered only after the commit that holds these events; a key conflict or a failing
        total fails only this call."""
        if not self.group_commit:
            return await self.record(events)
        answer = await self._writes.submit(events)
        if isinstance(answer, KeyConflict):
            raise answer
        return answer

    async def record(self, events: Sequence[domain.UsageEvent]) -> list[Recorded]:
        """Stores events in one transaction, answering per event in order. A key seen before
        (in this call or earlier) with the same payload is a duplicate; with another payload it
        raises KeyConflict and nothing is stored."""
        (answer,) = await self.record_many([events])
        if isinstance(answer, KeyConflict):
            raise answer
        return answer

    async def record_isolated(
        self, requests: Sequence[Sequence[domain.UsageEvent]]
    ) -> list[list[Recorded] | KeyConflict | BaseException]:
        """`record_many`; when the group fails for a reason that belongs to one request (a total
        out of range, a deadlock), each request is retried alone so only its own caller fails."""
        try:
            return list(await self.record_many(requests))
        except _DATABASE_DOWN:
            raise
        except Exception:
            if len(requests) == 1:
                raise
        out: list[list[Recorded] | KeyConflict | BaseException] = []
        for events in requests:
            try:
                out.extend(await self.record_many([events]))
            except _DATABASE_DOWN:
                raise
            except Exception as exc:
                out.append(exc)
        return out

    async def record_many(
        self, requests: Sequence[Sequence[domain.UsageEvent]]
    ) -> list[list[Recorded] | KeyConflict]:
        """Stores several requests' events in one transaction and one commit. Each request is
        all-or-nothing on its own and is judged as if it ran alone after the ones before it: a
        key conflict (against a stored event or an earlier request) fails only that request."""
        known: dict[Key, tuple[str, bytes]] = {}
        for _ in range(MAX_RECORD_ROUNDS):
            try:
                return await self._record_round(requests, known)
            except _Replan:
                continue
        raise asyncpg.exceptions.SerializationError("idempotency keys kept changing; retry")

    async def _record_round(
        self,
        requests: Sequence[Sequence[domain.UsageEvent]],
        known: dict[Key, tuple[str, bytes]],
    ) -> list[list[Recorded] | KeyConflict]:
        answers, fresh = _resolve(requests, known)
        if not fresh:
            return answers
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(queries.LOCK_CUSTOMERS, sorted({e.customer_id for e in fresh}))
            periods = {r["customer_id"]: (r["period_start"], r["period_end"]) for r in rows}
            inserted_rows = await conn.fetch(
                queries.INSERT_EVENTS,
                [e.event_id for e in fresh],
                [e.customer_id for e in fresh],
                [e.idempotency_key for e in fresh],
                [e.meter for e in fresh],
                [e.quantity for e in fresh],
                [e.event_time for e in fresh],
                [properties_json(e.properties) for e in fresh],
                [e.payload_hash for e in fresh],
            )
            inserted = {str(r["event_id"]) for r in inserted_rows}
            missing = [e for e in fresh if e.event_id not in inserted]
            if missing:  # keys stored by earlier calls: duplicates, or conflicts to replan
                for r in await conn.fetch(
                    queries.EXISTING_EVENTS,
                    [e.customer_id for e in missing],
                    [e.idempotency_key for e in missing],
                ):
                    known[(r["customer_id"], r["idempotency_key"])] = (
                        str(r["event_id"]),
                        bytes(r["payload_hash"]),
                    )
                for e in missing:
                    seen = known.get((e.customer_id, e.idempotency_key))
                    if seen is None or seen[1] != e.payload_hash:
                        raise _Replan
                answers, _ = _resolve(requests, known)
            await self._add_totals(conn, periods, [e for e in fresh if e.event_id in inserted])
        return answers

    async def _add_totals(
        self,
        conn: Conn,
        periods: Mapping[str, tuple[dt.datetime, dt.datetime]],
        events: Sequence[domain.UsageEvent],
    ) -> None:
        """Adds events to their customers' current-period totals (`periods`: customer_id ->
        (start, end)); events outside it, or of unknown customers, count in none."""
        groups: dict[tuple[str, str], list[domain.UsageEvent]] = defaultdict(list)
        for e in events:
            period = periods.get(e.customer_id)
            if period is not None and period[0] <= e.event_time < period[1]:
                groups[(e.customer_id, e.meter)].append(e)
        if not groups:
            return
        keys = sorted(groups)
        folded = [domain.fold(groups[k]) for k in keys]
        bounds = [periods[c] for c, _ in keys]
        await conn.execute(
            queries.ADD_TOTALS,
            [c for c, _ in keys],
            [m for _, m in keys],
            [b[0] for b in bounds],
            [b[1] for b in bounds],
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

    async def check_read(
        self, customer_id: str, meter: str
    ) -> tuple[domain.Customer | None, domain.Totals]:
        """A customer and its current period's totals for one meter, read fresh in one
        statement that concurrent callers share (one round trip for a whole group)."""
        return await self._reads.submit((customer_id, meter))

    async def check_read_many(
        self, keys: Sequence[tuple[str, str]]
    ) -> list[tuple[domain.Customer | None, domain.Totals]]:
        rows = await self.pool.fetch(
            queries.CHECK_READS, [c for c, _ in keys], [m for _, m in keys]
        )
        found = {
            r["i"]: (
                customer_from_row(r),
                totals_from_row(r) if r["has_totals"] else domain.Totals(),
            )
            for r in rows
        }
        none: tuple[domain.Customer | None, domain.Totals] = (None, domain.Totals())
        return [found.get(i, none) for i in range(1, len(keys) + 1)]

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
        metering_plans: Sequence[str] = (),
    ) -> Consumed:
        """Check-and-consume in one transaction holding the totals row's lock, so no two
        callers can both take the last units. `gate` may deny before any lock on usage;
        `decide` judges the locked totals. A key consumed before answers as a duplicate.

        `metering_plans` (the plans that meter the feature) lets the first statement take the
        totals row's lock with the customer; otherwise it is taken by a second statement. Either
        way `decide` only ever sees the locked row."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                queries.CONSUME_LOCK,
                event.customer_id,
                event.meter,
                list(metering_plans),
                [s.value for s in domain.ALLOWED_STATUSES],
                event.idempotency_key,
            )
            customer = customer_from_row(row) if row else None
            denial = gate(customer)
            if denial is not None or customer is None:
                return Consumed(customer, denial)
            assert row is not None
            if row["locked"]:
                totals = totals_from_row(row)
                seen = _key_owner(row["seen_event_id"], row["seen_payload_hash"])
            else:
                locked = await conn.fetchrow(
                    queries.LOCK_TOTALS,
                    customer.customer_id,
                    event.meter,
                    customer.period_start,
                    customer.period_end,
                )
                assert locked is not None
                totals = totals_from_row(locked)
                seen = await self._seen(conn, event)
            if seen is not None:
                return self._replay(customer, totals, event, seen)
            decision = decide(customer, totals)
            if not decision.allowed:
                # The key was read before the lock was granted: a consume of the same key that
                # committed meanwhile is a replay, not a denial.
                seen = await self._seen(conn, event)
                if seen is not None:
                    return self._replay(customer, totals, event, seen)
                return Consumed(customer, decision, totals)
            result = await self._insert_consumed(conn, customer, event)
            if result.duplicate:
                return Consumed(customer, None, totals, result.event_id, duplicate=True)
            return Consumed(customer, decision, totals, result.event_id)

    @staticmethod
    async def _seen(conn: Conn, e: domain.UsageEvent) -> tuple[str, bytes] | None:
        row = await conn.fetchrow(queries.EVENT_BY_KEY, e.customer_id, e.idempotency_key)
        return _key_owner(row["event_id"], row["payload_hash"]) if row else None

    @staticmethod
    def _replay(
        customer: domain.Customer,
        totals: domain.Totals,
        e: domain.UsageEvent,
        seen: tuple[str, bytes],
    ) -> Consumed:
        """The key names a stored event: a replay when the payload matches, else a conflict."""
        event_id, payload = seen
        if payload != e.payload_hash:
            raise KeyConflict(0, event_id)
        return Consumed(customer, None, totals, event_id, duplicate=True)

    async def _insert_consumed(
        self, conn: Conn, customer: domain.Customer, e: domain.UsageEvent
    ) -> Recorded:
        inserted = await conn.fetchval(
            queries.CONSUME_INSERT,
            e.event_id,
            e.customer_id,
            e.idempotency_key,
            e.meter,
            e.quantity,
            e.event_time,
            properties_json(e.properties),
            e.payload_hash,
            customer.in_period(e.event_time),
            customer.period_start,
        )
        if inserted is None:  # a concurrent RecordUsage took the key between our check and insert
            seen = await self._seen(conn, e)
            assert seen is not None
            if seen[1] != e.payload_hash:
                raise KeyConflict(0, seen[0])
            return Recorded(seen[0], duplicate=True)
        return Recorded(e.event_id, duplicate=False)


def _key_owner(event_id: object, payload_hash: bytes | None) -> tuple[str, bytes] | None:
    """(event_id, payload hash) of the event stored under a key, None when there is none."""
    return (
        None if event_id is None or payload_hash is None else (str(event_id), bytes(payload_hash))
    )


_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def new_event_id() -> str:
    """A random (version 4) UUID as text, like `str(uuid.uuid4())`."""
    return new_event_ids(1)[0]


def new_event_ids(count: int) -> list[str]:
    """`count` random (version 4) UUIDs as text from one read of the OS's random source: a
    batch needs one per event, and each read releases the GIL to the gRPC poller thread."""
    h = os.urandom(16 * count).hex()
    return [
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-4{h[i + 13 : i + 16]}-"
        f"{_VARIANT[h[i + 16]]}{h[i + 17 : i + 20]}-{h[i + 20 : i + 32]}"
        for i in range(0, 32 * count, 32)
    ]


def properties_json(properties: Mapping[str, str]) -> str:
    return json.dumps(dict(properties)) if properties else "{}"
