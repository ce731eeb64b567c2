"""OpenTelemetry tracing (CONTRACT.md §5), configured only by the standard ``OTEL_*`` variables.

* Off unless an exporter is configured: ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` set (or ``OTEL_TRACES_EXPORTER=console``), and
  ``OTEL_TRACES_EXPORTER`` not ``none``. When off, a check pays for nothing here.
* One server span per check, a child of Envoy's span: the W3C context in the gRPC metadata, else
  the request's own ``traceparent`` or B3 headers.
* One client span per IdP HTTP call, made by the OpenTelemetry httpx instrumentation (which also
  injects ``traceparent`` and records ``url.full``, ``http.response.status_code`` and
  ``error.type``); we only name it ``idp.discovery`` / ``idp.jwks`` / ``idp.introspection``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "ENDPOINT_EXTENSION",
    "SPAN_NAMES",
    "configure",
    "enabled",
    "extract_parent",
    "instrument_client",
    "shutdown",
    "tracer",
]

ENDPOINT_EXTENSION = "extauthz.idp_endpoint"  # httpx request extension naming the IdP endpoint
SPAN_NAMES = {
    "discovery": "idp.discovery",
    "jwks_uri": "idp.jwks",
    "introspection_endpoint": "idp.introspection",
}

_W3C = TraceContextTextMapPropagator()
_B3 = (B3MultiFormat(), B3SingleFormat())
_provider: Any = None  # the SDK TracerProvider when tracing is on


def _wanted(env: Mapping[str, str]) -> bool:
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none" or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if exporter == "console":
        return True
    return bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def enabled() -> bool:
    return _provider is not None


def configure(env: Mapping[str, str] = os.environ) -> bool:
    """Set up the SDK from the environment; True when tracing is on."""
    global _provider
    if _provider is not None or not _wanted(env):
        return _provider is not None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    # The httpx instrumentation records the stable HTTP attribute names (url.full,
    # http.response.status_code, error.type) only when asked to.
    os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
    attributes = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: "extauthz"}
    provider = TracerProvider(resource=Resource.create(attributes))
    exporter: SpanExporter
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "console":
        exporter = ConsoleSpanExporter()
    else:
        protocol = env.get(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        )
        if protocol.startswith("http"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpExporter,
            )

            exporter = HttpExporter()
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    return True


def shutdown() -> None:
    """Flush and stop the exporter (at server exit)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def tracer() -> trace.Tracer:
    return trace.get_tracer("extauthz")


def extract_parent(
    metadata: Iterable[tuple[str, Any]] | None, headers: Mapping[str, str]
) -> Context | None:
    """Envoy's span context from the gRPC metadata, else from the request's headers."""
    carrier = {k.lower(): v for k, v in (metadata or ()) if isinstance(v, str)}
    if "traceparent" in carrier:
        ctx = _W3C.extract(carrier)
        if trace.get_current_span(ctx).get_span_context().is_valid:
            return ctx
    for propagator in (_W3C, *_B3):
        ctx = propagator.extract(headers)
        if trace.get_current_span(ctx).get_span_context().is_valid:
            return ctx
    return None


async def _name_idp_span(span: trace.Span, request: Any) -> None:
    endpoint = request.extensions.get(ENDPOINT_EXTENSION) if request.extensions else None
    if endpoint in SPAN_NAMES:
        span.update_name(SPAN_NAMES[endpoint])
        span.set_attribute("extauthz.idp.endpoint", endpoint)


def instrument_client(client: httpx.AsyncClient) -> None:
    """Client spans for every request this (IdP) client makes, when tracing is on."""
    if _provider is None:
        return
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    HTTPXClientInstrumentor.instrument_client(
        client, tracer_provider=_provider, request_hook=_name_idp_span
    )
