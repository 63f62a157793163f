"""The schema the migrations build: the committed schema.sql, and CHECK constraints that allow
exactly the states and enum values the code knows."""

from __future__ import annotations

import importlib.util
import pathlib
import pkgutil
import re
import uuid

import asyncpg
import pytest

from usage_service import domain, storage
from usage_service.domain import credits, periods

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("schema_tool", ROOT / "tools" / "schema.py")
assert _spec is not None and _spec.loader is not None
schema_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(schema_tool)

# The drain's states, as its SQL writes them (storage/drain_store.py, reconcile_store.py).
# usage_events.report_state; 'covered': paid for by grants
EVENT_STATES = {"pending", "reported", "failed", "unbilled", "covered"}
REPORT_STATES = {"open", "delivered", "failed"}  # reports.state
REPORT_KINDS = {"usage", "fix"}  # reports.kind: usage, or a reconciliation's fix
PROVIDERS = {p.value for p in domain.Provider}  # '' included: no provider
BILLED_BY = PROVIDERS - {""}
INTERVALS = {i.value for i in periods.Interval}
# A placeholder (a customer known only by its usage) has the status ''.
STATUSES = {s.value for s in domain.SubscriptionStatus} | {""}

EXPECTED = {
    ("customers", "customers_subscription_status_known"): STATUSES,
    ("customers", "customers_provider_known"): PROVIDERS,
    ("customers", "customers_billing_interval_known"): INTERVALS,
    ("billing_periods", "billing_periods_billing_interval_known"): INTERVALS,
    ("customer_providers", "customer_providers_provider_known"): BILLED_BY,
    ("usage_events", "usage_events_provider_known"): PROVIDERS,
    ("usage_events", "usage_events_report_state_known"): EVENT_STATES,
    ("reports", "reports_provider_known"): BILLED_BY,
    ("reports", "reports_state_known"): REPORT_STATES,
    ("reports", "reports_kind_known"): REPORT_KINDS,
    ("credit_grants", "credit_grants_source_known"): {s.value for s in credits.GrantSource},
}

# Partitions carry their table's checks: the table's are the ones that count.
CHECKS = """
SELECT k.conrelid::regclass::text AS table_name, k.conname,
    pg_get_constraintdef(k.oid) AS definition
FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
WHERE k.contype = 'c' AND k.conname LIKE '%\\_known' AND NOT c.relispartition"""


