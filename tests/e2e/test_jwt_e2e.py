"""JWT validation through the real Envoy, extauthz and oidc-provider, as a client sees it.

Every denial is checked on all its surfaces: HTTP status, ``www-authenticate`` exactly as in
docs/decisions.md's table, ``x-extauthz-reason``, the JSON body, and the access and execution log
lines that extauthz wrote for that request's ``x-request-id``.

Each test through Envoy runs once per wire (gRPC, HTTP: tests/e2e/conftest.py), and
``test_both_wires_answer_the_client_alike`` sends the same requests through both and compares
what the client and the upstream get.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.tokens import opaque_token, revoked_token, tamper_signature, with_header
from tests.integration.serverproc import run_extauthz

# Every test through Envoy runs on both wires (tests/e2e/conftest.py): the decisions, the
# denials as the client sees them and the identity headers the upstream gets must never drift.
pytestmark = pytest.mark.both_wires

if TYPE_CHECKING:  # the fixtures' types; conftest is never imported at run time
    from tests.e2e.conftest import Call, Gateway, IdP, Logs

REPO = Path(__file__).resolve().parents[2]
OTHER_API = "https://other.example.com"

INVALID_TOKEN = 'Bearer realm="{realm}", error="invalid_token"'
# What the access line says of GET /orders/42 and of POST /orders, whatever the decision.
GET_ORDER = {"deployment": "orders", "route": "get-order", "method": "GET", "path": "/orders/42"}
CREATE_ORDER = {"deployment": "orders", "route": "create-order", "method": "POST", "path": "/orders"}


def assert_denied(
    call: Call, *, status: int, error: str, reason: str, www_authenticate: str | None
) -> None:
    """A denial as docs/decisions.md's table describes it, on every surface the client sees."""
    response = call.response
    assert response.status_code == status, response.text
    assert response.headers.get("www-authenticate") == www_authenticate
    assert response.headers.get("x-extauthz-reason") == reason
    assert response.headers.get("x-request-id") == call.request_id
    assert response.headers.get("content-type", "").startswith("application/json")
    # exposeDetailedErrors is false in the test policy, so no error_description.
    assert response.json() == {"error": error, "reason": reason, "request_id": call.request_id}


def assert_access_line(logs: Logs, call: Call, **expected: Any) -> dict[str, Any]:
    """The request's access log line, with the fields every access line has and ``expected``."""
    line = logs.find(call.request_id, "access")
    for field in (
        "ts",
        "level",
        "deployment",
        "route",
        "method",
        "path",
        "status",
        "decision",
        "reason",
        "latencyMs",
        "idpCalls",
    ):
        assert field in line, f"access line without {field!r}: {line}"
    assert isinstance(line["latencyMs"], (int, float)) and line["latencyMs"] >= 0
    assert isinstance(line["idpCalls"], int) and line["idpCalls"] >= 0
    assert {key: line[key] for key in expected} == expected, line
    return line


def assert_failure_line(
    logs: Logs, call: Call, *, reason: str, message: str | None = None, legacy: bool = False
) -> dict[str, Any]:
    """The request's execution log line for an authentication failure."""
    event = (
        "jwtAuthentication.authenticationFailed"
        if legacy
        else "tokenAuthentication.authenticationFailed"
    )
    line = logs.find(call.request_id, event)
    assert line["reason"] == reason, line
    assert "ts" in line and "level" in line, line
    if message is None:  # no fixed wording for this reason: a plain sentence
        assert isinstance(line.get("message"), str) and line["message"].strip(), line
    else:
        assert line.get("message") == message, line
    return line


def assert_invalid_token(
    logs: Logs,
    call: Call,
    *,
    realm: str,
    reason: str,
    message: str | None = None,
    deployment: str | None = None,
    legacy: bool = False,
) -> None:
    """A 401 ``invalid_token`` denial on every surface, its execution log line and, when
    ``deployment`` is given, its access line."""
    assert_denied(
        call,
        status=401,
        error="invalid_token",
        reason=reason,
        www_authenticate=INVALID_TOKEN.format(realm=realm),
    )
    assert_failure_line(logs, call, reason=reason, message=message, legacy=legacy)
    if deployment is not None:
        assert_access_line(
            logs, call, deployment=deployment, status=401, decision="deny", reason=reason
        )


def upstream_echo(call: Call) -> dict[str, Any]:
    """What the echo upstream saw: method, path and (lower-cased) headers."""
    assert call.response.status_code == 200, call.response.text
    echo: dict[str, Any] = call.response.json()
    return echo


