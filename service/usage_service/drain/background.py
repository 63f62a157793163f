"""The drain as a task of the server process, and the drain operator commands build: made from
the settings with one adapter per provider that has credentials, stopped with a grace, its
adapters closed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

from usage_service import providers
from usage_service.domain.plans import Meter, Plans
from usage_service.drain.loop import Drain, DrainSettings
from usage_service.storage import store
from usage_service.storage.drain_store import DrainStore

STOP_GRACE = 30.0  # seconds the current cycle gets to finish on shutdown


def build(
    st: store.Store,
    meters: Mapping[str, Meter],
    drain_settings: DrainSettings,
    provider_settings: providers.ProviderSettings,
) -> Drain:
    adapters = providers.adapters(provider_settings, meters)
    return Drain(DrainStore(st.pool), adapters, meters, drain_settings)


async def close(drain: Drain) -> None:
    """Closes the drain's adapters (their HTTP clients)."""
    for adapter in drain.adapters.values():
        await adapter.aclose()


@contextlib.asynccontextmanager
async def running(
    st: store.Store,
    plans: Plans,
    drain_settings: DrainSettings,
    provider_settings: providers.ProviderSettings,
    grace: float = STOP_GRACE,
) -> AsyncIterator[Drain]:
    """The drain runs while the block does. On the way out the current cycle may finish (up to
    `grace` seconds), then the adapters are closed. Whatever is cut short is safe: its reports
    are re-sent under the same ids."""
    drain = build(st, plans.meters, drain_settings, provider_settings)
    task = asyncio.create_task(drain.run(), name="drain")
    try:
        yield drain
    finally:
        drain.stop()
        try:
            await asyncio.wait_for(task, grace)
        except TimeoutError:
            pass
        finally:
            await close(drain)
