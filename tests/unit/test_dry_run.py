"""enforcement: DRY_RUN: every request of the denial corpus is let through, and logged and counted
exactly as ENFORCE denies it (docs/configuration.md, "Dry run")."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest

from extauthz.config import parse_config
from extauthz.logs import JsonLogger
from extauthz.metrics import Metrics
from extauthz.server import AuthorizationService
from tests.check_requests import ServicerContext, check_request
from tests.conftest import AUDIENCE, ISSUER, SigningKey, claims
from tests.fake_idp import FakeIdp
from tests.policies import GET_ORDER, orders


def service(key: SigningKey, enforcement: str) -> tuple[AuthorizationService, io.StringIO, Metrics]:
    static = {"type": "STATIC_KEYS", "keys": [key.public_jwk], "additionalValidationPolicy": {
        "issuers": [ISSUER], "audiences": [AUDIENCE], "verifyClaims": [{"key": "tenant", "values": ["acme"]}]}}  # fmt: skip
    config = parse_config({"deployments": [orders(static, routes=[GET_ORDER], enforcement=enforcement,
                                                   headersFromClaims={"x-auth-subject": "sub"})]})  # fmt: skip
    out, metrics = io.StringIO(), Metrics()
    return AuthorizationService(FakeIdp().engine(config), JsonLogger(stream=out), metrics), out, metrics


def corpus(key: SigningKey, other: SigningKey) -> list[tuple[str, str | None]]:
    return [
        ("token_missing", None),
        ("token_malformed", "not-a.jwt.at-all"),
        ("key_not_found", other.sign(claims())),
        ("token_expired", key.sign(claims(exp=1))),
        ("issuer_mismatch", key.sign(claims(iss="https://evil.example.com"))),
        ("audience_mismatch", key.sign(claims(aud="https://other.example.com"))),
        ("claim_value_mismatch", key.sign(claims(tenant="globex"))),
        ("insufficient_scope", key.sign(claims(scope="profile"))),
    ]


def run(svc: AuthorizationService, token: str | None, rid: str) -> Any:
    request = check_request("/orders/42", token=token, request_id=rid, headers={"x-auth-subject": "forged"})
    return asyncio.run(svc.Check(request, ServicerContext()))


def test_dry_run_lets_the_denial_corpus_through_and_logs_it_as_enforce_denies_it(
    rsa_key: SigningKey, rsa_key2: SigningKey
) -> None:
    enforce, enforce_out, _ = service(rsa_key, "ENFORCE")
    dry, dry_out, metrics = service(rsa_key, "DRY_RUN")
    for reason, token in corpus(rsa_key, rsa_key2):
        denied = run(enforce, token, f"e-{reason}")
        allowed = run(dry, token, f"d-{reason}")
        assert denied.status.code != 0 and json.loads(denied.denied_response.body)["reason"] == reason
        assert allowed.status.code == 0  # let through
        assert list(allowed.ok_response.headers) == [] and list(allowed.ok_response.headers_to_remove) == ["x-auth-subject"]
        assert allowed.dynamic_metadata["dryRun"] is True
    enforce_lines = [json.loads(line) for line in enforce_out.getvalue().splitlines()]
    dry_lines = [json.loads(line) for line in dry_out.getvalue().splitlines()]
    for reason, _ in corpus(rsa_key, rsa_key2):
        (e_access,) = [line for line in enforce_lines if line["requestId"] == f"e-{reason}" and line["event"] == "access"]
        (d_access,) = [line for line in dry_lines if line["requestId"] == f"d-{reason}" and line["event"] == "access"]
        assert d_access["decision"] == "allow" and d_access["dryRun"] is True and d_access["status"] == 200
        assert d_access["reason"] == e_access["reason"] == reason and "dryRun" not in e_access
        e_failure = [line for line in enforce_lines if line["requestId"] == f"e-{reason}" and line["event"] != "access"]
        d_failure = [line for line in dry_lines if line["requestId"] == f"d-{reason}" and line["event"] != "access"]
        strip = lambda lines: [{k: v for k, v in line.items() if k not in ("ts", "requestId", "now")} for line in lines]  # noqa: E731
        assert strip(d_failure) == strip(e_failure) and len(d_failure) == 1
    metrics.flush()
    labels = {"deployment": "orders", "decision": "dry_run_deny", "reason": "token_expired", "wire": "grpc"}
    assert metrics.registry.get_sample_value("extauthz_checks_total", labels) == 1


def test_dry_run_allows_as_enforce_does_when_the_policy_allows(rsa_key: SigningKey) -> None:
    dry, out, _ = service(rsa_key, "DRY_RUN")
    allowed = run(dry, rsa_key.sign(claims()), "ok")
    assert [(h.header.key, h.header.value) for h in allowed.ok_response.headers] == [("x-auth-subject", "alice")]
    (access,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert access["reason"] == "none" and "dryRun" not in access


@pytest.mark.parametrize("path", ["/elsewhere", "/orders/../admin"])
def test_a_request_no_deployment_covers_is_still_denied(rsa_key: SigningKey, path: str) -> None:
    dry, _, _ = service(rsa_key, "DRY_RUN")
    response = asyncio.run(dry.Check(check_request(path, token=rsa_key.sign(claims())), ServicerContext()))
    assert response.status.code != 0
