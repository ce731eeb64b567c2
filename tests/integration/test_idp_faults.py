"""Identity-provider failures, through the real extauthz server and a real misbehaving IdP.

Every failure is checked on every surface: the gRPC and HTTP status of the denial, its headers
and JSON body, the access line, and exactly one ``authentication.idpCallFailed`` line whose
``endpoint`` and ``message`` are the contract's (docs/decisions.md and docs/logs.md). None is ever allowed.
The IdP is ``faulty_idp.FaultyIdp``: real sockets, real HTTP, a real self-signed certificate.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AUDIENCE, ISSUER, SigningKey, claims
from tests.integration.faulty_idp import Fault, FaultyIdp, SilentPort
from tests.integration.serverproc import Checked, ExtauthzProcess, closed_port
from tests.waiting import wait_until

IDP_FAILED = "authentication.idpCallFailed"
INTROSPECTION, JWKS, DISCOVERY = "REMOTE_INTROSPECTION", "REMOTE_JWKS", "REMOTE_DISCOVERY"
CLIENT_ID, POST_CLIENT_ID = "extauthz", "extauthz-post"
SECRET_ENV = "FAULTS_TEST_INTROSPECTION_SECRET"
HANG_TIMEOUT = 0.5  # timeoutSeconds of the deployments whose IdP hangs
PARSE = "Unable to parse response from Identity Provider"
RFC3339 = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})"
UNREACHABLE = (
    "Unable to connect to the {endpoint} uri: {uri}, {kind}. Make sure that the URI is "
    "accessible from the network of the authorization service."
)
UNEXPECTED = "Unexpected response from the {endpoint} uri: {uri}, received ({status})."


def parse_rfc3339(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# -- shared assertions -----------------------------------------------------------------------


def assert_idp_denial(
    server: ExtauthzProcess,
    checked: Checked,
    *,
    deployment: str,
    endpoint: str,
    message: str | re.Pattern[str],
    status: int = 500,
    detailed: bool = False,
) -> dict[str, Any]:
    """An idp_call_failed denial on every surface; returns its idpCallFailed log line.
    ``detailed``: the server runs with exposeDetailedErrors, so the body carries the message."""
    resp = checked.response
    assert not checked.allowed and not resp.HasField("ok_response"), resp
    assert checked.grpc_code == 14, resp  # UNAVAILABLE
    assert checked.http_status == status, resp
    headers = checked.headers
    assert headers.get("x-extauthz-reason") == "idp_call_failed", headers
    assert headers.get("x-request-id") == checked.request_id
    assert headers.get("content-type") == "application/json"
    assert "www-authenticate" not in headers  # an IdP failure is not the client's fault
    body = dict(checked.body)
    description = body.pop("error_description", None)
    assert body == {
        "error": "server_error",
        "reason": "idp_call_failed",
        "request_id": checked.request_id,
    }
    assert (description is not None) == detailed, checked.body
    access = server.line(checked.request_id, "access")
    assert (access["decision"], access["status"], access["reason"], access["deployment"]) == (
        "deny", status, "idp_call_failed", deployment,
    ), access
    failures = server.lines_for(checked.request_id, IDP_FAILED)
    assert len(failures) == 1, failures  # exactly one line per failed check
    line = failures[0]
    assert line["endpoint"] == endpoint, line
    if isinstance(message, re.Pattern):
        assert message.fullmatch(line["message"]), line
    else:
        assert line["message"] == message, line
    assert line["reason"] == "idp_call_failed" and line["deployment"] == deployment, line
    assert {"ts", "level", "requestId"} <= line.keys()
    if detailed:
        assert description == line["message"], (description, line)
    return line


def assert_allowed(checked: Checked, subject: str = "alice") -> None:
    assert checked.allowed, checked.response
    assert checked.upstream_headers.get("x-auth-subject") == subject


# -- the fault matrix ------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One deployment whose IdP fails in one way; its name is also its path prefix."""

    name: str
    policy: str
    endpoint: str  # the endpoint the log line must name
    fault: Fault | None  # on that endpoint's route
    expect: str  # a status "500, Internal Server Error", a connect kind, or PARSE
    where: str = "http"  # http | https (self-signed) | refused | dns
    secret: str = "right"  # "wrong": the introspection client's credentials are rejected

    @property
    def opaque(self) -> bool:
        return self.endpoint == "introspection_endpoint"


# Every endpoint can answer in these ways (a name's suffix, the fault, what the log line says)...
ANSWERED_WRONG = [
    ("500", Fault.status_code(500), "500, Internal Server Error"),
    ("hang", Fault.hang(), "TIMEOUT"),
    ("close", Fault.close(), PARSE),
    ("html", Fault.html(), PARSE),
]
# ...and be out of reach in these (a name's suffix, where it is, the connect kind).
OUT_OF_REACH = [("tls", "https", "TLS_ERROR"), ("refused", "refused", "CONNECTION_REFUSED"), ("dns", "dns", "DNS_FAILURE")]
POLICIES = [("i", INTROSPECTION, "introspection_endpoint"), ("j", JWKS, "jwks_uri"), ("d", DISCOVERY, "discovery")]

