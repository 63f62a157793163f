"""Connections: the pool, with jsonb as Python values and no reset query on release."""

from __future__ import annotations

import json

import asyncpg

DEFAULT_POOL_SIZE = 10  # connections


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
