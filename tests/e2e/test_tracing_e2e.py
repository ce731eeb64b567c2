"""One trace across the real Envoy, extauthz and an identity provider.

The shared stack's Envoy (its OpenTelemetry tracer, envoy/envoy.yaml) and extauthz (the OTEL_*
variables) both export to the session's real OTLP/gRPC receiver (``otlp``). The ``idp-down``
deployment introspects at a real IdP that answers 500 (``faulty_idp``), so a request there is
denied with ``idp_call_failed`` after one IdP call. That one request must show up as one trace:

    Envoy ingress span (root, service envoy-gateway)
      └─ Envoy `async envoy.service.auth.v3.Authorization.Check egress` (client)
           └─ extauthz `envoy.service.auth.v3.Authorization/Check` (server, idp_call_failed)
                └─ extauthz `idp.introspection` (client, http.response.status_code 500)

and the log lines for it carry the same ``traceId`` and ``requestId``.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

import pytest
from opentelemetry.trace import SpanKind

from tests.otlp_receiver import ReceivedSpan
from tests.waiting import wait_until

if TYPE_CHECKING:  # the fixtures' types; conftest is never imported at run time
    from tests.e2e.conftest import Gateway, Logs
    from tests.integration.faulty_idp import FaultyIdp
    from tests.otlp_receiver import OtlpReceiver

T = TypeVar("T")

ENVOY_SERVICE = "envoy-gateway"
EXTAUTHZ_SERVICE = "extauthz"
EGRESS = "async envoy.service.auth.v3.Authorization.Check egress"
CHECK = "envoy.service.auth.v3.Authorization/Check"
# OTLP span kinds (opentelemetry-proto numbers them one above the API's SpanKind).
SERVER, CLIENT = SpanKind.SERVER.value + 1, SpanKind.CLIENT.value + 1
# Envoy exports every second (tracing.opentelemetry.flush_interval_ms), extauthz every 0.1 s.
SPAN_WAIT_SECONDS = 10.0


def spans_of_trace(otlp: OtlpReceiver, trace_id: str) -> list[ReceivedSpan]:
    return [span for span in otlp.snapshot() if span.trace_id == trace_id]


def one(spans: list[ReceivedSpan], what: str, **match: object) -> ReceivedSpan:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, f"expected one {what}, found {len(found)} in {spans}"
    return found[0]


@pytest.fixture(scope="module")
def traced_denial(
    gateway: Gateway, otlp: OtlpReceiver, faulty_idp: FaultyIdp, failing_introspection: str
) -> tuple[str, str, list[ReceivedSpan]]:
    """One request to ``idp-down``: its request id, trace id and the trace's spans, once both
    Envoy (ingress, egress) and extauthz (check, introspection) exported theirs."""
    path = urlsplit(failing_introspection).path
    calls_before = faulty_idp.count(path)
    call = gateway.request("GET", "/idp-down/items/7", token=secrets.token_urlsafe(32))
    assert call.response.status_code == 500, call.response.text
    assert call.response.headers["x-extauthz-reason"] == "idp_call_failed"
    assert call.response.headers["x-request-id"] == call.request_id
    assert faulty_idp.count(path) == calls_before + 1, "one IdP call, no retry after a 500"

    def check_span() -> ReceivedSpan | None:
        return next(
            (
                s
                for s in otlp.snapshot()
                if s.name == CHECK and s.attributes.get("extauthz.request_id") == call.request_id
            ),
            None,
        )

    trace_id = wait_until(
        check_span, timeout=SPAN_WAIT_SECONDS, what="extauthz's check span"
    ).trace_id

    def whole_trace() -> list[ReceivedSpan] | None:
        spans = spans_of_trace(otlp, trace_id)
        services = {(s.service, s.name) for s in spans}
        wanted = {
            (ENVOY_SERVICE, EGRESS),
            (EXTAUTHZ_SERVICE, CHECK),
            (EXTAUTHZ_SERVICE, "idp.introspection"),
        }
        has_ingress = any(s.service == ENVOY_SERVICE and s.kind == SERVER for s in spans)
        return spans if wanted <= services and has_ingress else None

    spans = wait_until(
        whole_trace, timeout=SPAN_WAIT_SECONDS, what=f"every span of trace {trace_id}"
    )
    return call.request_id, trace_id, spans


def test_envoy_extauthz_and_idp_spans_form_one_trace(
    traced_denial: tuple[str, str, list[ReceivedSpan]],
    faulty_idp: FaultyIdp,
    failing_introspection: str,
) -> None:
    request_id, trace_id, spans = traced_denial

    ingress = one(spans, "Envoy ingress span", service=ENVOY_SERVICE, kind=SERVER)
    assert ingress.parent_span_id == "", "the client sent no trace context: Envoy starts the trace"
    assert ingress.attributes["guid:x-request-id"] == request_id
    assert ingress.attributes["http.status_code"] == "500"

    egress = one(spans, "Envoy ext_authz egress span", service=ENVOY_SERVICE, name=EGRESS)
    assert egress.kind == CLIENT
    assert egress.parent_span_id == ingress.span_id
    assert egress.attributes["upstream_cluster"] == "extauthz"

    check = one(spans, "extauthz check span", service=EXTAUTHZ_SERVICE, name=CHECK)
    assert check.kind == SERVER
    assert check.parent_span_id == egress.span_id, "the check span continues Envoy's egress span"
    assert check.attributes["extauthz.reason"] == "idp_call_failed"
    assert check.attributes["extauthz.decision"] == "deny"
    assert check.attributes["extauthz.deployment"] == "idp-down"
    assert check.attributes["extauthz.request_id"] == request_id
    assert check.attributes["http.request.method"] == "GET"
    assert check.attributes["url.path"] == "/idp-down/items/7"

    introspection = one(
        spans, "idp.introspection span", service=EXTAUTHZ_SERVICE, name="idp.introspection"
    )
    assert introspection.kind == CLIENT
    assert introspection.parent_span_id == check.span_id
    assert introspection.attributes["http.response.status_code"] == 500
    assert introspection.attributes["error.type"] == "500"
    assert introspection.attributes["url.full"] == failing_introspection

    # The IdP received the introspection span's context: the trace continues into the IdP.
    path = urlsplit(failing_introspection).path
    traceparents = [r.headers.get("traceparent") for r in faulty_idp.requests(path)]
    assert f"00-{trace_id}-{introspection.span_id}-01" in traceparents


def test_log_lines_carry_the_trace_id_and_request_id(
    traced_denial: tuple[str, str, list[ReceivedSpan]], logs: Logs
) -> None:
    request_id, trace_id, _ = traced_denial
    failed = logs.find(request_id, "authentication.idpCallFailed")
    assert failed["traceId"] == trace_id
    assert failed["requestId"] == request_id
    assert failed["endpoint"] == "introspection_endpoint"
    assert "received (500, Internal Server Error)" in failed["message"]
    access = logs.find(request_id, "access")
    assert access["traceId"] == trace_id
    assert (access["decision"], access["reason"], access["status"]) == (
        "deny",
        "idp_call_failed",
        500,
    )
