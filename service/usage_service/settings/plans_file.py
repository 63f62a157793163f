"""The plans file (USAGE_PLANS_FILE): its TOML format as pydantic models, checked once at
start-up and turned into the domain's plans. A bad file raises PlansError naming the file, the
key and the reason (`plans.toml: plans.pro.features.ghost: is not a declared meter`).

`json_schema()` is the format as a JSON Schema, for editors; `schemas/plans.schema.json` in the
repository is that schema (`usage-service check-plans --schema` prints it).
"""

from __future__ import annotations

import dataclasses
import decimal
import fractions
import json
import pathlib
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal, NoReturn

import pydantic
import pydantic.json_schema
from pydantic import Field
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import ErrorDetails, core_schema

from usage_service import domain, settings
from usage_service.domain.plans import (
    DEFAULT_PLANS_FILE,
    MAX_NAME_LENGTH,
    Aggregation,
    Billing,
    Enforcement,
    Meter,
    MeteredFeature,
    Plan,
    Plans,
    PlansError,
    ProviderNaming,
    RecurringGrant,
    Threshold,
)

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]
Whole = Annotated[int, Field(ge=0)]
Total = Annotated[int, Field(ge=0, le=domain.MAX_TOTAL)]  # a figure the service stores (int64)
Positive = Annotated[int, Field(ge=1, le=domain.MAX_TOTAL)]

_PERCENT = r"((?=[0-9.]*[1-9])\d+(?:\.\d+)?)% of (included|limit)"  # a percentage > 0
THRESHOLD_FORMS = '"P% of included", "P% of limit" or a whole number >= 1'


@dataclasses.dataclass(frozen=True)
class ThresholdSpec:
    """A threshold as declared, before the feature's allowance and limit give its amount:
    `percent` of `basis` ("included" or "limit"), or an absolute `amount` (basis "")."""

    text: str  # canonical: "80% of included", "100% of limit", "1500000"
    percent: decimal.Decimal | None = None
    basis: str = ""
    amount: int = 0


def _threshold(value: object) -> ThresholdSpec:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return ThresholdSpec(str(value), amount=value)
    if isinstance(value, str) and (found := re.fullmatch(_PERCENT, value)):
        percent = decimal.Decimal(found[1])
        return ThresholdSpec(f"{percent.normalize():f}% of {found[2]}", percent, found[2])
    try:
        shown = json.dumps(value)
    except TypeError:
        shown = repr(value)
    raise ValueError(f"{shown} is not {THRESHOLD_FORMS}")


ThresholdItem = Annotated[
    ThresholdSpec,
    pydantic.PlainValidator(_threshold),
    pydantic.WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": f"^{_PERCENT}$"},
                {"type": "integer", "minimum": 1},
            ],
            "description": f"{THRESHOLD_FORMS}: the usage in a period that raises an alert",
        }
    ),
]


class _Table(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True, frozen=True)


class StripeNaming(_Table):
    event_name: Name | None = Field(None, description="the Stripe meter's event name")


class IngestNaming(_Table):
    event_name: Name | None = Field(None, description="the provider's event name")
    value_key: Name | None = Field(
        None, description='the metadata key carrying the value (default "value")'
    )


class LemonSqueezyAction(_Table):
    action: Literal["increment", "set"] | None = Field(
        None, description="increment for sum and count meters, set for max and last ones"
    )


class MeterTable(_Table):
    aggregation: Literal["sum", "count", "max", "last"] = Field(
        description="how a period's events combine (this also drives limits)"
    )
    unit: Annotated[str, Field(min_length=1)] | None = Field(None, description="for display")
    stripe: StripeNaming = StripeNaming()
    polar: IngestNaming = IngestNaming()
    dodo_payments: IngestNaming = IngestNaming()
    creem: IngestNaming = IngestNaming()
    lemon_squeezy: LemonSqueezyAction = LemonSqueezyAction()


