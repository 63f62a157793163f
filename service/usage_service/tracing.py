"""Optional OpenTelemetry tracing (`pip install 'usage-service[otel]'`, USAGE_TRACING=otlp).

Every gRPC call becomes a server span, exported over OTLP to OTEL_EXPORTER_OTLP_ENDPOINT; the
usual OTEL_* variables (service name, sampler, headers) apply. Off by default.
"""

from __future__ import annotations

import importlib
import logging

from usage_service.settings import ConfigError

log = logging.getLogger(__name__)


class TracingUnavailable(ConfigError):
    """USAGE_TRACING=otlp without the `otel` extra installed."""


def setup(mode: str) -> bool:
    """Installs the tracer provider and the gRPC server instrumentation; True when tracing."""
    if mode != "otlp":
        return False
    try:
        trace = importlib.import_module("opentelemetry.trace")
        sdk_trace = importlib.import_module("opentelemetry.sdk.trace")
        export = importlib.import_module("opentelemetry.sdk.trace.export")
        otlp = importlib.import_module("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
        grpc_instrumentation = importlib.import_module("opentelemetry.instrumentation.grpc")
        resources = importlib.import_module("opentelemetry.sdk.resources")
    except ImportError as exc:
        raise TracingUnavailable(
            f"USAGE_TRACING=otlp needs the otel extra (pip install 'usage-service[otel]'): {exc}"
        ) from None
    resource = resources.Resource.create({"service.name": "usage-service"})
    provider = sdk_trace.TracerProvider(resource=resource)
    provider.add_span_processor(export.BatchSpanProcessor(otlp.OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    grpc_instrumentation.GrpcAioInstrumentorServer().instrument()
    log.info("OpenTelemetry tracing on (OTLP)", extra={"action": "start"})
    return True
