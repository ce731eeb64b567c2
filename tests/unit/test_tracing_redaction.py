"""Credentials never reach an exported span, whatever the header-capture variables say.

The spans are made by the real OpenTelemetry httpx instrumentation on a real IdP request
(``fetch_json`` over ``httpx.MockTransport``) and exported through extauthz's exporter wrapper to
the SDK's in-memory exporter, with ``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_*=".*"``.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from extauthz import tracing
from extauthz.idp.http import fetch_json

SECRET = "s3cr3t-CLIENT-SECRET"
BASIC = "Basic " + base64.b64encode(f"rs:{SECRET}".encode()).decode()
TOKEN = "opaque-TOKEN-VALUE"
REQUEST_CREDENTIALS = {
    "authorization": BASIC,
    "proxy-authorization": "Basic cHJveHk6UFJPWFktU0VDUkVU",
    "cookie": "session=COOKIE-SECRET",
    "dpop": "eyJ0eXAiOiJkcG9wK2p3dCJ9.DPOP-PROOF.sig",
}
SET_COOKIE = "idp_session=SET-COOKIE-SECRET; HttpOnly"
NEEDLES = [SECRET, BASIC, TOKEN, "PROXY", "cHJveHk6UFJPWFktU0VDUkVU", "COOKIE-SECRET", "DPOP-PROOF",
           "url-password", BASIC.removeprefix("Basic ")]


@dataclass
class Pipeline:
    """A tracer provider whose spans go through extauthz's exporter wrapper into memory."""

    provider: TracerProvider
    memory: InMemorySpanExporter


@pytest.fixture
def pipeline(monkeypatch: pytest.MonkeyPatch) -> Iterator[Pipeline]:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST", ".*")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_RESPONSE", ".*")
    monkeypatch.delenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS", raising=False)
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(tracing.CredentialRedactingExporter(memory)))
    yield Pipeline(provider, memory)
    provider.shutdown()


def introspect(pipeline: Pipeline, url: str, **form: str) -> ReadableSpan:
    """One introspection request through the instrumented client; its exported span."""

    def idp(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, json={"active": False}, headers={"set-cookie": SET_COOKIE, "x-idp": "visible"}
        )

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(idp)) as client:
            tracing.instrument_client(client, pipeline.provider)
            await fetch_json(client, "introspection_endpoint", url, timeout=5, method="POST",
                             data={"token": TOKEN, **form}, headers=REQUEST_CREDENTIALS)

    asyncio.run(run())
    (span,) = pipeline.memory.get_finished_spans()
    return span


def all_text(span: ReadableSpan) -> str:
    attributes: dict[str, Any] = dict(span.attributes or {})
    events = [(e.name, dict(e.attributes or {})) for e in span.events]
    return repr((span.name, attributes, events))


def test_captured_credential_headers_are_redacted_and_nothing_else_is(pipeline: Pipeline) -> None:
    span = introspect(pipeline, "https://idp.example.com/introspect", client_secret=SECRET)
    attributes = dict(span.attributes or {})
    assert span.name == "idp.introspection"
    # The capture variables are honoured for every other header...
    assert attributes["http.request.header.content_type"] == ("application/x-www-form-urlencoded",)
    assert attributes["http.response.header.x_idp"] == ("visible",)
    # ...but a credential's value is never exported.
    for name in ("authorization", "proxy_authorization", "cookie", "dpop"):
        assert attributes[f"http.request.header.{name}"] == ("[REDACTED]",), name
    assert attributes["http.response.header.set_cookie"] == ("[REDACTED]",)
    text = all_text(span)
    for needle in NEEDLES:
        assert needle not in text, needle


def test_userinfo_never_reaches_url_full(pipeline: Pipeline) -> None:
    span = introspect(pipeline, "https://idp-user:url-password@idp.example.com:8443/introspect?x=1")
    attributes = dict(span.attributes or {})
    url = attributes.get("url.full", attributes.get("http.url"))
    assert url == "https://idp.example.com:8443/introspect?x=1"
    assert "url-password" not in all_text(span) and "idp-user" not in all_text(span)


@pytest.mark.parametrize(
    ("url", "clean"),
    [
        ("https://u:p@idp.example.com/x?y=1#z", "https://idp.example.com/x?y=1#z"),
        ("https://REDACTED:REDACTED@idp.example.com", "https://idp.example.com"),
        ("https://idp.example.com/a@b", "https://idp.example.com/a@b"),  # an @ in the path is not userinfo
        ("https://idp.example.com?next=a@b", "https://idp.example.com?next=a@b"),
        ("http://a:b@c@idp.example.com:80/", "http://idp.example.com:80/"),
        ("not a url", "not a url"),
    ],
)
def test_url_without_userinfo(url: str, clean: str) -> None:
    assert tracing.url_without_userinfo(url) == clean


def test_body_attributes_are_dropped_whoever_records_them() -> None:
    attributes = {
        "http.request.body": "token=t&client_secret=s",
        "http.request.body.content": "client_secret=s",
        "http.response.body": '{"active":true}',
        "http.request.body.size": 42,
        "http.request.header.Proxy-Authorization": ("Basic x",),
        "http.response.header.www_authenticate": ('Basic realm="idp"',),
        "url.full": "https://u:p@idp/x",
        "http.response.status_code": 200,
    }
    assert tracing.redacted_attributes(attributes) == {
        "http.request.body.size": 42,
        "http.request.header.Proxy-Authorization": ("[REDACTED]",),
        "http.response.header.www_authenticate": ('Basic realm="idp"',),
        "url.full": "https://idp/x",
        "http.response.status_code": 200,
    }
    clean = {"url.full": "https://idp/x", "http.request.header.accept": ("application/json",)}
    assert tracing.redacted_attributes(clean) is None  # nothing to change: no copy
