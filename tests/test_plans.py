"""The plans file: the shipped example loads; a bad file names the file, the key and the reason."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from usage_service.domain import plans
from usage_service.domain.plans import Aggregation, Enforcement
from usage_service.settings import plans_file

GOOD = """
[meters.tokens]
aggregation = "sum"
[plans.p.features.tokens]
included = 5
"""


def test_the_shipped_example_loads() -> None:
    loaded = plans_file.load()
    assert {"free", "pro"} <= set(loaded.plans)
    assert loaded.meters["llm_tokens"].polar.value_key == "tokens"
    assert loaded.plans["pro"].metered["api_calls"].enforcement is Enforcement.SOFT


def test_defaults_keep_the_file_short(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text(GOOD)
    loaded = plans_file.load(f)
    meter = loaded.meters["tokens"]
    assert meter.aggregation is Aggregation.SUM
    assert meter.stripe.event_name == meter.polar.event_name == "tokens"
    assert meter.creem.value_key == meter.dodo_payments.value_key == "value"
    assert meter.lemon_squeezy_action == "increment"
    feature = loaded.plans["p"].metered["tokens"]
    assert (feature.included, feature.limit, feature.enforcement) == (5, None, Enforcement.HARD)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[plans.p]", "meters", "is missing"),
        (GOOD + "[meters.bad]\naggregation = 'avg'", "meters.bad.aggregation", "must be one of"),
        (GOOD + "[meters.bad]\nunit = 'x'", "meters.bad.aggregation", "is missing"),
        (
            GOOD
            + "[meters.m]\naggregation = 'max'\n[meters.m.lemon_squeezy]\naction = 'increment'",
            "meters.m.lemon_squeezy.action",
            "does not keep",
        ),
        (
            GOOD + "[plans.q.features.ghost]\nincluded = 1",
            "plans.q.features.ghost",
            "not a declared meter",
        ),
        (
            GOOD + "[plans.q.features.tokens]\nincluded = 10\nlimit = 5",
            "plans.q.features.tokens.limit",
            "below included",
        ),
        (
            GOOD + "[plans.q.features.tokens]\nincluded = -1",
            "plans.q.features.tokens.included",
            "whole number",
        ),
        (
            GOOD + "[plans.q.features.tokens]\nenforcement = 'strict'",
            "plans.q.features.tokens.enforcement",
            "hard or soft",
        ),
        (
            GOOD + "[plans.q.features.sso]\nenabled = 'yes'",
            "plans.q.features.sso.enabled",
            "true or false",
        ),
        (GOOD + "[plans.q]\ncolour = 'red'", "plans.q.colour", "unknown key"),
        ("[meters", "", "not valid TOML"),
    ],
)
def test_bad_files_name_file_key_and_reason(
    tmp_path: pathlib.Path, text: str, key: str, reason: str
) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(plans.PlansError) as caught:
        plans_file.load(f)
    message = str(caught.value)
    assert message.startswith(f"{f}: {key}")
    assert reason in message


@pytest.mark.process
def test_serve_refuses_to_start_on_a_bad_file(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(GOOD + "[plans.q.features.ghost]\nincluded = 1")
    done = subprocess.run(
        [sys.executable, "-m", "usage_service.cli", "serve"],
        env={
            "USAGE_PLANS_FILE": str(f),
            "DATABASE_URL": "postgresql://unused@127.0.0.1:1/x",
            "PATH": "/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"{f}: plans.q.features.ghost: is not a declared meter" in done.stderr
