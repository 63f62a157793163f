"""Distributes the schema when the database is the coordinator of a Citus cluster: every table
that carries customer_id is sharded by it, co-located with `customers`, so each customer's rows
of every table live on one node and a statement naming one customer runs there; the few tables
without it become reference tables (a copy on every node). Without Citus, nothing is done.

Run by migrate after the migrations, so a table a migration adds is distributed at once; a
table already distributed is left as it is (Citus propagates later DDL to its shards)."""

from __future__ import annotations

import logging

import asyncpg

from usage_service.storage import distribution_queries as q

log = logging.getLogger(__name__)


async def present(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> bool:
    return bool(await conn.fetchval(q.CITUS_PRESENT))


async def distribute(conn: asyncpg.Connection) -> list[str]:
    """Distributes the tables Citus does not manage yet; returns their names."""
    if not await present(conn):
        return []
    await conn.execute(q.SHOW_SHARDS)
    done: list[str] = []
    for row in await conn.fetch(q.UNDISTRIBUTED):
        name = str(row["name"])
        if row["by_customer"]:
            first = name == "customers"
            await conn.execute(q.DISTRIBUTE, name, "none" if first else "customers")
        else:
            await conn.execute(q.REFERENCE, name)
        log.info("distributed %s", name, extra={"action": "migrate"})
        done.append(name)
    return done
