"""The gRPC servicer in-process: what it logs when Envoy abandons a check."""

from __future__ import annotations

import asyncio
import io
import json
import time
from typing import Any

import pytest

from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from extauthz.config import parse_config
from extauthz.logs import JsonLogger
from extauthz.metrics import Metrics
from extauthz.server import AuthorizationService, lift_request
from tests.check_requests import ServicerContext, check_request
from tests.fake_idp import INTROSPECT, FakeIdp
from tests.waiting import wait_until_async


def _introspecting_service(
    monkeypatch: pytest.MonkeyPatch, idp: FakeIdp
) -> tuple[AuthorizationService, io.StringIO]:
    """The servicer on one REMOTE_INTROSPECTION deployment whose IdP is ``idp``; its log."""
    monkeypatch.setenv("SERVICER_TEST_SECRET", "s")
    cfg = parse_config({"deployments": [{"name": "o", "pathPrefix": "/", "authentication": {
        "type": "TOKEN_AUTHENTICATION", "validationPolicy": {
            "type": "REMOTE_INTROSPECTION", "uri": INTROSPECT,
            "clientDetails": {"clientId": "c", "clientSecretEnv": "SERVICER_TEST_SECRET"}}}}]})
    out = io.StringIO()
    return AuthorizationService(idp.engine(cfg), JsonLogger(stream=out), Metrics()), out


def _http(headers: dict[str, str], path: str = "/x") -> ext.CheckRequest:
    return check_request(path, host="h", headers=headers)


def test_a_check_envoy_abandons_still_gets_an_access_line(monkeypatch: pytest.MonkeyPatch) -> None:
    idp = FakeIdp()
    idp.delay = 60  # the IdP never answers in time
    service, out = _introspecting_service(monkeypatch, idp)
    request = _http({"x-request-id": "rid-cancelled", "authorization": "Bearer opaque"}, path="/x?q=1")

    async def run() -> None:
        task = asyncio.ensure_future(service.Check(request, ServicerContext()))
        await idp.until_called("/introspect")  # the check is waiting on the IdP: Envoy gives up
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    lines: list[dict[str, Any]] = [json.loads(line) for line in out.getvalue().splitlines()]
    (access,) = [line for line in lines if line["event"] == "access"]
    assert access["requestId"] == "rid-cancelled" and access["reason"] == "cancelled"
    assert access["decision"] == "deny" and access["status"] == 0 and access["path"] == "/x"
    assert "opaque" not in out.getvalue()


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
    idp = FakeIdp()
    idp.answer = {"active": True, "sub": "svc"}
    service, out = _introspecting_service(monkeypatch, idp)

    async def run() -> None:
        for i in range(3):
            await service.Check(_http({"X-Request-Id": f"rid-{i}", "authorization": "Bearer opaque"}), ServicerContext())

    asyncio.run(run())
    access = [json.loads(line) for line in out.getvalue().splitlines() if '"access"' in line]
    assert [a["requestId"] for a in access] == ["rid-0", "rid-1", "rid-2"]
    assert [a["idpCalls"] for a in access] == [1, 0, 0] and {a["decision"] for a in access} == {"allow"}


def test_envoy_deadline_bounds_the_idp_call_and_extauthz_answers_first(monkeypatch: pytest.MonkeyPatch) -> None:
    idp = FakeIdp()
    idp.delay = 60  # hangs, far past timeoutSeconds (5 s by default)
    service, out = _introspecting_service(monkeypatch, idp)

    async def run() -> tuple[ext.CheckResponse, float]:
        started = time.monotonic()
        responses = [
            await service.Check(_http({"x-request-id": f"rid-{i}", "authorization": f"Bearer t{i}"}), ServicerContext(0.6))
            for i in range(2)
        ]
        return responses[0], (time.monotonic() - started) / 2

    response, seconds = asyncio.run(run())
    assert response.status.code == 14 and 0.3 < seconds < 0.6  # UNAVAILABLE, before Envoy's 0.6 s
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    failed = [line for line in lines if line["event"] == "authentication.idpCallFailed"]
    assert failed[0]["requestId"] == "rid-0" and failed[0]["detail"] == "the check's deadline"
    (warning,) = [line for line in lines if line["event"] == "config.timeoutTooLong"]  # once per config
    assert warning["deployment"] == "o" and warning["envoyTimeoutSeconds"] == 0.6 and warning["worstCaseSeconds"] == 5


def test_a_cancelled_check_names_its_deployment_and_route_and_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    idp = FakeIdp()
    idp.delay = 60
    service, out = _introspecting_service(monkeypatch, idp)

    async def run() -> None:
        task = asyncio.ensure_future(service.Check(_http({"x-request-id": "rid-c", "authorization": "Bearer o"}), ServicerContext()))
        await idp.until_called("/introspect")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    (cancelled,) = [line for line in lines if line["event"] == "server.checkCancelled"]
    assert cancelled["requestId"] == "rid-c" and cancelled["deployment"] == "o" and cancelled["reason"] == "cancelled"
    assert cancelled["elapsedMs"] > 0
    (access,) = [line for line in lines if line["event"] == "access"]
    assert access["deployment"] == "o" and access["reason"] == "cancelled"
    metrics = service.serving.metrics
    metrics.flush()
    labels = {"deployment": "o", "decision": "deny", "reason": "cancelled", "wire": "grpc"}
    assert metrics.registry.get_sample_value("extauthz_checks_total", labels) == 1


def test_the_idp_call_a_cancelled_check_waited_for_is_logged_when_it_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    idp = FakeIdp()
    idp.answer = {"active": True, "sub": "svc"}
    idp.delay = 0.3  # answers, but after Envoy gave up
    service, out = _introspecting_service(monkeypatch, idp)

    async def run() -> None:
        task = asyncio.ensure_future(service.Check(_http({"x-request-id": "rid-a", "authorization": "Bearer t0k3n-abandoned"}), ServicerContext()))
        await idp.until_called("/introspect")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until_async(lambda: "abandonedCallEnded" in out.getvalue(), what="the abandoned call's line")

    asyncio.run(run())
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    (cancelled,) = [line for line in lines if line["event"] == "server.checkCancelled"]
    assert cancelled["endpoint"] == "introspection_endpoint" and cancelled["uri"] == INTROSPECT
    (ended,) = [line for line in lines if line["event"] == "server.abandonedCallEnded"]
    assert ended["requestId"] == "rid-a" and ended["outcome"] == "ok" and 0 < ended["afterCancelMs"] < 5000
    assert "t0k3n-abandoned" not in out.getvalue()
