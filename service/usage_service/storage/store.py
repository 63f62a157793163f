"""The core's storage port: customers, usage events and running totals, over an asyncpg pool."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from typing import NamedTuple, TypeAlias

import asyncpg

from usage_service import domain
from usage_service.domain import credits as domain_credits
from usage_service.domain import ids, periods
from usage_service.domain.errors import KeyConflict, TotalOutOfRange
from usage_service.domain.plans import MeteredFeature, Plans
from usage_service.storage import (
    changes,
    coalesce,
    consuming,
    credits,
    decisions,
    history,
    idempotency,
    queries,
    readmodel,
)
from usage_service.storage.consuming import Consumed as Consumed
from usage_service.storage.consuming import Group, Keep, Planned, Request, keep_nothing
from usage_service.storage.rows import (
    Conn,
    customer_from_row,
    last_confirmed_from_row,
    stored_periods,
    totals_from_row,
)

ORDER_MASK = 2**20 - 1  # the acceptance-order bits of an event's seq (see INSERT_EVENTS)
MAX_CONSUME_GROUP = 256  # consumes of one customer's meter decided in one transaction
MAX_RECORD_ROUNDS = 10  # transactions tried for one group before answering CONCURRENCY_CONFLICT
# Failures of the database as a whole: a group that meets one fails whole, never retried item
# by item (every caller retries with its own key).
_DATABASE_DOWN = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
)


class Checked(NamedTuple):
    """A read for a check: the customer (None when unknown), the period containing now, the
    customer's totals for the meter in it and its change version, read together."""

    customer: domain.Customer | None = None
    period: periods.Period | None = None
    totals: domain.Totals = domain.Totals()
    version: int = 0


_NO_TOTALS = domain.Totals()


@dataclasses.dataclass(frozen=True)
class _Grants:
    """A customer's grants that may count in a period (`credits.live` since its start)."""

    grants: tuple[credits.Grant, ...]


# What the read model keeps: a check's read per (customer, meter), and a customer's grants per
# (customer, the start of the period they are read for).
Kept: TypeAlias = Checked | _Grants


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


_NEVER = dt.datetime.min.replace(tzinfo=dt.UTC)
_EVER = dt.datetime.max.replace(tzinfo=dt.UTC)


def _group_order(key: tuple[str, str, dt.datetime | None]) -> tuple[str, str, dt.datetime]:
    return key[0], key[1], key[2] or _NEVER


class _Locked(NamedTuple):
    """Customers locked by a recorder: their rows (LOCK_CUSTOMER), and all the confirmed
    periods of those with events before their last confirmed one."""

    rows: Mapping[str, asyncpg.Record]
    history: Mapping[str, Sequence[periods.Stored]]

    def provider(self, customer_id: str) -> str | None:
        """The provider the customer's events are billed to ('' none); None for a placeholder:
        decided by its first UpsertCustomer."""
        row = self.rows[customer_id]
        return row["provider"] if row["plan_id"] else None

    def bounds(
        self, customer_id: str, when: dt.datetime
    ) -> tuple[dt.datetime, dt.datetime, dt.datetime | None]:
        """(start, end, start) of the customer's period containing `when`; for a placeholder
        (no periods), all of time and no start."""
        row = self.rows[customer_id]
        if not row["plan_id"]:
            return _NEVER, _EVER, None
        start, end = row["period_start"], row["period_end"]
        if start <= when < end:
            return start, end, start
        stored = self.history.get(customer_id) or last_confirmed_from_row(row)
        p = periods.period_at(stored, when)
        return p.start, p.end, p.start


