"""Threshold alerts as tasks of the server process: the alerter (when a plan declares
thresholds) and the webhook deliverer (when USAGE_WEBHOOK_URL is set), stopped with a grace."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import urllib.parse
from collections.abc import AsyncIterator
from typing import Self

import pydantic
from pydantic import Field, SecretStr

from usage_service import settings
from usage_service.alerts import crossings, webhooks
from usage_service.alerts.alerter import Alerter
from usage_service.alerts.webhooks import Deliverer, Target
from usage_service.domain.plans import Plans
from usage_service.storage import store

DEFAULT_INTERVAL = 10.0  # seconds between looks at every customer's log and at the outbox
DEFAULT_WEBHOOK_TIMEOUT = 10.0  # seconds per webhook attempt
DEFAULT_BACKOFF_BASE = 1.0  # seconds, doubled per failed attempt
DEFAULT_BACKOFF_CAP = 600.0  # seconds between attempts at most
MIN_SECRET_LENGTH = 16  # characters
STOP_GRACE = 10.0  # seconds the current turn and sends get to finish on shutdown


def _webhook_url(value: object) -> str:
    text = str(value).strip()
    parts = urllib.parse.urlsplit(text)
    if text and (parts.scheme not in ("http", "https") or not parts.hostname):
        raise ValueError(f"{text!r} is not an http:// or https:// URL")
    return text


def _secret_length(value: SecretStr) -> SecretStr:
    if value.get_secret_value() and len(value.get_secret_value()) < MIN_SECRET_LENGTH:
        raise ValueError(f"must be at least {MIN_SECRET_LENGTH} characters")
    return value


class AlertSettings(settings.Group):
    interval: settings.Seconds = Field(
        DEFAULT_INTERVAL, validation_alias="USAGE_ALERTS_INTERVAL_SECONDS"
    )
    webhook_url: str = Field("", validation_alias="USAGE_WEBHOOK_URL")
    webhook_secret: settings.Secret = Field(SecretStr(""), validation_alias="USAGE_WEBHOOK_SECRET")
    webhook_timeout: settings.Seconds = Field(
        DEFAULT_WEBHOOK_TIMEOUT, validation_alias="USAGE_WEBHOOK_TIMEOUT_SECONDS"
    )
    webhook_backoff_base: settings.Seconds = Field(
        DEFAULT_BACKOFF_BASE, validation_alias="USAGE_WEBHOOK_BACKOFF_BASE_SECONDS"
    )
    webhook_backoff_cap: settings.Seconds = Field(
        DEFAULT_BACKOFF_CAP, validation_alias="USAGE_WEBHOOK_BACKOFF_CAP_SECONDS"
    )

    _url = pydantic.field_validator("webhook_url", mode="before")(_webhook_url)
    _secret = pydantic.field_validator("webhook_secret", mode="after")(_secret_length)

    @pydantic.model_validator(mode="after")
    def _paired(self) -> Self:
        if bool(self.webhook_url) != bool(self.webhook_secret.get_secret_value()):
            raise ValueError("USAGE_WEBHOOK_URL and USAGE_WEBHOOK_SECRET go together")
        return self

    def target(self) -> Target | None:
        """Where webhooks go; None when they are off."""
        if not self.webhook_url:
            return None
        return Target(
            url=self.webhook_url,
            secret=self.webhook_secret.get_secret_value(),
            timeout=self.webhook_timeout,
            backoff_base=self.webhook_backoff_base,
            backoff_cap=self.webhook_backoff_cap,
        )


@dataclasses.dataclass(frozen=True)
class Alerting:
    alerter: Alerter | None  # None: no plan declares thresholds
    deliverer: Deliverer | None  # None: webhooks are off


@contextlib.asynccontextmanager
async def running(
    st: store.Store, plans: Plans, alert_settings: AlertSettings, grace: float = STOP_GRACE
) -> AsyncIterator[Alerting]:
    """The alerter and the deliverer run while the block does. On the way out they get `grace`
    seconds to finish what they are doing; whatever is cut short is done again (a turn's
    transaction rolls back; a webhook is sent again once its lease runs out)."""
    target = alert_settings.target()
    deliverer = None
    if target is not None:
        deliverer = Deliverer(st.pool, target, alert_settings.interval)
    alerter = None
    if crossings.watched_plans(plans):
        alerter = Alerter(
            st.pool,
            plans,
            alert_settings.interval,
            webhooks.body if deliverer else None,
            deliverer.wake if deliverer else lambda: None,
        )
    tasks = []
    if alerter is not None:
        tasks.append(asyncio.create_task(alerter.run(), name="alerts"))
    if deliverer is not None:
        tasks.append(asyncio.create_task(deliverer.run(), name="webhooks"))
    try:
        yield Alerting(alerter, deliverer)
    finally:
        for worker in (alerter, deliverer):
            if worker is not None:
                worker.stop()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if deliverer is not None:
            await deliverer.aclose()
