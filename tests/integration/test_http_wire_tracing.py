"""Traces on the HTTP wire: the check span is the child of the incoming traceparent, the IdP
call's span the child of the check span, exactly as on gRPC (docs/traces.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.faulty_idp import Fault, FaultyIdp
from tests.integration.serverproc import ExtauthzProcess, free_port
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.waiting import wait_until

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
INTROSPECT = "/introspect"


@pytest.fixture
def traced(tmp_path: Path) -> Iterator[tuple[int, OtlpReceiver, FaultyIdp]]:
    with FaultyIdp(tls=False) as idp, OtlpReceiver() as receiver:
        idp.introspection(INTROSPECT, fault=Fault.status_code(500))
        config = {"deployments": [{"name": "opaque", "pathPrefix": "/opaque", "authentication": {
            "type": "TOKEN_AUTHENTICATION", "validationPolicy": {
                "type": "REMOTE_INTROSPECTION", "uri": idp.url + INTROSPECT,
                "clientDetails": {"clientId": "rs", "clientSecretEnv": "HTTP_TRACING_SECRET"}}}}]}  # fmt: skip
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
               "HTTP_TRACING_SECRET": "not-a-real-secret"}  # fmt: skip
        port = free_port()
        args = ["--http-listen", f"127.0.0.1:{port}"]
        with ExtauthzProcess(config, tmp_path / "server", env=env, args=args):
            yield port, receiver, idp


def test_the_check_span_joins_the_incoming_trace_and_parents_the_idp_span(traced: Any) -> None:
    port, receiver, idp = traced
    headers = {"host": "api.example.com", "authorization": "Bearer opaque-http-token",
               "x-request-id": "h-trace", "traceparent": f"00-{TRACE_ID}-{PARENT}-01"}  # fmt: skip
    answer = httpx.get(f"http://127.0.0.1:{port}/opaque/1", headers=headers, timeout=10)
    assert answer.status_code == 500 and answer.headers["x-extauthz-reason"] == "idp_call_failed"

    def both() -> list[ReceivedSpan] | None:
        spans = [s for s in receiver.snapshot() if s.trace_id == TRACE_ID]
        return spans if len(spans) == 2 else None

    spans = wait_until(both, timeout=15, what="the check and idp.introspection spans")
    check_span = next(s for s in spans if s.name.endswith("/Check"))
    idp_span = next(s for s in spans if s.name == "idp.introspection")
    assert check_span.parent_span_id == PARENT and check_span.kind == 2  # SERVER
    assert check_span.attributes["extauthz.wire"] == "http"
    assert check_span.attributes["extauthz.request_id"] == "h-trace"
    assert check_span.attributes["extauthz.reason"] == "idp_call_failed"
    assert idp_span.parent_span_id == check_span.span_id
    assert idp.requests(INTROSPECT)[-1].headers.get("traceparent") == f"00-{TRACE_ID}-{idp_span.span_id}-01"
    for span in receiver.snapshot():
        assert "opaque-http-token" not in repr(span) and "not-a-real-secret" not in repr(span)
