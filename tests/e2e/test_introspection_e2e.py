"""Opaque tokens through the real Envoy, extauthz and oidc-provider: RFC 7662 introspection.

The demo IdP issues opaque access tokens for ``https://opaque.example.com``; only its
introspection endpoint can say what they are. The deployments these tests reach are at the end of
``tests/e2e/policy.yaml`` (``/opaque``, ``/opaque-post``, ``/opaque-bad-client``,
``/opaque-wrong-audience``, ``/discovered``, ``/discovered-post``).
"""

from __future__ import annotations

import re
import secrets
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.e2e.test_jwt_e2e import (
    assert_access_line,
    assert_denied,
    assert_invalid_token,
    upstream_echo,
)

# Every test through Envoy runs on both wires (tests/e2e/conftest.py): the decisions, the
# denials as the client sees them and the identity headers the upstream gets must never drift.
pytestmark = pytest.mark.both_wires

if TYPE_CHECKING:  # the fixtures' types; conftest is never imported at run time
    from tests.e2e.conftest import Call, Gateway, IdP, Logs

OPAQUE = "https://opaque.example.com"
API = "https://api.example.com"
IDP_FAILED = "authentication.idpCallFailed"


def opaque_token(idp: IdP, client_id: str = "acme-client", scope: str = "orders.read orders.write") -> str:
    token = idp.token(client_id, resource=OPAQUE, scope=scope)
    assert token.count(".") != 2, "expected an opaque token, not a JWT"
    return token


def revoke(idp: IdP, token: str, client_id: str = "acme-client") -> None:
    """RFC 7009 revocation by the client the token was issued to."""
    response = idp.http.post(
        f"{idp.issuer}/token/revocation",
        auth=(client_id, f"{client_id}-secret"),
        data={"token": token, "token_type_hint": "access_token"},
    )
    assert response.status_code == 200, response.text


def idp_requests(http: httpx.Client, logs: Logs, endpoint: str) -> float:
    """extauthz's count of successful calls to one kind of IdP endpoint (admin /metrics)."""
    text = http.get(f"http://127.0.0.1:{logs.stack.ports.extauthz_admin}/metrics").text
    pattern = (
        r'^extauthz_idp_requests_total\{endpoint="' + re.escape(endpoint) + r'",outcome="ok"\} (\S+)$'
    )
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# -- allowed -----------------------------------------------------------------------------------


def test_valid_opaque_token_is_allowed_with_identity_headers(
    idp: IdP, gateway: Gateway, logs: Logs
) -> None:
    """An active opaque token is introspected and allowed; its claims fill the identity headers."""
    call = gateway.request(
        "GET",
        "/opaque/42",
        token=opaque_token(idp, scope="orders.read"),
        headers={"x-auth-subject": "attacker", "x-auth-tenant": "evil"},
    )
    echo = upstream_echo(call)
    assert echo["path"] == "/opaque/42"
    assert echo["headers"]["x-auth-subject"] == "acme-client"
    assert echo["headers"]["x-auth-tenant"] == "acme"
    assert "authorization" in echo["headers"]  # the token itself goes on to the upstream
    assert_access_line(
        logs, call, deployment="opaque", route="read", path="/opaque/42", decision="allow", idpCalls=1
    )


def test_opaque_token_with_client_secret_post_is_allowed(
    idp: IdP, gateway: Gateway, logs: Logs
) -> None:
    """The introspection client authenticating with client_secret_post works the same."""
    call = gateway.request("GET", "/opaque-post/7", token=opaque_token(idp))
    assert upstream_echo(call)["headers"]["x-auth-subject"] == "acme-client"
    assert_access_line(logs, call, deployment="opaque-post", decision="allow")


def test_introspection_answer_is_cached(idp: IdP, gateway: Gateway, logs: Logs) -> None:
    """The second check of the same token needs no IdP call."""
    token = opaque_token(idp)
    first = gateway.request("GET", "/opaque/1", token=token)
    second = gateway.request("GET", "/opaque/2", token=token)
    for call in (first, second):
        assert upstream_echo(call)["headers"]["x-auth-subject"] == "acme-client"
    assert_access_line(logs, first, decision="allow", idpCalls=1)
    assert_access_line(logs, second, decision="allow", idpCalls=0)


