"""The server as a user runs it: `python -m extauthz serve`, spoken to over real gRPC."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extauthz._pb.envoy.service.auth.v3 import attribute_context_pb2 as ac
from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from tests.check_requests import check_request
from tests.configmap import ConfigMapVolume
from tests.conftest import claims
from tests.integration.serverproc import ExtauthzProcess, free_port, run_extauthz
from tests.policies import orders
from tests.waiting import stays, wait_until

ORDER = "/orders/1"


@pytest.fixture
def config(rsa_key: Any) -> dict[str, Any]:
    static = {
        "type": "STATIC_KEYS",
        "keys": [rsa_key.public_jwk],
        "additionalValidationPolicy": {"issuers": ["https://idp.example.com"]},
    }
    return {"deployments": [orders(static, headersFromClaims={"x-auth-subject": "sub"})]}


@pytest.fixture
def server(config: dict[str, Any], tmp_path: Path) -> Iterator[ExtauthzProcess]:
    with ExtauthzProcess(config, tmp_path / "server", grace_seconds=5) as running:
        yield running


def test_allow_deny_and_log_lines(server: ExtauthzProcess, rsa_key: Any) -> None:
    token = rsa_key.sign(claims())
    ok = server.check(token, path=ORDER)
    assert ok.grpc_code == 0
    assert [(h.header.key, h.header.value) for h in ok.response.ok_response.headers] == [("x-auth-subject", "alice")]
    denied = server.check(rsa_key.sign(claims(exp=1)), path=ORDER)
    assert denied.grpc_code == 16 and denied.http_status == 401
    lines = wait_until(
        lambda: found if len(found := server.lines_for(denied.request_id)) == 2 else None,
        timeout=15,
        what="the denial's two log lines",
    )
    failure = next(line for line in lines if line["event"] == "tokenAuthentication.authenticationFailed")
    assert failure["reason"] == "token_expired" and failure["message"] == "Validation failed for 'exp' claim."
    access = next(line for line in lines if line["event"] == "access")
    assert access["decision"] == "deny" and access["status"] == 401 and access["path"] == ORDER
    assert access["deployment"] == "orders" and access["idpCalls"] == 0
    for line in server.lines():
        assert {"ts", "level", "event", "requestId"} <= line.keys()
        assert line["ts"].endswith("Z")
    assert token not in server.text()


@pytest.mark.parametrize(
    "request_msg",
    [
        ext.CheckRequest(),
        ext.CheckRequest(attributes=ac.AttributeContext(request=ac.AttributeContext.Request())),
        check_request("\x00\xff/orders/%%", method="", host="", headers={"authorization": "Bearer \x01"}),
    ],
    ids=["empty", "no-http", "odd-path"],
)
def test_malformed_check_requests_get_a_denial(server: ExtauthzProcess, request_msg: ext.CheckRequest) -> None:
    resp = server.send(request_msg, timeout=5)
    assert resp.status.code != 0
    # Without a path, or with a path not in normal form: request_ambiguous (400); else 401/403.
    assert resp.denied_response.status.code in (400, 401, 403)
    assert server.proc is not None and server.proc.poll() is None


def test_health_and_admin(server: ExtauthzProcess) -> None:
    stub = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", "envoy.service.auth.v3.Authorization"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    assert server.admin("healthz")[0] == 200
    server.check(None, path=ORDER)
    text = server.metrics_text()
    assert 'extauthz_checks_total{decision="deny",deployment="orders",reason="token_missing",wire="grpc"} 1.0' in text


def test_the_event_loop_is_uvloop_unless_asyncio_is_asked_for(
    server: ExtauthzProcess, config: dict[str, Any], tmp_path: Path, rsa_key: Any
) -> None:
    (started,) = server.events("server.started")
    assert started["eventLoop"] == "uvloop"  # a dependency wherever it builds
    with ExtauthzProcess(config, tmp_path / "plain", args=("--event-loop", "asyncio")) as plain:
        (started,) = plain.events("server.started")
        assert started["eventLoop"] == "asyncio"
        assert plain.check(rsa_key.sign(claims()), path=ORDER).grpc_code == 0
        assert plain.stop(timeout=15) == 0


def test_sigterm_exits_cleanly(server: ExtauthzProcess) -> None:
    assert server.stop(timeout=15) == 0
    events = [line["event"] for line in server.lines()]
    assert events[-2:] == ["server.stopping", "server.stopped"]


def test_invalid_config_refuses_to_start(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("deployments:\n  - name: x\n    pathPrefix: /x\n    bogus: 1\n")
    res = run_extauthz(
        "serve", "--config", str(cfg), "--listen", f"127.0.0.1:{free_port()}",
        "--admin-listen", f"127.0.0.1:{free_port()}", timeout=30,
    )  # fmt: skip
    assert res.returncode == 2
    assert "deployments[0].bogus: unknown key" in res.stderr


def test_config_reload_by_symlink_swap(config: dict[str, Any], tmp_path: Path, rsa_key: Any) -> None:
    """The file is updated the way Kubernetes updates a mounted ConfigMap: a new directory, then
    an atomic rename of the `..data` symlink."""
    volume = ConfigMapVolume(tmp_path / "cm")
    volume.write(yaml.safe_dump(config))
    with ExtauthzProcess(None, tmp_path / "server", config_file=volume.path) as server:
        token = rsa_key.sign(claims())
        assert server.check(token, path=ORDER).grpc_code == 0
        assert server.check(token, path="/billing/1").http_status == 403

        # 1. a valid new policy: /billing appears, /orders is gone
        new = copy.deepcopy(config)
        new["deployments"][0]["name"] = "billing"
        new["deployments"][0]["pathPrefix"] = "/billing"
        volume.write(yaml.safe_dump(new))
        wait_until(lambda: server.events("config.reloaded"), timeout=15, what="config.reloaded")
        assert server.check(token, path="/billing/1").grpc_code == 0
        assert server.check(token, path=ORDER).http_status == 403

        # 2. an invalid file: every error logged, the previous policy keeps serving
        broken = copy.deepcopy(new)
        broken["deployments"][0]["bogus"] = 1
        volume.write(yaml.safe_dump(broken))
        (failed,) = wait_until(
            lambda: server.events("config.reloadFailed"), timeout=15, what="config.reloadFailed"
        )
        assert failed["errors"] == ["deployments[0].bogus: unknown key"]
        assert server.check(token, path="/billing/1").grpc_code == 0
        assert server.proc is not None and server.proc.poll() is None


def test_readyz_reports_providers(server: ExtauthzProcess) -> None:
    body = json.loads(server.admin("readyz")[1])
    assert body["ready"] is True and body["deployments"] == 1 and body["providers"] == []


def test_metrics_match_a_scripted_mix_exactly(server: ExtauthzProcess, rsa_key: Any) -> None:
    good, expired = rsa_key.sign(claims()), rsa_key.sign(claims(exp=1))
    wrong_iss = rsa_key.sign(claims(iss="https://evil.example.com"))
    mix = [(good, ORDER)] * 7 + [(expired, ORDER)] * 3 + [(None, ORDER)] * 2 + [
        (wrong_iss, ORDER)] * 4 + [(good, "/nothing")] * 5
    for token, path in mix:
        server.check(token, path=path)
    checks = "extauthz_checks_total"
    assert server.metric(checks, deployment="orders", decision="allow", reason="none") == 7
    assert server.metric(checks, deployment="orders", decision="deny", reason="token_expired") == 3
    assert server.metric(checks, deployment="orders", decision="deny", reason="token_missing") == 2
    assert server.metric(checks, deployment="orders", decision="deny", reason="issuer_mismatch") == 4
    assert server.metric(checks, deployment="", decision="deny", reason="no_matching_policy") == 5
    assert server.metric("extauthz_check_duration_seconds_count") == len(mix)
    text = server.metrics_text()
    assert 'le="0.0001"' in text and 'le="10.0"' in text  # sub-millisecond to multi-second buckets


def test_workers_share_the_port_and_the_metrics(config: dict[str, Any], tmp_path: Path, rsa_key: Any) -> None:
    with ExtauthzProcess(config, tmp_path / "server", workers=2) as server:
        token = rsa_key.sign(claims())
        # separate channels: the kernel balances connections, not streams
        for _ in range(20):
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = ext_grpc.AuthorizationStub(ch)  # type: ignore[no-untyped-call]
                assert stub.Check(check_request(ORDER, token=token), timeout=5).status.code == 0

        def allowed() -> float:
            return server.metric("extauthz_checks_total", deployment="orders", decision="allow", reason="none")

        # Each worker adds its checks to the shared series every 50 ms: wait for the last batch.
        wait_until(lambda: allowed() == 20, timeout=5, what="20 allowed checks in the workers' metrics")
        stays(lambda: allowed() == 20, seconds=0.2, what="20 allowed checks, and no more")
        ready = json.loads(server.admin("readyz")[1])
        assert ready["ready"] is True and ready["workersAlive"] == ready["workersListening"] == 2
        access = wait_until(
            lambda: lines if len(lines := server.events("access")) == 20 else None,
            timeout=15,
            what="20 access lines",
        )
        assert len({line["requestId"] for line in access}) == 20
        assert server.stop(timeout=30) == 0
