"""The plan rule behind an entitlement decision, as a check reports it."""

from __future__ import annotations

import dataclasses

from usage_service.domain.plans import Plans


@dataclasses.dataclass(frozen=True)
class Rule:
    """A plan's rule for a feature: a metered feature's allowance, limit (None: unlimited) and
    enforcement ("hard" or "soft"), or a boolean feature that is enabled. Empty where the plan
    (or the customer) is unknown or lacks the feature."""

    plan_id: str
    feature: str
    included: int = 0
    limit: int | None = None
    enforcement: str = ""
    enabled: bool = False
    billing: str = ""
    overage: bool = False
    ceiling: int | None = None


def rule(plans: Plans, plan_id: str, feature: str) -> Rule:
    """The rule of plan `plan_id` ('' for an unknown customer) for `feature`, as far as it is
    known. A boolean feature enabled in the plan wins over a meter of the same name, as in
    `domain.gate`."""
    plan = plans.plans.get(plan_id)
    if plan is None:
        return Rule(plan_id, feature)
    if feature in plan.enabled:
        return Rule(plan_id, feature, enabled=True)
    metered = plan.metered.get(feature)
    if metered is None:
        return Rule(plan_id, feature)
    return Rule(
        plan_id,
        feature,
        metered.included,
        metered.limit,
        metered.enforcement.value,
        billing=metered.billing.value,
        overage=metered.overage if metered.prepaid else False,
        ceiling=metered.ceiling,
    )
