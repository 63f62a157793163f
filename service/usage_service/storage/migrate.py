"""Plain versioned SQL migrations, applied in file-name order under an advisory lock, so several
replicas starting at once apply each one exactly once."""

from __future__ import annotations

import datetime as dt
import logging
import pathlib

import asyncpg

from usage_service.storage import changes, distribution, partitions, queries

MIGRATIONS = pathlib.Path(__file__).with_name("migrations")
log = logging.getLogger(__name__)


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Applies the migrations not yet applied, distributes the tables on Citus (a no-op
    elsewhere: storage/distribution.py), then makes the month partitions of usage_events due
    (storage/partitions.py); returns the versions applied."""
    applied_now: list[str] = []
    await conn.execute(queries.MIGRATION_LOCK)
    try:
        await conn.execute(queries.MIGRATION_TABLE)
        done = {row["version"] for row in await conn.fetch(queries.MIGRATIONS_APPLIED)}
        for file in sorted(MIGRATIONS.glob("*.sql")):
            if file.stem in done:
                continue
            async with conn.transaction():
                for statement in statements(file.read_text(encoding="utf-8")):
                    await conn.execute(statement)
                await conn.execute(queries.MIGRATION_DONE, file.stem)
            log.info("applied migration %s", file.stem, extra={"action": "migrate"})
            applied_now.append(file.stem)
        await distribution.distribute(conn)
        await partitions.ensure(conn, dt.datetime.now(dt.UTC))
        if applied_now:  # running replicas forget what they read before
            await changes.notify(conn, None)
    finally:
        await conn.execute(queries.MIGRATION_UNLOCK)
    return applied_now


def statements(text: str) -> list[str]:
    """A migration file's statements, one per call (a sharded database refuses several in one
    string): each ends with a semicolon at the end of a line; `--` comments are dropped."""
    out: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        code = line.split("--", 1)[0].rstrip()
        if not code:
            continue
        current.append(code)
        if code.endswith(";"):
            out.append("\n".join(current)[:-1])
            current = []
    if current:
        out.append("\n".join(current))
    return out


async def migrate_dsn(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate(conn)
    finally:
        await conn.close()
