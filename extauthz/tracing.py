"""OpenTelemetry tracing (docs/traces.md), configured only by the standard ``OTEL_*`` variables.

* Off unless an exporter is configured: ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` set (or ``OTEL_TRACES_EXPORTER=console``), and
  ``OTEL_TRACES_EXPORTER`` not ``none``. When off, a check pays for nothing here.
* One server span per check, a child of Envoy's span: the W3C context in the gRPC metadata, else
  the request's own ``traceparent`` or B3 headers.
* One client span per IdP HTTP call, made by the OpenTelemetry httpx instrumentation (which also
  injects ``traceparent`` and records ``url.full``, ``http.response.status_code`` and
  ``error.type``); we only name it ``idp.discovery`` / ``idp.jwks`` / ``idp.introspection``.
* No credential is ever exported, whatever ``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_*`` say:
  every span passes :class:`CredentialRedactingExporter`, which redacts credential headers
  (the introspection client's Basic credentials, cookies, DPoP proofs), drops any recorded
  request or response body (a client_secret_post form) and takes userinfo out of ``url.full``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import httpx
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "CREDENTIAL_HEADERS",
    "ENDPOINT_EXTENSION",
    "REDACTED",
    "SPAN_NAMES",
    "CredentialRedactingExporter",
    "configure",
    "enabled",
    "extract_parent",
    "instrument_client",
    "redacted_attributes",
    "redacted_span",
    "shutdown",
    "tracer",
    "url_without_userinfo",
]

ENDPOINT_EXTENSION = "extauthz.idp_endpoint"  # httpx request extension naming the IdP endpoint
SPAN_NAMES = {
    "discovery": "idp.discovery",
    "jwks_uri": "idp.jwks",
    "introspection_endpoint": "idp.introspection",
}

# Headers whose values are credentials (names as the instrumentation writes them: lower case,
# `-` as `_`): RFC 9110 §11.6.2 Authorization (the introspection client's Basic credentials) and
# §11.7.2 Proxy-Authorization, RFC 6265 §4 Cookie and Set-Cookie, RFC 9449 §4 DPoP (a proof).
CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy_authorization", "cookie", "set_cookie", "dpop"}
)
_HEADER_ATTRIBUTES = ("http.request.header.", "http.response.header.")
# A body is never a span attribute here (the client_secret_post form holds the secret and the
# token); only its size may be. Names from any instrumentation or hook: all are dropped.
_BODY_ATTRIBUTES = ("http.request.body", "http.response.body")
_BODY_SIZE_ATTRIBUTES = frozenset({"http.request.body.size", "http.response.body.size"})
_URL_ATTRIBUTES = frozenset({"url.full", "http.url"})  # stable and old HTTP semantic conventions
REDACTED = ("[REDACTED]",)  # what OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS writes
_DROPPED = object()

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
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

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
    provider.add_span_processor(BatchSpanProcessor(CredentialRedactingExporter(exporter)))
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


def instrument_client(
    client: httpx.AsyncClient, provider: trace.TracerProvider | None = None
) -> None:
    """Client spans for every request this (IdP) client makes, when tracing is on (or on the
    given SDK ``provider``, whose exporter must be a :class:`CredentialRedactingExporter`)."""
    provider = provider or _provider
    if provider is None:
        return
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    HTTPXClientInstrumentor.instrument_client(
        client, tracer_provider=provider, request_hook=_name_idp_span
    )


def _is_credential_header(attribute: str) -> bool:
    for prefix in _HEADER_ATTRIBUTES:
        if attribute.startswith(prefix):
            header = attribute[len(prefix) :].lower().replace("-", "_")
            return header in CREDENTIAL_HEADERS
    return False


def _is_body(attribute: str) -> bool:
    return attribute.startswith(_BODY_ATTRIBUTES) and attribute not in _BODY_SIZE_ATTRIBUTES


def url_without_userinfo(url: str) -> str:
    """``url`` without its userinfo (``user:password@``), the rest as it was."""
    # RFC 3986 §3.2: the authority follows "//" and ends at the next "/", "?" or "#"; userinfo
    # is what comes before its last "@". RFC 9110 §4.2.4: userinfo in an http(s) URI is
    # deprecated, and a password there is a credential.
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    end = min((i for i in (rest.find(d) for d in "/?#") if i != -1), default=len(rest))
    authority = rest[:end]
    if "@" not in authority:
        return url
    return f"{scheme}://{authority.rpartition('@')[2]}{rest[end:]}"


def _clean(attribute: str, value: Any) -> Any:
    """The value to export for one attribute; ``_DROPPED`` for none."""
    if _is_credential_header(attribute):
        return REDACTED
    if _is_body(attribute):
        return _DROPPED
    if attribute in _URL_ATTRIBUTES and isinstance(value, str):
        return url_without_userinfo(value)
    return value


def redacted_attributes(attributes: Mapping[str, Any]) -> dict[str, Any] | None:
    """``attributes`` with credentials taken out; None when they hold none (no copy made)."""
    clean: dict[str, Any] = {}
    changed = False
    for attribute, value in attributes.items():
        exported = _clean(attribute, value)
        changed = changed or exported is not value
        if exported is not _DROPPED:
            clean[attribute] = exported
    return clean if changed else None


def _redacted_event(event: Event) -> Event:
    attributes = redacted_attributes(event.attributes or {})
    if attributes is None:
        return event
    return Event(event.name, attributes, event.timestamp)


def redacted_span(span: ReadableSpan) -> ReadableSpan:
    """``span`` as it may be exported: itself when it holds no credential, else a copy."""
    attributes = redacted_attributes(span.attributes or {})
    original_events = span.events
    events = [_redacted_event(event) for event in original_events]
    if attributes is None and all(
        new is old for new, old in zip(events, original_events, strict=True)
    ):
        return span
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=span.attributes if attributes is None else attributes,
        events=events,
        links=span.links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class CredentialRedactingExporter(SpanExporter):
    """Exports every span through ``exporter`` with its credentials taken out.

    One place for every span, whichever instrumentation or hook set the attribute, and on the
    export thread rather than a span processor's ``on_end``: the checks' path pays nothing."""

    def __init__(self, exporter: SpanExporter) -> None:
        self._exporter = exporter

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._exporter.export([redacted_span(span) for span in spans])

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)
