"""Bad input gets INVALID_ARGUMENT naming each field and changes nothing; failures below the API
become clear codes, never UNKNOWN and never a stack trace."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from conftest import Service
from helpers import details, record

from usage.v1 import usage_pb2, usage_pb2_grpc
from usage_service.api.server import start_server
from usage_service.domain import plans as plans_mod
from usage_service.storage import store

FUTURE = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)  # far past the allowed clock skew


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (record(customer_id=""), {"customer_id"}),
        (record(customer_id="c" * 256), {"customer_id"}),
        (record(customer_id="a\x00b"), {"customer_id"}),
        (record(meter=""), {"meter"}),
        (record(meter="nope"), {"meter"}),
        (record(quantity=-1), {"quantity"}),
        (record(key=""), {"idempotency_key"}),
        (record(key="k" * 256), {"idempotency_key"}),
        (record(when=FUTURE), {"event_time"}),
        (record(**{"k" * 41: "v"}), {f"properties[{'k' * 41!r}]"}),
        (record(big="v" * 501), {"properties['big']"}),
        (
            record(customer_id="", meter="nope", quantity=-5, key=""),
            {"customer_id", "meter", "quantity", "idempotency_key"},
        ),
    ],
)
async def test_record_rejects_bad_fields_and_stores_nothing(
    service: Service, request_: usage_pb2.RecordUsageRequest, fields: set[str]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.usage.RecordUsage(request_)
    d = details(caught.value)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (d.reason, d.domain) == ("INVALID_REQUEST", "usage.v1")
    assert set(d.fields) == fields
    assert all(d.fields.values())
    assert await service.count_events() == 0


async def test_an_event_time_just_past_the_allowed_skew_is_refused(service: Service) -> None:
    ahead = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=6)  # from when the test runs
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.usage.RecordUsage(record(when=ahead))
    d = details(caught.value)
    assert (d.code, set(d.fields)) == (grpc.StatusCode.INVALID_ARGUMENT, {"event_time"})
    assert await service.count_events() == 0


async def test_limits_are_inclusive(service: Service) -> None:
    near_future = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=4)
    ok = record(customer_id="c" * 255, key="k" * 255, quantity=0, when=near_future)
    assert not (await service.usage.RecordUsage(ok)).duplicate


async def test_check_and_summary_validate_too(service: Service) -> None:
    bad_check = usage_pb2.CheckEntitlementRequest(customer_id="", feature="", quantity=-1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.usage.CheckEntitlement(bad_check)
    assert set(details(caught.value).fields) == {"customer_id", "feature", "quantity"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.usage.GetUsageSummary(
            usage_pb2.GetUsageSummaryRequest(customer_id="c", meter="nope")
        )
    assert set(details(caught.value).fields) == {"meter"}


async def test_database_unreachable_is_unavailable(plans: plans_mod.Plans) -> None:
    import asyncpg

    pool = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:1/none", min_size=0)
    assert pool is not None
    running = await start_server(store.Store(pool), plans, "127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = usage_pb2_grpc.UsageServiceStub(channel)
            for call in (
                stub.RecordUsage(record()),
                stub.GetUsageSummary(usage_pb2.GetUsageSummaryRequest(customer_id="c")),
                stub.CheckEntitlement(
                    usage_pb2.CheckEntitlementRequest(customer_id="c", feature="tokens")
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                d = details(caught.value)
                assert d.code == grpc.StatusCode.UNAVAILABLE
                assert d.reason == "DATABASE_UNAVAILABLE"
                assert "Traceback" not in (caught.value.details() or "")
    finally:
        await running.stop(0)
        await pool.close()


async def test_unexpected_failure_is_internal_without_a_stack_trace(service: Service) -> None:
    """A broken table is a bug, not bad input: INTERNAL, with nothing of the trace exposed."""
    await service.db.execute(
        "ALTER TABLE usage_events ADD CONSTRAINT no_sevens CHECK (quantity <> 7)"
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await service.usage.RecordUsage(record(quantity=7))
    finally:  # on Citus the database outlives the test
        await service.db.execute("ALTER TABLE usage_events DROP CONSTRAINT no_sevens")
    d = details(caught.value)
    assert d.code == grpc.StatusCode.INTERNAL and d.reason == "INTERNAL_ERROR"
    assert caught.value.details() == "internal error"


async def test_a_thousand_bad_items_get_details_that_fit_in_the_trailers(service: Service) -> None:
    """4,000 violations would not fit in gRPC's limit on trailing metadata: the first ones are
    listed and the count of the rest is stated, so the caller still gets INVALID_ARGUMENT with
    details it can read."""
    bad = record(customer_id="", meter="nope", quantity=-1, key="")
    batch = usage_pb2.BatchRecordUsageRequest(requests=[bad] * 1000)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.usage.BatchRecordUsage(batch)
    d = details(caught.value)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (d.reason, d.domain) == ("INVALID_REQUEST", "usage.v1")
    assert "requests[0].customer_id" in d.fields and all(d.fields.values())
    assert 0 < len(d.fields) < 4000
    assert int(d.metadata["unlisted_violations"]) == 4000 - len(d.fields)
    assert "(and 3995 more)" in (caught.value.details() or "")
    assert await service.count_events() == 0


@pytest.mark.parametrize(
    "method", ["/usage.v1.UsageService/DeleteEverything", "/made.up.Service/Method"]
)
async def test_unknown_method_is_unimplemented_with_error_info(
    service: Service, method: str
) -> None:
    unary = service.channel.unary_unary(
        method, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unary(b"", timeout=5)
    d = details(caught.value)
    assert (d.code, d.reason, d.domain) == (
        grpc.StatusCode.UNIMPLEMENTED,
        "UNKNOWN_METHOD",
        "usage.v1",
    )
    # A streaming caller is answered at once, before it sends anything.
    stream = service.channel.stream_stream(
        method, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )(timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream.read()
    assert details(caught.value).reason == "UNKNOWN_METHOD"