class Store:
    def __init__(
        self,
        pool: asyncpg.Pool,
        group_commit: bool = True,
        plans: Plans | None = None,
        read_model: readmodel.ReadModel[Kept] | None = None,
        group_by_customer: bool = False,
    ) -> None:
        self.pool = pool
        self.group_commit = group_commit
        # group commit per customer (on Citus: a group's transaction stays on one worker), or
        # across customers (on one PostgreSQL: calls of every customer share a commit)
        self.group_by_customer = group_by_customer
        # what checks read, kept in memory (None: every check reads the database)
        self.read_model = read_model
        # the plans whose prepaid features burn grants when usage is recorded (None: none do)
        self.plans = plans
        # what recording takes as now: whether a grant has expired (a consume's now is its
        # event's time)
        self.clock: Callable[[], dt.datetime] = _utc_now
        self._writes: coalesce.Coalescer[
            Sequence[domain.UsageEvent], list[idempotency.Recorded] | KeyConflict
        ] = coalesce.Coalescer(self.record_isolated, weight=len)
        self._writes_of: coalesce.Keyed[
            str, Sequence[domain.UsageEvent], list[idempotency.Recorded] | KeyConflict
        ] = coalesce.Keyed(self.record_isolated, weight=len)
        # checks' reads, grouped per customer (one statement reads one customer)
        self._reads: coalesce.Keyed[str, tuple[str, str, dt.datetime], Checked] = coalesce.Keyed(
            self.check_read_many, max_items=1000
        )
        # consumes, grouped per customer and meter (one totals row at a time)
        self._consumes: coalesce.Keyed[tuple[str, str], Request, Consumed] = coalesce.Keyed(
            self.consume_many, max_items=MAX_CONSUME_GROUP
        )

    @contextlib.asynccontextmanager
    async def _writing(self, customer_ids: Collection[str]) -> AsyncIterator[Conn]:
        """A connection in a transaction that writes these customers: once it commits, and
        before the caller is answered, the read model forgets them."""
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                yield conn
            self._wrote(customer_ids)

    def _wrote(self, customer_ids: Collection[str]) -> None:
        if self.read_model is not None:
            self.read_model.forget(customer_ids)

    async def close(self) -> None:
        await self._writes.close()
        await self._writes_of.close()
        await self._reads.close()
        await self._consumes.close()
        await self.pool.close()

    # --- customers ---

    async def get_customer(
        self, customer_id: str, now: dt.datetime
    ) -> tuple[domain.Customer, periods.Period] | None:
        """A customer and the period containing `now`; None when unknown."""
        row = await self.pool.fetchrow(queries.GET_CUSTOMER, customer_id)
        customer = customer_from_row(row) if row else None
        if customer is None:
            return None
        return customer, await self.period_now(customer, now)

    async def period_now(
        self, customer: domain.Customer, now: dt.datetime, conn: Conn | None = None
    ) -> periods.Period:
        """The period containing `now`: from the customer's row alone, unless `now` is before
        its last confirmed period (then its confirmed periods are read, through `conn` when
        given)."""
        period = customer.period_after_confirmed(now)
        if period is None:
            stored = await stored_periods(conn or self.pool, [customer.customer_id])
            period = periods.period_at(stored[customer.customer_id], now)
        return period

    async def upsert_customer(
        self, c: domain.Customer, cadence: history.CadenceRequest, now: dt.datetime
    ) -> tuple[domain.Customer, periods.Period]:
        """Writes the customer and confirms its period, rewriting the periods from that period's
        start on and rebuilding exactly the totals whose periods changed, in one transaction."""
        async with self._writing([c.customer_id]) as conn:
            plan = self.plans.plans.get(c.plan_id) if self.plans else None
            credits_only = [
                name
                for name, f in (plan.metered.items() if plan else ())
                if f.prepaid and not f.overage
            ]
            saved = await history.confirm(conn, c, cadence, now, credits_only)
            schedule = await stored_periods(conn, [saved.customer_id])
            await credits.follow_periods(
                conn, saved.customer_id, schedule[saved.customer_id], c.period_start, now
            )
            period = await self.period_now(saved, now, conn)
            rows = await conn.fetch(queries.PERIOD_TOTALS, saved.customer_id, period.start)
            figures = {r["meter"]: totals_from_row(r) for r in rows}
            detail: dict[str, object] = {
                "plan_id": saved.plan_id,
                "status": saved.subscription_status.value,
            }
            prepaid = {n: f for n, f in (plan.metered.items() if plan else ()) if f.prepaid}
            if prepaid:  # the plan's credit as this change leaves it, for WatchUsage
                credit = await credits.credit(conn, saved.customer_id, prepaid, period, now)
                detail["credit"] = {m: cr.to_json() for m, cr in credit.items()}
            await changes.append(
                conn,
                [changes.Change(saved.customer_id, "customer", *period.bounds, figures, detail)],
                dt.datetime.now(dt.UTC),
            )
        return saved, period

    # --- usage ---

    async def submit(self, events: Sequence[domain.UsageEvent]) -> list[idempotency.Recorded]:
        """`record`, coalesced with concurrent callers into one transaction (group commit; with
        `group_by_customer`, only callers of the same customer, and a call that names several
        customers runs alone):
        answered only after the commit that holds these events; a key conflict or a failing
        total fails only this call."""
        customers = {e.customer_id for e in events}
        if not self.group_commit or (self.group_by_customer and len(customers) != 1):
            return await self.record(events)
        if self.group_by_customer:
            answer = await self._writes_of.submit(customers.pop(), events)
        else:
            answer = await self._writes.submit(events)
        if isinstance(answer, KeyConflict):
            raise answer
        return answer

    async def record(self, events: Sequence[domain.UsageEvent]) -> list[idempotency.Recorded]:
        """Stores events in one transaction, answering per event in order. A key seen before
        (in this call or earlier) with the same payload is a duplicate; with another payload it
        raises KeyConflict and nothing is stored. An event that would take its lifetime total
        past int64 raises TotalOutOfRange."""
        try:
            (answer,) = await self.record_many([events])
        except asyncpg.exceptions.NumericValueOutOfRangeError:
            raise await self._overflowing(events) from None
        if isinstance(answer, KeyConflict):
            raise answer
        return answer

    async def _overflowing(self, events: Sequence[domain.UsageEvent]) -> TotalOutOfRange:
        """Which of `events` (refused as a whole for an out-of-range total) takes its total past
        int64, counting the keys not already stored."""
        keys = sorted({(e.customer_id, e.meter) for e in events})
        async with self.pool.acquire() as conn:
            sums = {
                (r["customer_id"], r["meter"]): r["quantity_sum"]
                for r in await conn.fetch(
                    queries.LIFETIME_SUMS, [k[0] for k in keys], [k[1] for k in keys]
                )
            }
            stored = {
                (r["customer_id"], r["idempotency_key"])
                for customer_id in sorted({e.customer_id for e in events})
                for r in await conn.fetch(
                    queries.EXISTING_EVENTS,
                    customer_id,
                    [e.idempotency_key for e in events if e.customer_id == customer_id],
                )
            }
        fresh = [e for e in events if (e.customer_id, e.idempotency_key) not in stored]
        index = domain.first_overflow(fresh, sums)
        return TotalOutOfRange(events.index(fresh[index]) if index >= 0 else 0)

    async def record_isolated(
        self, requests: Sequence[Sequence[domain.UsageEvent]]
    ) -> list[list[idempotency.Recorded] | KeyConflict | BaseException]:
        """`record_many`; when the group fails for a reason that belongs to one request (a total
        out of range, a deadlock), each request is retried alone so only its own caller fails."""
        try:
            return list(await self.record_many(requests))
        except _DATABASE_DOWN:
            raise
        except Exception:
            if len(requests) == 1:
                return [await self._record_one(requests[0])]
        return [await self._record_one(events) for events in requests]

    async def _record_one(
        self, events: Sequence[domain.UsageEvent]
    ) -> list[idempotency.Recorded] | KeyConflict | BaseException:
        try:
            return await self.record(events)
        except _DATABASE_DOWN:
            raise
        except Exception as exc:
            return exc

    async def record_many(
        self, requests: Sequence[Sequence[domain.UsageEvent]]
    ) -> list[list[idempotency.Recorded] | KeyConflict]:
        """Stores several requests' events in one transaction and one commit. Each request is
        all-or-nothing on its own and is judged as if it ran alone after the ones before it: a
        key conflict (against a stored event or an earlier request) fails only that request."""
        known: dict[idempotency.Key, tuple[str, bytes]] = {}
        for _ in range(MAX_RECORD_ROUNDS):
            try:
                return await self._record_round(requests, known)
            except idempotency.Replan:
                continue
        raise asyncpg.exceptions.SerializationError("idempotency keys kept changing; retry")

    async def _record_round(
        self,
        requests: Sequence[Sequence[domain.UsageEvent]],
        known: dict[idempotency.Key, tuple[str, bytes]],
    ) -> list[list[idempotency.Recorded] | KeyConflict]:
        answers, ordered = idempotency.resolve(requests, known)
        if not ordered:
            return answers
        by_customer: dict[str, list[tuple[domain.UsageEvent, int]]] = defaultdict(list)
        for pair in ordered:
            by_customer[pair[0].customer_id].append(pair)
        customers = sorted(by_customer)
        # Every statement names one customer; a statement's executions for several customers
        # are sent together (asyncpg's fetchmany: one round trip), in customer order.
        async with self._writing(customers) as conn:
            locked = await self._lock_customers(conn, customers, ordered)
            inserted_rows = await conn.fetchmany(
                queries.INSERT_EVENTS,
                [
                    (
                        [e.event_id for e, _ in by_customer[c]],
                        c,
                        [e.idempotency_key for e, _ in by_customer[c]],
                        [e.meter for e, _ in by_customer[c]],
                        [e.quantity for e, _ in by_customer[c]],
                        [e.event_time for e, _ in by_customer[c]],
                        [properties_json(e.properties) for e, _ in by_customer[c]],
                        [e.payload_hash for e, _ in by_customer[c]],
                        [o for _, o in by_customer[c]],
                        locked.provider(c),
                    )
                    for c in customers
                ],
            )
            # seq = one value per statement, shifted, plus the event's acceptance order
            seqs = {r["seq"] & ORDER_MASK: r["seq"] for r in inserted_rows}
            added = [(e, seqs[o]) for e, o in ordered if o in seqs]
            missing = [e for e, o in ordered if o not in seqs]
            if missing:  # keys stored by earlier calls: duplicates, or conflicts to replan
                for c in sorted({e.customer_id for e in missing}):
                    keys = [e.idempotency_key for e in missing if e.customer_id == c]
                    for r in await conn.fetch(queries.EXISTING_EVENTS, c, keys):
                        known[(r["customer_id"], r["idempotency_key"])] = (
                            str(r["event_id"]),
                            bytes(r["payload_hash"]),
                        )
                for e in missing:
                    seen = known.get((e.customer_id, e.idempotency_key))
                    if seen is None or seen[1] != e.payload_hash:
                        raise idempotency.Replan
            changed = await self._add_totals(conn, locked, added)
            details: dict[str, dict[str, dict[str, list[object]]]] = {}
            changed = await self._burn_prepaid(conn, locked, added, changed, details)
            await changes.append_totals(conn, "usage", changed, dt.datetime.now(dt.UTC), details)
        if missing:
            answers, _ = idempotency.resolve(requests, known)
        return answers

    def prepaid(self, plan_id: str, meter: str) -> MeteredFeature | None:
        """The plan's feature for the meter when it is prepaid."""
        plan = self.plans.plans.get(plan_id) if self.plans else None
        feature = plan.metered.get(meter) if plan else None
        return feature if feature is not None and feature.prepaid else None

    async def _burn_prepaid(
        self,
        conn: Conn,
        locked: _Locked,
        events: Sequence[tuple[domain.UsageEvent, int]],
        changed: list[asyncpg.Record],
        details: dict[str, dict[str, dict[str, list[object]]]],
    ) -> list[asyncpg.Record]:
        """Burns grants for the events of prepaid features (their totals rows are locked by
        now), each customer's and feature's in acceptance order, customer by customer; returns
        `changed` with the rows the burns changed, and puts each customer's credit after the
        burns in `details` (for the change log)."""
        if self.plans is None:
            return changed
        groups: dict[tuple[str, str], list[tuple[domain.UsageEvent, int]]] = defaultdict(list)
        for pair in events:
            e = pair[0]
            if self.prepaid(locked.rows[e.customer_id]["plan_id"], e.meter) is not None:
                groups[(e.customer_id, e.meter)].append(pair)
        if not groups:
            return changed
        assert self.plans is not None
        wanted: list[credits.Wanted] = []
        usage: dict[tuple[str, str], list[credits.Usage]] = {}
        for key in sorted(groups):
            customer_id, meter = key
            feature = self.prepaid(locked.rows[customer_id]["plan_id"], meter)
            assert feature is not None
            state = "unbilled" if locked.provider(customer_id) == "" else "pending"
            spans = set()
            usage[key] = []
            for e, _ in sorted(groups[key], key=lambda pair: pair[1]):
                start, end, _s = locked.bounds(customer_id, e.event_time)
                spans.add(periods.Period(start, end))
                usage[key].append(credits.Usage(e.event_id, e.quantity, e.event_time, start, state))
            wanted.append(
                credits.Wanted(customer_id, feature, sorted(spans, key=lambda p: p.start))
            )
        replaced: dict[tuple[str, str, dt.datetime], asyncpg.Record] = {}
        for customer_id in sorted({w.customer_id for w in wanted}):  # one customer at a time
            mine = [w for w in wanted if w.customer_id == customer_id]
            grants, now = await credits.lock(conn, mine, self.clock(), self.clock)
            burners = [
                credits.Burner(
                    w.customer_id,
                    w.feature,
                    self.plans.meters[w.feature.meter].aggregation,
                    grants[w.key],
                    usage[w.key],
                )
                for w in mine
            ]
            rows, afters = await credits.burn(conn, burners, now)
            replaced.update({(r["customer_id"], r["meter"], r["period_start"]): r for r in rows})
            for b, after in zip(burners, afters, strict=True):
                start, end, _s = locked.bounds(b.customer_id, now)
                credit = credits.credit_detail(
                    b.customer_id, b.feature, after, periods.Period(start, end), now
                )
                details.setdefault(b.customer_id, {"credit": {}})["credit"].update(credit)
        return [replaced.get((r["customer_id"], r["meter"], r["period_start"]), r) for r in changed]

    async def _lock_customers(
        self,
        conn: Conn,
        customer_ids: Sequence[str],
        events: Sequence[tuple[domain.UsageEvent, int]],
    ) -> _Locked:
        """Locks the customers (shared, in the order given), creating placeholders for unknown
        ones, and reads all the confirmed periods of those with events before their last one."""
        found = await conn.fetchmany(queries.LOCK_CUSTOMER, [(c,) for c in customer_ids])
        if len(found) < len(customer_ids):
            seen = {r["customer_id"] for r in found}
            new = [(c,) for c in customer_ids if c not in seen]
            await conn.executemany(queries.INSERT_PLACEHOLDER, new)
            found = [*found, *await conn.fetchmany(queries.LOCK_CUSTOMER, new)]
        rows = {row["customer_id"]: row for row in found}
        starts = {c: r["period_start"] for c, r in rows.items() if r["plan_id"]}
        early = sorted(
            {e.customer_id for e, _ in events if e.event_time < starts.get(e.customer_id, _NEVER)}
        )
        return _Locked(rows, await stored_periods(conn, early) if early else {})

    async def _add_totals(
        self,
        conn: Conn,
        locked: _Locked,
        events: Sequence[tuple[domain.UsageEvent, int]],
    ) -> list[asyncpg.Record]:
        """Adds (event, seq) pairs to the totals of the periods containing them, then to their
        meters' lifetime totals, customer by customer (a placeholder's events count in its
        lifetime totals only). Returns the period totals rows after the change."""
        if not events:
            return []
        # customer -> (meter, period start or None for a placeholder) -> (event, seq) pairs
        groups: dict[str, dict[tuple[str, dt.datetime | None], list[tuple[domain.UsageEvent, int]]]]
        groups = defaultdict(lambda: defaultdict(list))
        ends: dict[tuple[str, dt.datetime | None], dt.datetime] = {}
        latest: dict[str, tuple[dt.datetime, dt.datetime, dt.datetime | None]] = {}
        for pair in events:
            customer_id, when = pair[0].customer_id, pair[0].event_time
            bounds = latest.get(customer_id)  # most events of a customer share a period
            if bounds is None or not bounds[0] <= when < bounds[1]:
                bounds = latest[customer_id] = locked.bounds(customer_id, when)
                ends[(customer_id, bounds[2])] = bounds[1]
            groups[customer_id][(pair[0].meter, bounds[2])].append(pair)
        args: list[tuple[object, ...]] = []
        lifetime: list[tuple[object, ...]] = []
        for c in sorted(groups):
            keys = sorted(groups[c], key=lambda k: _group_order((c, *k)))
            folded = [domain.fold(groups[c][k]) for k in keys]
            meters = [m for m, _ in keys]
            args.append(
                (
                    c,
                    meters,
                    [s for _, s in keys],
                    [ends[(c, s)] for _, s in keys],
                    [t.event_count for t in folded],
                    [t.quantity_sum for t in folded],
                    [t.quantity_max for t in folded],
                    [t.last_quantity for t in folded],
                    [t.last_event_time for t in folded],
                    [t.last_seq for t in folded],
                    locked.provider(c) == "",
                )
            )
            counts = [t.event_count for t in folded]
            lifetime.append((c, meters, counts, [t.quantity_sum for t in folded]))
        changed = await conn.fetchmany(queries.ADD_TOTALS, args)
        await conn.executemany(queries.ADD_LIFETIME, lifetime)
        return changed

    async def period_totals(
        self, customer: domain.Customer, period: periods.Period
    ) -> dict[str, domain.Totals]:
        rows = await self.pool.fetch(queries.PERIOD_TOTALS, customer.customer_id, period.start)
        return {r["meter"]: totals_from_row(r) for r in rows}

    async def check_read(self, customer_id: str, meter: str, now: dt.datetime) -> Checked:
        """A customer, the period containing `now` and its totals for one meter: from the read
        model when it holds them for a period containing `now`, else read in one statement that
        concurrent callers share (one round trip for a whole group)."""
        model = self.read_model
        if model is None or not model.fresh():
            return await self._reads.submit(customer_id, (customer_id, meter, now))
        kept = model.get(customer_id, meter)
        if isinstance(kept, Checked) and (
            kept.period is None or kept.period.start <= now < kept.period.end
        ):
            return kept

        async def fetch() -> Kept:
            return await self._reads.submit(customer_id, (customer_id, meter, now))

        read = await model.read(customer_id, meter, fetch)
        assert isinstance(read, Checked)
        return read

    async def check_credit(
        self, read: Checked, feature: MeteredFeature, now: dt.datetime
    ) -> domain.Credit:
        """A prepaid feature's credit for a check (`read`: the check's read), as `credit` reads
        it, from the grants the read model keeps when it can."""
        assert read.customer is not None and read.period is not None
        customer_id, period = read.customer.customer_id, read.period
        model = self.read_model
        grants: Sequence[credits.Grant]
        if model is None or not model.fresh() or now < period.start:
            grants = await credits.live(self.pool, customer_id, min(period.start, now))
        else:
            kept = model.get(customer_id, period.start)
            if not isinstance(kept, _Grants):

                async def fetch() -> Kept:
                    return _Grants(tuple(await credits.live(self.pool, customer_id, period.start)))

                kept = await model.read(customer_id, period.start, fetch)
            assert isinstance(kept, _Grants)
            grants = kept.grants
        return domain_credits.credit_of(customer_id, feature, grants, period, now)

    async def check_read_many(self, keys: Sequence[tuple[str, str, dt.datetime]]) -> list[Checked]:
        """Reads of one customer's checks, in one statement."""
        now = max(k[2] for k in keys)  # the group's reads all happen after each caller's now
        (customer_id,) = {c for c, _, _ in keys}
        rows = await self.pool.fetch(queries.CHECK_READS, customer_id, [m for _, m, _ in keys], now)
        found: dict[int, Checked] = {}
        for r in rows:
            customer = customer_from_row(r)
            if customer is None:
                found[r["i"]] = Checked(version=r["totals_version"])
                continue
            period = customer.period_after_confirmed(now) or await self.period_now(customer, now)
            # totals rows are periods: one that starts where the period does is that period's
            totals = totals_from_row(r) if r["t_start"] == period.start else _NO_TOTALS
            found[r["i"]] = Checked(customer, period, totals, r["totals_version"])
        unknown = Checked()
        return [found.get(i, unknown) for i in range(1, len(keys) + 1)]

    async def credit(
        self,
        customer: domain.Customer,
        features: dict[str, MeteredFeature],
        period: periods.Period,
        now: dt.datetime,
    ) -> dict[str, domain.Credit]:
        """The customer's grants of prepaid features as usage timed `now` sees them."""
        return await credits.credit(self.pool, customer.customer_id, features, period, now)

    async def create_grant(
        self,
        grant: credits.Grant,
        payload_hash: bytes,
        customer: domain.Customer,
        period: periods.Period,
    ) -> tuple[credits.Grant, bool]:
        """Stores a top-up grant: (it, duplicate?); another grant under its key raises
        GrantKeyConflict. A new grant of a prepaid feature of the customer's plan is logged as
        a change (`period`: the one containing now)."""
        feature = self.prepaid(customer.plan_id, grant.feature)
        logged = (feature, period) if feature is not None else None
        made = await credits.top_up(self.pool, grant, payload_hash, logged)
        self._wrote([grant.customer_id])
        return made

    async def void_grant(
        self,
        customer: domain.Customer,
        grant_id: str,
        period: periods.Period,
        now: dt.datetime,
    ) -> tuple[credits.Grant, int] | None:
        """Voids a grant (logged as a change when its feature is prepaid in the plan)."""

        def logged(name: str) -> tuple[MeteredFeature, periods.Period] | None:
            feature = self.prepaid(customer.plan_id, name)
            return (feature, period) if feature is not None else None

        voided = await credits.void(self.pool, customer.customer_id, grant_id, now, logged)
        self._wrote([customer.customer_id])
        return voided

    async def list_grants(
        self,
        customer: domain.Customer,
        made: dict[str, MeteredFeature],
        period: periods.Period,
        feature: str,
        now: dt.datetime,
    ) -> list[credits.Grant]:
        """The customer's grants (of `feature`, '' all) in burn order, after making the plan's
        grants of `period` for the features in `made`, so that each has an id."""
        if made:  # as a burner: the customer (shared), the totals rows, then the grants
            async with self._writing([customer.customer_id]) as conn:
                await conn.fetch(queries.LOCK_CUSTOMER, customer.customer_id)
                for name in sorted(made):
                    await conn.fetchrow(
                        queries.LOCK_TOTALS, customer.customer_id, name, *period.bounds
                    )
                wanted = [
                    credits.Wanted(customer.customer_id, f, [period])
                    for _, f in sorted(made.items())
                ]
                await credits.lock(conn, wanted, max(now, self.clock()), self.clock)
                await changes.notify(conn, [customer.customer_id])
        return await credits.listed(self.pool, customer.customer_id, feature)

    async def burned_by(self, customer_id: str, event_id: str) -> int:
        """The grant units an event burned."""
        return await credits.burned_by(self.pool, customer_id, event_id)

    async def keep_decision(self, kept: decisions.Kept) -> None:
        """Keeps a decision taken outside a consume (a check's denial)."""
        await decisions.keep(self.pool, kept)

    async def get_decision(self, decision_id: str) -> decisions.Kept | None:
        """A kept decision by its id (a UUID); None when none is kept."""
        return await decisions.get(self.pool, decision_id)

    async def consume(
        self,
        event: domain.UsageEvent,
        gate: Callable[[domain.Customer | None], domain.Decision | None],
        decide: Callable[[domain.Customer, domain.Totals, int | None], domain.Decision],
        metering_plans: Sequence[str] = (),
        keep: Keep = keep_nothing,
    ) -> Consumed:
        """Check-and-consume in one transaction holding the lock of the totals row of the period
        containing the event's time (now), so no two callers can both take the last units. A
        key consumed before answers as a replay whatever happened to the customer since; else
        `gate` may deny before any lock on usage, and `decide` judges the locked totals (and,
        for a prepaid feature, the balance of the grants, locked after the totals row; an
        allowed consume burns them).

        `metering_plans` (the plans that meter the feature) lets the first statement lock an
        existing totals row with the customer; otherwise a second statement creates and locks
        it. Either way `decide` only ever sees the locked row.

        Concurrent consumes of one customer's meter are grouped (with group commit on): one
        transaction decides them in arrival order against the locked row, each seeing the
        ones before it, so a hard limit holds exactly as if each ran alone.

        A consumed event is appended to the change log last; its version is the decision's.
        `keep` gives the answer to keep for a decision (every consume's, denials' as it
        chooses), kept in the same transaction. A decision that was not consumed is at the
        version its figures are at once the locks are held."""
        request = Request(event, gate, decide, tuple(metering_plans), keep)
        if self.group_commit:
            return await self._consumes.submit((event.customer_id, event.meter), request)
        (result,) = await self.consume_many([request])
        if isinstance(result, BaseException):
            raise result
        return result

    async def consume_many(self, requests: Sequence[Request]) -> list[Consumed | BaseException]:
        """Consumes of one customer's meter, decided in order, in as few transactions as their
        periods allow (one, unless the group straddles a period boundary). A group that fails
        for a reason that belongs to one request (a total out of range) is run again request by
        request, so only that request's caller fails."""
        results: dict[int, Consumed | BaseException] = {}
        todo = list(range(len(requests)))
        rounds = 0
        while todo:
            try:
                todo = await self._consume_round(requests, todo, results)
            except idempotency.Replan:
                rounds += 1
                if rounds < MAX_RECORD_ROUNDS:
                    continue
                raise asyncpg.exceptions.SerializationError(
                    "idempotency keys kept changing; retry"
                ) from None
            except _DATABASE_DOWN:
                raise
            except asyncpg.exceptions.NumericValueOutOfRangeError:
                if len(todo) == 1:  # the lifetime total: refused
                    results[todo[0]] = TotalOutOfRange(0)
                    break
                for i in todo:
                    (results[i],) = await self.consume_many([requests[i]])
                break
        return [results[i] for i in range(len(requests))]

    async def _consume_round(
        self,
        requests: Sequence[Request],
        todo: Sequence[int],
        results: dict[int, Consumed | BaseException],
    ) -> list[int]:
        """One transaction: decides the requests in `todo` whose time falls in the period of
        the first one's, puts their outcomes in `results` once committed, and returns the rest.
        Raises Replan when a key turned out to be taken meanwhile (nothing is kept)."""
        first = requests[todo[0]]
        customer_id, meter = first.event.customer_id, first.event.meter
        keys = sorted({requests[i].event.idempotency_key for i in todo})
        async with self._writing([customer_id]) as conn:
            rows = await conn.fetch(
                queries.CONSUME_LOCK,
                customer_id,
                meter,
                list(first.metering_plans),
                [s.value for s in domain.ALLOWED_STATUSES],
                keys,
                first.event.event_time,
            )
            row = rows[0] if rows else None
            customer = customer_from_row(row) if row else None
            period: periods.Period | None = None
            mine, rest = list(todo), []
            if customer is not None:
                when = {i: requests[i].event.event_time for i in todo}
                period = await self.period_now(customer, when[todo[0]], conn)
                mine = [i for i in todo if period.start <= when[i] < period.end]
                rest = [i for i in todo if i not in mine]
            seen = consuming.seen_in(rows)
            group = Group(customer, period, [requests[i] for i in mine], seen)
            if customer is not None and group.deciding():
                assert row is not None and period is not None
                if row["locked"] and (row["t_start"], row["t_end"]) == period.bounds:
                    group.totals = totals_from_row(row)
                else:
                    locked = await conn.fetchrow(
                        queries.LOCK_TOTALS, customer_id, meter, *period.bounds
                    )
                    assert locked is not None and locked["period_end"] == period.end
                    group.totals = totals_from_row(locked)
                    await self._keys_held(conn, group, keys)  # as they are with the lock held
                await self._lock_grants(conn, group)
            elif group.seen:  # replays only: the figures they show, as they are now
                start = period.start if period else None
                figures = await conn.fetchrow(queries.METER_TOTALS, customer_id, meter, start)
                assert figures is not None
                if figures["event_count"] is not None:
                    group.totals = totals_from_row(figures)
                group.head = figures["totals_version"]
            group.decide()
            if group.needs_fresh_keys() and await self._keys_held(conn, group, keys):
                group.decide()  # a key it denied was consumed meanwhile: a replay
            outcomes = await self._commit_group(conn, group)
        results.update(zip(mine, outcomes, strict=True))
        return rest

    @staticmethod
    async def _keys_held(conn: Conn, group: Group, keys: Sequence[str]) -> bool:
        """Reads the keys and the change version once the locks are held; whether a key is
        newly found stored."""
        customer_id = group.requests[0].event.customer_id
        rows = await conn.fetch(queries.KEYS_AND_VERSION, customer_id, list(keys))
        return group.saw(consuming.seen_in(rows), rows[0]["totals_version"])

    async def _lock_grants(self, conn: Conn, group: Group) -> None:
        """For a prepaid feature, locks the grants the group may burn (after its totals row)."""
        assert group.customer is not None and group.period is not None
        prepaid = self.prepaid(group.customer.plan_id, group.requests[0].event.meter)
        if prepaid is None:
            return
        assert self.plans is not None
        wanted = credits.Wanted(group.customer.customer_id, prepaid, [group.period])
        latest = max(r.event.event_time for r in group.requests)
        held, burn_at = await credits.lock(conn, [wanted], latest, self.clock)
        aggregation = self.plans.meters[prepaid.meter].aggregation
        group.credit = consuming.Credit(prepaid, aggregation, held[wanted.key], burn_at)

    async def _commit_group(self, conn: Conn, group: Group) -> list[Consumed | BaseException]:
        """Stores what the group's decisions consumed, logs one change per consume and keeps
        the decisions; returns each request's outcome."""
        customer, period = group.customer, group.period
        allowed = group.allowed()
        versions: list[int] = []
        if allowed:
            assert customer is not None and period is not None
            await self._insert_allowed(conn, group, allowed)
            change_list = [
                changes.Change(
                    customer.customer_id,
                    "usage",
                    period.start,
                    period.end,
                    {p.request.event.meter: p.after or domain.Totals()},
                    {"credit": p.credit} if p.credit is not None else {},
                )
                for p in allowed
            ]
            latest = (await changes.append(conn, change_list, dt.datetime.now(dt.UTC)))[
                customer.customer_id
            ]
            versions = list(range(latest - len(allowed) + 1, latest + 1))
        head = group.head
        if head is None and group.needs_head():
            head = await changes.head(conn, group.requests[0].event.customer_id)
        outcomes = group.outcomes(versions, head or 0)
        kept: list[decisions.Kept] = []
        for n, (p, outcome) in enumerate(zip(group.decided, outcomes, strict=True)):
            if not isinstance(outcome, Consumed) or outcome.decision is None:
                continue
            decision = outcome.decision
            outcome = dataclasses.replace(outcome, decision_id=ids.new_decision_id())
            answer = p.request.keep(outcome)
            if answer is None:
                outcomes[n] = dataclasses.replace(outcome, decision_id="")
                continue
            outcomes[n] = outcome
            e = p.request.event
            kept.append(
                decisions.Kept(
                    customer_id=e.customer_id,
                    decision_id=outcome.decision_id,
                    feature=e.meter,
                    quantity=e.quantity,
                    consume=True,
                    allowed=decision.allowed,
                    event_id=outcome.event_id or None,
                    response=answer,
                    created_at=e.event_time,
                )
            )
        await decisions.keep_many(conn, kept)
        return group.replays_of(outcomes)

    async def _insert_allowed(self, conn: Conn, group: Group, allowed: Sequence[Planned]) -> None:
        """Stores the allowed consumes' events and adds them to the totals (and burns their
        grants); Replan when a key was taken since it was read."""
        customer, period = group.customer, group.period
        assert customer is not None and period is not None
        events = [p.request.event for p in allowed]
        folded = domain.fold([(e, o) for o, e in enumerate(events)])
        last = max(range(len(events)), key=lambda o: (events[o].event_time, o))
        provider = customer.provider.value
        inserted = await conn.fetch(
            queries.INSERT_EVENTS,
            [e.event_id for e in events],
            customer.customer_id,
            [e.idempotency_key for e in events],
            [e.meter for e in events],
            [e.quantity for e in events],
            [e.event_time for e in events],
            [properties_json(e.properties) for e in events],
            [e.payload_hash for e in events],
            list(range(len(events))),
            provider,
        )
        if len(inserted) < len(events):  # a concurrent RecordUsage took a key
            raise idempotency.Replan
        base = max(r["seq"] for r in inserted) & ~ORDER_MASK  # one sequence value per statement
        row = await conn.fetchrow(
            queries.CONSUME_TOTALS,
            customer.customer_id,
            events[0].meter,
            period.start,
            folded.event_count,
            folded.quantity_sum,
            folded.quantity_max,
            folded.last_event_time,
            base + last,
            folded.last_quantity,
            provider,
        )
        assert row is not None  # the totals row is locked: it exists
        credit = group.credit
        if credit is None:
            return
        state = "unbilled" if customer.provider is domain.Provider.NONE else "pending"
        usage = [
            credits.Usage(e.event_id, e.quantity, e.event_time, period.start, state) for e in events
        ]
        burner = credits.Burner(
            customer.customer_id, credit.feature, credit.aggregation, credit.grants, usage
        )
        await credits.burn(conn, [burner], credit.burn_at)


def properties_json(properties: Mapping[str, str]) -> str:
    return json.dumps(dict(properties)) if properties else "{}"
