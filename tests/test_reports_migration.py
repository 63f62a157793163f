"""Migration 0011: reports of several customers (batch providers' reports before it) are split
into one row per customer under the same report id, so nothing is lost or settled twice."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from conftest import _admin, with_database

from usage_service import domain
from usage_service.storage import migrate, queries
from usage_service.storage.drain_store import DrainStore


def _event(customer_id: str, n: int) -> dict[str, object]:
    return {
        "event_id": str(uuid.uuid4()),
        "customer_id": customer_id,
        "meter": "tokens",
        "quantity": n,
        "event_time": "2026-11-01T00:00:00+00:00",
        "properties": {},
        "provider_customer_id": "",
        "subscription_item": "",
    }


@pytest.fixture
async def before_0011(server_dsn: str) -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    """A database migrated up to 0010 only, and its DSN."""
    name = f"usage_m_{uuid.uuid4().hex[:12]}"
    await _admin(server_dsn, f'CREATE DATABASE "{name}"')
    url = with_database(server_dsn, name)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(queries.MIGRATION_TABLE)
        for file in sorted(migrate.MIGRATIONS.glob("*.sql")):
            if file.stem >= "0011":
                break
            async with conn.transaction():
                for statement in migrate.statements(file.read_text(encoding="utf-8")):
                    await conn.execute(statement)
                await conn.execute(queries.MIGRATION_DONE, file.stem)
        yield conn, url
    finally:
        await conn.close()
        await _admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


INSERT = """
INSERT INTO reports (report_id, provider, lane, state, events, attempts, next_attempt_at,
    first_sent_at, last_error)
VALUES ($1::uuid, $2, $3, $4, $5::text::jsonb, 2, now() - interval '1 minute',
    now() - interval '1 hour', 'boom')"""


async def test_reports_of_several_customers_are_split_per_customer(
    before_0011: tuple[asyncpg.Connection, str],
) -> None:
    conn, url = before_0011
    mixed, settled, lane, empty = (str(uuid.uuid4()) for _ in range(4))
    events = [_event("c_b", 1), _event("c_a", 2), _event("c_b", 3), _event("c_c", 4)]
    await conn.execute(INSERT, mixed, "polar", None, "open", json.dumps(events))
    done = [_event("c_a", 5), _event("c_b", 6)]
    await conn.execute(INSERT, settled, "creem", None, "delivered", json.dumps(done))
    lane_id = "\x1f".join(("stripe", "c_s", "tokens"))
    stripe_event = _event("c_s", 7)
    await conn.execute(INSERT, lane, "stripe", lane_id, "open", json.dumps([stripe_event]))
    await conn.execute(INSERT, empty, "polar", None, "failed", "[]")

    assert await migrate.migrate(conn) == ["0011_reports"]

    rows = await conn.fetch(
        """SELECT customer_id, report_id::text, state, events::text, attempts, last_error,
               first_sent_at FROM reports ORDER BY report_id, customer_id"""
    )
    got = {
        (r["customer_id"], r["report_id"]): (
            r["state"],
            [e["event_id"] for e in json.loads(r["events"])],
            r["attempts"],
            r["last_error"],
        )
        for r in rows
    }
    ids = [e["event_id"] for e in events]
    assert got == {
        ("c_a", mixed): ("open", [ids[1]], 2, "boom"),
        ("c_b", mixed): ("open", [ids[0], ids[2]], 2, "boom"),  # in their order
        ("c_c", mixed): ("open", [ids[3]], 2, "boom"),
        ("c_a", settled): ("delivered", [done[0]["event_id"]], 2, "boom"),
        ("c_b", settled): ("delivered", [done[1]["event_id"]], 2, "boom"),
        ("c_s", lane): ("open", [stripe_event["event_id"]], 2, "boom"),  # the lane's customer
        ("", empty): ("failed", [], 2, "boom"),  # no events: no customer known
    }
    for report_id in (mixed, settled):  # kept: a resend window still counts from the first send
        assert len({r["first_sent_at"] for r in rows if r["report_id"] == report_id}) == 1
    # every event is in exactly one row
    sent = [e for r in rows for e in json.loads(r["events"])]
    assert len(sent) == len({e["event_id"] for e in sent}) == 7

    # The pieces of the open report are due, each under its own key.
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    assert pool is not None
    try:
        claimed = await DrainStore(pool).claim_reports(domain.Provider.POLAR, "w", 30.0, 10)
    finally:
        await pool.close()
    assert sorted(r.key for r in claimed) == [("c_a", mixed), ("c_b", mixed), ("c_c", mixed)]
    assert all({e.customer_id for e in r.events} == {r.customer_id} for r in claimed)
