"""Thresholds in the plans file: the three forms, their amounts, and the errors that stop start-up
with the file, the key and the reason; the JSON Schema refuses what the loader refuses."""

from __future__ import annotations

import datetime as dt
import json
import pathlib
import tomllib

import jsonschema
import pytest

from usage_service import domain
from usage_service.alerts import crossings
from usage_service.domain.plans import DEFAULT_PLANS_FILE, PlansError, Threshold
from usage_service.settings import plans_file
from usage_service.storage import alerts, changes

SCHEMA = json.loads(
    (pathlib.Path(__file__).resolve().parent.parent / "schemas" / "plans.schema.json").read_text()
)


def plans_with(feature: str) -> str:
    return f'[meters.m]\naggregation = "sum"\n[plans.p.features.m]\n{feature}\n'


def parse(text: str) -> domain.plans.Plans:
    return plans_file.parse(tomllib.loads(text), "p.toml")


def test_the_three_forms_and_their_amounts() -> None:
    text = plans_with(
        "included = 1000\nlimit = 1500\n"
        'thresholds = [1200, "80% of included", "100.0% of limit", "12.5% of included", '
        '"33.3% of limit"]'
    )
    jsonschema.validate(tomllib.loads(text), SCHEMA)
    feature = parse(text).plans["p"].metered["m"]
    assert feature.thresholds == (
        Threshold("12.5% of included", 125),
        Threshold("33.3% of limit", 500),  # 499.5 rounded up: reached at 500
        Threshold("80% of included", 800),
        Threshold("1200", 1200),
        Threshold("100% of limit", 1500),
    )
    assert [t.text for t in feature.reached(799)] == ["12.5% of included", "33.3% of limit"]
    assert feature.reached(124) == ()


def test_the_shipped_plans_declare_thresholds() -> None:
    plans = plans_file.load(DEFAULT_PLANS_FILE)
    assert crossings.watched_plans(plans) == {"free", "pro"}
    assert [t.text for t in plans.plans["free"].metered["api_calls"].thresholds] == [
        "80% of limit",
        "100% of limit",
    ]


@pytest.mark.parametrize(
    ("feature", "error"),
    [
        (
            'included = 10\nthresholds = ["80% of limit"]',
            'p.toml: plans.p.features.m.thresholds: "80% of limit": the feature has no limit',
        ),
        (
            'limit = 10\nthresholds = ["50% of included"]',
            'p.toml: plans.p.features.m.thresholds: "50% of included": included is 0',
        ),
        (
            'included = 0\nlimit = 0\nthresholds = ["100% of limit"]',
            'p.toml: plans.p.features.m.thresholds: "100% of limit": limit is 0',
        ),
        (
            'limit = 10\nthresholds = ["80% of limit", "80.00% of limit"]',
            'p.toml: plans.p.features.m.thresholds: "80% of limit" is declared twice',
        ),
        (
            'limit = 10\nthresholds = ["80%"]',
            'p.toml: plans.p.features.m.thresholds.0: "80%" is not "P% of included", '
            '"P% of limit" or a whole number >= 1',
        ),
        (
            "limit = 10\nthresholds = [5, 0]",
            'p.toml: plans.p.features.m.thresholds.1: 0 is not "P% of included", '
            '"P% of limit" or a whole number >= 1',
        ),
        (
            'limit = 10\nthresholds = ["0% of limit"]',
            'p.toml: plans.p.features.m.thresholds.0: "0% of limit" is not "P% of included", '
            '"P% of limit" or a whole number >= 1',
        ),
        (
            "limit = 10\nthresholds = [0.8]",
            'p.toml: plans.p.features.m.thresholds.0: 0.8 is not "P% of included", '
            '"P% of limit" or a whole number >= 1',
        ),
        (
            'limit = 10\nthresholds = "80% of limit"',
            "p.toml: plans.p.features.m.thresholds: Input should be a valid list",
        ),
    ],
)
def test_bad_thresholds_stop_start_up_with_file_key_and_reason(feature: str, error: str) -> None:
    with pytest.raises(PlansError) as caught:
        parse(plans_with(feature))
    assert str(caught.value) == error