@pytest.mark.parametrize("deployment", ["discovered", "discovered-post"])
def test_discovery_verifies_jwts_locally_and_introspects_opaque_tokens(
    deployment: str, idp: IdP, gateway: Gateway, logs: Logs, http: httpx.Client
) -> None:
    """REMOTE_DISCOVERY with clientDetails: a JWT is checked against the discovered JWKS with no
    introspection, an opaque token is introspected at the discovered endpoint; both allowed."""
    jwt_call = gateway.request("GET", f"/{deployment}/a", token=idp.token("acme-client", resource=API))
    assert upstream_echo(jwt_call)["headers"]["x-auth-subject"] == "acme-client"
    assert_access_line(logs, jwt_call, deployment=deployment, decision="allow")

    before = idp_requests(http, logs, "introspection_endpoint")
    jwt_again = gateway.request("GET", f"/{deployment}/b", token=idp.token("acme-client", resource=API))
    assert upstream_echo(jwt_again)["headers"]["x-auth-tenant"] == "acme"
    assert_access_line(logs, jwt_again, deployment=deployment, decision="allow", idpCalls=0)
    assert idp_requests(http, logs, "introspection_endpoint") == before

    opaque_call = gateway.request("GET", f"/{deployment}/c", token=opaque_token(idp))
    echo = upstream_echo(opaque_call)
    assert (echo["headers"]["x-auth-subject"], echo["headers"]["x-auth-tenant"]) == ("acme-client", "acme")
    assert_access_line(logs, opaque_call, deployment=deployment, decision="allow", idpCalls=1)
    assert idp_requests(http, logs, "introspection_endpoint") == before + 1


# -- 401 ---------------------------------------------------------------------------------------


def test_revoked_token_is_401_token_inactive(idp: IdP, gateway: Gateway, logs: Logs) -> None:
    """A token revoked at the IdP (RFC 7009) before any check introspects as inactive: 401."""
    token = opaque_token(idp)
    revoke(idp, token)
    call = gateway.request("GET", "/opaque/42", token=token)
    assert_invalid_token(logs, call, realm="opaque", reason="token_inactive")
    assert_access_line(
        logs, call, deployment="opaque", status=401, decision="deny", reason="token_inactive", idpCalls=1
    )


def test_unknown_token_is_401_token_inactive(gateway: Gateway, logs: Logs) -> None:
    """A random string the IdP never issued: 401 token_inactive, not an IdP failure."""
    call = gateway.request("GET", "/opaque/42", token=secrets.token_urlsafe(32))
    assert_invalid_token(logs, call, realm="opaque", reason="token_inactive")


def test_opaque_token_for_another_audience_is_401_audience_mismatch(
    idp: IdP, gateway: Gateway, logs: Logs
) -> None:
    """An active token whose introspected aud is not among the deployment's audiences: 401."""
    call = gateway.request("GET", "/opaque-wrong-audience/1", token=opaque_token(idp))
    assert_invalid_token(
        logs, call, realm="opaque-wrong-audience", reason="audience_mismatch",
        message="JWT token not issued for the configured audience.",
    )


def test_opaque_token_with_wrong_claim_value_is_401(idp: IdP, gateway: Gateway, logs: Logs) -> None:
    """verifyClaims applies to introspected claims: globex's tenant is not acme."""
    call = gateway.request("GET", "/opaque/1", token=opaque_token(idp, "globex-client"))
    assert_invalid_token(
        logs, call, realm="opaque", reason="claim_value_mismatch",
        message="JWT token does not have the expected claim value for 'tenant'.",
    )


# -- 403 ---------------------------------------------------------------------------------------


