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


class UsageChangeKind(enum.Enum):
    """What a `UsageChange` carries."""

    UNSPECIFIED = 0
    SNAPSHOT = 1  # the state of every meter watched: a stream's first message, or a resume too old
    USAGE = 2  # usage was recorded or consumed: the meters it changed
    ROLLOVER = 3  # a new billing period began: every meter watched, from the new period's figures
    CUSTOMER = 4  # the plan, status or period changed: every meter watched
    DRAIN = 5  # a provider accepted (or refused) reported usage: the meters whose figures moved
    THRESHOLD = 6  # a threshold of the plan was crossed (see `UsageChange.threshold`)
    CREDIT = 7  # a grant was created or voided: the meter whose balance changed


class SnapshotReason(enum.Enum):
    """Why a SNAPSHOT was sent (UNSPECIFIED for other kinds)."""

    UNSPECIFIED = 0
    INITIAL = 1  # the watch started without a version to resume after
    # The changes after the version resumed from are no longer kept: start again from this state.
    RESUME_TOO_OLD = 2


class EntitlementReason(enum.Enum):
    UNSPECIFIED = 0
    WITHIN_LIMIT = 1  # metered feature with room left (or no limit)
    FEATURE_ENABLED = 2  # boolean feature enabled in the plan
    SOFT_LIMIT_EXCEEDED = 3  # allowed, but over a soft limit
    LIMIT_EXCEEDED = 4  # denied: over a hard limit
    FEATURE_NOT_IN_PLAN = 5  # denied
    SUBSCRIPTION_INACTIVE = 6  # denied: not ACTIVE or TRIALING
    CUSTOMER_NOT_FOUND = 7  # denied
    # denied: a prepaid feature whose plan allows no overage, and the grants cannot cover it
    BALANCE_EXHAUSTED = 8


class GrantSource(enum.Enum):
    """Where a grant comes from."""

    UNSPECIFIED = 0
    PLAN = 1  # the plan's recurring allowance for one billing period
    ROLLOVER = 2  # the unused part of the previous period's plan allowance, up to a cap
    TOP_UP = 3  # a one-off grant made with `create_grant`


class GrantState(enum.Enum):
    """A grant's state when it was read."""

    UNSPECIFIED = 0
    ACTIVE = 1  # effective, not expired, not voided, with a balance left
    PENDING = 2  # not effective yet
    SPENT = 3  # burned to zero
    EXPIRED = 4  # past its expiry: the remainder was forfeited then
    VOIDED = 5  # voided: the remainder was removed then


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
    limit (None: unlimited) and enforcement ("hard" or "soft"), how usage is paid (billing
    "arrears" or "prepaid"), whether a prepaid feature allows usage beyond its grants (overage)
    and a soft limit's hard ceiling (None: none); boolean features: enabled.
    Empty where it is not known (an unknown customer, a feature outside the plan)."""

    plan_id: str
    feature: str
    included: int = 0
    limit: int | None = None
    enforcement: str = ""
    enabled: bool = False
    billing: str = ""
    overage: bool = False
    ceiling: int | None = None


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
    # Prepaid features: the units left in the customer's grants, after this call's consumption
    # if any. None for features paid in arrears.
    balance: int | None = None
    covered: int = 0  # the units of this call's consumption that grants paid for


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
    # "arrears" (all usage is reported) or "prepaid" (usage burns grants first; only the rest
    # is reported, as overage, when the plan allows overage).
    billing: str = ""
    # Prepaid features, over the grants that can be burned now: granted, burned so far, left.
    granted: int = 0
    burned: int = 0
    balance: int = 0
    next_expire_time: dt.datetime | None = None  # earliest expiry of a grant with units left
    covered: int = 0  # usage in the period that grants paid for: never reported
    billable_overage: int = 0  # prepaid with overage: the period's usage beyond the grants
    ceiling: int | None = None  # a soft limit's hard ceiling; None: none


@dataclasses.dataclass(frozen=True)
class Grant:
    """Prepaid units of a metered feature that the customer's usage of it burns down.

    Grants burn in a fixed order (`list_grants` gives it): lower priority first, then the
    earliest expiry, then the oldest. remaining is 0 once the grant is spent, expired or voided;
    forfeited is what an expiry or a void removed.
    """

    grant_id: str
    customer_id: str
    feature: str
    amount: int
    priority: int
    effective_time: dt.datetime  # usage timed earlier never burns it
    expire_time: dt.datetime | None  # None: never expires
    source: GrantSource
    burned: int
    remaining: int
    forfeited: int
    void_time: dt.datetime | None  # set once voided
    state: GrantState
    # The key it was created under (plan and rollover grants: one the service chose).
    idempotency_key: str
    create_time: dt.datetime


@dataclasses.dataclass(frozen=True)
class CreateGrantResult:
    grant: Grant
    # True when the key had already created this grant: nothing new was granted.
    duplicate: bool


@dataclasses.dataclass(frozen=True)
class VoidGrantResult:
    grant: Grant  # as it stands after the void
    # Units this call removed (0 when the grant was already voided, expired or spent).
    voided: int


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


@dataclasses.dataclass(frozen=True)
class ThresholdCrossing:
    """A threshold of the plan reached by a customer's usage in a period."""

    alert_id: str  # stable: the same in every stream and in the webhook, for de-duplication
    feature: str
    threshold: str  # as declared, e.g. "80% of included", "100% of limit", "1000"
    amount: int  # the usage the threshold stands for in this period
    used: int  # the usage that crossed it


@dataclasses.dataclass(frozen=True)
class UsageChange:
    """One message of `watch_usage`: a snapshot, or a committed change and the figures after it.

    `version` increases strictly (it may skip numbers: changes to meters not watched are left
    out); resume after the last one seen. A SNAPSHOT carries every meter watched, as do ROLLOVER
    and CUSTOMER; USAGE and DRAIN carry the meters they changed; CREDIT the meter whose balance
    a grant changed; THRESHOLD carries `threshold`.
    """

    version: int
    kind: UsageChangeKind
    commit_time: dt.datetime | None  # when the change committed (a snapshot: when it was read)
    snapshot_reason: SnapshotReason  # SNAPSHOT only; UNSPECIFIED otherwise
    plan_id: str
    subscription_status: SubscriptionStatus
    # The billing period the figures belong to (a late event can change an earlier period).
    period_start_time: dt.datetime | None
    period_end_time: dt.datetime | None
    meters: tuple[MeterUsage, ...]
    threshold: ThresholdCrossing | None = None  # THRESHOLD only

    def meter(self, name: str) -> MeterUsage:
        """The figures of one meter; KeyError when this message does not carry it."""
        for usage in self.meters:
            if usage.meter == name:
                return usage
        raise KeyError(name)