@pytest.mark.parametrize("value", ['"80%"', "0", '"0% of limit"', "0.8", '"80% of quota"'])
def test_the_schema_refuses_what_the_loader_refuses(value: str) -> None:
    text = plans_with(f"limit = 10\nthresholds = [{value}]")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(tomllib.loads(text), SCHEMA)
    with pytest.raises(PlansError):
        parse(text)


def test_a_boolean_feature_takes_no_thresholds() -> None:
    text = (
        '[meters.m]\naggregation = "sum"\n'
        "[plans.p.features.sso]\nenabled = true\nthresholds = [5]\n"
    )
    with pytest.raises(PlansError) as caught:
        parse(text)
    assert str(caught.value) == "p.toml: plans.p.features.sso.thresholds: does not go with enabled"


# --- which changes cross (no database) ---

PLANS = parse(
    '[meters.m]\naggregation = "sum"\n[meters.n]\naggregation = "last"\n'
    '[plans.p.features.m]\nincluded = 100\nlimit = 1000\nthresholds = ["80% of limit", 1000]\n'
    "[plans.p.features.n]\nthresholds = [3]\n"
    "[plans.q.features.m]\nincluded = 100\n"
)
NOW = dt.datetime(2026, 3, 10, tzinfo=dt.UTC)
START, END = dt.datetime(2026, 3, 1, tzinfo=dt.UTC), dt.datetime(2026, 4, 1, tzinfo=dt.UTC)


def logged(
    version: int,
    figures: dict[str, domain.Totals],
    kind: str = "usage",
    at: dt.datetime = NOW,
    plan_id: str = "",
) -> changes.Logged:
    detail = {"plan_id": plan_id, "status": "active"} if plan_id else {}
    return changes.Logged(changes.Change("c", kind, START, END, figures, detail), version, at)


def crossed(
    plan_id: str | None, batch: list[changes.Logged], known: alerts.Known | None = None
) -> list[tuple[str, str, int, int]]:
    found, _ = crossings.crossings(PLANS, plan_id, batch, known or set(), NOW)
    return [(c.feature, c.threshold, c.amount, c.used) for c in found]


def test_each_threshold_is_crossed_once_within_a_batch_and_never_again() -> None:
    batch = [
        logged(1, {"m": domain.Totals(quantity_sum=500)}),
        logged(2, {"m": domain.Totals(quantity_sum=850), "n": domain.Totals(last_quantity=3)}),
        logged(3, {"m": domain.Totals(quantity_sum=1200)}),
        logged(4, {"m": domain.Totals(quantity_sum=1300)}),
    ]
    assert crossed("p", batch) == [
        ("m", "80% of limit", 800, 850),
        ("n", "3", 3, 3),
        ("m", "1000", 1000, 1200),
    ]
    assert crossed("p", batch[2:], {("m", START, "80% of limit")}) == [("m", "1000", 1000, 1200)]


def test_each_change_is_judged_by_the_plan_it_was_made_under() -> None:
    over = {"m": domain.Totals(quantity_sum=900)}
    upgrade = [logged(1, over), logged(2, over, kind="customer", plan_id="p"), logged(3, over)]
    assert crossed("q", upgrade) == [("m", "80% of limit", 800, 900)]
    assert crossings.crossings(PLANS, "q", upgrade, set(), NOW)[1] == "p"
    downgrade = [logged(1, over, kind="customer", plan_id="q"), logged(2, over)]
    assert crossed("p", downgrade) == []
    assert crossings.crossings(PLANS, "p", downgrade, set(), NOW)[1] == "q"


def test_changes_that_raise_nothing() -> None:
    over = {"m": domain.Totals(quantity_sum=900)}
    assert crossed("q", [logged(1, over)]) == []  # a plan without thresholds
    assert crossed(None, [logged(1, over)]) == []  # no plan
    assert crossed("p", [logged(1, over, kind="threshold")]) == []
    assert crossed("p", [logged(1, over, at=END)]) == []  # committed once its period had ended
    old = [logged(1, over, at=NOW)]
    assert crossings.crossings(PLANS, "p", old, set(), END + crossings.LATE)[0] == []
    assert crossings.crossings(PLANS, "p", old, set(), END + dt.timedelta(hours=1))[0] != []