class GrantTable(_Table):
    """A prepaid feature's grant each billing period."""

    amount: Positive = Field(description="units granted each period")
    priority: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = Field(
        None, description="lower burns first (default 0)"
    )
    rollover_cap: Total | None = Field(
        None,
        description="carry the unused part of a period's grant into the next, up to this "
        "(default 0: nothing carries over)",
    )


class FeatureTable(_Table):
    """A metered feature (keyed by a meter's name) or a boolean one (enabled)."""

    included: Whole | None = Field(None, description="free allowance per period (default 0)")
    limit: Whole | None = Field(None, description="absent: unlimited")
    enforcement: Literal["hard", "soft"] | None = Field(
        None, description="hard: deny past the limit (default); soft: allow and flag"
    )
    enabled: bool | None = Field(None, description="a boolean feature: on or off")
    thresholds: list[ThresholdItem] | None = Field(
        None, description="usage levels that raise an alert once per period (webhook and stream)"
    )
    ceiling: Total | None = Field(
        None,
        description="a soft limit's hard ceiling: past the limit allow and flag, past this deny",
    )
    billing: Literal["arrears", "prepaid"] | None = Field(
        None,
        description="arrears: report all usage (default); prepaid: usage burns grants first and "
        "only the rest is reported",
    )
    overage: bool | None = Field(
        None, description="prepaid: allow (and report) usage beyond the grants (default true)"
    )
    grant: GrantTable | None = Field(None, description="prepaid: a grant each period")
    balance_alerts: list[Total] | None = Field(
        None,
        description="prepaid: balances that raise an alert once per period when the grants' "
        "balance falls to or below them (credits running low)",
    )


class PlanTable(_Table):
    name: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="for display (default: the plan's id)"
    )
    features: dict[str, FeatureTable] = {}


class PlansFile(_Table):
    """Meters and plans for usage-service."""

    model_config = pydantic.ConfigDict(title="usage-service plans file")
    meters: dict[str, MeterTable] = Field(min_length=1)
    plans: dict[str, PlanTable] = Field(min_length=1)


def load(path: pathlib.Path | str | None = None) -> Plans:
    """The plans in `path` (default: the packaged example)."""
    file = pathlib.Path(path) if path else DEFAULT_PLANS_FILE
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PlansError(f"{file}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PlansError(f"{file}: not valid TOML: {exc}") from exc
    return parse(raw, str(file))


def parse(raw: Mapping[str, Any], source: str) -> Plans:
    try:
        checked = PlansFile.model_validate(raw)
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"])
        raise PlansError(f"{source}: {key}: {_reason(error)}") from None
    return _Builder(source).plans(checked)


class _TomlSchema(pydantic.json_schema.GenerateJsonSchema):
    """TOML has no null: an optional key is one that may be left out."""

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        out = super().default_schema(schema)
        if "default" in out and out["default"] is None:
            del out["default"]
        return out


def json_schema() -> str:
    """The JSON Schema of the plans file, as committed in schemas/plans.schema.json."""
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **PlansFile.model_json_schema(schema_generator=_TomlSchema),
    }
    return json.dumps(schema, indent=2) + "\n"


def _reason(error: ErrorDetails) -> str:
    kind, context = error["type"], error.get("ctx") or {}
    if kind == "extra_forbidden":
        return f"unknown key (expected one of {', '.join(_keys_at(error['loc'][:-1]))})"
    if kind == "literal_error":
        choices = str(context.get("expected", "")).replace("'", "")
        return f"must be {'' if choices.count(',') == 0 else 'one of '}{choices}, " + (
            f"not {error['input']!r}"
        )
    if kind == "too_short" and error["loc"]:
        return f"declare at least one {str(error['loc'][-1]).removesuffix('s')}"
    if kind == "string_too_long":
        return f"names must be 1..{MAX_NAME_LENGTH} printable characters"
    if kind == "greater_than_equal":
        return f"must be a whole number >= {context.get('ge', 0)}"
    if kind == "less_than_equal":
        return f"must be at most {context.get('le')} (the largest int64)"
    return _REASONS.get(kind) or settings.describe(error)


