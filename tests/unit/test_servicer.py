"""The gRPC servicer in-process: what it logs when Envoy abandons a check."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from extauthz._pb.envoy.service.auth.v3 import attribute_context_pb2 as ac
from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from extauthz.config import parse_config
from extauthz.engine import Engine
from extauthz.idp import Providers
from extauthz.logs import JsonLogger
from extauthz.metrics import Metrics
from extauthz.server import AuthorizationService, lift_request


class _Context:
    def invocation_metadata(self) -> tuple[()]:
        return ()


def _introspecting_service(
    monkeypatch: pytest.MonkeyPatch, idp: Callable[[httpx.Request], Awaitable[httpx.Response]]
) -> tuple[AuthorizationService, io.StringIO]:
    """The servicer on one REMOTE_INTROSPECTION deployment whose IdP is ``idp``; its log."""
    monkeypatch.setenv("SERVICER_TEST_SECRET", "s")
    cfg = parse_config({"deployments": [{"name": "o", "pathPrefix": "/", "authentication": {
        "type": "TOKEN_AUTHENTICATION", "validationPolicy": {
            "type": "REMOTE_INTROSPECTION", "uri": "https://idp.example.com/i",
            "clientDetails": {"clientId": "c", "clientSecretEnv": "SERVICER_TEST_SECRET"}}}}]})
    transport = httpx.MockTransport(idp)
    providers = Providers(cfg, client_factory=lambda _t: httpx.AsyncClient(transport=transport))
    out = io.StringIO()
    return AuthorizationService(Engine(cfg, providers.by_deployment), JsonLogger(stream=out), Metrics()), out


def test_a_check_envoy_abandons_still_gets_an_access_line(monkeypatch: pytest.MonkeyPatch) -> None:
    async def never(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(60)
        raise AssertionError("not reached")

    service, out = _introspecting_service(monkeypatch, never)
    request = ext.CheckRequest(attributes=ac.AttributeContext(request=ac.AttributeContext.Request(
        http=ac.AttributeContext.HttpRequest(method="GET", host="h", path="/x?q=1", headers={
            "x-request-id": "rid-cancelled", "authorization": "Bearer opaque"}))))

    async def run() -> None:
        task = asyncio.ensure_future(service.Check(request, _Context()))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    lines: list[dict[str, Any]] = [json.loads(line) for line in out.getvalue().splitlines()]
    (access,) = [line for line in lines if line["event"] == "access"]
    assert access["requestId"] == "rid-cancelled" and access["reason"] == "cancelled"
    assert access["decision"] == "deny" and access["status"] == 0 and access["path"] == "/x"
    assert "opaque" not in out.getvalue()


def _http(headers: dict[str, str]) -> ext.CheckRequest:
    return ext.CheckRequest(attributes=ac.AttributeContext(request=ac.AttributeContext.Request(
        http=ac.AttributeContext.HttpRequest(method="GET", host="h", path="/x", headers=headers))))


def test_header_names_are_matched_lower_case_whatever_the_client_sent() -> None:
    inp, request_id = lift_request(_http({"Authorization": "Bearer t1", "X-Request-Id": "rid-mixed"}))
    assert inp.headers.get("authorization") == "Bearer t1" and request_id == "rid-mixed"
    assert dict(inp.headers) == {"authorization": "Bearer t1", "x-request-id": "rid-mixed"}
    # Both spellings sent: the lower-case one (what Envoy itself would send) wins, every time.
    inp, _ = lift_request(_http({"Authorization": "Bearer upper", "authorization": "Bearer lower"}))
    assert inp.headers["authorization"] == "Bearer lower" and dict(inp.headers) == {"authorization": "Bearer lower"}
    inp, request_id = lift_request(_http({}))
    assert inp.headers.get("authorization") is None and len(inp.headers) == 0 and len(request_id) == 36


def test_the_fast_lane_finds_a_mixed_case_request_id_like_the_whole_path(monkeypatch: pytest.MonkeyPatch) -> None:
    async def active(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"active": True, "sub": "svc"})

    service, out = _introspecting_service(monkeypatch, active)

    async def run() -> None:
        for i in range(3):
            await service.Check(_http({"X-Request-Id": f"rid-{i}", "authorization": "Bearer opaque"}), _Context())

    asyncio.run(run())
    access = [json.loads(line) for line in out.getvalue().splitlines() if '"access"' in line]
    assert [a["requestId"] for a in access] == ["rid-0", "rid-1", "rid-2"]
    assert [a["idpCalls"] for a in access] == [1, 0, 0] and {a["decision"] for a in access} == {"allow"}