@pytest.mark.quick
async def test_the_migrations_build_the_documented_schema(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        built = await schema_tool.dump(conn)
    finally:
        await conn.close()
    committed = schema_tool.SCHEMA.read_text(encoding="utf-8")
    assert built == committed, "schema.sql is stale: run `.venv/bin/python tools/schema.py`"


@pytest.mark.quick
async def test_checks_allow_exactly_the_values_the_code_knows(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(CHECKS)
    finally:
        await conn.close()
    allowed = {
        (r["table_name"], r["conname"]): set(re.findall(r"'((?:[^']|'')*)'::text", r["definition"]))
        for r in rows
    }
    assert allowed == EXPECTED


def _sql_of_storage() -> str:
    """Every SQL statement the storage modules define, as one text."""
    texts = []
    for info in pkgutil.walk_packages(storage.__path__, f"{storage.__name__}."):
        module = importlib.import_module(info.name)
        texts += [v for v in vars(module).values() if isinstance(v, str)]
    return "\n".join(texts)


def _literals(sql: str, column: str) -> set[str]:
    """The literals `column` is compared with or set to (=, <>, IN (...), = CASE ... END)."""
    found: set[str] = set()
    name = rf"(?<![\w]){column}\b"
    for m in re.finditer(rf"{name}\s*(?:=|<>|!=)\s*'([^']*)'", sql):
        found.add(m.group(1))
    for m in re.finditer(rf"{name}\s+(?:NOT\s+)?IN\s*\(([^)]*)\)", sql):
        found |= set(re.findall(r"'([^']*)'", m.group(1)))
    for m in re.finditer(rf"{name}\s*=\s*CASE\b(.*?)\bEND\b", sql, re.DOTALL):
        found |= set(re.findall(r"(?:THEN|ELSE)\s+'([^']*)'", m.group(1)))
    return found


def test_the_storage_sql_uses_only_values_the_checks_allow() -> None:
    sql = _sql_of_storage()
    events = _literals(sql, "report_state")
    assert events == EVENT_STATES  # every state is written or read somewhere
    reports = _literals(sql, "(?:r\\.)?state")
    assert reports and reports <= REPORT_STATES
    kinds = _literals(sql, "kind")
    assert kinds and kinds <= REPORT_KINDS


# One row in each table with a checked column, every value allowed.
ROWS = """
INSERT INTO customers (customer_id, plan_id, subscription_status, period_start, period_end,
    provider)
VALUES ('c1', 'basic', 'active', now(), now() + interval '1 month', 'stripe');
INSERT INTO billing_periods (customer_id, period_start, period_end, billing_interval,
    billing_interval_count, billing_anchor)
SELECT customer_id, period_start, period_end, 'month', 1, period_end FROM customers;
INSERT INTO customer_providers (customer_id, provider) VALUES ('c1', 'stripe');
INSERT INTO usage_events (event_id, customer_id, idempotency_key, meter, quantity, event_time,
    payload_hash, provider, report_state)
VALUES (gen_random_uuid(), 'c1', 'k', 'tokens', 1, now(), '\\x00', '', 'unbilled');
INSERT INTO reports (customer_id, report_id, provider, events, kind)
VALUES ('c1', gen_random_uuid(), 'stripe', '[]', 'fix');
"""

BAD = [
    ("UPDATE customers SET subscription_status = 'cancelled'", "customers_subscription_status"),
    ("UPDATE customers SET provider = 'paypal'", "customers_provider_known"),
    ("UPDATE customers SET billing_interval = 'months'", "customers_billing_interval_known"),
    ("UPDATE customers SET billing_interval_count = 0", "customers_billing_interval_count"),
    ("UPDATE billing_periods SET billing_interval = 'fortnight'", "billing_periods_billing"),
    ("UPDATE customer_providers SET provider = ''", "customer_providers_provider_known"),
    ("UPDATE usage_events SET provider = 'Stripe'", "usage_events_provider_known"),
    ("UPDATE usage_events SET report_state = 'done'", "usage_events_report_state_known"),
    ("UPDATE reports SET provider = ''", "reports_provider_known"),
    ("UPDATE reports SET state = 'settled'", "reports_state_known"),
    ("UPDATE reports SET kind = 'refund'", "reports_kind_known"),
]


async def test_the_database_refuses_an_unknown_value(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    outer = conn.transaction()  # rolled back: the test's database is left as it was
    await outer.start()
    try:
        await conn.execute(ROWS)
        for statement, constraint in BAD:
            with pytest.raises(asyncpg.CheckViolationError) as refused:
                async with conn.transaction():  # a savepoint: the rows stay for the next
                    await conn.execute(statement)
            # (on Citus the coordinator passes on a worker's message, not its fields)
            named = refused.value.constraint_name or str(refused.value)
            assert constraint in named, statement
        # What the code writes for a placeholder and for its events (provider not decided yet).
        await conn.execute(
            "INSERT INTO customers (customer_id, plan_id, subscription_status)"
            " VALUES ('c2', '', '')"
        )
        await conn.execute(
            "INSERT INTO usage_events (event_id, customer_id, idempotency_key, meter, quantity,"
            " event_time, payload_hash) VALUES ($1, 'c2', 'k', 'tokens', 1, now(), '\\x00')",
            uuid.uuid4(),
        )
    finally:
        await outer.rollback()
        await conn.close()
