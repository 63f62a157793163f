"""The database the service runs on: DATABASE_URL, or an embedded PostgreSQL; migrated, pooled."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from usage_service.config import ConfigError, Settings
from usage_service.storage import connections, embedded, migrate, store


@contextlib.asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[store.Store]:
    """Migrated storage on DATABASE_URL, or on an embedded PostgreSQL when it is unset."""
    handle: Any = None
    dsn = settings.database_url
    if not dsn:
        dsn, handle = await asyncio.to_thread(embedded.start, settings.data_dir)
    try:
        await migrate.migrate_dsn(dsn)
        st = store.Store(await connections.create_pool(dsn, settings.pool_size))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = " ".join(str(exc).split()) or "no reason given"
        raise ConfigError(
            f"DATABASE_URL: cannot use the database: {type(exc).__name__}: {reason}"
        ) from None
    try:
        yield st
    finally:
        await st.close()
        del handle  # the embedded server stops when the process exits