# -- allowed -----------------------------------------------------------------------------------


def test_valid_token_reaches_upstream_with_identity_headers(
    idp: IdP, gateway: Gateway, logs: Logs
) -> None:
    """A valid acme token with orders.read is allowed; identity headers replace client-sent ones."""
    token = idp.token("acme-client", scope="orders.read")
    call = gateway.request(
        "GET",
        "/orders/42?expand=items",
        token=token,
        headers={"x-auth-subject": "attacker", "x-auth-tenant": "evil"},
    )
    echo = upstream_echo(call)
    assert echo["path"] == "/orders/42?expand=items"
    assert echo["headers"]["x-auth-subject"] == "acme-client"
    assert echo["headers"]["x-auth-tenant"] == "acme"
    assert echo["headers"]["x-request-id"] == call.request_id
    assert_access_line(logs, call, **GET_ORDER, decision="allow")


def test_post_with_write_scope_is_allowed(idp: IdP, gateway: Gateway, logs: Logs) -> None:
    """POST /orders matches the create-order route, and orders.write grants it."""
    call = gateway.request("POST", "/orders", token=idp.token("acme-client"))
    assert upstream_echo(call)["method"] == "POST"
    assert_access_line(
        logs, call, deployment="orders", route="create-order", method="POST", decision="allow"
    )


def test_healthz_route_bypasses_ext_authz(gateway: Gateway, logs: Logs) -> None:
    """Envoy's /healthz route disables ext_authz: no token needed and no check is logged."""
    call = gateway.request("GET", "/healthz")
    assert upstream_echo(call)["path"] == "/healthz"
    assert not any(
        line.get("requestId") == call.request_id for line in logs.stack.extauthz_log_lines()
    )


# -- 401: token missing or invalid --------------------------------------------------------------


def test_missing_token_is_401_without_error_code(gateway: Gateway, logs: Logs) -> None:
    """No credentials: 401 and a bare Bearer challenge (RFC 6750 §3.1: no error code)."""
    call = gateway.request("GET", "/orders/42")
    assert_denied(
        call,
        status=401,
        error="invalid_token",
        reason="token_missing",
        www_authenticate='Bearer realm="orders"',
    )
    assert_failure_line(logs, call, reason="token_missing")
    assert_access_line(
        logs, call, **GET_ORDER, status=401, decision="deny", reason="token_missing"
    )


def test_expired_token_is_rejected(expired_token: str, gateway: Gateway, logs: Logs) -> None:
    """A token past its exp, with no clock skew allowed: 401 token_expired."""
    call = gateway.request("GET", "/orders/42", token=expired_token)
    assert_invalid_token(
        logs,
        call,
        realm="orders",
        reason="token_expired",
        message="Validation failed for 'exp' claim.",
        deployment="orders",
    )


def test_expired_token_within_clock_skew_is_accepted(
    expired_token: str, gateway: Gateway, logs: Logs
) -> None:
    """The same kind of token, seconds past exp, passes where maxClockSkewInSeconds is 60."""
    call = gateway.request("GET", "/skew/anything", token=expired_token)
    assert upstream_echo(call)["headers"]["x-auth-subject"] == "short-lived"
    assert_access_line(logs, call, deployment="skew", decision="allow")


