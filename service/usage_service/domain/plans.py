"""Plans as code: meters and plans read from a TOML file, validated once at start-up.

A bad file raises PlansError naming the file, the key and the reason.
"""

from __future__ import annotations

import dataclasses
import enum
import pathlib
import tomllib
import typing
from collections.abc import Mapping
from typing import Any

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
class MeteredFeature:
    meter: str
    included: int
    limit: int | None  # None: unlimited
    enforcement: Enforcement


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


def load(path: pathlib.Path | str | None = None) -> Plans:
    file = pathlib.Path(path) if path else DEFAULT_PLANS_FILE
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PlansError(f"{file}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PlansError(f"{file}: not valid TOML: {exc}") from exc
    return parse(raw, str(file))


def parse(raw: Mapping[str, Any], source: str) -> Plans:
    checker = _Checker(source)
    checker.keys(raw, "", {"meters", "plans"})
    meters_raw = checker.table(raw, "meters", required=True)
    meters = {name: _meter(checker, name, body) for name, body in meters_raw.items()}
    if not meters:
        checker.fail("meters", "declare at least one meter")
    plans_raw = checker.table(raw, "plans", required=True)
    plans = {pid: _plan(checker, pid, body, meters) for pid, body in plans_raw.items()}
    if not plans:
        checker.fail("plans", "declare at least one plan")
    return Plans(meters=meters, plans=plans, source=source)


def _meter(c: _Checker, name: str, body: Any) -> Meter:
    key = f"meters.{name}"
    c.name(name, key)
    body = c.as_table(body, key)
    providers = {"stripe", "polar", "dodo_payments", "creem", "lemon_squeezy"}
    c.keys(body, key, {"aggregation", "unit", *providers})
    agg_text = c.string(body, key, "aggregation", required=True) or ""
    try:
        aggregation = Aggregation(agg_text)
    except ValueError:
        c.fail(f"{key}.aggregation", f"must be one of sum, count, max, last, not {agg_text!r}")
    unit = c.string(body, key, "unit") or ""

    def naming(provider: str, with_value_key: bool) -> ProviderNaming:
        pkey = f"{key}.{provider}"
        section = c.table(body, provider)
        allowed = {"event_name", "value_key"} if with_value_key else {"event_name"}
        c.keys(section, pkey, allowed)
        event_name = c.string(section, pkey, "event_name") or name
        c.name(event_name, f"{pkey}.event_name")
        value_key = (c.string(section, pkey, "value_key") or "value") if with_value_key else ""
        return ProviderNaming(event_name=event_name, value_key=value_key)

    lemon_key = f"{key}.lemon_squeezy"
    lemon = c.table(body, "lemon_squeezy")
    c.keys(lemon, lemon_key, {"action"})
    additive = aggregation in (Aggregation.SUM, Aggregation.COUNT)
    action = c.string(lemon, lemon_key, "action") or ("increment" if additive else "set")
    if action != ("increment" if additive else "set"):
        c.fail(
            f"{lemon_key}.action",
            f"{action!r} does not keep a {aggregation} meter's result: use "
            f"{'increment' if additive else 'set'}",
        )
    return Meter(
        name=name,
        aggregation=aggregation,
        unit=unit,
        stripe=naming("stripe", with_value_key=False),
        polar=naming("polar", with_value_key=True),
        dodo_payments=naming("dodo_payments", with_value_key=True),
        creem=naming("creem", with_value_key=True),
        lemon_squeezy_action=action,
    )


def _plan(c: _Checker, plan_id: str, body: Any, meters: Mapping[str, Meter]) -> Plan:
    key = f"plans.{plan_id}"
    c.name(plan_id, key)
    body = c.as_table(body, key)
    c.keys(body, key, {"name", "features"})
    name = c.string(body, key, "name") or plan_id
    metered: dict[str, MeteredFeature] = {}
    enabled: set[str] = set()
    for feature, fbody in c.table(body, "features").items():
        fkey = f"{key}.features.{feature}"
        c.name(feature, fkey)
        fbody = c.as_table(fbody, fkey)
        if "enabled" in fbody:
            c.keys(fbody, fkey, {"enabled"})
            if feature in meters:
                c.fail(fkey, "is a meter: give it included/limit/enforcement, not enabled")
            if not isinstance(fbody["enabled"], bool):
                c.fail(f"{fkey}.enabled", "must be true or false")
            if fbody["enabled"]:
                enabled.add(feature)
            continue
        if feature not in meters:
            c.fail(fkey, "is not a declared meter (a boolean feature needs enabled = true)")
        c.keys(fbody, fkey, {"included", "limit", "enforcement"})
        included = c.whole(fbody, fkey, "included") or 0
        limit = c.whole(fbody, fkey, "limit")
        if limit is not None and limit < included:
            c.fail(f"{fkey}.limit", f"{limit} is below included ({included})")
        enf_text = c.string(fbody, fkey, "enforcement") or "hard"
        try:
            enforcement = Enforcement(enf_text)
        except ValueError:
            c.fail(f"{fkey}.enforcement", f"must be hard or soft, not {enf_text!r}")
        metered[feature] = MeteredFeature(feature, included, limit, enforcement)
    return Plan(plan_id=plan_id, name=name, metered=metered, enabled=frozenset(enabled))


class _Checker:
    """Type checks that fail with the file, the key and the reason."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, reason: str) -> Any:
        raise PlansError(f"{self.source}: {key}: {reason}")

    def as_table(self, value: Any, key: str) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            self.fail(key, "must be a table")
        return typing.cast(Mapping[str, Any], value)

    def table(self, body: Mapping[str, Any], name: str, required: bool = False) -> dict[str, Any]:
        if name not in body:
            if required:
                self.fail(name, "is missing")
            return {}
        value = body[name]
        if not isinstance(value, dict):
            self.fail(name, "must be a table")
        return typing.cast(dict[str, Any], value)

    def keys(self, body: Mapping[str, Any], key: str, allowed: set[str]) -> None:
        for unknown in sorted(set(body) - allowed):
            where = f"{key}.{unknown}" if key else unknown
            self.fail(where, f"unknown key (expected one of {', '.join(sorted(allowed))})")

    def string(
        self, body: Mapping[str, Any], key: str, name: str, required: bool = False
    ) -> str | None:
        if name not in body:
            if required:
                self.fail(f"{key}.{name}", "is missing")
            return None
        value = body[name]
        if not isinstance(value, str) or not value:
            self.fail(f"{key}.{name}", "must be a non-empty string")
        return str(value)

    def whole(self, body: Mapping[str, Any], key: str, name: str) -> int | None:
        if name not in body:
            return None
        value = body[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.fail(f"{key}.{name}", "must be a whole number >= 0")
        return int(value)

    def name(self, value: str, key: str) -> None:
        if not value or len(value) > MAX_NAME_LENGTH or not value.isprintable():
            self.fail(key, f"names must be 1..{MAX_NAME_LENGTH} printable characters")