def test_opaque_token_without_the_route_scope_is_403(idp: IdP, gateway: Gateway, logs: Logs) -> None:
    """Scope checks use the introspected scope: orders.read cannot POST."""
    call = gateway.request("POST", "/opaque", token=opaque_token(idp, scope="orders.read"))
    assert_denied(
        call,
        status=403,
        error="insufficient_scope",
        reason="insufficient_scope",
        www_authenticate='Bearer realm="opaque", error="insufficient_scope", scope="orders.write"',
    )
    assert_access_line(logs, call, deployment="opaque", route="write", status=403, decision="deny")


# -- 500: the IdP refuses extauthz -------------------------------------------------------------


def assert_idp_refusal_logged(idp: IdP, logs: Logs, call: Call) -> None:
    """One idpCallFailed line naming the endpoint and the IdP's 401, and the access line."""
    line = logs.find(call.request_id, IDP_FAILED)
    uri = f"{idp.issuer}/token/introspection"
    assert line["endpoint"] == "introspection_endpoint", line
    assert line["message"] == (
        f"Unexpected response from the introspection_endpoint uri: {uri}, received (401, Unauthorized)."
    ), line
    assert_access_line(
        logs, call, deployment="opaque-bad-client", status=500, decision="deny", reason="idp_call_failed"
    )
    failures = [
        record for record in logs.stack.extauthz_log_lines()
        if record.get("requestId") == call.request_id and record.get("event") == IDP_FAILED
    ]
    assert len(failures) == 1, failures


@pytest.mark.grpc_only(
    "Envoy takes an http_service's 5xx for a failed call and answers its own status_on_error "
    "(503, no body, none of extauthz's headers); test_jwt_e2e's "
    "test_both_wires_answer_the_client_alike[idp_call_failed] asserts that"
)
def test_wrong_introspection_credentials_are_500_with_the_401_message(
    idp: IdP, gateway: Gateway, logs: Logs
) -> None:
    """The IdP rejects extauthz's client credentials: 500 idp_call_failed, never allowed, and the
    log names the endpoint and the IdP's 401."""
    token = opaque_token(idp)
    call = gateway.request("GET", "/opaque-bad-client/1", token=token)
    assert_denied(call, status=500, error="server_error", reason="idp_call_failed", www_authenticate=None)
    assert_idp_refusal_logged(idp, logs, call)
    # The same token is fine where the credentials are right: the failure was extauthz's client.
    assert upstream_echo(gateway.request("GET", "/opaque/1", token=token))["headers"]["x-auth-tenant"] == "acme"


# What the client gets when extauthz answers 500: extauthz's denial on the gRPC wire, Envoy's
# status_on_error on the HTTP wire (docs/wires.md, "Configuring Envoy").
IDP_REFUSED_STATUS = {"grpc": 500, "http": 503}


def test_wrong_introspection_credentials_are_never_allowed_and_logged_alike(
    idp: IdP, gateway: Gateway, logs: Logs, wire: str
) -> None:
    """On either wire: refused, and the same lines, whatever Envoy then tells the client."""
    call = gateway.request("GET", "/opaque-bad-client/2", token=opaque_token(idp))
    assert call.response.status_code == IDP_REFUSED_STATUS[wire], call.response.text
    assert_idp_refusal_logged(idp, logs, call)


# -- what never leaves the server ----------------------------------------------------------------


def test_opaque_tokens_and_client_secrets_never_reach_the_log(
    idp: IdP, gateway: Gateway, logs: Logs
) -> None:
    """Neither accepted, revoked nor rejected opaque tokens, nor the introspection secrets, are logged."""
    good, revoked = opaque_token(idp), opaque_token(idp)
    revoke(idp, revoked)
    calls = [
        gateway.request("GET", "/opaque/9", token=good),
        gateway.request("GET", "/opaque/9", token=revoked),
        gateway.request("GET", "/opaque-bad-client/9", token=good),
        gateway.request("GET", "/opaque-post/9", token=good),
    ]
    for call in calls:
        logs.find(call.request_id, "access")
    text = logs.text()
    for value in (good, revoked, "extauthz-secret", "extauthz-post-secret", "not-the-extauthz-secret"):
        assert value not in text