CASES = [
    *(Case(f"{p}-{suffix}", policy, endpoint, fault, expect)
      for p, policy, endpoint in POLICIES for suffix, fault, expect in ANSWERED_WRONG),
    *(Case(f"{p}-{suffix}", policy, endpoint, None, expect, where=where)
      for p, policy, endpoint in POLICIES for suffix, where, expect in OUT_OF_REACH),
    # what only one kind of endpoint can get wrong: introspection_endpoint (REMOTE_INTROSPECTION)
    Case("i-503", INTROSPECTION, "introspection_endpoint", Fault.status_code(503), "503, Service Unavailable"),
    Case("i-active-yes", INTROSPECTION, "introspection_endpoint", Fault.json({"active": "yes"}), PARSE),
    Case("i-active-1", INTROSPECTION, "introspection_endpoint", Fault.json({"active": 1}), PARSE),
    Case("i-no-active", INTROSPECTION, "introspection_endpoint", Fault.json({"sub": "alice"}), PARSE),
    Case("i-array", INTROSPECTION, "introspection_endpoint", Fault.json([{"active": True}]), PARSE),
    Case("i-bad-client", INTROSPECTION, "introspection_endpoint", None, "401, Unauthorized", secret="wrong"),
    # jwks_uri (REMOTE_JWKS)
    Case("j-404", JWKS, "jwks_uri", Fault.status_code(404), "404, Not Found"),
    Case("j-no-keys", JWKS, "jwks_uri", Fault.json({"active": "yes"}), PARSE),
    Case("j-empty-keys", JWKS, "jwks_uri", Fault.json({"keys": []}), PARSE),
    # discovery (REMOTE_DISCOVERY)
    Case("d-no-jwks-uri", DISCOVERY, "discovery", Fault.json({"issuer": ISSUER}), PARSE),
    # discovery answers, but an endpoint it names fails
    Case("dj-500", DISCOVERY, "jwks_uri", Fault.status_code(500), "500, Internal Server Error"),
    Case("dj-hang", DISCOVERY, "jwks_uri", Fault.hang(), "TIMEOUT"),
    Case("di-500", DISCOVERY, "introspection_endpoint", Fault.status_code(500), "500, Internal Server Error"),
    Case("di-active-yes", DISCOVERY, "introspection_endpoint", Fault.json({"active": "yes"}), PARSE),
    Case("di-bad-client", DISCOVERY, "introspection_endpoint", None, "401, Unauthorized", secret="wrong"),
]
assert len({case.name for case in CASES}) == len(CASES) == 36

PATHS = {
    "introspection_endpoint": "introspect",
    "jwks_uri": "jwks",
    "discovery": ".well-known/openid-configuration",
}


@dataclass
class Env:
    """Everything the module's tests share: the IdP, one extauthz with every deployment, secrets."""

    idp: FaultyIdp
    server: ExtauthzProcess
    signer: SigningKey
    secret: str
    post_secret: str
    refused_port: int
    silent: SilentPort  # accepts, never answers: a TLS handshake or a request left hanging

    def jwt(self, **overrides: Any) -> str:
        return self.signer.sign(claims(**overrides))

    def provider(self, uri: str) -> dict[str, Any]:
        """The /readyz entry of the endpoint at ``uri``."""
        (entry,) = [p for p in json.loads(self.server.admin("readyz")[1])["providers"] if p["uri"] == uri]
        return dict(entry)

    def opaque(self, **overrides: Any) -> str:
        return self.idp.issue(claims(**overrides))

    def base(self, where: str) -> str:
        return {
            "http": self.idp.url,
            "https": self.idp.https_url,
            "refused": f"http://127.0.0.1:{self.refused_port}",
            "dns": "http://idp.invalid",
        }[where]

    def configured_uri(self, case: Case) -> str:
        """The validationPolicy.uri of the case's deployment."""
        endpoint = {INTROSPECTION: "introspection_endpoint", JWKS: "jwks_uri", DISCOVERY: "discovery"}
        return f"{self.base(case.where)}/{case.name}/{PATHS[endpoint[case.policy]]}"

    def failing_uri(self, case: Case) -> str:
        """The URI the log line must name (for a discovered endpoint, the one discovery names)."""
        if case.policy == DISCOVERY and case.endpoint != "discovery":
            return f"{self.idp.url}/{case.name}/{PATHS[case.endpoint]}"
        return self.configured_uri(case)

    def expected_message(self, case: Case) -> str:
        uri = self.failing_uri(case)
        if case.expect == PARSE:
            return PARSE
        if "," in case.expect:
            return UNEXPECTED.format(endpoint=case.endpoint, uri=uri, status=case.expect)
        return UNREACHABLE.format(endpoint=case.endpoint, uri=uri, kind=case.expect)


def client_details(secret_file: Path, *, post: bool = False, wrong_file: Path | None = None) -> dict[str, Any]:
    if post:  # the secret from the environment, sent in the form
        return {"clientId": POST_CLIENT_ID, "clientSecretEnv": SECRET_ENV, "authMethod": "client_secret_post"}
    return {
        "clientId": CLIENT_ID,
        "clientSecretFile": str(wrong_file or secret_file),
        "authMethod": "client_secret_basic",
    }


def deployment(name: str, policy: dict[str, Any]) -> dict[str, Any]:
    policy.setdefault("additionalValidationPolicy", {"issuers": [ISSUER], "audiences": [AUDIENCE]})
    return {
        "name": name,
        "pathPrefix": f"/{name}",
        "authentication": {"type": "TOKEN_AUTHENTICATION", "validationPolicy": policy},
        "headersFromClaims": {"x-auth-subject": "sub"},
    }


