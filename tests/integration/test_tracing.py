"""Traces from the real server process to a real OTLP/gRPC receiver."""

from __future__ import annotations

import base64
import http.server
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from extauthz._pb.envoy.service.auth.v3 import attribute_context_pb2 as ac
from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from tests.conftest import claims
from tests.integration.serverproc import ExtauthzProcess
from tests.integration.test_server import ROOT, Server, free_port, wait_for
from tests.otlp_receiver import OtlpReceiver

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class Failing(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        Failing.traceparents.append(self.headers.get("traceparent"))
        self.send_response(500)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass

    traceparents: list[str | None] = []


@pytest.fixture
def idp() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/introspect"
    server.shutdown()
    server.server_close()


@pytest.fixture
def traced(tmp_path: Path, rsa_key: Any, idp: str) -> Iterator[tuple[Server, OtlpReceiver]]:
    config = {"deployments": [
        {"name": "jwt", "pathPrefix": "/jwt", "authentication": {"type": "TOKEN_AUTHENTICATION",
         "validationPolicy": {"type": "STATIC_KEYS", "keys": [rsa_key.public_jwk]}}},
        {"name": "opaque", "pathPrefix": "/opaque", "authentication": {"type": "TOKEN_AUTHENTICATION",
         "validationPolicy": {"type": "REMOTE_INTROSPECTION", "uri": idp,
                              "clientDetails": {"clientId": "rs", "clientSecretEnv": "TRACING_TEST_SECRET"}}}},
    ]}
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    port, admin = free_port(), free_port()
    log = tmp_path / "server.log"
    with OtlpReceiver() as receiver:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
               "OTEL_BSP_SCHEDULE_DELAY": "100", "TRACING_TEST_SECRET": "not-a-real-secret"}
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "extauthz", "serve", "--config", str(cfg), "--listen", f"127.0.0.1:{port}",
                 "--admin-listen", f"127.0.0.1:{admin}"], stdout=out, stderr=subprocess.STDOUT, env=env)
        server = Server(proc, log, port, admin)  # type: ignore[arg-type]
        try:
            wait_for(lambda: any(l["event"] == "server.started" for l in server.lines()), what="start")
            yield server, receiver
        finally:
            server.channel.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)


def check(server: Server, path: str, token: str, request_id: str, *, metadata: Any = None, headers: dict[str, str] | None = None) -> ext.CheckResponse:
    req = ext.CheckRequest(attributes=ac.AttributeContext(request=ac.AttributeContext.Request(
        http=ac.AttributeContext.HttpRequest(method="GET", host="h", path=path, headers={
            "x-request-id": request_id, "authorization": f"Bearer {token}", **(headers or {})}))))
    return server.stub.Check(req, metadata=metadata, timeout=10)


def test_check_span_is_a_child_of_envoys_span_from_grpc_metadata(traced: Any, rsa_key: Any) -> None:
    server, receiver = traced
    check(server, "/jwt/x", rsa_key.sign(claims()), "rid-trace-1",
          metadata=[("traceparent", f"00-{TRACE_ID}-{PARENT}-01")])
    span = wait_for(lambda: next((s for s in receiver.snapshot() if s.attributes.get("extauthz.request_id") == "rid-trace-1"), None), what="span")
    assert span.trace_id == TRACE_ID and span.parent_span_id == PARENT
    assert span.service == "extauthz" and span.kind == 2  # SERVER
    assert span.attributes["extauthz.decision"] == "allow"
    assert span.attributes["extauthz.deployment"] == "jwt"
    assert span.attributes["url.path"] == "/jwt/x" and span.attributes["http.request.method"] == "GET"
    access = next(l for l in server.lines() if l.get("requestId") == "rid-trace-1" and l["event"] == "access")
    assert access["traceId"] == TRACE_ID


def test_falls_back_to_the_request_traceparent_header(traced: Any, rsa_key: Any) -> None:
    server, receiver = traced
    check(server, "/jwt/x", rsa_key.sign(claims()), "rid-trace-2",
          headers={"traceparent": f"00-{TRACE_ID[::-1]}-{PARENT}-01"})
    span = wait_for(lambda: next((s for s in receiver.snapshot() if s.attributes.get("extauthz.request_id") == "rid-trace-2"), None), what="span")
    assert span.trace_id == TRACE_ID[::-1] and span.parent_span_id == PARENT


def test_falls_back_to_b3_headers(traced: Any, rsa_key: Any) -> None:
    server, receiver = traced
    check(server, "/jwt/x", rsa_key.sign(claims()), "rid-trace-b3",
          headers={"x-b3-traceid": TRACE_ID, "x-b3-spanid": PARENT, "x-b3-sampled": "1"})
    span = wait_for(lambda: next((s for s in receiver.snapshot() if s.attributes.get("extauthz.request_id") == "rid-trace-b3"), None), what="span")
    assert span.trace_id == TRACE_ID and span.parent_span_id == PARENT


