"""Provider credentials and addresses, read once from the environment.

A provider without a key is off: its customers' events stay pending, visibly, until it is set.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import Field, SecretStr

from usage_service import domain, settings

STRIPE_API = "https://api.stripe.com"
STRIPE_METER_EVENTS = "https://meter-events.stripe.com"
LEMONSQUEEZY_API = "https://api.lemonsqueezy.com"
POLAR_API = "https://api.polar.sh"
DODO_PAYMENTS_API = "https://live.dodopayments.com"
CREEM_API = "https://api.creem.io"
DEFAULT_HTTP_TIMEOUT = 15.0  # seconds per provider call
# Seconds after our HTTP timeout within which Lemon Squeezy may still apply a usage record.
DEFAULT_LEMONSQUEEZY_SETTLE = 30.0

ALL = tuple(p for p in domain.Provider if p is not domain.Provider.NONE)
_DEFAULT_BASE = {
    domain.Provider.STRIPE: STRIPE_API,
    domain.Provider.LEMON_SQUEEZY: LEMONSQUEEZY_API,
    domain.Provider.POLAR: POLAR_API,
    domain.Provider.DODO_PAYMENTS: DODO_PAYMENTS_API,
    domain.Provider.CREEM: CREEM_API,
}


@dataclasses.dataclass(frozen=True)
class Endpoint:
    api_key: str = dataclasses.field(repr=False)  # empty: the provider is off
    base_url: str


def _key(variable: str) -> Any:
    return Field(SecretStr(""), validation_alias=variable)


class ProviderSettings(settings.Group):
    """Each provider's key (empty: off) and API address (empty: its real host)."""

    stripe_api_key: settings.Secret = _key("STRIPE_API_KEY")
    stripe_api_base: str = Field("", validation_alias="STRIPE_API_BASE")
    # Stripe: send through the v2 meter event stream (sessions, 100 events a call); off: v1
    stripe_meter_event_stream: settings.Flag = Field(
        False, validation_alias="STRIPE_METER_EVENT_STREAM"
    )
    lemon_squeezy_api_key: settings.Secret = _key("LEMONSQUEEZY_API_KEY")
    lemon_squeezy_api_base: str = Field("", validation_alias="LEMONSQUEEZY_API_BASE")
    polar_api_key: settings.Secret = _key("POLAR_ACCESS_TOKEN")
    polar_api_base: str = Field("", validation_alias="POLAR_API_BASE")
    dodo_payments_api_key: settings.Secret = _key("DODO_PAYMENTS_API_KEY")
    dodo_payments_api_base: str = Field("", validation_alias="DODO_PAYMENTS_API_BASE")
    creem_api_key: settings.Secret = _key("CREEM_API_KEY")
    creem_api_base: str = Field("", validation_alias="CREEM_API_BASE")
    http_timeout: settings.Seconds = Field(
        DEFAULT_HTTP_TIMEOUT, validation_alias="USAGE_PROVIDER_TIMEOUT_SECONDS"
    )
    lemon_squeezy_settle: settings.Seconds = Field(  # see DEFAULT_LEMONSQUEEZY_SETTLE
        DEFAULT_LEMONSQUEEZY_SETTLE, validation_alias="LEMONSQUEEZY_SETTLE_SECONDS"
    )

    @property
    def stripe_meter_events_base(self) -> str:
        """Stripe's v2 meter-events host (the API base when that is set, as in tests)."""
        return self.stripe_api_base.rstrip("/") or STRIPE_METER_EVENTS

    def endpoint(self, provider: domain.Provider) -> Endpoint:
        key: SecretStr = getattr(self, f"{provider.value}_api_key")
        base: str = getattr(self, f"{provider.value}_api_base")
        return Endpoint(key.get_secret_value(), (base or _DEFAULT_BASE[provider]).rstrip("/"))

    def configured(self) -> tuple[domain.Provider, ...]:
        """The providers that have a key, in a fixed order."""
        return tuple(p for p in ALL if self.endpoint(p).api_key)

    @classmethod
    def key_variable(cls, provider: str) -> str:
        """The environment variable that holds `provider`'s key (e.g. STRIPE_API_KEY)."""
        return str(cls.model_fields[f"{domain.Provider(provider).value}_api_key"].validation_alias)
