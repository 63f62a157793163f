"""The client's records: frozen dataclasses and enums mirroring usage.v1, with datetimes for times.

Times returned by the service are timezone-aware (UTC). Times passed in must be aware too.
Enum members drop the proto prefix (`SUBSCRIPTION_STATUS_ACTIVE` is `SubscriptionStatus.ACTIVE`);
a value this client does not know yet (from a newer server) reads as `UNSPECIFIED`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Mapping


class SubscriptionStatus(enum.Enum):
    UNSPECIFIED = 0
    ACTIVE = 1
    TRIALING = 2
    PAST_DUE = 3
    CANCELED = 4
    UNPAID = 5
    INCOMPLETE = 6
    PAUSED = 7


class Provider(enum.Enum):
    """Where usage is reported. UNSPECIFIED: metered and checked, never reported."""

    UNSPECIFIED = 0
    STRIPE = 1
    LEMON_SQUEEZY = 2
    POLAR = 3
    DODO_PAYMENTS = 4
    CREEM = 5


class BillingInterval(enum.Enum):
    """The unit of a billing cadence (UTC). UNSPECIFIED in an upsert: inferred from the period."""

    UNSPECIFIED = 0
    DAY = 1
    WEEK = 2
    MONTH = 3
    YEAR = 4


class PeriodSource(enum.Enum):
    """Where a billing period comes from: a webhook (CONFIRMED) or the cadence (PROJECTED)."""

    UNSPECIFIED = 0
    CONFIRMED = 1
    PROJECTED = 2


class EntitlementReason(enum.Enum):
    UNSPECIFIED = 0
    WITHIN_LIMIT = 1  # metered feature with room left (or no limit)
    FEATURE_ENABLED = 2  # boolean feature enabled in the plan
    SOFT_LIMIT_EXCEEDED = 3  # allowed, but over a soft limit
    LIMIT_EXCEEDED = 4  # denied: over a hard limit
    FEATURE_NOT_IN_PLAN = 5  # denied
    SUBSCRIPTION_INACTIVE = 6  # denied: not ACTIVE or TRIALING
    CUSTOMER_NOT_FOUND = 7  # denied


@dataclasses.dataclass(frozen=True)
class Customer:
    """A customer's plan, subscription and billing period [start, end)."""

    customer_id: str
    plan_id: str
    subscription_status: SubscriptionStatus
    current_period_start_time: dt.datetime
    current_period_end_time: dt.datetime
    provider: Provider = Provider.UNSPECIFIED
    # Stripe cus_..., Polar, Dodo or Creem customer id.
    provider_customer_id: str = ""
    # Meter -> Lemon Squeezy subscription item id.
    subscription_items: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # The cadence: periods are billing_interval_count billing_intervals long (count 0 means 1).
    billing_interval: BillingInterval = BillingInterval.UNSPECIFIED
    billing_interval_count: int = 0
    # A boundary of the cadence whose day of month periods keep; None: taken from the period.
    billing_cycle_anchor_time: dt.datetime | None = None
    # Output only (not sent): whether the current period was confirmed or projected.
    current_period_source: PeriodSource = PeriodSource.UNSPECIFIED


@dataclasses.dataclass(frozen=True)
class UsageEvent:
    """One item of a batch: the arguments of `record_usage`."""

    customer_id: str
    meter: str
    quantity: int
    # Unique per customer for ever; see `usage_client.idempotency_key`.
    idempotency_key: str
    event_time: dt.datetime | None = None  # None: the service's now
    properties: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RecordResult:
    event_id: str
    # True when the key had already been recorded with the same payload; event_id is the original.
    duplicate: bool


@dataclasses.dataclass(frozen=True)
class DecisionRule:
    """The plan rule an entitlement decision applied. Metered features: the plan's allowance,
    limit (None: unlimited) and enforcement ("hard" or "soft"); boolean features: enabled.
    Empty where it is not known (an unknown customer, a feature outside the plan)."""

    plan_id: str
    feature: str
    included: int = 0
    limit: int | None = None
    enforcement: str = ""
    enabled: bool = False


@dataclasses.dataclass(frozen=True)
class Entitlement:
    """The answer to a check. A denial is an answer (allowed=False), not an exception."""

    allowed: bool
    reason: EntitlementReason
    used: int  # in the current period, after this call's consumption if any
    included: int
    limit: int | None  # None: unlimited
    remaining: int | None  # None: unlimited
    period_start_time: dt.datetime | None
    period_end_time: dt.datetime | None
    event_id: str | None  # the consumed event, when consume was set and allowed
    duplicate: bool  # the idempotency key had already been consumed: nothing new was recorded
    period_source: PeriodSource = PeriodSource.UNSPECIFIED  # confirmed by a webhook or projected
    # Names this decision for `get_decision`: every consume is kept, and denials when the
    # service keeps them (USAGE_KEEP_DENIALS). None when the decision is not kept.
    decision_id: str | None = None
    as_of_time: dt.datetime | None = None  # when the decision was taken
    # The version of the customer's figures the decision read; for a consume, the version its
    # own usage committed as.
    totals_version: int = 0
    rule: DecisionRule | None = None  # the plan rule that decided


@dataclasses.dataclass(frozen=True)
class Decision:
    """A kept entitlement decision: the request as it was checked, and the answer exactly as
    `check_entitlement` gave it."""

    decision_id: str
    customer_id: str
    feature: str
    quantity: int
    consume: bool
    response: Entitlement


@dataclasses.dataclass(frozen=True)
class MeterUsage:
    meter: str
    used: int  # by the meter's aggregation
    included: int
    limit: int | None  # None: unlimited
    remaining: int | None  # None: unlimited
    overage: int  # used beyond included
    reported: int  # accepted by the payment provider
    pending: int  # recorded, not yet accepted by the provider
    failed: int  # rejected by the provider for good, waiting for an operator
    aggregation: str  # "sum", "count", "max" or "last"
    unit: str
    unbilled: int = 0  # recorded for a customer with no payment provider: never reported


@dataclasses.dataclass(frozen=True)
class UsageSummary:
    customer_id: str
    plan_id: str
    subscription_status: SubscriptionStatus
    period_start_time: dt.datetime | None
    period_end_time: dt.datetime | None
    meters: tuple[MeterUsage, ...]
    period_source: PeriodSource = PeriodSource.UNSPECIFIED  # confirmed by a webhook or projected

    def meter(self, name: str) -> MeterUsage:
        """The usage of one meter; KeyError when the summary has no such meter."""
        for usage in self.meters:
            if usage.meter == name:
                return usage
        raise KeyError(name)