def test_idp_call_gets_a_client_span_and_the_failure_is_on_the_check_span(traced: Any, idp: str) -> None:
    server, receiver = traced
    Failing.traceparents.clear()
    resp = check(server, "/opaque/x", "opaque-token-value", "rid-trace-3",
                 metadata=[("traceparent", f"00-{TRACE_ID}-{PARENT}-01")])
    assert resp.denied_response.status.code == 500
    spans = wait_for(lambda: (lambda ss: ss if len(ss) == 2 else None)(
        [s for s in receiver.snapshot() if s.trace_id == TRACE_ID and s.name in ("idp.introspection", "envoy.service.auth.v3.Authorization/Check")
         and (s.name != "envoy.service.auth.v3.Authorization/Check" or s.attributes.get("extauthz.request_id") == "rid-trace-3")]), what="spans")
    check_span = next(s for s in spans if s.name.endswith("/Check"))
    idp_span = next(s for s in spans if s.name == "idp.introspection")
    assert check_span.attributes["extauthz.reason"] == "idp_call_failed"
    assert idp_span.parent_span_id == check_span.span_id and idp_span.kind == 3  # CLIENT
    assert idp_span.attributes["http.response.status_code"] == 500
    assert idp_span.attributes["error.type"] == "500"
    assert idp_span.attributes["url.full"] == idp
    # the outgoing request carried the IdP span's context
    assert Failing.traceparents[-1] == f"00-{TRACE_ID}-{idp_span.span_id}-01"
    line = next(l for l in server.lines() if l.get("requestId") == "rid-trace-3" and l["event"] == "authentication.idpCallFailed")
    assert line["traceId"] == TRACE_ID
    for s in receiver.snapshot():
        assert "opaque-token-value" not in repr(s) and "not-a-real-secret" not in repr(s)


def test_cache_results_are_span_events_not_spans(traced: Any) -> None:
    server, receiver = traced
    check(server, "/opaque/x", "another-opaque-token", "rid-trace-4")
    span = wait_for(lambda: next((s for s in receiver.snapshot() if s.attributes.get("extauthz.request_id") == "rid-trace-4"), None), what="span")
    assert ("cache", {"extauthz.cache": "miss", "extauthz.cache.name": "introspection"}) in span.events
    assert span.attributes["extauthz.cache"] == "miss"
    assert not [s for s in receiver.snapshot() if "cache" in s.name]


# -- credentials never reach a span, even with every header captured ----------------------------

CAPTURE_EVERY_HEADER = {
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST": ".*",
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_RESPONSE": ".*",
}
SET_COOKIE = "idp_session=IDP-COOKIE-MARKER; HttpOnly"


class Introspecting(http.server.BaseHTTPRequestHandler):
    """An introspection endpoint that finds every token active and sets a session cookie."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.dumps({"active": True, **claims()}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("set-cookie", SET_COOKIE)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class Capturing:
    server: ExtauthzProcess
    receiver: OtlpReceiver
    secret: str


@pytest.fixture
def capturing(tmp_path: Path) -> Iterator[Capturing]:
    idp = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Introspecting)
    threading.Thread(target=idp.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{idp.server_address[1]}/introspect"
    secret = secrets.token_urlsafe(24)

    def deployment(name: str, auth_method: str) -> dict[str, Any]:
        return {"name": name, "pathPrefix": f"/{name}", "authentication": {
            "type": "TOKEN_AUTHENTICATION", "validationPolicy": {
                "type": "REMOTE_INTROSPECTION", "uri": uri, "clientDetails": {
                    "clientId": "rs", "clientSecretEnv": "TRACING_TEST_SECRET", "authMethod": auth_method}}}}

    config = {"deployments": [deployment("basic", "client_secret_basic"), deployment("post", "client_secret_post")]}
    try:
        with OtlpReceiver() as receiver:
            env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
                   "TRACING_TEST_SECRET": secret, **CAPTURE_EVERY_HEADER}
            with ExtauthzProcess(config, tmp_path / "server", env=env) as server:
                yield Capturing(server, receiver, secret)
    finally:
        idp.shutdown()
        idp.server_close()


def test_credentials_never_reach_a_span_even_when_every_header_is_captured(capturing: Capturing) -> None:
    """With OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_*=".*", the idp.introspection span
    keeps the headers that are not credentials, but the Basic client credentials and the IdP's
    Set-Cookie are redacted, and the client_secret_post form body is recorded nowhere."""
    server, receiver, secret = capturing.server, capturing.receiver, capturing.secret
    tokens = {"basic": secrets.token_urlsafe(24), "post": secrets.token_urlsafe(24)}
    for name, token in tokens.items():
        assert server.check(token, path=f"/{name}/x").allowed
    spans = wait_for(lambda: (lambda ss: ss if len(ss) == 2 else None)(
        [s for s in receiver.snapshot() if s.name == "idp.introspection"]), what="two idp.introspection spans")
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
