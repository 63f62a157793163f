"""Plans as code: the meters and plans a plans file declares (settings.plans_file reads and
checks the file and builds these records).

A bad file raises PlansError naming the file, the key and the reason.
"""

from __future__ import annotations

import dataclasses
import enum
import pathlib
from collections.abc import Mapping

DEFAULT_PLANS_FILE = pathlib.Path(__file__).with_name("default_plans.toml")
MAX_NAME_LENGTH = 100  # characters; Stripe's event_name limit


class PlansError(ValueError):
    """The plans file is invalid."""


class Aggregation(enum.StrEnum):
    SUM = "sum"
    COUNT = "count"
    MAX = "max"
    LAST = "last"


class Enforcement(enum.StrEnum):
    HARD = "hard"
    SOFT = "soft"


class Billing(enum.StrEnum):
    ARREARS = "arrears"  # all usage is reported to the provider
    PREPAID = "prepaid"  # usage burns grants first; only the rest is reported (as overage)


@dataclasses.dataclass(frozen=True)
class ProviderNaming:
    """How one provider names a meter: its event name and the metadata key carrying the value."""

    event_name: str
    value_key: str = "value"


@dataclasses.dataclass(frozen=True)
class Meter:
    name: str
    aggregation: Aggregation
    unit: str
    stripe: ProviderNaming
    polar: ProviderNaming
    dodo_payments: ProviderNaming
    creem: ProviderNaming
    lemon_squeezy_action: str  # "increment" (sum, count) or "set" (max, last)


@dataclasses.dataclass(frozen=True)
class Threshold:
    """A level of a feature's usage in a period that raises one alert per period: `text` as
    declared, in its canonical form ("80% of included", "100% of limit", "1500000"), and the
    `amount` of usage that reaches it. A prepaid feature's balance alert ("balance 1000") is
    reached when the balance of its grants is at or below `amount`."""

    text: str
    amount: int  # >= 1


@dataclasses.dataclass(frozen=True)
class RecurringGrant:
    """A prepaid feature's grant each period: `amount` units, burned at `priority`; with a
    `rollover_cap`, the unused part of a period's plan grants carries into the next period, up
    to that cap (0: nothing carries over)."""

    amount: int
    priority: int = 0
    rollover_cap: int = 0


@dataclasses.dataclass(frozen=True)
class MeteredFeature:
    meter: str
    included: int
    limit: int | None  # None: unlimited
    enforcement: Enforcement
    thresholds: tuple[Threshold, ...] = ()  # by amount, lowest first
    billing: Billing = Billing.ARREARS
    overage: bool = True  # prepaid: usage beyond the grants is allowed and reported
    ceiling: int | None = None  # a soft limit's hard ceiling
    grant: RecurringGrant | None = None  # prepaid: the plan's grant each period
    balance_alerts: tuple[Threshold, ...] = ()  # prepaid: "balance N", highest first

    @property
    def prepaid(self) -> bool:
        return self.billing is Billing.PREPAID

    def reached(self, used: int) -> tuple[Threshold, ...]:
        """The thresholds a period's usage of `used` has reached."""
        return tuple(t for t in self.thresholds if used >= t.amount)


@dataclasses.dataclass(frozen=True)
class Plan:
    plan_id: str
    name: str
    metered: Mapping[str, MeteredFeature]
    enabled: frozenset[str]  # boolean features that are on


@dataclasses.dataclass(frozen=True)
class Plans:
    meters: Mapping[str, Meter]
    plans: Mapping[str, Plan]
    source: str
