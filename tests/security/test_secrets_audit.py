"""Secrets audit: the real server, a batch of valid, invalid and IdP-failing checks, and then a grep
of everything it produced for anything secret.

The server runs as a user runs it (``python -m extauthz serve``, logLevel DEBUG,
exposeDetailedErrors on, traces exported to a real OTLP receiver) in front of a loopback IdP
(``tests/integration/faulty_idp.py``) that serves a JWKS, a discovery document and four
introspection endpoints: one that works (Basic auth, secret from ``clientSecretEnv``), one that
answers 500, one that refuses the secret read from ``clientSecretFile`` (401), one reached through
discovery with ``client_secret_post``, and one that answers an HTML page. Every error body the IdP
sends carries a marker.

Needles: every token sent, each JWT's signature part, every client secret (and the Basic
credentials built from them), every ``Authorization`` header value, and the IdP's error bodies.
Haystacks: stdout, stderr, every exported span (names, attributes, events), /metrics, /readyz
and every CheckResponse. The IdP's own request log proves the secrets were really in play.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus

import pytest

from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from tests.check_requests import check_request
from tests.conftest import AUDIENCE, ISSUER, SigningKey, claims
from tests.integration.faulty_idp import Fault, FaultyIdp
from tests.integration.serverproc import ExtauthzProcess
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.security._support import (
    scan,
    server_process,
    split,
)
from tests.waiting import wait_until

MARKER = "IDP-BODY-MARKER"
CLIENT_ID = "extauthz-rs"


@dataclass
class Audit:
    needles: dict[str, str]  # name → secret text that must appear nowhere
    server: ExtauthzProcess
    spans: list[ReceivedSpan]
    responses: list[tuple[str, ext.CheckResponse]]
    admin_text: str
    idp: FaultyIdp
    url_password: str


def sign(key: SigningKey, **over: Any) -> str:
    return key.sign(claims(**over))


@pytest.fixture(scope="module")
def audit(rsa_key: SigningKey, rsa_key2: SigningKey, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Audit]:
    workdir = tmp_path_factory.mktemp("audit")
    env_secret = "env-secret-" + secrets.token_urlsafe(18)
    file_secret = "file-secret-" + secrets.token_urlsafe(18)  # wrong for /introspect-strict
    post_secret = "post-secret-" + secrets.token_urlsafe(18)
    url_password = "url-password-" + secrets.token_urlsafe(12)
    (workdir / "wrong.secret").write_text(file_secret + "\n")
    (workdir / "post.secret").write_text(post_secret)
    # The IdP: a JWKS; introspection with Basic credentials (the secret in the environment); one
    # that answers 500 and one that answers an HTML page, both with IDP-BODY-MARKER in the body;
    # a discovery document naming an introspection endpoint for client_secret_post.
    idp = FaultyIdp(keys=[rsa_key.public_jwk], clients={CLIENT_ID: env_secret}, tls=False).start()
    idp.jwks("/jwks")
    idp.introspection("/introspect")
    idp.introspection("/introspect-strict")  # the file's secret is not env_secret: 401
    idp.introspection("/introspect-500", fault=Fault.status_code(500))
    idp.introspection("/introspect-html", fault=Fault.html())
    idp.introspection("/introspect-post", clients={CLIENT_ID: post_secret})
    idp.discovery("/.well-known/openid-configuration", jwks="/jwks", introspection="/introspect-post", issuer=ISSUER)
    opaque_good = idp.issue(claims(sub="opaque-user"))
    opaque_bad = "opaque-" + secrets.token_urlsafe(24)
    opaque_post = idp.issue(claims(sub="post-user"))
    checks_policy = {"issuers": [ISSUER], "audiences": [AUDIENCE]}

    def intro(uri: str, **client: Any) -> dict[str, Any]:
        return {"type": "TOKEN_AUTHENTICATION", "validationPolicy": {
            "type": "REMOTE_INTROSPECTION", "uri": uri, "timeoutSeconds": 2,
            "clientDetails": {"clientId": CLIENT_ID, **client}}}

    static = {"type": "STATIC_KEYS", "keys": [rsa_key.public_jwk], "additionalValidationPolicy": checks_policy}
    config = {
        "server": {"logLevel": "DEBUG", "exposeDetailedErrors": True},
        "deployments": [
            {"name": "jwt", "pathPrefix": "/jwt", "headersFromClaims": {"x-auth-subject": "sub"},
             "authentication": {"type": "TOKEN_AUTHENTICATION", "validationPolicy": static}},
            {"name": "legacy", "pathPrefix": "/legacy",
             "authentication": {"type": "JWT_AUTHENTICATION", "issuers": [ISSUER],
                                "publicKeys": {"type": "REMOTE_JWKS", "uri": f"{idp.url}/jwks"}}},
            # verifyClaims values may be personal data: compared, never logged (logClaimValues off).
            {"name": "claims", "pathPrefix": "/claims",
             "authentication": {"type": "TOKEN_AUTHENTICATION", "validationPolicy": {**static, "additionalValidationPolicy": {
                 **checks_policy, "verifyClaims": [{"key": "email", "values": ["expected@example.com"], "isRequired": True}]}}}},
            {"name": "query", "pathPrefix": "/query",
             "authentication": {"type": "TOKEN_AUTHENTICATION", "tokenQueryParam": "access_token", "validationPolicy": static}},
            {"name": "intro-ok", "pathPrefix": "/intro-ok", "authentication": intro(f"{idp.url}/introspect", clientSecretEnv="AUDIT_CLIENT_SECRET")},
            {"name": "intro-500", "pathPrefix": "/intro-500", "authentication": intro(f"{idp.url}/introspect-500", clientSecretEnv="AUDIT_CLIENT_SECRET")},
            {"name": "intro-wrong", "pathPrefix": "/intro-wrong", "authentication": intro(f"{idp.url}/introspect-strict", clientSecretFile=str(workdir / "wrong.secret"))},
            {"name": "intro-html", "pathPrefix": "/intro-html", "authentication": intro(f"{idp.url}/introspect-html", clientSecretEnv="AUDIT_CLIENT_SECRET")},
            {"name": "disc-post", "pathPrefix": "/disc-post", "authentication": {"type": "TOKEN_AUTHENTICATION", "validationPolicy": {
                "type": "REMOTE_DISCOVERY", "uri": f"{idp.url}/.well-known/openid-configuration",
                "additionalValidationPolicy": checks_policy,
                "clientDetails": {"clientId": CLIENT_ID, "clientSecretFile": str(workdir / "post.secret"), "authMethod": "client_secret_post"}}}},
        ],
    }  # fmt: skip

    valid, valid2 = sign(rsa_key), sign(rsa_key, sub="bob")
    expired, wrong_iss = sign(rsa_key, exp=1), sign(rsa_key, iss="https://evil.example.com")
    forged = sign(rsa_key2)  # kid rsa-2: unknown
    h, p, s = split(valid)
    tampered = f"{h}.{split(sign(rsa_key, scope='admin'))[1]}.{s}"
    alg_none = f"{h}.{p}."
    personal = f"person-{secrets.token_hex(6)}@example.com"  # a claim value: personal data
    claim_mismatch = sign(rsa_key, email=personal)
    basic = "Basic " + base64.b64encode(b"alice:alice-password-" + secrets.token_urlsafe(8).encode()).decode()
    plan: list[tuple[str, str | None, dict[str, str]]] = [
        ("/jwt/1", valid, {}), ("/jwt/1", expired, {}), ("/jwt/1", wrong_iss, {}), ("/jwt/1", forged, {}),
        ("/jwt/1", tampered, {}), ("/jwt/1", alg_none, {}), ("/jwt/1", None, {"authorization": basic}),
        ("/legacy/1", valid2, {}), ("/legacy/1", forged, {}),
        (f"/query/1?access_token={valid}", None, {}), (f"/query/1?access_token={expired}&x=1", None, {}),
        ("/intro-ok/1", opaque_good, {}), ("/intro-ok/1", opaque_bad, {}), ("/intro-ok/1", valid, {}),
        ("/intro-500/1", opaque_good, {}), ("/intro-500/1", valid, {}),
        ("/intro-wrong/1", opaque_good, {}), ("/intro-wrong/1", valid2, {}),
        ("/intro-html/1", opaque_bad, {}),
        ("/disc-post/1", opaque_post, {}), ("/disc-post/1", valid, {}), ("/disc-post/1", opaque_bad, {}),
        ("/nowhere", valid, {}),
        ("/claims/1", claim_mismatch, {}),
    ]  # fmt: skip

    with idp, OtlpReceiver() as receiver:  # the IdP stops listening at the end of the batch
        env = {"AUDIT_CLIENT_SECRET": env_secret, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
               "OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_SERVICE_NAME": "extauthz-audit"}
        server = server_process(config, workdir, env=env).start()
        responses: list[tuple[str, ext.CheckResponse]] = []
        try:
            for path, token, headers in plan:
                request = check_request(path, token=token, headers=headers, request_id=f"audit-{len(responses)}")
                responses.append((path, server.send(request)))
            admin = ""
            for page in ("metrics", "readyz"):
                admin += server.admin(page)[1]
            wait_until(lambda: sum(1 for line in server.lines() if line.get("event") == "access") >= len(plan), timeout=10, what="access lines")
        finally:
            assert server.stop() == 0
        # The exporter flushes at exit; wait for every check span.
        def all_check_spans() -> list[ReceivedSpan] | None:
            got = receiver.snapshot()
            return got if sum(s.name.endswith("/Check") for s in got) >= len(plan) else None

        spans = wait_until(all_check_spans, timeout=10, what="check spans")
        assert spans is not None

    tokens = {"valid": valid, "valid2": valid2, "expired": expired, "wrong_iss": wrong_iss, "forged": forged,
              "tampered": tampered, "alg_none": alg_none, "claim_mismatch": claim_mismatch, "opaque_good": opaque_good, "opaque_bad": opaque_bad, "opaque_post": opaque_post}
    needles: dict[str, str] = {}
    for name, tok in tokens.items():
        needles[f"token:{name}"] = tok
        needles[f"authorization:{name}"] = f"Bearer {tok}"
        if tok.count(".") == 2 and split(tok)[2]:
            needles[f"signature:{name}"] = split(tok)[2]
    needles["authorization:basic"] = basic
    needles["authorization:basic-credentials"] = basic.removeprefix("Basic ")
    for name, secret in {"env": env_secret, "file": file_secret, "post": post_secret}.items():
        needles[f"secret:{name}"] = secret
        needles[f"secret:{name}:urlencoded"] = quote_plus(secret)
        needles[f"secret:{name}:basic"] = base64.b64encode(f"{CLIENT_ID}:{secret}".encode()).decode()
    needles["idp-body"] = MARKER  # in the IdP's 500, 401 and HTML answers
    needles["claim-value"] = personal  # compared with verifyClaims, never logged
    yield Audit(needles, server, spans, responses, admin, idp, url_password)


def spans_text(spans: list[ReceivedSpan]) -> str:
    return "\n".join(repr(s) for s in spans)


# -- the batch really exercised what the audit claims to cover ------------------------------------


def test_the_batch_allowed_denied_and_failed_as_planned(audit: Audit) -> None:
    reasons = [json.loads(r.denied_response.body)["reason"] if r.status.code else "allow" for _, r in audit.responses]
    assert reasons == [
        "allow", "token_expired", "issuer_mismatch", "key_not_found", "signature_invalid", "signature_invalid", "token_missing",
        "allow", "key_not_found",
        "allow", "token_expired",
        "allow", "token_inactive", "token_inactive",
        "idp_call_failed", "idp_call_failed",
        "idp_call_failed", "idp_call_failed",
        "idp_call_failed",
        "allow", "allow", "token_inactive",
        "no_matching_policy",
        "claim_value_mismatch",
    ]  # fmt: skip


def test_the_secrets_really_reached_the_idp(audit: Audit) -> None:
    """Otherwise the audit below would prove nothing."""
    seen = [r for path in ("/introspect", "/introspect-strict", "/introspect-post") for r in audit.idp.requests(path)]
    auths = {r.headers["authorization"] for r in seen if r.headers.get("authorization")}
    forms = [r.form for r in seen]
    for secret in (audit.needles["secret:env:basic"], audit.needles["secret:file:basic"]):
        assert f"Basic {secret}" in auths
    assert any(f.get("client_secret") == audit.needles["secret:post"] for f in forms)
    lines = audit.server.lines()
    failed = [line for line in lines if line.get("event") == "authentication.idpCallFailed"]
    assert {line["deployment"] for line in failed} >= {"intro-500", "intro-wrong", "intro-html"}
    assert any(s.name == "idp.introspection" for s in audit.spans)


# -- the audit ---------------------------------------------------------------------------------------


def test_no_secret_in_stdout_or_stderr(audit: Audit) -> None:
    text = audit.server.stdout() + audit.server.stderr()
    assert len(text.splitlines()) > len(audit.responses)  # an access line per check, and more
    assert scan(text, audit.needles) == []


def test_no_secret_in_exported_spans(audit: Audit) -> None:
    assert len(audit.spans) > 24
    assert scan(spans_text(audit.spans), audit.needles) == []


def test_no_secret_in_admin_endpoints(audit: Audit) -> None:
    assert "extauthz_checks_total" in audit.admin_text
    assert scan(audit.admin_text, audit.needles) == []


def test_no_secret_in_any_check_response(audit: Audit) -> None:
    """Detailed errors are on: error_description may explain, never quote."""
    described = 0
    for path, resp in audit.responses:
        wire = resp.SerializeToString().decode("utf-8", "replace")
        assert scan(wire, audit.needles) == [], path
        described += "error_description" in resp.denied_response.body
    assert described >= 10


def test_log_lines_name_a_token_only_by_its_short_hash(audit: Audit) -> None:
    for line in audit.server.lines():
        assert {"ts", "level", "event", "requestId"} <= line.keys()
        for key, value in line.items():
            if isinstance(value, str) and len(value) >= 40:
                # long values are messages or ids, never base64url blobs
                assert not (value.count(".") == 2 and " " not in value), (key, value)


def test_access_log_drops_the_query_string_that_carried_a_token(audit: Audit) -> None:
    paths = [line["path"] for line in audit.server.lines() if line.get("event") == "access" and line.get("deployment") == "query"]
    assert paths == ["/query/1", "/query/1"]


def test_password_in_an_idp_uri_is_refused_without_echoing_it(audit: Audit) -> None:
    """A URI is printed in logs, /readyz and probe output, so credentials in it are a config
    error (they belong in clientDetails), and the error does not repeat them."""
    from extauthz.config import ConfigError, parse_config

    policy = {"type": "REMOTE_INTROSPECTION", "uri": f"http://{CLIENT_ID}:{audit.url_password}@idp.example.com/i",
              "clientDetails": {"clientId": CLIENT_ID, "clientSecretEnv": "AUDIT_CLIENT_SECRET"}}
    with pytest.raises(ConfigError) as exc:
        parse_config({"deployments": [{"name": "d", "pathPrefix": "/", "authentication": {
            "type": "TOKEN_AUTHENTICATION", "validationPolicy": policy}}]})
    assert exc.value.errors == [
        "deployments[0].authentication.validationPolicy.uri: credentials in the URI are refused; use clientDetails"
    ]
    assert audit.url_password not in str(exc.value)


def test_startup_does_not_echo_the_config_secrets(audit: Audit) -> None:
    started = next(line for line in audit.server.lines() if line.get("event") == "server.started")
    assert scan(json.dumps(started), audit.needles) == []


def test_the_failure_lines_carried_their_new_fields(audit: Audit) -> None:
    """The audit covers what a failure line compares: the fields were there, the secrets not."""
    failures = [line for line in audit.server.lines() if line.get("event", "").endswith("authenticationFailed")]
    assert failures and all(len(line.get("tokenSha256", "")) == 8 for line in failures if line["reason"] != "token_missing")
    (claim,) = [line for line in failures if line["reason"] == "claim_value_mismatch"]
    assert claim["claim"] == "email" and "claimValue" not in claim and "expectedValues" not in claim
    (issuer,) = [line for line in failures if line["reason"] == "issuer_mismatch"]
    assert issuer["tokenIss"] == "https://evil.example.com" and issuer["issuers"] == [ISSUER]
