"""Traces from the real server process to a real OTLP/gRPC receiver."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from tests.check_requests import check_request
from tests.conftest import claims
from tests.integration.faulty_idp import Fault, FaultyIdp
from tests.integration.serverproc import ExtauthzProcess
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.waiting import wait_until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
INTROSPECT = "/introspect"


@pytest.fixture
def idp() -> Iterator[FaultyIdp]:
    """An IdP whose introspection endpoint answers 500, and records the traceparent it was sent."""
    with FaultyIdp(tls=False) as server:
        server.introspection(INTROSPECT, fault=Fault.status_code(500))
        yield server


@pytest.fixture
def traced(tmp_path: Path, rsa_key: Any, idp: FaultyIdp) -> Iterator[tuple[ExtauthzProcess, OtlpReceiver]]:
    config = {"deployments": [
        {"name": "jwt", "pathPrefix": "/jwt", "authentication": {"type": "TOKEN_AUTHENTICATION",
         "validationPolicy": {"type": "STATIC_KEYS", "keys": [rsa_key.public_jwk]}}},
        {"name": "opaque", "pathPrefix": "/opaque", "authentication": {"type": "TOKEN_AUTHENTICATION",
         "validationPolicy": {"type": "REMOTE_INTROSPECTION", "uri": idp.url + INTROSPECT,
                              "clientDetails": {"clientId": "rs", "clientSecretEnv": "TRACING_TEST_SECRET"}}}},
    ]}
    with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
               "TRACING_TEST_SECRET": "not-a-real-secret"}
        with ExtauthzProcess(config, tmp_path / "server", env=env) as server:
            yield server, receiver


def check(server: ExtauthzProcess, path: str, token: str, request_id: str, *, metadata: Any = None,
          headers: dict[str, str] | None = None) -> ext.CheckResponse:
    return server.send(check_request(path, token=token, request_id=request_id, headers=headers),
                       metadata=metadata)


def span_of(receiver: OtlpReceiver, request_id: str) -> ReceivedSpan:
    """The check span of this request, once exported."""
    found: ReceivedSpan = wait_until(
        lambda: next((s for s in receiver.snapshot() if s.attributes.get("extauthz.request_id") == request_id), None),
        timeout=15,
        what=f"the check span of {request_id}",
    )
    return found


def test_check_span_is_a_child_of_envoys_span_from_grpc_metadata(traced: Any, rsa_key: Any) -> None:
    server, receiver = traced
    check(server, "/jwt/x", rsa_key.sign(claims()), "rid-trace-1",
          metadata=[("traceparent", f"00-{TRACE_ID}-{PARENT}-01")])
    span = span_of(receiver, "rid-trace-1")
    assert span.trace_id == TRACE_ID and span.parent_span_id == PARENT
    assert span.service == "extauthz" and span.kind == 2  # SERVER
    assert span.attributes["extauthz.decision"] == "allow"
    assert span.attributes["extauthz.deployment"] == "jwt"
    assert span.attributes["url.path"] == "/jwt/x" and span.attributes["http.request.method"] == "GET"
    access = server.line("rid-trace-1", "access")
    assert access["traceId"] == TRACE_ID


def test_falls_back_to_the_request_traceparent_header(traced: Any, rsa_key: Any) -> None:
    server, receiver = traced
    check(server, "/jwt/x", rsa_key.sign(claims()), "rid-trace-2",
          headers={"traceparent": f"00-{TRACE_ID[::-1]}-{PARENT}-01"})
    span = span_of(receiver, "rid-trace-2")
    assert span.trace_id == TRACE_ID[::-1] and span.parent_span_id == PARENT


def test_falls_back_to_b3_headers(traced: Any, rsa_key: Any) -> None:
    server, receiver = traced
    check(server, "/jwt/x", rsa_key.sign(claims()), "rid-trace-b3",
          headers={"x-b3-traceid": TRACE_ID, "x-b3-spanid": PARENT, "x-b3-sampled": "1"})
    span = span_of(receiver, "rid-trace-b3")
    assert span.trace_id == TRACE_ID and span.parent_span_id == PARENT


def test_idp_call_gets_a_client_span_and_the_failure_is_on_the_check_span(traced: Any, idp: FaultyIdp) -> None:
    server, receiver = traced
    resp = check(server, "/opaque/x", "opaque-token-value", "rid-trace-3",
                 metadata=[("traceparent", f"00-{TRACE_ID}-{PARENT}-01")])
    assert resp.denied_response.status.code == 500
    spans = wait_until(lambda: (lambda ss: ss if len(ss) == 2 else None)(
        [s for s in receiver.snapshot() if s.trace_id == TRACE_ID and s.name in ("idp.introspection", "envoy.service.auth.v3.Authorization/Check")
         and (s.name != "envoy.service.auth.v3.Authorization/Check" or s.attributes.get("extauthz.request_id") == "rid-trace-3")]),
        timeout=15, what="the check and idp.introspection spans")
    check_span = next(s for s in spans if s.name.endswith("/Check"))
    idp_span = next(s for s in spans if s.name == "idp.introspection")
    assert check_span.attributes["extauthz.reason"] == "idp_call_failed"
    assert idp_span.parent_span_id == check_span.span_id and idp_span.kind == 3  # CLIENT
    assert idp_span.attributes["http.response.status_code"] == 500
    assert idp_span.attributes["error.type"] == "500"
    assert idp_span.attributes["url.full"] == idp.url + INTROSPECT
    # the outgoing request carried the IdP span's context
    assert idp.requests(INTROSPECT)[-1].headers.get("traceparent") == f"00-{TRACE_ID}-{idp_span.span_id}-01"
    line = server.line("rid-trace-3", "authentication.idpCallFailed")
    assert line["traceId"] == TRACE_ID
    for s in receiver.snapshot():
        assert "opaque-token-value" not in repr(s) and "not-a-real-secret" not in repr(s)


def test_cache_results_are_span_events_not_spans(traced: Any) -> None:
    server, receiver = traced
    check(server, "/opaque/x", "another-opaque-token", "rid-trace-4")
    span = span_of(receiver, "rid-trace-4")
    assert ("cache", {"extauthz.cache": "miss", "extauthz.cache.name": "introspection"}) in span.events
    assert span.attributes["extauthz.cache"] == "miss"
    assert not [s for s in receiver.snapshot() if "cache" in s.name]


# -- credentials never reach a span, even with every header captured ----------------------------

CAPTURE_EVERY_HEADER = {
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST": ".*",
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_RESPONSE": ".*",
}
SET_COOKIE = "idp_session=IDP-COOKIE-MARKER; HttpOnly"


@dataclass
class Capturing:
    server: ExtauthzProcess
    receiver: OtlpReceiver
    secret: str


@pytest.fixture
def capturing(tmp_path: Path) -> Iterator[Capturing]:
    """Two introspecting deployments (Basic and form credentials) at an IdP that finds every token
    active and sets a session cookie; every header of the IdP calls captured."""
    secret = secrets.token_urlsafe(24)
    with FaultyIdp(tls=False) as idp:
        active = Fault.json({"active": True, **claims()}, headers={"set-cookie": SET_COOKIE})
        uri = idp.introspection(INTROSPECT, fault=active)

        def deployment(name: str, auth_method: str) -> dict[str, Any]:
            return {"name": name, "pathPrefix": f"/{name}", "authentication": {
                "type": "TOKEN_AUTHENTICATION", "validationPolicy": {
                    "type": "REMOTE_INTROSPECTION", "uri": uri, "clientDetails": {
                        "clientId": "rs", "clientSecretEnv": "TRACING_TEST_SECRET", "authMethod": auth_method}}}}

        config = {"deployments": [deployment("basic", "client_secret_basic"), deployment("post", "client_secret_post")]}
        with OtlpReceiver() as receiver:
            env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
                   "TRACING_TEST_SECRET": secret, **CAPTURE_EVERY_HEADER}
            with ExtauthzProcess(config, tmp_path / "server", env=env) as server:
                yield Capturing(server, receiver, secret)


def test_credentials_never_reach_a_span_even_when_every_header_is_captured(capturing: Capturing) -> None:
    """With OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_*=".*", the idp.introspection span
    keeps the headers that are not credentials, but the Basic client credentials and the IdP's
    Set-Cookie are redacted, and the client_secret_post form body is recorded nowhere."""
    server, receiver, secret = capturing.server, capturing.receiver, capturing.secret
    tokens = {"basic": secrets.token_urlsafe(24), "post": secrets.token_urlsafe(24)}
    for name, token in tokens.items():
        assert server.check(token, path=f"/{name}/x").allowed
    spans = wait_until(lambda: (lambda ss: ss if len(ss) == 2 else None)(
        [s for s in receiver.snapshot() if s.name == "idp.introspection"]), timeout=15, what="two idp.introspection spans")
    # client_secret_basic: the Authorization header was captured, and its value redacted
    (basic,) = [s for s in spans if "http.request.header.authorization" in s.attributes]
    assert basic.attributes["http.request.header.authorization"] == ["[REDACTED]"]
    for span in spans:
        attributes = span.attributes
        # the capture variables are in force for the headers that are not credentials...
        assert attributes["http.request.header.content_type"] == ["application/x-www-form-urlencoded"]
        assert attributes["http.response.header.content_type"] == ["application/json"]
        # ...and the IdP's cookie is not exported
        assert attributes["http.response.header.set_cookie"] == ["[REDACTED]"], attributes
    credentials = base64.b64encode(f"rs:{secret}".encode()).decode()
    text = repr(receiver.snapshot())
    for needle in (secret, credentials, "IDP-COOKIE-MARKER", *tokens.values()):
        assert needle not in text, needle
