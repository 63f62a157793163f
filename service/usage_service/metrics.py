"""Prometheus metrics, served by prometheus_client's own exposition server on
USAGE_METRICS_ADDRESS (`serving`).

Counters are updated where things happen (the RPC interceptor; the drain through
`provider_call` and `events_reported`; the ingestion adapters through `provider_duplicates`).
Gauges that describe the database (the drain backlog and the pool) are set by a periodic task
of the server process (`backlog`, `pool_use`), from the database, so every replica reports the
same backlog.
Label values are bounded sets (methods, codes, providers, reasons): never ids, keys or tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import prometheus_client as prom

from usage_service import domain
from usage_service.settings import ConfigError

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
WATCHES = prom.Gauge("usage_watch_streams", "WatchUsage streams open now")
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
    "usage_drain_backlog_read_errors", "backlog reads that failed (the gauges keep their values)"
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
THRESHOLD_ALERTS = prom.Counter(
    "usage_threshold_alerts", "threshold crossings recorded (each once per period)"
)
WEBHOOK_DELIVERIES = prom.Counter(
    "usage_webhook_deliveries",
    "webhook attempts, by outcome (delivered, rejected: not 2xx, network_error)",
    ["outcome"],
)
WEBHOOK_BACKLOG = prom.Gauge(
    "usage_webhook_backlog", "webhooks not yet accepted by the receiver (all replicas)"
)
WEBHOOK_OLDEST_AGE = prom.Gauge(
    "usage_webhook_oldest_age_seconds",
    "how long the oldest webhook not yet accepted by the receiver has waited",
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


# --- threshold alerts and their webhooks ---


def threshold_alerts(count: int) -> None:
    THRESHOLD_ALERTS.inc(count)


def webhook_delivery(outcome: str) -> None:
    """One webhook attempt ended: delivered, rejected (an answer other than 2xx) or
    network_error."""
    WEBHOOK_DELIVERIES.labels(outcome).inc()


def webhook_backlog(waiting: int, oldest_age_seconds: float) -> None:
    WEBHOOK_BACKLOG.set(waiting)
    WEBHOOK_OLDEST_AGE.set(oldest_age_seconds)


# --- the database gauges, set periodically by the server process ---


def pool_use(in_use: int, idle: int, most: int) -> None:
    DB_POOL.labels("in_use").set(in_use)
    DB_POOL.labels("idle").set(idle)
    DB_POOL.labels("max").set(most)


def backlog(by_provider: Mapping[str, tuple[int, float]]) -> None:
    """Events waiting and the oldest one's age in seconds, per provider (absent ones: 0)."""
    for provider in {*PROVIDERS, *by_provider}:
        events, oldest = by_provider.get(provider, (0, 0.0))
        DRAIN_BACKLOG.labels(provider).set(events)
        DRAIN_OLDEST_AGE.labels(provider).set(oldest)


def backlog_unread() -> None:
    """The backlog could not be read: the gauges keep their values."""
    DRAIN_BACKLOG_ERRORS.inc()


# --- the exposition endpoint ---


@contextlib.contextmanager
def serving(address: str) -> Iterator[int]:
    """prometheus_client's HTTP server on `address` (host:port) while the block runs; yields
    the port it listens on (the one chosen, for port 0). A port it cannot listen on is a
    ConfigError naming USAGE_METRICS_ADDRESS."""
    host, _, port = address.rpartition(":")
    try:
        server, thread = prom.start_http_server(int(port), host.strip("[]") or "0.0.0.0")
    except OSError as exc:
        raise ConfigError(
            f"USAGE_METRICS_ADDRESS: cannot listen on {address}: {exc.strerror or exc}"
        ) from None
    try:
        yield int(server.server_port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def reconciled(
    verdicts: Mapping[tuple[str, str], int],
    drift: Mapping[tuple[str, str], int],
    meter_errors: Mapping[str, int] | None,
) -> None:
    """Sets the reconciliation gauges from one run: customer meters per (provider, verdict),
    drift per (provider, meter), and Stripe's meter errors per code (None: they could not be
    read, and the gauge keeps its values)."""
    if meter_errors is not None:
        STRIPE_METER_ERRORS.clear()
        for code, n in meter_errors.items():
            STRIPE_METER_ERRORS.labels(code).set(n)
    RECONCILED.clear()
    for (provider, verdict), n in verdicts.items():
        RECONCILED.labels(provider, verdict).set(n)
    RECONCILE_DRIFT.clear()
    for (provider, meter), d in drift.items():
        RECONCILE_DRIFT.labels(provider, meter).set(d)