# (path, the token sent, realm, reason, the exact log message or None, the deployment its access
# line names or None, whether the deployment is the legacy JWT_AUTHENTICATION form)
INVALID_TOKENS = [
    # One changed character in the signature.
    pytest.param(
        "/orders/42", lambda idp: tamper_signature(idp.token("acme-client")),
        "orders", "signature_invalid", None, "orders", False, id="tampered-signature",
    ),
    # A bearer value that is not a JWT at all.
    pytest.param(
        "/orders/42", lambda idp: "not-a-jwt",
        "orders", "token_malformed", None, None, False, id="garbage-is-malformed",
    ),
    # A deployment that trusts another issuer.
    pytest.param(
        "/wrong-issuer/x", lambda idp: idp.token("acme-client"),
        "wrong-issuer", "issuer_mismatch", "JWT token not issued by the configured issuers.",
        "wrong-issuer", False, id="wrong-issuer",
    ),
    # A genuine token issued for https://other.example.com.
    pytest.param(
        "/orders/42", lambda idp: idp.token("acme-client", resource=OTHER_API),
        "orders", "audience_mismatch", "JWT token not issued for the configured audience.",
        None, False, id="another-audience",
    ),
    # plain-client's token has no tenant claim.
    pytest.param(
        "/orders/42", lambda idp: idp.token("plain-client"),
        "orders", "claim_missing", "JWT token missing required claim 'tenant'.",
        None, False, id="missing-required-claim",
    ),
    # globex-client's token has tenant globex, orders wants acme.
    pytest.param(
        "/orders/42", lambda idp: idp.token("globex-client"),
        "orders", "claim_value_mismatch",
        "JWT token does not have the expected claim value for 'tenant'.",
        "orders", False, id="wrong-claim-value",
    ),
    # isAnonymousAccessAllowed does not excuse a token that was sent and is invalid.
    pytest.param(
        "/public/hello", lambda idp: tamper_signature(idp.token("acme-client")),
        "public", "signature_invalid", None, None, False, id="anonymous-access-still-rejects-a-bad-token",
    ),
    # A legacy deployment's failure is logged as jwtAuthentication.authenticationFailed.
    pytest.param(
        "/legacy/1", lambda idp: idp.token("globex-client"),
        "legacy", "claim_value_mismatch",
        "JWT token does not have the expected claim value for 'tenant'.",
        None, True, id="legacy-jwt-authentication-logs-its-own-event",
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "token", "realm", "reason", "message", "deployment", "legacy"), INVALID_TOKENS
)
def test_an_invalid_token_is_401_invalid_token(
    idp: IdP,
    gateway: Gateway,
    logs: Logs,
    path: str,
    token: Callable[[IdP], str],
    realm: str,
    reason: str,
    message: str | None,
    deployment: str | None,
    legacy: bool,
) -> None:
    """401 with the deployment's invalid_token challenge, the reason, and its failure line."""
    call = gateway.request("GET", path, token=token(idp))
    assert_invalid_token(
        logs, call, realm=realm, reason=reason, message=message, deployment=deployment, legacy=legacy
    )


# -- 403 ---------------------------------------------------------------------------------------


def test_missing_scope_is_403_insufficient_scope(idp: IdP, gateway: Gateway, logs: Logs) -> None:
    """A valid token with only orders.read cannot POST: 403 naming the scope it lacks."""
    call = gateway.request("POST", "/orders", token=idp.token("acme-client", scope="orders.read"))
    assert_denied(
        call,
        status=403,
        error="insufficient_scope",
        reason="insufficient_scope",
        www_authenticate='Bearer realm="orders", error="insufficient_scope", scope="orders.write"',
    )
    assert_access_line(
        logs, call, **CREATE_ORDER, status=403, decision="deny", reason="insufficient_scope"
    )


def test_path_no_deployment_covers_is_403_no_matching_policy(
    idp: IdP, gateway: Gateway, logs: Logs
) -> None:
    """No deployment's pathPrefix covers /nowhere: 403 access_denied, no challenge."""
    call = gateway.request("GET", "/nowhere/1", token=idp.token("acme-client"))
    assert_denied(
        call, status=403, error="access_denied", reason="no_matching_policy", www_authenticate=None
    )
    assert_access_line(logs, call, status=403, decision="deny", reason="no_matching_policy")


def test_path_prefix_matches_whole_segments_only(gateway: Gateway) -> None:
    """/publicity is not under the /public deployment, so nothing covers it."""
    call = gateway.request("GET", "/publicity")
    assert_denied(
        call, status=403, error="access_denied", reason="no_matching_policy", www_authenticate=None
    )


# -- anonymous access --------------------------------------------------------------------------


def test_anonymous_access_allows_no_token(gateway: Gateway, logs: Logs) -> None:
    """isAnonymousAccessAllowed: no token is fine; a client-sent identity header is dropped."""
    call = gateway.request("GET", "/public/hello", headers={"x-auth-subject": "attacker"})
    assert "x-auth-subject" not in upstream_echo(call)["headers"]
    assert_access_line(logs, call, deployment="public", path="/public/hello", decision="allow")


def test_anonymous_access_still_uses_a_valid_token(idp: IdP, gateway: Gateway) -> None:
    """isAnonymousAccessAllowed with a valid token: allowed, with its identity headers."""
    call = gateway.request("GET", "/public/hello", token=idp.token("acme-client"))
    assert upstream_echo(call)["headers"]["x-auth-subject"] == "acme-client"


# -- legacy JWT_AUTHENTICATION form --------------------------------------------------------------


