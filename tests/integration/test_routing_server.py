"""Route selection through the real server over gRPC: the request_ambiguous row of the decision
table, its log lines and metric, and the config warnings the server logs."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import SigningKey
from tests.integration.serverproc import ExtauthzProcess
from tests.waiting import wait_until


def deployments(key: SigningKey) -> list[dict[str, Any]]:
    policy = {"type": "STATIC_KEYS", "keys": [key.public_jwk]}
    return [
        {"name": "wild", "pathPrefix": "/api", "authentication": {
            "type": "TOKEN_AUTHENTICATION", "isAnonymousAccessAllowed": True, "validationPolicy": policy}},
        {"name": "secure", "hosts": ["secure.example.com"], "pathPrefix": "/api", "authentication": {
            "type": "TOKEN_AUTHENTICATION", "validationPolicy": policy}},
    ]


@pytest.fixture(scope="module")
def server(rsa_key: SigningKey, tmp_path_factory: pytest.TempPathFactory) -> Any:
    config = {"server": {"exposeDetailedErrors": True}, "deployments": deployments(rsa_key)}
    with ExtauthzProcess(config, tmp_path_factory.mktemp("routing")) as running:
        yield running


def test_a_dot_segment_is_a_400_request_ambiguous(server: ExtauthzProcess) -> None:
    checked = server.check(path="/api/%2e%2e/admin", host="secure.example.com")
    assert checked.grpc_code == 3  # INVALID_ARGUMENT
    assert checked.http_status == 400
    headers = checked.headers
    assert headers["x-extauthz-reason"] == "request_ambiguous"
    assert headers["x-request-id"] == checked.request_id
    assert "www-authenticate" not in headers  # not a credentials problem
    body = checked.body
    assert body["error"] == "invalid_request" and body["reason"] == "request_ambiguous"
    assert "normalize_path" in body["error_description"]
    access = server.line(checked.request_id, "access")
    assert (access["status"], access["reason"], access["decision"], access["deployment"]) == (
        400, "request_ambiguous", "deny", ""
    )
    line = server.line(checked.request_id, "routing.requestAmbiguous")
    assert line["reason"] == "request_ambiguous" and "'.' or '..' segment" in line["message"]
    assert server.metric("extauthz_checks_total", deployment="", decision="deny", reason="request_ambiguous") >= 1


def test_the_exact_host_wins_over_a_host_less_deployment_listed_first(server: ExtauthzProcess) -> None:
    secure = server.check(path="/api/x", host="secure.example.com.")
    assert secure.http_status == 401 and secure.headers["www-authenticate"] == 'Bearer realm="secure"'
    assert server.check(path="/api/x", host="other.example.com").allowed


def test_the_server_logs_the_config_warnings(server: ExtauthzProcess) -> None:
    lines = wait_until(lambda: server.events("config.warning"), timeout=10, what="config.warning")
    assert lines[0]["level"] == "WARNING"
    assert "'secure' applies" in lines[0]["message"]
    assert lines[0]["config"] == str(server.config_path)
