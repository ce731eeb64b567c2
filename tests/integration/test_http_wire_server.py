"""`extauthz serve --http-listen`: the real server process answering Envoy's HTTP protocol beside
gRPC, from the same policy, with the same lines and a metric per wire."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.conftest import claims
from tests.integration.serverproc import ExtauthzProcess, free_port
from tests.policies import orders
from tests.waiting import wait_until


def test_both_wires_answer_the_same_policy(rsa_key: Any, tmp_path: Path) -> None:
    static = {"type": "STATIC_KEYS", "keys": [rsa_key.public_jwk],
              "additionalValidationPolicy": {"issuers": ["https://idp.example.com"]}}  # fmt: skip
    config = {"deployments": [orders(static, headersFromClaims={"x-auth-subject": "sub"})]}
    port = free_port()
    with ExtauthzProcess(config, tmp_path / "server", args=["--http-listen", f"127.0.0.1:{port}"]) as server:
        token = rsa_key.sign(claims())
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"host": "api.example.com"}) as http:
            allowed = http.get("/orders/1", headers={"authorization": f"Bearer {token}", "x-request-id": "h-ok"})
            denied = http.get("/orders/1", headers={"x-request-id": "h-no"})
        assert allowed.status_code == 200 and allowed.headers["x-auth-subject"] == "alice"
        grpc = server.check(None, path="/orders/1")
        assert denied.status_code == grpc.http_status == 401
        assert denied.json()["reason"] == "token_missing" and denied.headers["x-request-id"] == "h-no"
        assert denied.headers["www-authenticate"] == 'Bearer realm="orders"'
        lines = wait_until(lambda: found if len(found := server.lines_for("h-no")) == 2 else None,
                           timeout=10, what="the HTTP denial's lines")  # fmt: skip
        assert {line["event"] for line in lines} == {"access", "tokenAuthentication.authenticationFailed"}
        assert server.metric("extauthz_checks_total", deployment="orders", reason="token_missing", wire="http") == 1
        assert server.metric("extauthz_checks_total", deployment="orders", reason="token_missing", wire="grpc") == 1
        started = next(line for line in server.lines() if line["event"] == "server.started")
        assert started["httpListen"] == f"127.0.0.1:{port}"


def test_workers_all_serve_the_http_wire(rsa_key: Any, tmp_path: Path) -> None:
    static = {"type": "STATIC_KEYS", "keys": [rsa_key.public_jwk]}
    port = free_port()
    args = ["--http-listen", f"127.0.0.1:{port}"]
    with ExtauthzProcess({"deployments": [orders(static)]}, tmp_path / "server", workers=2, args=args) as server:
        for i in range(8):  # new connections, spread by the kernel over both workers
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
                assert http.get("/orders/1", headers={"host": "h", "x-request-id": f"w-{i}"}).status_code == 401
        started = [line for line in server.lines() if line["event"] == "server.started" and "httpListen" in line]
        assert len(started) == 2  # each worker serves the HTTP wire on the one port
