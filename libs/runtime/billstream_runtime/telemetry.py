"""OpenTelemetry: a tracer provider per service and W3C trace-context carriers for Kafka.

Traces follow one request through HTTP, the event log, Kafka headers and the consumers: the
appending code captures the current trace context into the event log row, the relay writes it
into the Kafka headers, and the consumer starts its span as a child of it.
"""

from __future__ import annotations

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


def configure_tracing(
    service: str, otlp_endpoint: str = "", extra_processor: SpanProcessor | None = None
) -> TracerProvider:
    """Install a tracer provider for `service`. Spans are exported over OTLP/HTTP when an
    endpoint is configured; otherwise they are created (ids reach logs and headers) but
    not exported."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        provider = current
    else:
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        trace.set_tracer_provider(provider)
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    if extra_processor is not None:
        provider.add_span_processor(extra_processor)
    return provider


def current_carrier() -> dict[str, str]:
    """The current trace context as W3C headers (`traceparent`, `tracestate`)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def context_from_carrier(carrier: dict[str, str] | None):
    return propagate.extract(carrier or {})


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)
