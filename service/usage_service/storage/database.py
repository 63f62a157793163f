"""The database the service runs on: DATABASE_URL, or an embedded PostgreSQL; migrated, pooled."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from pydantic import Field

from usage_service import settings
from usage_service.storage import (
    connections,
    distribution,
    embedded,
    migrate,
    readmodel,
    store,
)

DEFAULT_DATA_DIR = ".data"  # embedded PostgreSQL lives in DATA_DIR/postgres
DEFAULT_POOL_SIZE = 10  # database connections per process


class DatabaseSettings(settings.Group):
    url: str = Field(  # empty: start an embedded PostgreSQL under data_dir
        "", validation_alias="DATABASE_URL", repr=False
    )
    data_dir: pathlib.Path = Field(
        pathlib.Path(DEFAULT_DATA_DIR), validation_alias="USAGE_DATA_DIR"
    )
    pool_size: settings.Count = Field(DEFAULT_POOL_SIZE, validation_alias="USAGE_DB_POOL_SIZE")


@contextlib.asynccontextmanager
async def database(
    config: DatabaseSettings, read_model: readmodel.ReadModelSettings | None = None
) -> AsyncIterator[store.Store]:
    """Migrated storage on DATABASE_URL, or on an embedded PostgreSQL when it is unset; with
    `read_model` (when enabled), checks are answered from memory kept fresh by the server."""
    handle: Any = None
    dsn = config.url
    if not dsn:
        dsn, handle = await asyncio.to_thread(embedded.start, config.data_dir)
    try:
        await migrate.migrate_dsn(dsn)
        pool = await connections.create_pool(dsn, config.pool_size)
        model = readmodel.ReadModel[store.Kept].configured(pool, read_model) if read_model else None
        async with pool.acquire() as conn:
            sharded = await distribution.present(conn)
        st = store.Store(pool, read_model=model, group_by_customer=sharded)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = " ".join(str(exc).split()) or "no reason given"
        raise settings.ConfigError(
            f"DATABASE_URL: cannot use the database: {type(exc).__name__}: {reason}"
        ) from None
    try:
        yield st
    finally:
        await st.close()
        del handle  # the embedded server stops when the process exits
