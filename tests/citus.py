"""Databases on a Citus cluster (scripts/citus-cluster), for the suite run with USAGE_TEST_CITUS=1.

A database of a Citus cluster exists on every node, with the extension in each, and the
coordinator's copy knows the workers. Creating one takes seconds, so a test run makes one per
pytest-xdist worker, migrated (migrate distributes the schema), and each test starts from it
emptied: every table but the migrations' is truncated."""

from __future__ import annotations

import datetime as dt
import os
import urllib.parse

import asyncpg

from usage_service.storage import partitions, partitions_queries

# USAGE_TEST_CITUS=1: DATABASE_URL is the coordinator of a Citus cluster (scripts/citus-cluster).
ENABLED = os.environ.get("USAGE_TEST_CITUS", "") == "1"

SETUP_LOCK = 7301958420019  # an advisory lock of the coordinator's `postgres` database

# Tables that hold nothing after a migration and are emptied between tests.
KEPT = frozenset({"schema_migrations"})


def _at(dsn: str, host: str, port: int, database: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    user = parts.username or "postgres"
    netloc = f"{user}@{host}:{port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, path=f"/{database}"))


async def _nodes(coordinator: str) -> list[tuple[str, int, bool]]:
    """(host, port, is the coordinator) of each node, the coordinator first."""
    conn = await asyncpg.connect(coordinator)
    try:
        rows = await conn.fetch(
            "SELECT nodename, nodeport, groupid = 0 AS coordinator FROM pg_dist_node"
            " ORDER BY groupid"
        )
    finally:
        await conn.close()
    if not rows or not rows[0]["coordinator"]:
        raise RuntimeError(f"{coordinator} is not the coordinator of a Citus cluster")
    return [(r["nodename"], r["nodeport"], r["coordinator"]) for r in rows]


async def execute(dsn: str, *statements: str) -> None:
    """Runs statements one by one on a connection of their own."""
    conn = await asyncpg.connect(dsn)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


async def create_database(coordinator: str, name: str) -> str:
    """Makes `name` on every node of the cluster whose coordinator's `postgres` database is
    `coordinator`, with the workers added; returns its DSN on the coordinator."""
    nodes = await _nodes(coordinator)
    # One database at a time: adding a node copies the role to it, and two pytest workers doing
    # so at once fail with "tuple concurrently updated" on the worker's role.
    lock = await asyncpg.connect(coordinator)
    try:
        await lock.execute(f"SELECT pg_advisory_lock({SETUP_LOCK})")
        for host, port, _ in nodes:
            await execute(_at(coordinator, host, port, "postgres"), f'CREATE DATABASE "{name}"')
            await execute(_at(coordinator, host, port, name), "CREATE EXTENSION citus")
        host, port, _ = nodes[0]
        dsn = _at(coordinator, host, port, name)
        statements = [f"SELECT citus_set_coordinator_host('{host}', {port})"]
        statements += [f"SELECT citus_add_node('{h}', {p})" for h, p, first in nodes if not first]
        await execute(dsn, *statements)
    finally:
        await lock.close()  # the session's advisory lock goes with it
    return dsn


async def drop_database(coordinator: str, name: str) -> None:
    for host, port, _ in await _nodes(coordinator):
        drop = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
        await execute(_at(coordinator, host, port, "postgres"), drop)


async def empty(dsn: str) -> None:
    """Truncates every table of the public schema but the migrations' (distributed tables on
    every shard), as one statement, and leaves usage_events the partitions a migrate makes."""
    conn = await asyncpg.connect(dsn)
    try:
        months = [r[0] for r in await conn.fetch(partitions_queries.PARTITIONS)]
        months += [r[0] for r in await conn.fetch(partitions_queries.DETACHED)]
        for month in months:
            if month != "usage_events_default":
                await conn.execute(f'DROP TABLE "{month}"')
        await partitions.ensure(conn, dt.datetime.now(dt.UTC))
        names = await conn.fetch(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition"
            " ORDER BY 1"
        )
        tables = [r["relname"] for r in names if r["relname"] not in KEPT]
        await conn.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables))
    finally:
        await conn.close()
