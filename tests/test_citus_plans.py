"""On a Citus cluster (USAGE_TEST_CITUS=1), every hot-path statement runs on one node and touches
one customer's shards only. For each statement, with one customer's values:
- EXPLAIN shows at most one task per step, each on the worker that holds the customer's shards
  (steps the coordinator runs itself, over results it already fetched, aside);
- run in a transaction that is rolled back, with citus.log_remote_commands on, every command the
  coordinator sends goes to that worker and names only that customer's shards (this also covers
  INSERT ... SELECT, whose plan does not show where its rows go).
Elsewhere these tests are skipped: plain PostgreSQL has no shards."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from conftest import CITUS

from usage_service import domain
from usage_service.domain import ids
from usage_service.domain.errors import KeyConflict
from usage_service.storage import (
    changes_queries,
    connections,
    credits_queries,
    decisions_queries,
    distribution,
    migrate,
    queries,
    store,
)

pytestmark = pytest.mark.skipif(not CITUS, reason="needs USAGE_TEST_CITUS=1 (a Citus cluster)")

CUSTOMER = "cus_plans"
NOW = dt.datetime(2026, 11, 15, tzinfo=dt.UTC)
START, END = dt.datetime(2026, 11, 1, tzinfo=dt.UTC), dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
E1, E2 = uuid.uuid4(), uuid.uuid4()
C = CUSTOMER

# name -> (statement, its arguments for CUSTOMER)
HOT: dict[str, tuple[str, Callable[[], tuple[Any, ...]]]] = {
    # UpsertCustomer
    "GET_CUSTOMER": (queries.GET_CUSTOMER, lambda: (C,)),
    "GET_CUSTOMER_FOR_UPDATE": (queries.GET_CUSTOMER_FOR_UPDATE, lambda: (C,)),
    "UPDATE_CUSTOMER": (
        queries.UPDATE_CUSTOMER,
        lambda: (C, "basic", "active", START, END, "stripe", "cus_x", "{}", "month", 1, START, NOW),
    ),
    "SAVE_CUSTOMER_PROVIDER": (
        queries.SAVE_CUSTOMER_PROVIDER,
        lambda: (C, "stripe", "cus_x", "{}", NOW),
    ),
    "ATTRIBUTE_EVENTS": (queries.ATTRIBUTE_EVENTS, lambda: (C, "stripe", ["calls"])),
    "STORED_PERIODS": (queries.STORED_PERIODS, lambda: (C,)),
    "DROP_PERIODS_FROM": (queries.DROP_PERIODS_FROM, lambda: (C, START)),
    "CUT_PERIOD_AT": (queries.CUT_PERIOD_AT, lambda: (C, START)),
    "INSERT_PERIOD": (queries.INSERT_PERIOD, lambda: (C, START, END, "month", 1, START, NOW)),
    # RecordUsage, BatchRecordUsage (per customer)
    "LOCK_CUSTOMER": (queries.LOCK_CUSTOMER, lambda: (C,)),
    "INSERT_PLACEHOLDER": (queries.INSERT_PLACEHOLDER, lambda: (C,)),
    "INSERT_EVENTS": (
        queries.INSERT_EVENTS,
        lambda: (
            *([E1, E2], C, ["k1", "k2"], ["tokens", "tokens"], [1, 2], [NOW, NOW]),
            *(["{}", "{}"], [b"h1", b"h2"], [0, 1], "stripe"),
        ),
    ),
    "EXISTING_EVENTS": (queries.EXISTING_EVENTS, lambda: (C, ["k1", "k2"])),
    "ADD_TOTALS": (
        queries.ADD_TOTALS,
        lambda: (C, ["tokens"], [START], [END], [2], [3], [2], [2], [NOW], [1], False),
    ),
    "ADVANCE_HEAD": (changes_queries.ADVANCE_HEAD, lambda: (C, 2, START)),
    "ADD_CHANGES": (
        changes_queries.ADD_CHANGES,
        lambda: (C, [1, 2], ["usage"] * 2, [START] * 2, [END] * 2, ["{}"] * 2, NOW, ["{}"] * 2),
    ),
    # CheckEntitlement (consume)
    "CONSUME_LOCK": (
        queries.CONSUME_LOCK,
        lambda: (C, "tokens", ["basic"], ["active"], ["k1"], NOW),
    ),
    "LOCK_TOTALS": (queries.LOCK_TOTALS, lambda: (C, "tokens", START, END)),
    "KEYS_AND_VERSION": (queries.KEYS_AND_VERSION, lambda: (C, ["k1"])),
    "CONSUME_TOTALS": (
        queries.CONSUME_TOTALS,
        lambda: (C, "tokens", START, 1, 5, 5, NOW, 1048577, 5, "stripe"),
    ),
    "KEEP_MANY": (
        decisions_queries.KEEP_MANY,
        lambda: ([C], [uuid.uuid4()], ["tokens"], [5], [True], [True], [E1], [b"r"], [NOW]),
    ),
    "KEEP": (
        decisions_queries.KEEP,
        lambda: (C, uuid.uuid4(), "tokens", 5, True, True, E1, b"r", NOW),
    ),
    "LOCK_GRANTS_OF": (
        credits_queries.LOCK_GRANTS_OF,
        lambda: ([C], ["images"], [START], C),
    ),
    "LOCK_GRANTS_BY_KEY": (credits_queries.LOCK_GRANTS_BY_KEY, lambda: ([C], ["plan:x"], C)),
    "INSERT_PLAN_GRANTS": (
        credits_queries.INSERT_PLAN_GRANTS,
        lambda: (
            *([C], [uuid.uuid4()], ["images"], [10], [0], [START], [END], ["plan"]),
            *(["plan:x"], NOW),
        ),
    ),
    "APPLY_BURNS": (
        credits_queries.APPLY_BURNS,
        lambda: (
            *([C], [E1], [1], [C], [E1], [E2], [1], [C], [E1], [1], ["covered"]),
            *([C], ["images"], [START], [1], [1], [0], [0], NOW, C),
        ),
    ),
    # CheckEntitlement (no consume), GetUsageSummary
    "CHECK_READS": (queries.CHECK_READS, lambda: (C, ["tokens", "calls"], NOW)),
    "METER_TOTALS": (queries.METER_TOTALS, lambda: (C, "tokens", START)),
    "PERIOD_TOTALS": (queries.PERIOD_TOTALS, lambda: (C, START)),
    "CUSTOMER_TOTALS": (queries.CUSTOMER_TOTALS, lambda: (C,)),
    "CUSTOMER_LIFETIME": (queries.CUSTOMER_LIFETIME, lambda: (C,)),
    "CUSTOMER_GRANTS": (credits_queries.CUSTOMER_GRANTS, lambda: (C, START)),
    "HEAD": (changes_queries.HEAD, lambda: (C,)),
    "SINCE": (changes_queries.SINCE, lambda: (C, 0, 100)),
}

_NODE = re.compile(r"Node: host=\S+ port=(\d+)")
_TASKS = re.compile(r"Task Count: (\d+)")


_PARAM = re.compile(r"\$(\d+)(?!\d)")


async def explain(conn: asyncpg.Connection, sql: str, args: tuple[Any, ...]) -> str:
    """EXPLAIN of the statement with its arguments written in as typed literals, as Citus
    plans a call (EXPLAIN of a statement with parameters is not planned the same way)."""
    types = (await conn.prepare(sql)).get_parameters()
    literals: dict[int, str] = {}
    for n, (kind, value) in enumerate(zip(types, args, strict=True), start=1):
        name = await conn.fetchval("SELECT format_type($1::oid, NULL)", kind.oid)
        text = await conn.fetchval(f"SELECT quote_nullable($1::{name})", value)
        literals[n] = f"({text})::{name}"
    rows = await conn.fetch("EXPLAIN " + _PARAM.sub(lambda m: literals[int(m[1])], sql))
    return "\n".join(r[0] for r in rows)


async def _home(conn: asyncpg.Connection) -> tuple[int, int, set[int]]:
    """The coordinator's port, the port of the worker holding CUSTOMER's shards, and the ids of
    those shards (one per distributed table and partition)."""
    coordinator = await conn.fetchval("SELECT nodeport FROM pg_dist_node WHERE groupid = 0")
    worker = await conn.fetchval(
        "SELECT nodeport FROM citus_shards WHERE table_name = 'customers'::regclass"
        " AND shardid = get_shard_id_for_distribution_column('customers', $1::text)",
        CUSTOMER,
    )
    shards = await conn.fetch(
        "SELECT s.shardid FROM pg_dist_shard s JOIN pg_dist_partition p USING (logicalrelid)"
        " WHERE p.partmethod = 'h'"
        " AND s.shardid = get_shard_id_for_distribution_column(s.logicalrelid, $1::text)",
        CUSTOMER,
    )
    return int(coordinator), int(worker), {int(r["shardid"]) for r in shards}


_SENT = re.compile(r"issuing (.*)", re.S)
_SERVER = re.compile(r"on server \S+@\S+:(\d+)")
_SHARD = re.compile(r"\b[a-z][a-z0-9_]*_(\d{6,})\b")


async def remote_commands(
    conn: asyncpg.Connection, sql: str, args: tuple[Any, ...]
) -> list[tuple[int, str]]:
    """(worker port, command) of every command the coordinator sends to run the statement, in
    a transaction rolled back."""
    sent: list[tuple[int, str]] = []

    def heard(_: object, message: asyncpg.PostgresLogMessage) -> None:
        text = message.message or ""
        found, server = _SENT.match(text), _SERVER.search(message.detail or "")
        if found and server:
            sent.append((int(server[1]), found[1]))

    conn.add_log_listener(heard)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL citus.log_remote_commands = on")
            await conn.fetch(sql, *args)
            raise _RolledBack
    except _RolledBack:
        pass
    finally:
        conn.remove_log_listener(heard)
    return sent


class _RolledBack(Exception):
    pass


async def _observed(
    dsn: str, sql: str, args: tuple[Any, ...]
) -> tuple[int, int, set[int], str, list[tuple[int, str]]]:
    """_home's answer, then the statement's plan and the commands it sends to workers."""
    conn = await asyncpg.connect(dsn)
    try:
        coordinator, worker, shards = await _home(conn)
        return (
            coordinator,
            worker,
            shards,
            await explain(conn, sql, args),
            await remote_commands(conn, sql, args),
        )
    finally:
        await conn.close()


async def assert_on_customers_node(dsn: str, sql: str, args: tuple[Any, ...]) -> None:
    """The statement, with CUSTOMER's values, runs on the worker holding CUSTOMER's shards and
    names no other shard (see the module's docstring)."""
    coordinator, worker, shards, plan, sent = await _observed(dsn, sql, args)
    counts = [int(n) for n in _TASKS.findall(plan)]
    assert max(counts, default=1) == 1, plan  # no step runs one task per shard
    assert {int(p) for p in _NODE.findall(plan)} - {coordinator} <= {worker}, plan
    assert sent, "nothing was sent to a worker"
    assert {port for port, _ in sent} == {worker}, sent
    named = {int(i) for _, command in sent for i in _SHARD.findall(command)}
    assert named and named <= shards, (named - shards, sent)


@pytest.mark.parametrize("name", sorted(HOT))
async def test_a_hot_statement_runs_on_the_customers_node(dsn: str, name: str) -> None:
    sql, args = HOT[name]
    await assert_on_customers_node(dsn, sql, args())


async def test_a_statement_over_every_customer_is_seen_as_such(dsn: str) -> None:
    """The checks above can fail: a statement that does not name one customer reads every
    shard, on both workers."""
    sql, args = "SELECT count(*) FROM usage_totals WHERE meter = $1", ("x",)
    _, _, shards, plan, sent = await _observed(dsn, sql, args)
    assert max(int(n) for n in _TASKS.findall(plan)) > 1
    assert len({port for port, _ in sent}) == 2
    assert {int(i) for _, command in sent for i in _SHARD.findall(command)} - shards


async def _on_two_nodes(conn: asyncpg.Connection) -> tuple[str, str]:
    """Two customer ids whose shards are on different workers."""
    homes: dict[int, str] = {}
    for i in range(100):
        customer_id = f"cus_{i}"
        port = await conn.fetchval(
            "SELECT nodeport FROM citus_shards WHERE table_name = 'customers'::regclass"
            " AND shardid = get_shard_id_for_distribution_column('customers', $1::text)",
            customer_id,
        )
        homes.setdefault(int(port), customer_id)
        if len(homes) == 2:
            first, second = sorted(homes.values())
            return first, second
    raise AssertionError("every customer on one worker")


def _event(customer_id: str, key: str, quantity: int) -> domain.UsageEvent:
    when = dt.datetime.now(dt.UTC)
    return domain.UsageEvent(
        event_id=ids.new_event_id(),
        customer_id=customer_id,
        meter="tokens",
        quantity=quantity,
        idempotency_key=key,
        event_time=when,
        properties={},
        payload_hash=domain.payload_hash("tokens", quantity, None, {}),
    )


async def test_a_batch_over_customers_on_two_nodes_is_one_two_phase_commit(dsn: str) -> None:
    """A batch (BatchRecordUsage's store call) is all or nothing even when its customers live on
    different workers: Citus commits such a transaction in two phases, and keeps a record of
    each worker's prepared part (pg_dist_transaction) until it has confirmed the commit there;
    a key conflict of one customer stores nothing of the other's."""
    pool = await connections.create_pool(dsn, size=2)
    st = store.Store(pool)
    try:
        async with pool.acquire() as conn:
            first, second = await _on_two_nodes(conn)
        await st.record([_event(second, "taken", 1)])
        with pytest.raises(KeyConflict):  # "taken" with another payload
            await st.record([_event(first, "a", 5), _event(second, "taken", 2)])
        assert await pool.fetchval("SELECT count(*) FROM usage_events") == 1
        parts = "SELECT gid FROM pg_dist_transaction"
        before = {r["gid"] for r in await pool.fetch(parts)}
        await st.record([_event(first, "a", 5), _event(second, "fresh", 2)])
        # (Citus forgets these records once it has checked them, at most every minute)
        prepared = {r["gid"] for r in await pool.fetch(parts)} - before
        counts = await pool.fetch(
            "SELECT customer_id, count(*) AS n FROM usage_events GROUP BY 1 ORDER BY 1"
        )
        assert [(r["customer_id"], r["n"]) for r in counts] == [(first, 1), (second, 2)]
        assert len(prepared) == 2, prepared  # one prepared part per worker
    finally:
        await st.close()


async def test_migrate_distributes_every_table_by_customer_co_located(dsn: str) -> None:
    """Every table that carries customer_id (partitions of usage_events included) is sharded by
    it in the customers table's co-location group; the others are reference tables; a second
    migrate changes nothing; the database's sessions see shards as tables."""
    conn = await asyncpg.connect(dsn)
    try:
        assert await migrate.migrate(conn) == []
        assert await distribution.distribute(conn) == []
        rows = await conn.fetch(
            "SELECT c.relname, d.partmethod::text, d.colocationid,"
            " EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid"
            "  AND a.attname = 'customer_id' AND NOT a.attisdropped) AS by_customer,"
            " CASE WHEN d.partmethod = 'h'"
            "  THEN column_to_column_name(d.logicalrelid, d.partkey) END AS column_name"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " LEFT JOIN pg_dist_partition d ON d.logicalrelid = c.oid"
            " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')"
            " AND c.relname <> 'schema_migrations'"
        )
    finally:
        await conn.close()
    group = {r["colocationid"] for r in rows if r["relname"] == "customers"}
    for r in rows:
        if r["by_customer"]:
            shape = (r["partmethod"], r["column_name"], {r["colocationid"]})
            assert shape == ("h", "customer_id", group), r["relname"]
        else:
            assert r["partmethod"] == "n", r["relname"]  # a reference table
    assert {r["relname"] for r in rows} >= {"usage_events", "usage_events_default", "usage_keys"}
    # new sessions see no hidden shards to filter out (a client's type lookups stay fast)
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SHOW citus.override_table_visibility") == "off"
    finally:
        await conn.close()
