"""The server as a user runs it: `python -m extauthz serve`, spoken to over real gRPC."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
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
from tests.conftest import claims
from tests.integration.serverproc import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]


class Server:
    def __init__(self, proc: subprocess.Popen[str], log: Path, port: int, admin: int) -> None:
        self.proc, self.log, self.port, self.admin = proc, log, port, admin
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = ext_grpc.AuthorizationStub(self.channel)

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def check(self, token: str | None = None, path: str = "/orders/1", request_id: str = "r-1", **extra: str) -> ext.CheckResponse:
        headers = {"x-request-id": request_id, **extra}
        if token:
            headers["authorization"] = f"Bearer {token}"
        req = ext.CheckRequest(
            attributes=ac.AttributeContext(
                request=ac.AttributeContext.Request(
                    http=ac.AttributeContext.HttpRequest(method="GET", host="api", path=path, headers=headers)
                )
            )
        )
        return self.stub.Check(req, timeout=5)


def start(config: dict[str, Any], tmp: Path, *args: str) -> Server:
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    port, admin = free_port(), free_port()
    log = tmp / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "extauthz", "serve", "--config", str(cfg),
             "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}", "--grace-seconds", "5", *args],
            stdout=out, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    server = Server(proc, log, port, admin)
    wait_for(lambda: any(l["event"] == "server.started" for l in server.lines()) or proc.poll() is not None,
             what="server.started")
    assert proc.poll() is None, log.read_text()
    return server


@pytest.fixture
def config(rsa_key: Any) -> dict[str, Any]:
    return {
        "deployments": [
            {
                "name": "orders",
                "pathPrefix": "/orders",
                "authentication": {
                    "type": "TOKEN_AUTHENTICATION",
                    "validationPolicy": {
                        "type": "STATIC_KEYS",
                        "keys": [rsa_key.public_jwk],
                        "additionalValidationPolicy": {"issuers": ["https://idp.example.com"]},
                    },
                },
                "headersFromClaims": {"x-auth-subject": "sub"},
            }
        ]
    }


@pytest.fixture
def server(config: dict[str, Any], tmp_path: Path) -> Iterator[Server]:
    s = start(config, tmp_path)
    yield s
    s.channel.close()
    if s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait()


def test_allow_deny_and_log_lines(server: Server, rsa_key: Any) -> None:
    token = rsa_key.sign(claims())
    ok = server.check(token, request_id="req-allow")
    assert ok.status.code == 0
    assert [(h.header.key, h.header.value) for h in ok.ok_response.headers] == [("x-auth-subject", "alice")]
    denied = server.check(rsa_key.sign(claims(exp=1)), request_id="req-deny")
    assert denied.status.code == 16 and denied.denied_response.status.code == 401
    lines = wait_for(lambda: [l for l in server.lines() if l.get("requestId") == "req-deny"] if len(
        [l for l in server.lines() if l.get("requestId") == "req-deny"]) == 2 else None, what="deny lines")
    failure = next(l for l in lines if l["event"] == "tokenAuthentication.authenticationFailed")
    assert failure["reason"] == "token_expired" and failure["message"] == "Validation failed for 'exp' claim."
    access = next(l for l in lines if l["event"] == "access")
    assert access["decision"] == "deny" and access["status"] == 401 and access["path"] == "/orders/1"
    assert access["deployment"] == "orders" and access["idpCalls"] == 0
    for line in server.lines():
        assert {"ts", "level", "event", "requestId"} <= line.keys()
        assert line["ts"].endswith("Z")
    assert token not in server.log.read_text()


@pytest.mark.parametrize(
    "request_msg",
    [
        ext.CheckRequest(),
        ext.CheckRequest(attributes=ac.AttributeContext(request=ac.AttributeContext.Request())),
        ext.CheckRequest(attributes=ac.AttributeContext(request=ac.AttributeContext.Request(
            http=ac.AttributeContext.HttpRequest(path="\x00\xff/orders/%%", headers={"authorization": "Bearer \x01"})))),
    ],
)
def test_malformed_check_requests_get_a_denial(server: Server, request_msg: ext.CheckRequest) -> None:
    resp = server.stub.Check(request_msg, timeout=5)
    assert resp.status.code != 0
    # Without a path, or with a path not in normal form: request_ambiguous (400); else 401/403.
    assert resp.denied_response.status.code in (400, 401, 403)
    assert server.proc.poll() is None


def test_health_and_admin(server: Server) -> None:
    stub = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", "envoy.service.auth.v3.Authorization"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    with urllib.request.urlopen(f"http://127.0.0.1:{server.admin}/healthz") as r:
        assert r.status == 200
    server.check(None)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.admin}/metrics") as r:
        text = r.read().decode()
    assert 'extauthz_checks_total{decision="deny",deployment="orders",reason="token_missing"} 1.0' in text


def test_the_event_loop_is_uvloop_unless_asyncio_is_asked_for(
    server: Server, config: dict[str, Any], tmp_path: Path, rsa_key: Any
) -> None:
    (started,) = [line for line in server.lines() if line["event"] == "server.started"]
    assert started["eventLoop"] == "uvloop"  # a dependency wherever it builds
    (tmp_path / "plain").mkdir()
    plain = start(config, tmp_path / "plain", "--event-loop", "asyncio")
    try:
        (started,) = [line for line in plain.lines() if line["event"] == "server.started"]
        assert started["eventLoop"] == "asyncio"
        assert plain.check(rsa_key.sign(claims())).status.code == 0
    finally:
        plain.proc.terminate()
        assert plain.proc.wait(timeout=15) == 0


def test_sigterm_exits_cleanly(server: Server) -> None:
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=15) == 0
    events = [l["event"] for l in server.lines()]
    assert events[-2:] == ["server.stopping", "server.stopped"]


def test_invalid_config_refuses_to_start(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("deployments:\n  - name: x\n    pathPrefix: /x\n    bogus: 1\n")
    res = subprocess.run(
        [sys.executable, "-m", "extauthz", "serve", "--config", str(cfg), "--listen", f"127.0.0.1:{free_port()}",
         "--admin-listen", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 2
    assert "deployments[0].bogus: unknown key" in res.stderr


def _swap_in(link: Path, data_dir: Path, content: dict[str, Any], n: int) -> None:
    """Update the file the way Kubernetes updates a mounted ConfigMap: a new directory, then an
    atomic rename of the `..data` symlink."""
    version = data_dir / f"..v{n}"
    version.mkdir()
    (version / "config.yaml").write_text(yaml.safe_dump(content))
    tmp_link = data_dir / "..data_tmp"
    tmp_link.symlink_to(version.name)
    os.replace(tmp_link, data_dir / "..data")


def test_config_reload_by_symlink_swap(config: dict[str, Any], tmp_path: Path, rsa_key: Any) -> None:
    data_dir = tmp_path / "cm"
    data_dir.mkdir()
    _swap_in(data_dir / "config.yaml", data_dir, config, 1)
    (data_dir / "config.yaml").symlink_to("..data/config.yaml")
    port, admin = free_port(), free_port()
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "extauthz", "serve", "--config", str(data_dir / "config.yaml"),
             "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"],
            stdout=out, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    server = Server(proc, log, port, admin)
    try:
        wait_for(lambda: any(l["event"] == "server.started" for l in server.lines()), what="start")
        token = rsa_key.sign(claims())
        assert server.check(token, path="/orders/1").status.code == 0
        assert server.check(token, path="/billing/1").denied_response.status.code == 403

        # 1. a valid new policy: /billing appears, /orders is gone
        new = json.loads(json.dumps(config))
        new["deployments"][0]["name"] = "billing"
        new["deployments"][0]["pathPrefix"] = "/billing"
        _swap_in(data_dir / "config.yaml", data_dir, new, 2)
        wait_for(lambda: any(l["event"] == "config.reloaded" for l in server.lines()), what="reload")
        assert server.check(token, path="/billing/1").status.code == 0
        assert server.check(token, path="/orders/1").denied_response.status.code == 403

        # 2. an invalid file: every error logged, the previous policy keeps serving
        broken = json.loads(json.dumps(new))
        broken["deployments"][0]["bogus"] = 1
        _swap_in(data_dir / "config.yaml", data_dir, broken, 3)
        failed = wait_for(lambda: next((l for l in server.lines() if l["event"] == "config.reloadFailed"), None),
                          what="reloadFailed")
        assert failed["errors"] == ["deployments[0].bogus: unknown key"]
        assert server.check(token, path="/billing/1").status.code == 0
        assert proc.poll() is None
    finally:
        server.channel.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)


def test_readyz_reports_providers(server: Server) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.admin}/readyz") as r:
        body = json.loads(r.read())
    assert body["ready"] is True and body["deployments"] == 1 and body["providers"] == []


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and line.split("}")[0][len(name) + 1 :] == want:
            return float(line.rsplit(" ", 1)[1])
        if not labels and line.startswith(f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_match_a_scripted_mix_exactly(server: Server, rsa_key: Any) -> None:
    good, expired = rsa_key.sign(claims()), rsa_key.sign(claims(exp=1))
    wrong_iss = rsa_key.sign(claims(iss="https://evil.example.com"))
    mix = [(good, "/orders/1")] * 7 + [(expired, "/orders/1")] * 3 + [(None, "/orders/1")] * 2 + [
        (wrong_iss, "/orders/1")] * 4 + [(good, "/nothing")] * 5
    for token, path in mix:
        server.check(token, path=path)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.admin}/metrics") as r:
        text = r.read().decode()
    checks = "extauthz_checks_total"
    assert _metric(text, checks, deployment="orders", decision="allow", reason="none") == 7
    assert _metric(text, checks, deployment="orders", decision="deny", reason="token_expired") == 3
    assert _metric(text, checks, deployment="orders", decision="deny", reason="token_missing") == 2
    assert _metric(text, checks, deployment="orders", decision="deny", reason="issuer_mismatch") == 4
    assert _metric(text, checks, deployment="", decision="deny", reason="no_matching_policy") == 5
    assert _metric(text, "extauthz_check_duration_seconds_count") == len(mix)
    assert 'le="0.0001"' in text and 'le="10.0"' in text  # sub-millisecond to multi-second buckets


def test_workers_share_the_port_and_the_metrics(config: dict[str, Any], tmp_path: Path, rsa_key: Any) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    port, admin = free_port(), free_port()
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "extauthz", "serve", "--config", str(cfg), "--workers", "2",
             "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}"],
            stdout=out, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    server = Server(proc, log, port, admin)
    try:
        wait_for(lambda: sum(l["event"] == "server.started" for l in server.lines()) == 2, what="2 workers")
        token = rsa_key.sign(claims())
        # separate channels: the kernel balances connections, not streams
        for _ in range(20):
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = ext_grpc.AuthorizationStub(ch)
                req = ext.CheckRequest(attributes=ac.AttributeContext(request=ac.AttributeContext.Request(
                    http=ac.AttributeContext.HttpRequest(method="GET", host="api", path="/orders/1",
                                                         headers={"authorization": f"Bearer {token}"}))))
                assert stub.Check(req, timeout=5).status.code == 0
        def allowed() -> float:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics") as r:
                text = r.read().decode()
            return _metric(text, "extauthz_checks_total", deployment="orders", decision="allow", reason="none")

        # Each worker adds its checks to the shared series every 50 ms: wait for the last batch.
        wait_for(lambda: allowed() == 20, what="20 allowed checks in the workers' metrics", timeout=5)
        time.sleep(0.2)
        assert allowed() == 20  # and no more
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz") as r:
            ready = json.loads(r.read())
        assert ready["ready"] is True and ready["workersAlive"] == ready["workersListening"] == 2
        access = wait_for(lambda: (lambda a: a if len(a) == 20 else None)(
            [l for l in server.lines() if l["event"] == "access"]), what="20 access lines")
        assert len({l["requestId"] for l in access}) == 20
    finally:
        server.channel.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
