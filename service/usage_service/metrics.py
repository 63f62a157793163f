"""Prometheus metrics, served as text on USAGE_METRICS_ADDRESS.

Counters are updated where things happen (the RPC interceptor; the drain through
`provider_call` and `events_reported`; the ingestion adapters through `provider_duplicates`).
Gauges that describe the database (the drain backlog and the pool) are read at scrape time by
`refresh`, so they are right even with many replicas.
Label values are bounded sets (methods, codes, providers, reasons): never ids, keys or tokens.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import asyncpg
import prometheus_client as prom

from usage_service import domain
from usage_service.storage import ops

log = logging.getLogger(__name__)
BACKLOG_QUERY_TIMEOUT = 2.0  # seconds a scrape waits for the backlog query

RPC_CALLS = prom.Counter(
    "usage_rpc_calls", "gRPC calls answered, by method and status code", ["method", "code"]
)
RPC_DURATION = prom.Histogram(
    "usage_rpc_duration_seconds",
    "gRPC call latency, by method and status code",
    ["method", "code"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RPC_IN_FLIGHT = prom.Gauge("usage_rpc_in_flight", "gRPC calls being served now")
EVENTS_RECORDED = prom.Counter(
    "usage_events_recorded", "usage events newly stored (duplicates excluded), by method", ["rpc"]
)
ENTITLEMENT_DECISIONS = prom.Counter(
    "usage_entitlement_decisions",
    "CheckEntitlement answers, by reason and whether allowed",
    ["reason", "allowed"],
)
DRAIN_BACKLOG = prom.Gauge(
    "usage_drain_backlog_events", "events not yet accepted by the provider", ["provider"]
)
DRAIN_OLDEST_AGE = prom.Gauge(
    "usage_drain_oldest_pending_age_seconds",
    "how long the oldest event not yet accepted by the provider has waited",
    ["provider"],
)
DRAIN_BACKLOG_ERRORS = prom.Counter(
    "usage_drain_backlog_read_errors", "scrapes whose backlog query failed (gauges kept stale)"
)
PROVIDER_CALLS = prom.Counter(
    "usage_provider_calls", "calls to payment providers, by outcome", ["provider", "outcome"]
)
PROVIDER_DURATION = prom.Histogram(
    "usage_provider_call_duration_seconds", "payment provider call latency", ["provider"]
)
EVENTS_REPORTED = prom.Counter(
    "usage_events_reported", "events settled with a provider, by outcome", ["provider", "outcome"]
)
RECONCILED = prom.Gauge(
    "usage_reconcile_periods",
    "customer meters per provider and verdict in the last periodic reconciliation",
    ["provider", "verdict"],
)
RECONCILE_DRIFT = prom.Gauge(
    "usage_reconcile_drift",
    "provider figure minus reported, summed over customers, in the meter's units (last run)",
    ["provider", "meter"],
)
STRIPE_METER_ERRORS = prom.Gauge(
    "usage_stripe_meter_errors",
    "meter errors Stripe reported over the last 30 days (last reconciliation), by code",
    ["code"],
)
PROVIDER_DUPLICATES = prom.Counter(
    "usage_provider_duplicate_events",
    "events a provider reported it already had (a re-send it deduplicated)",
    ["provider"],
)
DB_POOL = prom.Gauge("usage_db_pool_connections", "database pool connections, by state", ["state"])

PROVIDERS = tuple(p.value for p in domain.Provider if p is not domain.Provider.NONE)


# --- the drain's hooks ---


def provider_call(provider: str, outcome: str, seconds: float | None = None) -> None:
    """One call to a provider ended. `outcome`: a small fixed set, e.g. delivered, duplicate,
    retry_after, permanent_failure, network_error."""
    PROVIDER_CALLS.labels(provider, outcome).inc()
    if seconds is not None:
        PROVIDER_DURATION.labels(provider).observe(seconds)


def events_reported(provider: str, outcome: str, count: int = 1) -> None:
    """`count` events were settled: outcome `delivered` or `failed` (parked)."""
    EVENTS_REPORTED.labels(provider, outcome).inc(count)


def provider_duplicates(provider: str, count: int) -> None:
    """A provider answered that `count` events of a call were duplicates of earlier ones."""
    PROVIDER_DUPLICATES.labels(provider).inc(count)


# --- scrape time ---


async def refresh(pool: asyncpg.Pool | None) -> None:
    """Reads the gauges that live in the database. A failure keeps the previous values and is
    counted, so a scrape never fails because the database is slow."""
    if pool is None:
        return
    use = ops.pool_use(pool)
    DB_POOL.labels("in_use").set(use.in_use)
    DB_POOL.labels("idle").set(use.idle)
    DB_POOL.labels("max").set(use.max)
    try:
        backlog = await ops.drain_backlog(pool, BACKLOG_QUERY_TIMEOUT)
    except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        DRAIN_BACKLOG_ERRORS.inc()
        log.warning("drain backlog not read: %s", type(exc).__name__, extra={"action": "metrics"})
        return
    seen = {b.provider: b for b in backlog}
    for provider in {*PROVIDERS, *seen}:
        b = seen.get(provider)
        DRAIN_BACKLOG.labels(provider).set(b.events if b else 0)
        DRAIN_OLDEST_AGE.labels(provider).set(b.oldest_age_seconds if b else 0)


def render() -> bytes:
    return prom.generate_latest(prom.REGISTRY)


def reconciled(
    rows: Sequence[tuple[str, str, str, int | None]], errors: Sequence[tuple[str, str, int]] | None
) -> None:
    """Sets the reconciliation gauges from one run's rows, (provider, meter, verdict, drift) for
    the current and previous periods, and Stripe's meter error reports, (event type, code,
    count) (None: they could not be read; the gauge keeps its values)."""
    if errors is not None:
        by_code: Counter[str] = Counter()
        for (_, code), count in {(event, code): n for event, code, n in errors}.items():
            by_code[code] += count
        STRIPE_METER_ERRORS.clear()
        for code, n in by_code.items():
            STRIPE_METER_ERRORS.labels(code).set(n)
    verdicts: Counter[tuple[str, str]] = Counter((r[0], r[2]) for r in rows)
    drift: Counter[tuple[str, str]] = Counter()
    for provider, meter, _, amount in rows:
        drift[(provider, meter)] += amount or 0
    RECONCILED.clear()
    for (provider, verdict), n in verdicts.items():
        RECONCILED.labels(provider, verdict).set(n)
    RECONCILE_DRIFT.clear()
    for (provider, meter), d in drift.items():
        RECONCILE_DRIFT.labels(provider, meter).set(d)
