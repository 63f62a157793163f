"""Fake payment providers: real HTTP servers on 127.0.0.1 that check the wire format of
PROVIDERS.md, keep what they accept (with each provider's dedupe rules) and inject faults."""

from __future__ import annotations

import datetime as dt
import uuid

from usage_service import domain
from usage_service.domain.reports import Report, ReportEvent


def event(
    customer_id: str = "c1",
    meter: str = "tokens",
    quantity: int = 1,
    when: dt.datetime | None = None,
    provider_customer_id: str = "cus_1",
    subscription_item: str = "",
    **properties: str,
) -> ReportEvent:
    return ReportEvent(
        event_id=str(uuid.uuid4()),
        customer_id=customer_id,
        meter=meter,
        quantity=quantity,
        event_time=when or dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5),
        properties=properties,
        provider_customer_id=provider_customer_id,
        subscription_item=subscription_item,
    )


def report(provider: domain.Provider, *events: ReportEvent, value: int = 0) -> Report:
    return Report(str(uuid.uuid4()), provider, tuple(events), value)