_REASONS = {
    "missing": "is missing",
    "int_type": "must be a whole number >= 0",
    "bool_type": "must be true or false",
    "string_type": "must be a non-empty string",
    "string_too_short": "must be a non-empty string",
    "dict_type": "must be a table",
    "model_type": "must be a table",
}


def _keys_at(loc: tuple[int | str, ...]) -> list[str]:
    """The keys the table at `loc` may hold."""
    model: Any = PlansFile
    parts = list(loc)
    while parts:
        kind = model.model_fields[parts.pop(0)].annotation
        if typing.get_origin(kind) is dict:  # a table of named entries: skip the name
            parts.pop(0)
            kind = typing.get_args(kind)[1]
        if isinstance(kind, types.UnionType):  # an optional table: the table
            kind = next(k for k in typing.get_args(kind) if k is not type(None))
        model = kind
    return sorted(model.model_fields)


class _Builder:
    """The domain's plans from a checked file, with the checks that span tables: names, meters
    that features refer to, limits against allowances, Lemon Squeezy actions."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, reason: str) -> NoReturn:
        raise PlansError(f"{self.source}: {key}: {reason}")

    def name(self, value: str, key: str) -> None:
        if not value or len(value) > MAX_NAME_LENGTH or not value.isprintable():
            self.fail(key, f"names must be 1..{MAX_NAME_LENGTH} printable characters")

    def plans(self, checked: PlansFile) -> Plans:
        meters = {name: self.meter(name, body) for name, body in checked.meters.items()}
        plans = {pid: self.plan(pid, body, meters) for pid, body in checked.plans.items()}
        return Plans(meters=meters, plans=plans, source=self.source)

    def meter(self, name: str, body: MeterTable) -> Meter:
        key = f"meters.{name}"
        self.name(name, key)
        aggregation = Aggregation(body.aggregation)

        def naming(provider: str, table: StripeNaming | IngestNaming) -> ProviderNaming:
            event_name = table.event_name or name
            self.name(event_name, f"{key}.{provider}.event_name")
            if isinstance(table, StripeNaming):
                return ProviderNaming(event_name=event_name, value_key="")
            value_key = table.value_key or "value"
            self.name(value_key, f"{key}.{provider}.value_key")
            return ProviderNaming(event_name=event_name, value_key=value_key)

        additive = aggregation in (Aggregation.SUM, Aggregation.COUNT)
        keeps = "increment" if additive else "set"
        action = body.lemon_squeezy.action or keeps
        if action != keeps:
            self.fail(
                f"{key}.lemon_squeezy.action",
                f"{action!r} does not keep a {aggregation} meter's result: use {keeps}",
            )
        return Meter(
            name=name,
            aggregation=aggregation,
            unit=body.unit or "",
            stripe=naming("stripe", body.stripe),
            polar=naming("polar", body.polar),
            dodo_payments=naming("dodo_payments", body.dodo_payments),
            creem=naming("creem", body.creem),
            lemon_squeezy_action=action,
        )

    def plan(self, plan_id: str, body: PlanTable, meters: Mapping[str, Meter]) -> Plan:
        key = f"plans.{plan_id}"
        self.name(plan_id, key)
        metered: dict[str, MeteredFeature] = {}
        enabled: set[str] = set()
        for feature, f in body.features.items():
            fkey = f"{key}.features.{feature}"
            self.name(feature, fkey)
            metered_keys = [
                k
                for k in (
                    "included",
                    "limit",
                    "enforcement",
                    "thresholds",
                    "ceiling",
                    "billing",
                    "overage",
                    "grant",
                    "balance_alerts",
                )
                if getattr(f, k) is not None
            ]
            if f.enabled is not None:
                if feature in meters:
                    self.fail(fkey, "is a meter: give it included/limit/enforcement, not enabled")
                if metered_keys:
                    self.fail(f"{fkey}.{metered_keys[0]}", "does not go with enabled")
                if f.enabled:
                    enabled.add(feature)
                continue
            if feature not in meters:
                self.fail(fkey, "is not a declared meter (a boolean feature needs enabled = true)")
            included = f.included or 0
            if f.limit is not None and f.limit < included:
                self.fail(f"{fkey}.limit", f"{f.limit} is below included ({included})")
            enforcement = Enforcement(f.enforcement or "hard")
            thresholds = self.thresholds(
                f"{fkey}.thresholds", f.thresholds or [], included, f.limit
            )
            metered[feature] = self.paid(fkey, f, meters[feature], included, enforcement)
            metered[feature] = dataclasses.replace(metered[feature], thresholds=thresholds)
        return Plan(
            plan_id=plan_id, name=body.name or plan_id, metered=metered, enabled=frozenset(enabled)
        )

    def paid(
        self, key: str, f: FeatureTable, meter: Meter, included: int, enforcement: Enforcement
    ) -> MeteredFeature:
        """The feature with its limit, spend cap and billing checked against each other."""
        if f.ceiling is not None:
            if enforcement is not Enforcement.SOFT or f.limit is None:
                self.fail(f"{key}.ceiling", 'needs a limit with enforcement = "soft"')
            if f.ceiling < f.limit:
                self.fail(f"{key}.ceiling", f"{f.ceiling} is below limit ({f.limit})")
        billing = Billing(f.billing or "arrears")
        if billing is Billing.PREPAID:
            if meter.aggregation not in (Aggregation.SUM, Aggregation.COUNT):
                self.fail(
                    f"{key}.billing",
                    f"prepaid needs a sum or count meter, not {meter.aggregation}",
                )
        else:
            for name in ("overage", "grant", "balance_alerts"):
                if getattr(f, name) is not None:
                    self.fail(f"{key}.{name}", 'goes with billing = "prepaid"')
        grant = None
        if f.grant is not None:
            grant = RecurringGrant(f.grant.amount, f.grant.priority or 0, f.grant.rollover_cap or 0)
        levels = f.balance_alerts or []
        if len(set(levels)) < len(levels):
            self.fail(f"{key}.balance_alerts", "a balance is declared twice")
        return MeteredFeature(
            meter.name,
            included,
            f.limit,
            enforcement,
            billing=billing,
            overage=True if f.overage is None else f.overage,
            ceiling=f.ceiling,
            grant=grant,
            balance_alerts=tuple(
                Threshold(f"balance {n}", n) for n in sorted(levels, reverse=True)
            ),
        )

    def thresholds(
        self, key: str, specs: list[ThresholdSpec], included: int, limit: int | None
    ) -> tuple[Threshold, ...]:
        """The feature's thresholds with their amounts, lowest first."""
        out: dict[str, Threshold] = {}
        for spec in specs:
            if spec.text in out:
                self.fail(key, f'"{spec.text}" is declared twice')
            amount = spec.amount
            if spec.percent is not None:
                base = included if spec.basis == "included" else limit
                if base is None:
                    self.fail(key, f'"{spec.text}": the feature has no limit')
                if base == 0:
                    self.fail(key, f'"{spec.text}": {spec.basis} is 0')
                share = fractions.Fraction(spec.percent) * base / 100
                amount = -(-share.numerator // share.denominator)  # rounded up
            if amount > domain.MAX_TOTAL:
                self.fail(key, f'"{spec.text}" is past the largest total ({domain.MAX_TOTAL})')
            out[spec.text] = Threshold(spec.text, amount)
        return tuple(sorted(out.values(), key=lambda t: (t.amount, t.text)))
