"""The composition root of `usage-service serve`: the validated settings, then the database,
the metrics endpoint and its gauges, the gRPC server, the reconciliation, the drain and the
threshold alerts, each entered into one exit stack, which stops them in the reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import signal
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from usage_service import metrics, tracing
from usage_service.alerts import background as alerts_background
from usage_service.api import server
from usage_service.drain import background as drain_background
from usage_service.reconcile import background as reconcile_background
from usage_service.settings import ConfigError, plans_file
from usage_service.settings.environment import Settings
from usage_service.storage import changes, database, ops, store
from usage_service.tls import TlsConfigError

log = logging.getLogger(__name__)
FORGET_EVERY = 600.0  # seconds between deletions of changes too old to resume from
FORGET_BATCH = 10_000  # changes deleted per statement
BACKLOG_QUERY_TIMEOUT = 2.0  # seconds one read of the drain backlog may take


async def serve(settings: Settings) -> None:
    """Every setting, the plans and the tokens are checked, the database reached and the
    metrics port taken before the gRPC server listens; a failure is a ConfigError naming the
    variable. On SIGTERM or SIGINT: health NOT_SERVING, in-flight calls get the shutdown grace,
    then the drain gets its own, then the reconciliation stops."""
    plans = plans_file.load(settings.plans_file)
    tokens = server.access(settings.grpc_address, settings.auth, settings.tls)
    tracing.setup(settings.tracing)
    async with contextlib.AsyncExitStack() as stack:
        st = await stack.enter_async_context(
            database.database(settings.database, settings.read_model)
        )
        if settings.metrics_address:
            port = stack.enter_context(metrics.serving(settings.metrics_address))
            host = settings.metrics_address.rsplit(":", 1)[0]
            print(f"usage-service metrics on {host}:{port}", flush=True)
            await stack.enter_async_context(_database_gauges(st, settings.metrics_refresh))
        try:
            running = await server.start_server(
                st,
                plans,
                settings.grpc_address,
                tokens=tokens,
                tls=settings.tls,
                max_in_flight=settings.max_in_flight,
                max_message_bytes=settings.max_message_bytes,
                reuse_port=settings.reuse_port,
                keep_denials=settings.decisions.keep_denials,
            )
        except TlsConfigError as exc:
            raise ConfigError(str(exc)) from None
        # Stops the server if anything below fails; after a graceful stop it returns at once.
        stack.push_async_callback(running.stop, 0)
        await stack.enter_async_context(
            reconcile_background.running(st, plans, settings.reconcile, settings.providers)
        )
        await stack.enter_async_context(
            drain_background.running(st, plans, settings.drain, settings.providers)
        )
        await stack.enter_async_context(_forgetting_changes(st, settings.watch_resume))
        await stack.enter_async_context(alerts_background.running(st, plans, settings.alerts))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        host = settings.grpc_address.rsplit(":", 1)[0]
        # Printed once signals are handled: whoever waits for this line may send SIGTERM.
        print(f"usage-service listening on {host}:{running.port}", flush=True)
        await stop.wait()
        log.info("shutting down", extra={"action": "shutdown"})
        await running.stop(settings.shutdown_grace)
    log.info("stopped", extra={"action": "shutdown"})


@contextlib.asynccontextmanager
async def _running(work: Coroutine[Any, Any, None], name: str) -> AsyncIterator[None]:
    """Runs `work` as a task while the block runs, and cancels it when the block ends."""
    task = asyncio.create_task(work, name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _database_gauges(st: store.Store, every: float) -> contextlib.AbstractAsyncContextManager[None]:
    """Sets the gauges read from the database (pool use, drain backlog) now and every `every`
    seconds while the block runs."""
    return _running(_refresh_gauges(st, every), "metrics")


async def _refresh_gauges(st: store.Store, every: float) -> None:
    while True:
        use = ops.pool_use(st.pool)
        metrics.pool_use(use.in_use, use.idle, use.max)
        try:
            backlog = await ops.drain_backlog(st.pool, BACKLOG_QUERY_TIMEOUT)
        except Exception as exc:  # the database is slow or away: keep the last values
            metrics.backlog_unread()
            log.warning(
                "drain backlog not read: %s", type(exc).__name__, extra={"action": "metrics"}
            )
        else:
            metrics.backlog({b.provider: (b.events, b.oldest_age_seconds) for b in backlog})
        await asyncio.sleep(every)


def _forgetting_changes(
    st: store.Store, keep: float
) -> contextlib.AbstractAsyncContextManager[None]:
    """Forgets the changes WatchUsage could resume from once they are `keep` seconds old, now
    and every FORGET_EVERY seconds while the block runs (a resume older than that gets a
    snapshot)."""
    return _running(_forget_changes(st, keep), "forget-changes")


async def _forget_changes(st: store.Store, keep: float) -> None:
    while True:
        before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=keep)
        try:
            await changes.forget(st.pool, before, FORGET_BATCH)
        except Exception as exc:  # the database is away: next time
            log.warning("old changes not forgotten: %r", exc, extra={"action": "watch"})
        await asyncio.sleep(min(keep, FORGET_EVERY))
