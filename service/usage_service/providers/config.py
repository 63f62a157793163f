"""Provider credentials and addresses, read once from the environment.

A provider without a key is off: its customers' events stay pending, visibly, until it is set.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from usage_service import domain
from usage_service.config import positive_number

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


@dataclasses.dataclass(frozen=True)
class Endpoint:
    api_key: str  # empty: the provider is off
    base_url: str


@dataclasses.dataclass(frozen=True)
class ProviderSettings:
    stripe: Endpoint
    stripe_meter_events_base: str  # Stripe's v2 meter-events host (same as the API base in tests)
    lemon_squeezy: Endpoint
    polar: Endpoint
    dodo_payments: Endpoint
    creem: Endpoint
    http_timeout: float
    lemon_squeezy_settle: float  # see DEFAULT_LEMONSQUEEZY_SETTLE

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ProviderSettings:
        env = os.environ if environ is None else environ

        def endpoint(key: str, base: str, default: str) -> Endpoint:
            return Endpoint(env.get(key, "").strip(), (env.get(base) or default).rstrip("/"))

        stripe_base = env.get("STRIPE_API_BASE", "").rstrip("/")
        return cls(
            stripe=endpoint("STRIPE_API_KEY", "STRIPE_API_BASE", STRIPE_API),
            stripe_meter_events_base=stripe_base or STRIPE_METER_EVENTS,
            lemon_squeezy=endpoint(
                "LEMONSQUEEZY_API_KEY", "LEMONSQUEEZY_API_BASE", LEMONSQUEEZY_API
            ),
            polar=endpoint("POLAR_ACCESS_TOKEN", "POLAR_API_BASE", POLAR_API),
            dodo_payments=endpoint(
                "DODO_PAYMENTS_API_KEY", "DODO_PAYMENTS_API_BASE", DODO_PAYMENTS_API
            ),
            creem=endpoint("CREEM_API_KEY", "CREEM_API_BASE", CREEM_API),
            http_timeout=positive_number(
                env, "USAGE_PROVIDER_TIMEOUT_SECONDS", DEFAULT_HTTP_TIMEOUT
            ),
            lemon_squeezy_settle=positive_number(
                env, "LEMONSQUEEZY_SETTLE_SECONDS", DEFAULT_LEMONSQUEEZY_SETTLE
            ),
        )

    def endpoint(self, provider: domain.Provider) -> Endpoint:
        endpoint: Endpoint = getattr(self, provider.value)
        return endpoint

    def configured(self) -> tuple[domain.Provider, ...]:
        """The providers that have a key, in a fixed order."""
        return tuple(p for p in ALL if self.endpoint(p).api_key)
