"""The composition root of `usage-service serve`: settings, then the database, then the server,
the metrics endpoint, the drain and the reconciler, each entered into one exit stack."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from usage_service import metrics, metrics_http, tracing
from usage_service.api import server
from usage_service.commands import drain as drain_commands
from usage_service.commands import reconcile as reconcile_commands
from usage_service.config import ConfigError, Settings
from usage_service.domain import plans as plans_mod
from usage_service.storage import database
from usage_service.tls import TlsConfigError

log = logging.getLogger(__name__)


async def serve(settings: Settings) -> None:
    """Every setting is read and checked, and the database reached, before anything listens;
    a port that is taken is found before the server says it is listening."""
    drain_commands.check_settings(settings.environ)
    reconcile_commands.check_settings(settings.environ)
    plans = plans_mod.load(settings.plans_file or None)
    tokens = server.access(settings)
    tracing.setup(settings.tracing)
    async with database.database(settings) as st, contextlib.AsyncExitStack() as stack:
        if settings.metrics_address:
            scraper = await metrics_http.start(
                settings.metrics_address, lambda: metrics.refresh(st.pool)
            )
            stack.callback(scraper.close)
            metrics_host = settings.metrics_address.rsplit(":", 1)[0]
            print(
                f"usage-service metrics on {metrics_host}:{metrics_http.bound_port(scraper)}",
                flush=True,
            )
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
            )
        except TlsConfigError as exc:
            raise ConfigError(str(exc)) from None
        # Stops the server if anything below fails; after a graceful stop it returns at once.
        stack.push_async_callback(running.server.stop, 0)
        drainer = drain_commands.Background.start(st, plans, settings.environ)
        reconciler = reconcile_commands.Background.start(st, plans, settings.environ)
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
        await drainer.stop()
        if reconciler is not None:
            await reconciler.stop()
    log.info("stopped", extra={"action": "shutdown"})