@pytest.fixture(scope="module")
def env(rsa_key: SigningKey, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    secret, post_secret = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    idp = FaultyIdp(keys=[rsa_key.public_jwk], clients={CLIENT_ID: secret, POST_CLIENT_ID: post_secret})
    workdir = tmp_path_factory.mktemp("faults")
    secret_file, wrong_file = workdir / "client-secret", workdir / "wrong-secret"
    secret_file.write_text(secret + "\n")
    wrong_file.write_text("not-" + secret + "\n")
    with idp, SilentPort() as silent:
        e = Env(idp, None, rsa_key, secret, post_secret, closed_port(), silent)  # type: ignore[arg-type]
        deployments = []
        for case in CASES:
            # Every route of the case exists and works, except the failing one.
            prefix = f"/{case.name}"
            faults = {ep: (case.fault if ep == case.endpoint else None) for ep in PATHS}
            idp.introspection(f"{prefix}/introspect", fault=faults["introspection_endpoint"])
            idp.jwks(f"{prefix}/jwks", fault=faults["jwks_uri"])
            idp.discovery(
                f"{prefix}/.well-known/openid-configuration",
                jwks=f"{prefix}/jwks",
                introspection=f"{prefix}/introspect",
                issuer=ISSUER,
                fault=faults["discovery"],
            )
            policy: dict[str, Any] = {
                "type": case.policy,
                "uri": e.configured_uri(case),
                "timeoutSeconds": HANG_TIMEOUT if case.expect == "TIMEOUT" else 5,
            }
            if case.opaque:
                policy["clientDetails"] = client_details(
                    secret_file, wrong_file=wrong_file if case.secret == "wrong" else None
                )
            deployments.append(deployment(case.name, policy))
        # Healthy deployments: the same server, configured right, allows.
        idp.introspection("/ok/introspect")
        idp.jwks("/ok/jwks")
        idp.discovery("/ok/.well-known/openid-configuration", jwks="/ok/jwks", introspection="/ok/introspect", issuer=ISSUER)
        idp.introspection("/single-flight/introspect")
        healthy: dict[str, dict[str, Any]] = {
            "ok-basic": {"type": INTROSPECTION, "uri": f"{idp.url}/ok/introspect", "clientDetails": client_details(secret_file)},
            "ok-post": {"type": INTROSPECTION, "uri": f"{idp.url}/ok/introspect", "clientDetails": client_details(secret_file, post=True)},
            "ok-jwks": {"type": JWKS, "uri": f"{idp.url}/ok/jwks"},
            "ok-discovery": {
                "type": DISCOVERY,
                "uri": f"{idp.url}/ok/.well-known/openid-configuration",
                "clientDetails": client_details(secret_file),
            },
            "ok-tls-ca": {
                "type": INTROSPECTION,
                "uri": f"{idp.https_url}/ok/introspect",
                "caFile": str(idp.ca_file),
                "clientDetails": client_details(secret_file),
            },
            "single-flight": {
                "type": INTROSPECTION,
                "uri": f"{idp.url}/single-flight/introspect",
                "timeoutSeconds": 20,
                "clientDetails": client_details(secret_file),
            },
        }
        # A discovery document that names another issuer.
        idp.jwks("/d-other-issuer/jwks")
        idp.discovery(
            "/d-other-issuer/.well-known/openid-configuration",
            jwks="/d-other-issuer/jwks",
            issuer="https://elsewhere.example.com",
        )
        healthy["d-other-issuer"] = {"type": DISCOVERY, "uri": f"{idp.url}/d-other-issuer/.well-known/openid-configuration"}
        # A TLS handshake that never completes, a request never answered (real sockets).
        healthy["t-connect"] = {"type": JWKS, "uri": silent.url("https", "/t-connect/jwks"), "timeoutSeconds": HANG_TIMEOUT}
        healthy["t-read"] = {"type": JWKS, "uri": silent.url("http", "/t-read/jwks"), "timeoutSeconds": HANG_TIMEOUT}
        # An IdP that hangs, with a timeout longer than the check's own deadline (DEADLINE_CHECK).
        idp.jwks("/t-deadline/jwks", fault=Fault.hang())
        healthy["t-deadline"] = {"type": JWKS, "uri": f"{idp.url}/t-deadline/jwks", "timeoutSeconds": 5}
        deployments += [deployment(name, policy) for name, policy in healthy.items()]
        server = ExtauthzProcess({"deployments": deployments}, workdir / "server", env={SECRET_ENV: post_secret})
        with server:
            e.server = server
            yield e


# -- every failure: 500, idp_call_failed, the exact line, never allowed -------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_idp_failure_is_denied_with_the_contract_message(env: Env, case: Case) -> None:
    """Each way an IdP endpoint can fail gives 500 idp_call_failed and its exact log line, twice."""
    token = env.opaque() if case.opaque else env.jwt()
    message = env.expected_message(case)
    for _ in range(2):  # a failure is not cached as anything that could allow the next check
        checked = env.server.check(token, path=f"/{case.name}/orders/1")
        line = assert_idp_denial(env.server, checked, deployment=case.name, endpoint=case.endpoint, message=message)
        assert line["uri"] == env.failing_uri(case), line
        if case.expect == "TIMEOUT":
            assert checked.seconds >= HANG_TIMEOUT * 0.9, checked.seconds
            assert line["detail"] == "read timeout", line  # the IdP read the request, then hung
        elif case.expect != PARSE:
            assert "detail" not in line, line
        # A refused connection is retried once: two requests went out. A discovery document
        # came from the cache or was fetched (one more) before a named endpoint failed.
        calls = env.server.line(checked.request_id, "access")["idpCalls"]
        own = 2 if case.where == "refused" else 1
        assert calls in ((own, own + 1) if case.policy == DISCOVERY and case.endpoint != "discovery" else (own,)), calls


def test_discovery_naming_another_issuer_is_a_parse_failure(env: Env) -> None:
    """A discovery document for another issuer is not this IdP's (OpenID Connect Discovery 1.0
    §4.3): 500 idp_call_failed with the unusable-answer message, its own detail naming both
    issuers, and /readyz shows it. The IdP answered as it should: the breaker stays closed."""
    uri = f"{env.idp.url}/d-other-issuer/.well-known/openid-configuration"
    detail = f"issuer in the discovery document is 'https://elsewhere.example.com', the configured issuer is '{ISSUER}'"
    for _ in range(6):  # past the breaker's threshold (5)
        checked = env.server.check(env.jwt(), path="/d-other-issuer/x")
        line = assert_idp_denial(env.server, checked, deployment="d-other-issuer", endpoint="discovery", message=PARSE)
        assert (line["uri"], line["detail"]) == (uri, detail), line
    shown = env.provider(uri)
    assert shown["breaker"] == "closed" and shown["lastSuccess"] is None
    error = shown["lastError"]
    assert (error["message"], error["outcome"], error["detail"]) == (PARSE, "issuer_mismatch", detail)
    assert re.fullmatch(RFC3339, error["at"]), error


@pytest.mark.parametrize(
    ("name", "scheme", "detail"),
    [("t-connect", "https", "connect timeout"), ("t-read", "http", "read timeout")],
)
def test_a_timeout_says_whether_it_was_connecting_or_reading(env: Env, name: str, scheme: str, detail: str) -> None:
    """Real sockets: a port that accepts and never answers. Over https the TLS handshake never
    completes (connect timeout); over http the request goes out and nothing comes back (read
    timeout). The message is the same TIMEOUT one; the line, the access line and /readyz say more."""
    uri = env.silent.url(scheme, f"/{name}/jwks")
    checked = env.server.check(env.jwt(), path=f"/{name}/x")
    line = assert_idp_denial(env.server, checked, deployment=name, endpoint="jwks_uri",
                             message=UNREACHABLE.format(endpoint="jwks_uri", uri=uri, kind="TIMEOUT"))
    assert (line["uri"], line["detail"]) == (uri, detail), line
    assert HANG_TIMEOUT * 0.9 <= checked.seconds < HANG_TIMEOUT + 3.0, checked.seconds
    assert env.server.line(checked.request_id, "access")["idpCalls"] == 1
    error = env.provider(uri)["lastError"]
    assert (error["outcome"], error["detail"]) == ("timeout", detail), error


DEADLINE_CHECK = 1.0  # the gRPC deadline of the check, as Envoy's ext_authz timeout sets it


def test_the_checks_deadline_cuts_an_idp_call_before_its_timeout(env: Env) -> None:
    """Envoy gives the check 1 s, the IdP hangs and timeoutSeconds is 5: the server cuts the call
    at the check's deadline and answers idp_call_failed itself, in time, and says why."""
    uri = f"{env.idp.url}/t-deadline/jwks"
    checked = env.server.check(env.jwt(), path="/t-deadline/x", timeout=DEADLINE_CHECK)
    line = assert_idp_denial(env.server, checked, deployment="t-deadline", endpoint="jwks_uri",
                             message=UNREACHABLE.format(endpoint="jwks_uri", uri=uri, kind="TIMEOUT"))
    assert (line["uri"], line["detail"]) == (uri, "the check's deadline"), line
    assert checked.seconds < DEADLINE_CHECK, checked.seconds
    assert env.server.line(checked.request_id, "access")["idpCalls"] == 1
    error = env.provider(uri)["lastError"]
    assert (error["outcome"], error["detail"]) == ("timeout", "the check's deadline"), error


def test_a_refused_retry_is_two_requests_in_the_metric_as_in_idp_calls(env: Env) -> None:
    """A refused connection is retried once: the access line's idpCalls and
    extauthz_idp_requests_total both count the two attempts; /readyz shows the refusal."""

    def refused() -> float:
        return env.server.metric("extauthz_idp_requests_total", endpoint="jwks_uri", outcome="connection_refused")

    before = refused()
    checked = env.server.check(env.jwt(), path="/j-refused/x")
    assert not checked.allowed
    assert env.server.line(checked.request_id, "access")["idpCalls"] == 2
    assert refused() - before == 2
    error = env.provider(f"http://127.0.0.1:{env.refused_port}/j-refused/jwks")["lastError"]
    assert (error["outcome"], error["detail"]) == ("connection_refused", None), error


def test_a_hanging_idp_costs_the_timeout_not_more(env: Env) -> None:
    """timeoutSeconds bounds the wait on an IdP that never answers (one check, one timeout)."""
    checked = env.server.check(env.opaque(), path="/i-hang/x")
    assert not checked.allowed
    assert HANG_TIMEOUT * 0.9 <= checked.seconds < HANG_TIMEOUT + 3.0, checked.seconds


def test_denials_never_reveal_the_idp_body_the_token_or_the_secret(env: Env) -> None:
    """After HTML and error bodies from the IdP, nothing of them, the tokens or secrets is logged."""
    tokens = [env.opaque(), env.opaque(), env.jwt()]
    for token, path in zip(tokens, ("/i-html/x", "/i-500/x", "/j-html/x"), strict=True):
        checked = env.server.check(token, path=path)
        env.server.line(checked.request_id, "access")
        assert "IDP-BODY-MARKER" not in checked.response.denied_response.body
    text = env.server.text()
    assert "IDP-BODY-MARKER" not in text and "maintenance" not in text
    assert env.secret not in text and env.post_secret not in text
    for token in tokens:
        assert token not in text


# -- the same IdP, configured right, allows ---------------------------------------------------


def test_introspection_with_client_secret_basic_from_a_file_allows(env: Env) -> None:
    """An active token is allowed; the IdP saw a form POST with Basic client credentials."""
    token = env.opaque(sub="bob")
    before = len(env.idp.requests("/ok/introspect"))
    assert_allowed(env.server.check(token, path="/ok-basic/x"), "bob")
    seen = env.idp.requests("/ok/introspect")[before:]
    assert len(seen) == 1
    assert seen[0].method == "POST"
    assert seen[0].headers["content-type"] == "application/x-www-form-urlencoded"
    assert seen[0].form == {"token": token, "token_type_hint": "access_token"}
    assert seen[0].headers["authorization"].startswith("Basic ")


def test_introspection_with_client_secret_post_from_the_environment_allows(env: Env) -> None:
    """client_secret_post: the credentials travel in the form, and no Authorization header."""
    token = env.opaque(sub="carol")
    before = len(env.idp.requests("/ok/introspect"))
    assert_allowed(env.server.check(token, path="/ok-post/x"), "carol")
    (seen,) = env.idp.requests("/ok/introspect")[before:]
    assert "authorization" not in seen.headers
    assert seen.form == {
        "token": token,
        "token_type_hint": "access_token",
        "client_id": POST_CLIENT_ID,
        "client_secret": env.post_secret,
    }


def test_an_inactive_or_revoked_token_is_401_token_inactive(env: Env) -> None:
    """{"active": false} is an answer, not a failure: 401 token_inactive with the challenge."""
    revoked = env.opaque()
    env.idp.revoke(revoked)
    for token in (revoked, secrets.token_urlsafe(32)):
        checked = env.server.check(token, path="/ok-basic/x")
        assert not checked.allowed
        assert (checked.grpc_code, checked.http_status) == (16, 401)
        assert checked.headers["www-authenticate"] == 'Bearer realm="ok-basic", error="invalid_token"'
        assert checked.headers["x-extauthz-reason"] == "token_inactive"
        assert checked.body["error"] == "invalid_token"
        assert env.server.line(checked.request_id, "access")["reason"] == "token_inactive"
        assert env.server.lines_for(checked.request_id, IDP_FAILED) == []


def test_remote_jwks_and_discovery_allow_and_cache(env: Env) -> None:
    """JWKS and discovery answer once; later checks use the cached keys and document."""
    for _ in range(3):
        assert_allowed(env.server.check(env.jwt(), path="/ok-jwks/x"))
        assert_allowed(env.server.check(env.jwt(), path="/ok-discovery/x"))
    assert env.idp.count("/ok/.well-known/openid-configuration") == 1
    # /ok/jwks serves both deployments' providers (same URI and settings: shared)
    assert env.idp.count("/ok/jwks") == 1


def test_discovery_with_client_details_introspects_only_opaque_tokens(env: Env) -> None:
    """REMOTE_DISCOVERY: a JWT is verified locally, an opaque token goes to the discovered endpoint."""
    assert_allowed(env.server.check(env.jwt(), path="/ok-discovery/x"))
    before = env.idp.count("/ok/introspect")
    assert_allowed(env.server.check(env.jwt(sub="dave"), path="/ok-discovery/x"), "dave")
    assert env.idp.count("/ok/introspect") == before
    assert_allowed(env.server.check(env.opaque(sub="erin"), path="/ok-discovery/x"), "erin")
    assert env.idp.count("/ok/introspect") == before + 1


def test_self_signed_idp_is_trusted_with_its_ca_file(env: Env) -> None:
    """The certificate that gives TLS_ERROR is accepted when caFile names it."""
    assert_allowed(env.server.check(env.opaque(), path="/ok-tls-ca/x"))


def test_positive_introspection_answers_are_cached(env: Env) -> None:
    """An active token is introspected once, then served from the cache."""
    token = env.opaque()
    before = env.idp.count("/ok/introspect")
    for _ in range(5):
        assert_allowed(env.server.check(token, path="/ok-basic/x"))
    assert env.idp.count("/ok/introspect") == before + 1


# -- single-flight -----------------------------------------------------------------------------


def test_64_concurrent_checks_of_a_new_token_make_one_introspection_call(env: Env) -> None:
    """Single-flight: the IdP holds its answer until all 64 checks wait on it, then sees 1 call."""
    path, server = "/single-flight/introspect", env.server
    env.idp.set_fault(path, Fault.hold())
    token = env.opaque(sub="frank")
    misses = server.metric("extauthz_cache_events_total", cache="introspection", result="miss")
    try:
        sent = server.check_many([(token, "/single-flight/x")] * 64)
        # Every check has looked in the cache and is now waiting: only then may the IdP answer.
        wait_until(
            lambda: server.metric("extauthz_cache_events_total", cache="introspection", result="miss")
            >= misses + 64,
            timeout=15,
            what="64 checks waiting on the introspection",
        )
        assert env.idp.count(path) == 1
    finally:
        env.idp.release()
        env.idp.set_fault(path, None)
    results = [Checked(rid, future.result(), 0.0) for rid, future in sent]
    for checked in results:
        assert_allowed(checked, "frank")
    assert env.idp.count(path) == 1
    access = [server.line(c.request_id, "access") for c in results]
    assert sum(line["idpCalls"] for line in access) == 1, [line["idpCalls"] for line in access]
    assert_allowed(server.check(token, path="/single-flight/x"), "frank")
    assert env.idp.count(path) == 1  # and the answer is cached


# -- stale-while-error -------------------------------------------------------------------------

TINY_CACHE_HOURS = 0.0003  # 1.08 s: the key cache's TTL floor is min(30 s, this)


def test_cached_keys_keep_serving_while_the_idp_is_down(
    rsa_key: SigningKey, rsa_key2: SigningKey, tmp_path: Path
) -> None:
    """Stale-while-error: the IdP stops; JWTs signed by the cached key are still allowed past the
    cache TTL (and the failed refresh is logged), an uncached opaque token is denied 500, and
    past maxStaleDurationInHours the cached keys stop serving."""
    idp = FaultyIdp(keys=[rsa_key.public_jwk], clients={CLIENT_ID: "s"}, tls=False).start()
    try:
        (tmp_path / "secret").write_text("s")
        jwks_uri = idp.jwks("/stale/jwks")
        bounded_uri = idp.jwks("/bounded/jwks")
        introspection_uri = idp.introspection("/stale/introspect")
        config = {
            "deployments": [
                deployment("stale", {"type": JWKS, "uri": jwks_uri, "maxCacheDurationInHours": TINY_CACHE_HOURS}),
                deployment("bounded", {
                    "type": JWKS, "uri": bounded_uri,
                    "maxCacheDurationInHours": TINY_CACHE_HOURS,
                    "maxStaleDurationInHours": TINY_CACHE_HOURS,
                }),
                deployment("opaque", {
                    "type": INTROSPECTION, "uri": introspection_uri,
                    "clientDetails": client_details(tmp_path / "secret"),
                }),
            ]
        }
        # Before the start: the warm start fetches both JWKS after this, before the first check.
        fetched = time.monotonic()
        with ExtauthzProcess(config, tmp_path / "server") as server:
            assert_allowed(server.check(rsa_key.sign(claims()), path="/stale/x"))
            assert_allowed(server.check(rsa_key.sign(claims()), path="/bounded/x"))
            assert (idp.count("/stale/jwks"), idp.count("/bounded/jwks")) == (1, 1)
            idp.stop()  # the IdP is gone: its port refuses connections

            assert_allowed(server.check(rsa_key.sign(claims(sub="gina")), path="/stale/x"), "gina")

            def refresh_failed() -> list[dict[str, Any]]:
                # Keep checking: every check is allowed from the cache, before and after the TTL.
                assert_allowed(server.check(rsa_key.sign(claims()), path="/stale/x"))
                return [
                    line for line in server.lines()
                    if line.get("event") == IDP_FAILED and line.get("endpoint") == "jwks_uri"
                    and jwks_uri in line.get("message", "")
                ]

            (refresh,) = wait_until(refresh_failed, timeout=20, what="the failed background JWKS refresh")
            assert time.monotonic() - fetched >= TINY_CACHE_HOURS * 3600 * 0.9  # the TTL had passed
            assert refresh["message"] == UNREACHABLE.format(
                endpoint="jwks_uri", uri=jwks_uri, kind="CONNECTION_REFUSED"
            )
            for _ in range(3):  # still serving, past the TTL, within maxStaleDurationInHours
                assert_allowed(server.check(rsa_key.sign(claims()), path="/stale/x"))
            # ...but only for keys it has: a token from an unknown key is never allowed
            assert not server.check(rsa_key2.sign(claims()), path="/stale/x").allowed

            checked = server.check(idp.issue(claims()), path="/opaque/x")
            assert_idp_denial(
                server, checked, deployment="opaque", endpoint="introspection_endpoint",
                message=UNREACHABLE.format(
                    endpoint="introspection_endpoint", uri=introspection_uri, kind="CONNECTION_REFUSED"
                ),
            )

            # The bounded deployment's stale window (1.08 s past a 1.08 s TTL) runs out.
            def bounded_denied() -> Checked | None:
                c = server.check(rsa_key.sign(claims()), path="/bounded/x")
                return None if c.allowed else c

            denied = wait_until(bounded_denied, timeout=20, what="the stale window to run out")
            assert time.monotonic() - fetched >= 2 * TINY_CACHE_HOURS * 3600 * 0.9
            assert_idp_denial(
                server, denied, deployment="bounded", endpoint="jwks_uri",
                message=UNREACHABLE.format(endpoint="jwks_uri", uri=bounded_uri, kind="CONNECTION_REFUSED"),
            )
            assert_allowed(server.check(rsa_key.sign(claims()), path="/stale/x"))
    finally:
        idp.stop()


# -- circuit breaker -----------------------------------------------------------------------------

BREAKER_TIMEOUT = 2.0
COOL_DOWN = 2.0
FAST_MS = 250  # a failing-fast denial, as the server measured it (latencyMs); normally ~1 ms


def test_breaker_fails_fast_while_open_and_recovers_after_the_cool_down(
    env: Env, tmp_path: Path
) -> None:
    """After failureThreshold timeouts the circuit opens: denials come back at once with the
    'Circuit open' message and no IdP call. After the cool-down exactly one probe goes out; when
    it fails the circuit opens again. Once the IdP answers and the cool-down has passed, the probe
    succeeds and checks are allowed again (here with denyStatusOnIdpFailure: 503)."""
    idp, path = env.idp, "/breaker/introspect"
    uri = idp.introspection(path, fault=Fault.hang())
    (tmp_path / "secret").write_text(env.secret)
    config = {
        "server": {"denyStatusOnIdpFailure": 503, "circuitBreaker": {"failureThreshold": 2, "coolDownSeconds": COOL_DOWN}},
        "deployments": [deployment("breaker", {
            "type": INTROSPECTION, "uri": uri, "timeoutSeconds": BREAKER_TIMEOUT,
            "clientDetails": client_details(tmp_path / "secret"),
        })],
    }
    timeout_message = UNREACHABLE.format(endpoint="introspection_endpoint", uri=uri, kind="TIMEOUT")
    open_message = re.compile(
        rf"Circuit open for the introspection_endpoint uri: {re.escape(uri)}; failing fast until ({RFC3339})\."
    )

    def denial(server: ExtauthzProcess, checked: Checked, message: str | re.Pattern[str]) -> dict[str, Any]:
        return assert_idp_denial(
            server, checked, deployment="breaker", endpoint="introspection_endpoint", message=message, status=503
        )

    def open_until(server: ExtauthzProcess, checked: Checked) -> float:
        """The check failed fast on the open circuit; when the circuit lets a probe through."""
        line = denial(server, checked, open_message)
        assert line["lastCause"] == "TIMEOUT (read timeout)", line  # what opened it
        # Far below timeoutSeconds, by the server's clock and (more loosely, as a loaded machine
        # may delay the round trip) by the client's.
        assert server.line(checked.request_id, "access")["latencyMs"] < FAST_MS
        assert checked.seconds < BREAKER_TIMEOUT / 2, checked.seconds
        match = open_message.fullmatch(line["message"])
        assert match is not None
        until = parse_rfc3339(match.group(1))
        assert 0 < until - parse_rfc3339(line["ts"]) <= COOL_DOWN + 0.1, (line["ts"], until)
        return until

    def batch(server: ExtauthzProcess, n: int) -> list[Checked]:
        sent = server.check_many([(idp.issue(claims()), "/breaker/x") for _ in range(n)])
        return [Checked(rid, future.result(), 0.0) for rid, future in sent]

    with ExtauthzProcess(config, tmp_path / "server") as server:
        # Two checks time out together: two consecutive failures open the circuit.
        for checked in batch(server, 2):
            denial(server, checked, timeout_message)
        calls = idp.count(path)
        assert calls == 2

        token = idp.issue(claims(sub="hank"))
        until = open_until(server, server.check(token, path="/breaker/x"))
        assert idp.count(path) == calls  # failing fast: nothing reached the IdP

        # The cool-down passes, the IdP still hangs: of four concurrent checks one probes (and
        # times out), three fail fast; the failed probe opens the circuit again.
        wait_until(lambda: time.time() > until + 0.05, timeout=COOL_DOWN + 5, what="the cool-down")
        probed = batch(server, 4)
        messages = [server.line(c.request_id, IDP_FAILED)["message"] for c in probed]
        assert messages.count(timeout_message) == 1, messages
        for checked, message in zip(probed, messages, strict=True):
            denial(server, checked, timeout_message if message == timeout_message else open_message)
        assert idp.count(path) == calls + 1
        calls += 1
        until = open_until(server, server.check(token, path="/breaker/x"))
        assert idp.count(path) == calls

        idp.set_fault(path, None)  # the IdP is back; the circuit does not know yet

        def allowed_again() -> Checked | None:
            c = server.check(token, path="/breaker/x")
            if c.allowed:
                return c
            open_until(server, c)
            return None

        first = wait_until(allowed_again, timeout=COOL_DOWN + 10, what="the circuit to close", interval=0.1)
        assert time.time() >= until - 0.01  # not before the cool-down had passed
        assert_allowed(first, "hank")
        assert idp.count(path) == calls + 1  # the half-open probe, and nothing else
        for checked in batch(server, 3):  # closed: concurrent checks all go through
            assert_allowed(checked)


# -- hostile answers: what the IdP sends is never echoed, and never escapes the breaker --------------

DEEP = b"[" * 200_000 + b"]" * 200_000  # 400 KB, well under the 1 MiB cap
HOSTILE_ANSWERS: dict[str, tuple[int, str, bytes]] = {
    # path: (status, the reason phrase the IdP sends, body)
    "/h-599/introspect": (599, "IDP-REASON-MARKER client_secret=leaked", b'{"error": "IDP-BODY-MARKER"}'),
    "/h-502/introspect": (502, "IDP-REASON-MARKER", b'{"error": "IDP-BODY-MARKER"}'),
    "/h-deep-i/introspect": (200, "OK", DEEP),
    "/h-deep-j/jwks": (200, "OK", DEEP),
    "/h-deep-object-j/jwks": (200, "OK", b'{"keys":' * 100_000 + b"[]" + b"}" * 100_000),
    "/h-huge-j/jwks": (200, "OK", b'{"keys": [' + b" " * (2 * 1024 * 1024) + b"]}"),
}


@dataclass
class Hostile:
    url: str
    server: ExtauthzProcess


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    """An IdP whose answers are hostile (each path its HOSTILE_ANSWERS entry, reason phrase as
    given), and an extauthz that shows its messages in the body
    (exposeDetailedErrors) and opens a circuit after two failures."""
    workdir = tmp_path_factory.mktemp("hostile")
    (workdir / "secret").write_text("hostile-secret\n")
    with FaultyIdp(tls=False) as idp:
        deployments = []
        for path, (status, reason, body) in HOSTILE_ANSWERS.items():
            name = path.split("/")[1]
            fault = Fault.raw(status, body, reason)
            policy: dict[str, Any]
            if path.endswith("/introspect"):
                policy = {"type": INTROSPECTION, "uri": idp.introspection(path, fault=fault),
                          "clientDetails": client_details(workdir / "secret")}
            else:
                policy = {"type": JWKS, "uri": idp.jwks(path, fault=fault)}
            deployments.append(deployment(name, policy))
        config = {
            "server": {"exposeDetailedErrors": True, "circuitBreaker": {"failureThreshold": 2, "coolDownSeconds": 60}},
            "deployments": deployments,
        }
        with ExtauthzProcess(config, workdir / "server") as server:
            yield Hostile(idp.url, server)


@pytest.mark.parametrize(("name", "shown"), [("h-599", "599, Unknown"), ("h-502", "502, Bad Gateway")])
def test_the_idps_reason_phrase_is_never_echoed(hostile: Hostile, name: str, shown: str) -> None:
    """RFC 9110 §15: the message names the standard phrase of the status, or Unknown."""
    uri = f"{hostile.url}/{name}/introspect"
    message = UNEXPECTED.format(endpoint="introspection_endpoint", uri=uri, status=shown)
    checked = hostile.server.check(secrets.token_urlsafe(24), path=f"/{name}/x")
    assert_idp_denial(hostile.server, checked, deployment=name, endpoint="introspection_endpoint",
                      message=message, detailed=True)
    assert "IDP-REASON-MARKER" not in hostile.server.text() and "leaked" not in hostile.server.text()
    assert "IDP-REASON-MARKER" not in checked.response.denied_response.body


@pytest.mark.parametrize(
    ("name", "endpoint"),
    [
        ("h-deep-i", "introspection_endpoint"),
        ("h-deep-j", "jwks_uri"),
        ("h-deep-object-j", "jwks_uri"),
        ("h-huge-j", "jwks_uri"),
    ],
)
def test_deeply_nested_or_oversized_json_is_unparseable_and_opens_the_circuit(
    hostile: Hostile, env: Env, name: str, endpoint: str
) -> None:
    """A 200,000-level nested answer (or one past 1 MiB) is the parse failure, never an internal
    error; the breaker counts it, so after two the circuit opens and checks fail fast."""
    server = hostile.server
    token = (lambda: secrets.token_urlsafe(24)) if endpoint == "introspection_endpoint" else env.jwt
    for _ in range(2):
        checked = server.check(token(), path=f"/{name}/x")
        line = assert_idp_denial(server, checked, deployment=name, endpoint=endpoint, message=PARSE, detailed=True)
        assert len(line.get("detail", "")) < 100, line  # what was wrong, not the body
    checked = server.check(token(), path=f"/{name}/x")
    uri = f"{hostile.url}/{name}/{PATHS[endpoint]}"
    line = assert_idp_denial(server, checked, deployment=name, endpoint=endpoint, detailed=True, message=re.compile(
        rf"Circuit open for the {endpoint} uri: {re.escape(uri)}; failing fast until {RFC3339}\."))
    assert re.fullmatch(r"unusable response \((JSON nested deeper than 64 levels|response larger than 1 MiB)\)",
                        line["lastCause"]), line
    assert "RecursionError" not in server.text() and "Traceback" not in server.text()


# -- queueing for a slot is not the IdP's failure -------------------------------------------------

FLOOD_TIMEOUT = 1.0
MAX_OUTSTANDING = 64  # extauthz.idp.http.MAX_OUTSTANDING_CALLS: calls in flight per endpoint
QUEUED = 40


def test_a_flood_of_junk_tokens_queued_for_a_slot_does_not_open_the_circuit(
    tmp_path: Path, rsa_key: SigningKey
) -> None:
    """64 junk tokens hold every slot at a hanging IdP, 40 more wait behind them. All 104 checks
    fail closed within the timeout with the TIMEOUT message, but only the 64 the IdP held count
    for the breaker (failureThreshold 100): the queued ones say `queued for a connection slot`
    (outcome queue_timeout, or timeout for one that got a slot late and sent its request), and
    once the IdP answers again the next check is allowed, not failed fast on an open circuit."""
    idp = FaultyIdp(clients={CLIENT_ID: "s"}, tls=False).start()
    try:
        (tmp_path / "secret").write_text("s")
        path = "/flood/introspect"
        uri = idp.introspection(path, fault=Fault.hold())
        config = {
            "server": {"circuitBreaker": {"failureThreshold": 100, "coolDownSeconds": 60}},
            "deployments": [deployment("flood", {
                "type": INTROSPECTION, "uri": uri, "timeoutSeconds": FLOOD_TIMEOUT,
                "clientDetails": client_details(tmp_path / "secret"),
            })],
        }
        timeout_message = UNREACHABLE.format(endpoint="introspection_endpoint", uri=uri, kind="TIMEOUT")
        with ExtauthzProcess(config, tmp_path / "server") as server:
            junk = [(secrets.token_urlsafe(24), "/flood/x") for _ in range(MAX_OUTSTANDING + QUEUED)]
            sent = server.check_many(junk)
            flood = [Checked(rid, future.result(), 0.0) for rid, future in sent]
            details, sent = [], 0
            for checked in flood:
                line = assert_idp_denial(server, checked, deployment="flood", endpoint="introspection_endpoint",
                                         message=timeout_message)
                details.append(line["detail"])
                access = server.line(checked.request_id, "access")
                assert access["latencyMs"] < FLOOD_TIMEOUT * 1000 + 500
                sent += access["idpCalls"]
            # The held ones: connected and unanswered, or not even connected (the IdP's listen
            # backlog overflows); the others waited for their slot.
            assert details.count("queued for a connection slot") == QUEUED, details
            assert set(details) <= {"read timeout", "connect timeout", "queued for a connection slot"}

            def outcome(name: str) -> float:
                return server.metric("extauthz_idp_requests_total", endpoint="introspection_endpoint", outcome=name)

            assert outcome("timeout") + outcome("queue_timeout") == MAX_OUTSTANDING + QUEUED
            # Each request that went out is a `timeout`, as idpCalls counts it; the rest never left.
            assert outcome("timeout") == sent >= MAX_OUTSTANDING

            idp.release()
            idp.set_fault(path, None)
            assert_allowed(server.check(idp.issue(claims()), path="/flood/x"))
    finally:
        idp.stop()
