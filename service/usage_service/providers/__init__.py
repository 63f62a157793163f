"""Payment-provider adapters: each turns a report into provider calls and answers an Outcome.

They know nothing of the database; the drain gives them reports and settles what they answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from usage_service import domain
from usage_service.domain.plans import Meter
from usage_service.domain.reports import Report, ReportEvent
from usage_service.providers import (
    creem,
    dodo_payments,
    lemon_squeezy,
    polar,
    stripe_meters,
    stripe_stream,
)
from usage_service.providers.config import ProviderSettings
from usage_service.providers.outcome import (
    Checkpoint,
    Delivered,
    Failed,
    Outcome,
    Rejected,
    Reporting,
    Retry,
)
from usage_service.providers.readback import Held, Query

__all__ = [
    "Adapter",
    "Checkpoint",
    "Delivered",
    "Failed",
    "Outcome",
    "ProviderSettings",
    "Rejected",
    "Report",
    "ReportEvent",
    "Reporting",
    "Retry",
    "StreamAdapter",
    "adapters",
]


class Adapter(Protocol):
    @property
    def reporting(self) -> Reporting: ...

    async def send(self, report: Report) -> Outcome: ...

    async def held(self, query: Query) -> Held: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class StreamAdapter(Adapter, Protocol):
    """An adapter that sends many reports in shared calls: one outcome per report, in order."""

    async def send_many(self, reports: Sequence[Report]) -> list[Outcome]: ...


def adapters(
    settings: ProviderSettings, meters: Mapping[str, Meter]
) -> dict[domain.Provider, Adapter]:
    """One adapter per provider that has credentials."""
    timeout = settings.http_timeout
    built: dict[domain.Provider, Adapter] = {}
    for provider in settings.configured():
        endpoint = settings.endpoint(provider)
        if provider is domain.Provider.STRIPE:
            stripe = (
                stripe_stream.StripeMeterStream
                if settings.stripe_meter_event_stream
                else stripe_meters.StripeMeters
            )
            built[provider] = stripe(endpoint, settings.stripe_meter_events_base, meters, timeout)
        elif provider is domain.Provider.LEMON_SQUEEZY:
            built[provider] = lemon_squeezy.LemonSqueezy(
                endpoint, meters, timeout, settings.lemon_squeezy_settle
            )
        elif provider is domain.Provider.POLAR:
            built[provider] = polar.adapter(endpoint, meters, timeout)
        elif provider is domain.Provider.DODO_PAYMENTS:
            built[provider] = dodo_payments.adapter(endpoint, meters, timeout)
        elif provider is domain.Provider.CREEM:
            built[provider] = creem.adapter(endpoint, meters, timeout)
    return built
