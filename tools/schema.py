"""Write the schema the migrations build to service/usage_service/storage/schema.sql.

    .venv/bin/python tools/schema.py [DATABASE_URL]

Migrates a scratch database on that server (default: $DATABASE_URL, else the local PostgreSQL
the tests use), reads its tables, columns, constraints, indexes and sequences from pg_catalog in a
fixed order, writes them as SQL, and drops the scratch database. tests/test_schema.py builds a
database from the migrations and compares it with the committed file.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import sys
import urllib.parse
import uuid

import asyncpg

from usage_service.storage import migrate

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "service" / "usage_service" / "storage" / "schema.sql"
LOCAL = "postgresql://postgres@127.0.0.1:5432/test"
HEADER = """\
-- The schema the migrations in migrations/ build, read from pg_catalog by tools/schema.py.
-- Generated: do not edit. After changing a migration, run `.venv/bin/python tools/schema.py`;
-- tests/test_schema.py compares this file with a database built from the migrations.
"""

# Tables, partitioned ones with their partition key. Partitions are left out: the months of
# usage_events are made as time goes on (storage/partitions.py); the DEFAULT ones are listed.
TABLES = """
SELECT c.oid, c.relname, pg_get_partkeydef(c.oid) AS partition_key
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND NOT c.relispartition
ORDER BY c.relname"""

# $1 partitioned table oid
DEFAULT_PARTITIONS = """
SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = $1 AND pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT'
ORDER BY c.relname"""

# $1 table oid
COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull,
    pg_get_expr(d.adbin, d.adrelid) AS default_value
FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum"""

# NOT NULL is shown on its column ('n' constraints exist from PostgreSQL 18 on only).
# $1 table oid
CONSTRAINTS = """
SELECT conname, pg_get_constraintdef(oid) AS definition FROM pg_constraint
WHERE conrelid = $1 AND contype IN ('c', 'f', 'p', 'u', 'x')
ORDER BY conname"""

# Indexes other than those of primary key and unique constraints. $1 table oid
INDEXES = """
SELECT pg_get_indexdef(x.indexrelid) AS definition
FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
WHERE x.indrelid = $1 AND NOT EXISTS (
    SELECT 1 FROM pg_constraint k WHERE k.conrelid = x.indrelid AND k.conindid = x.indexrelid)
ORDER BY i.relname"""

SEQUENCES = """
SELECT c.relname, format_type(s.seqtypid, NULL) AS type, s.seqstart, s.seqincrement
FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema()
ORDER BY c.relname"""


async def dump(conn: asyncpg.Connection) -> str:
    """The schema of the connection's database, as SQL."""
    out = [HEADER]
    for table in await conn.fetch(TABLES):
        lines = []
        for col in await conn.fetch(COLUMNS, table["oid"]):
            line = f"    {col['attname']} {col['type']}"
            if col["attnotnull"]:
                line += " NOT NULL"
            if col["default_value"] is not None:
                line += f" DEFAULT {col['default_value']}"
            lines.append(line)
        for con in await conn.fetch(CONSTRAINTS, table["oid"]):
            lines.append(f"    CONSTRAINT {con['conname']} {con['definition']}")
        key = f" PARTITION BY {table['partition_key']}" if table["partition_key"] else ""
        out.append(f"CREATE TABLE {table['relname']} (\n" + ",\n".join(lines) + f"\n){key};")
        out += [f"{index['definition']};" for index in await conn.fetch(INDEXES, table["oid"])]
        out += [
            f"CREATE TABLE {part['relname']} PARTITION OF {table['relname']} DEFAULT;"
            for part in await conn.fetch(DEFAULT_PARTITIONS, table["oid"])
        ]
        out.append("")
    for seq in await conn.fetch(SEQUENCES):
        out.append(
            f"CREATE SEQUENCE {seq['relname']} AS {seq['type']} "
            f"START {seq['seqstart']} INCREMENT {seq['seqincrement']};"
        )
    return "\n".join(out).rstrip("\n") + "\n"


def with_database(dsn: str, name: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


async def build_and_dump(server_dsn: str) -> str:
    """The schema of a scratch database built from the migrations on the server."""
    name = f"usage_schema_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            dsn = with_database(server_dsn, name)
            await migrate.migrate_dsn(dsn)
            conn = await asyncpg.connect(dsn)
            try:
                return await dump(conn)
            finally:
                await conn.close()
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def main() -> None:
    dsn = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DATABASE_URL") or LOCAL
    SCHEMA.write_text(asyncio.run(build_and_dump(dsn)), encoding="utf-8")
    print(f"wrote {SCHEMA.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