def test_legacy_jwt_authentication_allows_a_valid_token(
    idp: IdP, gateway: Gateway, logs: Logs
) -> None:
    """type JWT_AUTHENTICATION with publicKeys REMOTE_JWKS validates like TOKEN_AUTHENTICATION."""
    call = gateway.request("GET", "/legacy/1", token=idp.token("acme-client"))
    assert upstream_echo(call)["headers"]["x-auth-subject"] == "acme-client"
    assert_access_line(logs, call, deployment="legacy", decision="allow")


# -- what never leaves the server ----------------------------------------------------------------


def test_tokens_never_reach_the_log(idp: IdP, gateway: Gateway, logs: Logs) -> None:
    """Neither a rejected nor an accepted token, nor its signature, appears in extauthz's output."""
    good = idp.token("acme-client", scope="orders.read")
    bad = tamper_signature(idp.token("globex-client"))
    calls = [gateway.request("GET", "/orders/7", token=token) for token in (good, bad)]
    for call in calls:
        logs.find(call.request_id, "access")
    text = logs.text()
    for token in (good, bad):
        assert token not in text
        assert token.split(".")[2] not in text


def test_demo_config_passes_check_config() -> None:
    """examples/demo.yaml, the file users copy, is a valid config."""
    result = run_extauthz("check-config", str(REPO / "examples" / "demo.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr



# -- both wires answer alike -------------------------------------------------------------------
# The same request, with the same x-request-id and the same token, sent through the gRPC-wire
# Envoy and the HTTP-wire Envoy: what the client gets must be the same bytes, and the upstream
# the same identity headers. The tests above assert each wire against the expected decision;
# this asserts the two wires against each other, so that nothing either wire adds or drops
# (a header, a byte of the body) goes unnoticed. Where Envoy itself treats the HTTP wire's
# answer differently (docs/wires.md, "Configuring Envoy"), the difference is asserted exactly.

# What a client sees of a denial, compared header by header.
DENIAL_HEADERS = ("www-authenticate", "x-extauthz-reason", "x-request-id", "content-type")
# Envoy times its HTTP call to extauthz and says so on the denial it passes on; the gRPC call
# has no such header. Nothing of extauthz's.
HTTP_WIRE_ONLY = {"x-envoy-upstream-service-time"}
# Headers that differ from one response to the next whatever the wire.
PER_RESPONSE = {"date"}
IDENTITY = ("x-auth-subject", "x-auth-tenant")
FORGED = {"x-auth-subject": "attacker", "x-auth-tenant": "evil"}
ACME = {"x-auth-subject": "acme-client", "x-auth-tenant": "acme"}
# How the HTTP wire's answer reaches the client, next to the gRPC wire's:
SAME = "same"  # byte for byte
# HEAD: Envoy asks extauthz with HEAD, so the denial comes without a body, and Envoy's reply
# then has no content-type or content-length (the gRPC wire's reply has both, and no body).
HEAD = "head"
# A 5xx from an http_service is a failed call to Envoy: the client gets status_on_error (503)
# with an empty body and none of extauthz's headers.
ENVOY_503 = "status_on_error"


# (method, path, the credential or None, more request headers, the reason, or for an allow the
# identity headers the upstream gets, and how the HTTP wire's answer compares). A credential is
# made once and sent on both wires; the expired one only where it is used (it takes seconds).
WIRE_CASES = [
    pytest.param("GET", "/orders/42", lambda idp, request: idp.token("acme-client", scope="orders.read"), FORGED, ACME, SAME, id="allow-identity-replaces-forged"),
    pytest.param("GET", "/public/hello", None, {"x-auth-subject": "attacker"}, {}, SAME, id="allow-anonymous-forged-removed"),
    pytest.param("GET", "/opaque/1", lambda idp, request: opaque_token(idp), FORGED, ACME, SAME, id="allow-opaque"),
    pytest.param("GET", "/orders/42", None, {}, "token_missing", SAME, id="token_missing"),
    pytest.param("GET", "/orders/42", None, {"authorization": "Token abc"}, "token_missing", SAME, id="token_missing-other-scheme"),
    pytest.param("GET", "/orders/42", lambda idp, request: "not-a-jwt", {}, "token_malformed", SAME, id="token_malformed"),
    pytest.param("GET", "/orders/42", lambda idp, request: tamper_signature(idp.token("acme-client")), {}, "signature_invalid", SAME, id="signature_invalid"),
    pytest.param("GET", "/orders/42", lambda idp, request: with_header(idp.token("acme-client"), kid="rotated-away"), {}, "key_not_found", SAME, id="key_not_found"),
    pytest.param("GET", "/orders/42", lambda idp, request: with_header(idp.token("acme-client"), alg="HS256"), {}, "algorithm_not_allowed", SAME, id="algorithm_not_allowed"),
    pytest.param("GET", "/orders/42", lambda idp, request: request.getfixturevalue("expired_token"), {}, "token_expired", SAME, id="token_expired"),
    pytest.param("GET", "/wrong-issuer/x", lambda idp, request: idp.token("acme-client"), {}, "issuer_mismatch", SAME, id="issuer_mismatch"),
    pytest.param("GET", "/orders/42", lambda idp, request: idp.token("acme-client", resource=OTHER_API), {}, "audience_mismatch", SAME, id="audience_mismatch"),
    pytest.param("GET", "/orders/42", lambda idp, request: idp.token("plain-client"), {}, "claim_missing", SAME, id="claim_missing"),
    pytest.param("GET", "/orders/42", lambda idp, request: idp.token("globex-client"), {}, "claim_value_mismatch", SAME, id="claim_value_mismatch"),
    pytest.param("GET", "/opaque/1", lambda idp, request: revoked_token(idp), {}, "token_inactive", SAME, id="token_inactive"),
    pytest.param("POST", "/orders", lambda idp, request: idp.token("acme-client", scope="orders.read"), {}, "insufficient_scope", SAME, id="insufficient_scope"),
    pytest.param("GET", "/nowhere/1", lambda idp, request: idp.token("acme-client"), {}, "no_matching_policy", SAME, id="no_matching_policy"),
    pytest.param("DELETE", "/orders/42", lambda idp, request: idp.token("acme-client"), {}, "no_matching_policy", SAME, id="no_matching_policy-method"),
    # A client naming a deployment: the HTTP wire's x-extauthz-deployment is Envoy's to set.
    pytest.param("GET", "/nowhere/1", None, {"x-extauthz-deployment": "public"}, "no_matching_policy", SAME, id="no_matching_policy-forged-deployment"),
    pytest.param("HEAD", "/public/hello", lambda idp, request: "not-a-jwt", {}, "token_malformed", HEAD, id="head-token_malformed"),
    pytest.param("GET", "/opaque-bad-client/1", lambda idp, request: opaque_token(idp), {}, "idp_call_failed", ENVOY_503, id="idp_call_failed"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "credential", "headers", "expected", "on_http"), WIRE_CASES)
def test_both_wires_answer_the_client_alike(
    gateways: dict[str, Gateway],
    idp: IdP,
    request: pytest.FixtureRequest,
    method: str,
    path: str,
    credential: Callable[[IdP, pytest.FixtureRequest], str] | None,
    headers: dict[str, str],
    expected: str | dict[str, str],
    on_http: str,
) -> None:
    """Status, the denial's headers and body bytes as the client gets them, and the identity
    headers the upstream gets, are the same through either wire."""
    token = credential(idp, request) if credential is not None else None
    request_id = str(uuid.uuid4())
    calls = {
        wire: gateway.request(method, path, token=token, headers=headers, request_id=request_id)
        for wire, gateway in gateways.items()
    }
    grpc, over_http = calls["grpc"].response, calls["http"].response
    if isinstance(expected, dict):  # allowed: what the upstream got, not Envoy's echo of it
        for call in calls.values():
            echo = upstream_echo(call)["headers"]
            assert {k: echo[k] for k in IDENTITY if k in echo} == expected
        return
    assert grpc.headers["x-extauthz-reason"] == expected, grpc.text
    assert grpc.headers["x-request-id"] == request_id
    names = {wire: set(call.response.headers) - PER_RESPONSE for wire, call in calls.items()}
    if on_http == SAME:
        assert (over_http.status_code, over_http.content) == (grpc.status_code, grpc.content)
        for name in DENIAL_HEADERS:
            assert over_http.headers.get(name) == grpc.headers.get(name), name
        assert names["http"] - HTTP_WIRE_ONLY == names["grpc"]
    elif on_http == HEAD:
        assert over_http.status_code == grpc.status_code
        assert over_http.content == grpc.content == b""
        for name in ("www-authenticate", "x-extauthz-reason", "x-request-id"):
            assert over_http.headers.get(name) == grpc.headers.get(name), name
        assert grpc.headers["content-type"] == "application/json"
        assert "content-type" not in over_http.headers
    else:
        assert on_http == ENVOY_503
        assert grpc.status_code >= 500 and grpc.headers["content-type"] == "application/json"
        assert (over_http.status_code, over_http.content) == (503, b"")
        assert not {"x-extauthz-reason", "www-authenticate", "content-type"} & names["http"]
