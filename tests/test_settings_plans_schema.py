"""The plans file's JSON Schema: the committed file is the one the model generates, and the
plans files in the repository validate against it."""

from __future__ import annotations

import json
import pathlib
import tomllib

import jsonschema
import pytest

from usage_service.domain.plans import DEFAULT_PLANS_FILE, PlansError
from usage_service.settings import plans_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "schemas" / "plans.schema.json"
PLANS_FILES = [
    DEFAULT_PLANS_FILE,
    ROOT / "tests" / "plans.toml",
    ROOT / "bench" / "plans.toml",
]


def test_the_committed_schema_is_the_generated_one() -> None:
    assert SCHEMA_FILE.read_text() == plans_file.json_schema(), (
        "regenerate: usage-service check-plans --schema > schemas/plans.schema.json"
    )


@pytest.mark.parametrize("path", PLANS_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_repository_plans_validate(path: pathlib.Path) -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(tomllib.loads(path.read_text()), schema)
    plans_file.load(path)  # and load


@pytest.mark.parametrize(
    "text",
    [
        '[meters.m]\naggregation = "avg"\n[plans.p]\n',
        '[meters.m]\naggregation = "sum"\ncolour = "red"\n[plans.p]\n',
        '[meters.m]\naggregation = "sum"\n[plans.p.features.m]\nincluded = -1\n',
        '[meters.m]\naggregation = "sum"\n',
    ],
)
def test_the_schema_refuses_what_the_loader_refuses(text: str) -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(tomllib.loads(text), schema)
    with pytest.raises(PlansError):
        plans_file.parse(tomllib.loads(text), "p.toml")
