"""The engine end to end in-process: policy selection, IdP layer on httpx.MockTransport, and the
CheckResponse each decision becomes (every row of docs/decisions.md)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from extauthz._pb.envoy.config.core.v3 import base_pb2
from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from extauthz.config import Config, parse_config
from extauthz.decision import Decision, Reason
from extauthz.engine import CheckInput, Engine
from extauthz.idp.http import TlsSettings
from extauthz.response import to_check_response
from tests.check_requests import check_input
from tests.conftest import AUDIENCE, ISSUER, claims
from tests.fake_idp import DISCOVERY, FakeIdp
from tests.policies import GET_ORDER, LIST_ORDERS, orders
from tests.waiting import background_tasks_done


def make_config(validation: dict[str, Any], **auth: Any) -> Config:
    deployment = orders(
        validation,
        authentication=auth,
        hosts=["api.example.com", "*.example.org"],
        routes=[GET_ORDER, LIST_ORDERS],
        headersFromClaims={"x-auth-subject": "sub", "x-auth-tenant": "tenant"},
    )
    return parse_config({"deployments": [deployment]})


def discovery_policy(**extra: Any) -> dict[str, Any]:
    return {
        "type": "REMOTE_DISCOVERY",
        "uri": DISCOVERY,
        "additionalValidationPolicy": {
            "issuers": [ISSUER],
            "audiences": [AUDIENCE],
            "verifyClaims": [{"key": "tenant", "values": ["acme"], "isRequired": True}],
            **extra,
        },
    }


def build(config: Config, idp: FakeIdp, clock: Callable[[], float] | None = None) -> Engine:
    return idp.engine(config, clock=clock)


def request(token: str | None = None, path: str = "/orders/42", method: str = "GET", **headers: str) -> CheckInput:
    return check_input(path, token=token, method=method, host="api.example.com:443", headers=headers, request_id="rid-1")


def check(engine: Engine, req: CheckInput) -> Decision:
    return asyncio.run(engine.check(req))


def response_of(decision: Decision, config: Config) -> tuple[ext.CheckResponse, dict[str, str]]:
    resp = to_check_response(decision, "rid-1", config.server)
    headers = {h.header.key: h.header.value for h in resp.denied_response.headers}
    return resp, headers


@pytest.fixture
def idp(rsa_key: Any) -> FakeIdp:
    return FakeIdp([rsa_key.public_jwk])


@pytest.fixture
def config() -> Config:
    return make_config(discovery_policy())


def test_allow_sets_identity_headers_and_metadata(config: Config, idp: FakeIdp, rsa_key: Any) -> None:
    d = check(build(config, idp), request(rsa_key.sign(claims())))
    assert d.allowed and d.deployment == "orders" and d.route == "get-order"
    resp, _ = response_of(d, config)
    assert resp.status.code == 0
    set_headers = {(h.header.key, h.header.value, h.append_action) for h in resp.ok_response.headers}
    overwrite = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    assert set_headers == {("x-auth-subject", "alice", overwrite), ("x-auth-tenant", "acme", overwrite)}
    meta = dict(resp.dynamic_metadata)
    assert meta["deployment"] == "orders" and meta["route"] == "get-order"
    assert meta["sub"] == "alice" and meta["iss"] == ISSUER
    assert meta["client_id"] == "acme-client" and meta["scope"] == "orders.read"


def test_missing_claim_header_is_removed_not_passed_through(idp: FakeIdp, rsa_key: Any) -> None:
    config = make_config(discovery_policy(verifyClaims=[]))
    d = check(build(config, idp), request(rsa_key.sign(claims(tenant=None)), **{"x-auth-tenant": "evil"}))
    assert d.allowed
    assert d.remove_headers == ("x-auth-tenant",)
    resp, _ = response_of(d, config)
    assert list(resp.ok_response.headers_to_remove) == ["x-auth-tenant"]


def test_claim_with_crlf_never_becomes_a_header(idp: FakeIdp, rsa_key: Any) -> None:
    config = make_config(discovery_policy(verifyClaims=[]))
    d = check(build(config, idp), request(rsa_key.sign(claims(sub="a\r\nx-admin: 1"))))
    assert d.allowed and "x-auth-subject" in d.remove_headers
    assert all("\n" not in v for _, v in d.upstream_headers)


# (token claims override, expected reason, exact log message)
BAD_TOKENS = [
    ({"exp": 1}, Reason.TOKEN_EXPIRED, "Validation failed for 'exp' claim."),
    ({"nbf": 4_000_000_000}, Reason.TOKEN_NOT_YET_VALID, "Validation failed for 'nbf' claim."),
    ({"iss": "https://evil.example.com"}, Reason.ISSUER_MISMATCH, "JWT token not issued by the configured issuers."),
    ({"aud": "https://other.example.com"}, Reason.AUDIENCE_MISMATCH, "JWT token not issued for the configured audience."),
    ({"tenant": None}, Reason.CLAIM_MISSING, "JWT token missing required claim 'tenant'."),
    ({"tenant": "globex"}, Reason.CLAIM_VALUE_MISMATCH, "JWT token does not have the expected claim value for 'tenant'."),
]


@pytest.mark.parametrize(("over", "reason", "message"), BAD_TOKENS)
def test_bad_token_rows(config: Config, idp: FakeIdp, rsa_key: Any, over: dict[str, Any], reason: Reason, message: str) -> None:
    d = check(build(config, idp), request(rsa_key.sign(claims(**over))))
    assert not d.allowed and d.reason is reason and d.message == message
    assert d.event == "tokenAuthentication.authenticationFailed"
    resp, headers = response_of(d, config)
    assert resp.status.code == 16  # UNAUTHENTICATED
    assert resp.denied_response.status.code == 401
    assert headers["www-authenticate"] == 'Bearer realm="orders", error="invalid_token"'
    assert headers["x-extauthz-reason"] == reason.value
    assert headers["x-request-id"] == "rid-1"
    assert headers["content-type"] == "application/json"
    assert json.loads(resp.denied_response.body) == {
        "error": "invalid_token",
        "reason": reason.value,
        "request_id": "rid-1",
    }


def test_token_missing_has_realm_only_challenge(config: Config, idp: FakeIdp) -> None:
    d = check(build(config, idp), request(None))
    assert d.reason is Reason.TOKEN_MISSING
    resp, headers = response_of(d, config)
    assert resp.denied_response.status.code == 401 and resp.status.code == 16
    assert headers["www-authenticate"] == 'Bearer realm="orders"'
    assert json.loads(resp.denied_response.body)["error"] == "invalid_token"
    assert idp.calls == {}  # no IdP call for a request without a token


def test_other_auth_scheme_counts_as_no_token(config: Config, idp: FakeIdp) -> None:
    req = CheckInput("GET", "api.example.com", "/orders/1", {"authorization": "Basic YTpi"}, {})
    assert check(build(config, idp), req).reason is Reason.TOKEN_MISSING


def test_signature_and_key_rows(config: Config, idp: FakeIdp, rsa_key: Any, rsa_key2: Any) -> None:
    engine = build(config, idp)
    good = rsa_key.sign(claims())
    head, payload, sig = good.split(".")
    flipped = sig[:-4] + ("AAAA" if not sig.endswith("AAAA") else "BBBB")
    assert check(engine, request(f"{head}.{payload}.{flipped}")).reason is Reason.SIGNATURE_INVALID
    assert check(engine, request(rsa_key2.sign(claims()))).reason is Reason.KEY_NOT_FOUND
    assert check(engine, request("not-a-jwt")).reason is Reason.TOKEN_MALFORMED


def test_algorithm_not_allowed_row(idp: FakeIdp, ec_key: Any) -> None:
    config = make_config(discovery_policy(), )
    config = make_config({**discovery_policy(), "allowedAlgorithms": ["RS256"]})
    d = check(build(config, idp), request(ec_key.sign(claims())))
    assert d.reason is Reason.ALGORITHM_NOT_ALLOWED
    _, headers = response_of(d, config)
    assert headers["www-authenticate"] == 'Bearer realm="orders", error="invalid_token"'


def test_insufficient_scope_row(config: Config, idp: FakeIdp, rsa_key: Any) -> None:
    d = check(build(config, idp), request(rsa_key.sign(claims(scope="orders.write"))))
    assert d.reason is Reason.INSUFFICIENT_SCOPE
    resp, headers = response_of(d, config)
    assert resp.status.code == 7 and resp.denied_response.status.code == 403
    assert headers["www-authenticate"] == (
        'Bearer realm="orders", error="insufficient_scope", scope="orders.read"'
    )
    assert json.loads(resp.denied_response.body)["error"] == "insufficient_scope"


def test_authentication_only_route_needs_no_scope(config: Config, idp: FakeIdp, rsa_key: Any) -> None:
    d = check(build(config, idp), request(rsa_key.sign(claims(scope=None)), path="/orders"))
    assert d.allowed and d.route == "list"


@pytest.mark.parametrize(
    ("host", "path", "method"),
    [
        ("api.example.com", "/ordersX/1", "GET"),  # prefix on whole segments only
        ("other.example.com", "/orders/1", "GET"),  # host not listed
        ("api.example.com", "/orders/1", "DELETE"),  # no route for the method
        ("api.example.com", "/orders/1/2", "GET"),  # no route for the path
        ("example.org", "/orders/1", "GET"),  # *.example.org needs a subdomain
    ],
)
def test_no_matching_policy_row(config: Config, idp: FakeIdp, host: str, path: str, method: str) -> None:
    d = check(build(config, idp), CheckInput(method, host, path, {}, {}))
    assert d.reason is Reason.NO_MATCHING_POLICY
    resp, headers = response_of(d, config)
    assert resp.status.code == 7 and resp.denied_response.status.code == 403
    assert "www-authenticate" not in headers
    assert json.loads(resp.denied_response.body) == {
        "error": "access_denied",
        "reason": "no_matching_policy",
        "request_id": "rid-1",
    }


def test_host_wildcard_port_and_query_are_ignored(config: Config, idp: FakeIdp, rsa_key: Any) -> None:
    token = rsa_key.sign(claims())
    req = CheckInput("GET", "EU.Example.ORG:8443", "/orders/42?x=/y#frag", {"authorization": f"Bearer {token}"}, {})
    assert check(build(config, idp), req).allowed


def test_idp_failure_row(config: Config, idp: FakeIdp, rsa_key: Any) -> None:
    idp.status = 503
    d = check(build(config, idp), request(rsa_key.sign(claims())))
    assert d.reason is Reason.IDP_CALL_FAILED
    assert d.event == "authentication.idpCallFailed"
    assert d.message == f"Unexpected response from the discovery uri: {DISCOVERY}, received (503, Service Unavailable)."
    fields = dict(d.log_fields)
    assert fields["endpoint"] == "discovery" and len(fields["tokenSha256"]) == 8
    resp, headers = response_of(d, config)
    assert resp.status.code == 14 and resp.denied_response.status.code == 500
    assert "www-authenticate" not in headers
    assert json.loads(resp.denied_response.body)["error"] == "server_error"


def test_deny_status_on_idp_failure_503(idp: FakeIdp, rsa_key: Any) -> None:
    config = make_config(discovery_policy())
    config = parse_config({"server": {"denyStatusOnIdpFailure": 503}, "deployments": [
        {"name": "o", "pathPrefix": "/", "authentication": {"type": "TOKEN_AUTHENTICATION", "validationPolicy": discovery_policy()}}
    ]})
    idp.status = 500
    d = check(build(config, idp), request(rsa_key.sign(claims())))
    resp, _ = response_of(d, config)
    assert resp.denied_response.status.code == 503


def test_detailed_errors_only_when_exposed(idp: FakeIdp, rsa_key: Any) -> None:
    token = rsa_key.sign(claims(exp=1))
    for exposed in (False, True):
        config = parse_config({"server": {"exposeDetailedErrors": exposed}, "deployments": [
            {"name": "o", "pathPrefix": "/", "authentication": {"type": "TOKEN_AUTHENTICATION", "validationPolicy": discovery_policy()}}
        ]})
        d = check(build(config, idp), request(token))
        body = json.loads(response_of(d, config)[0].denied_response.body)
        assert ("error_description" in body) is exposed
        assert token not in json.dumps(body)
        if exposed:
            assert body["error_description"] == "Validation failed for 'exp' claim."


def test_discovery_issuer_must_match_configured(rsa_key: Any) -> None:
    idp = FakeIdp([rsa_key.public_jwk], issuer="https://impostor.example.com")
    config = make_config(discovery_policy())
    d = check(build(config, idp), request(rsa_key.sign(claims())))
    assert d.reason is Reason.IDP_CALL_FAILED
    assert d.message == "Unable to parse response from Identity Provider"
    fields = dict(d.log_fields)
    assert fields["endpoint"] == "discovery" and "issuer" in fields["detail"]


def test_discovery_issuer_is_used_when_none_configured(rsa_key: Any) -> None:
    idp = FakeIdp([rsa_key.public_jwk])
    policy = discovery_policy(issuers=[])
    config = make_config(policy)
    engine = build(config, idp)
    assert check(engine, request(rsa_key.sign(claims()))).allowed
    d = check(engine, request(rsa_key.sign(claims(iss="https://evil.example.com"))))
    assert d.reason is Reason.ISSUER_MISMATCH


def test_keys_are_cached(config: Config, idp: FakeIdp, rsa_key: Any) -> None:
    engine = build(config, idp)

    async def many() -> None:
        for _ in range(20):
            assert (await engine.check(request(rsa_key.sign(claims())))).allowed

    asyncio.run(many())
    assert idp.calls == {"/.well-known/openid-configuration": 1, "/jwks": 1}


def test_concurrent_fetches_collapse_into_one(config: Config, idp: FakeIdp, rsa_key: Any) -> None:
    idp.delay = 0.05
    engine = build(config, idp)
    token = rsa_key.sign(claims())

    async def burst() -> list[Decision]:
        return await asyncio.gather(*(engine.check(request(token)) for _ in range(50)))

    assert all(d.allowed for d in asyncio.run(burst()))
    assert idp.calls == {"/.well-known/openid-configuration": 1, "/jwks": 1}


def test_unknown_kid_refetch_is_rate_limited(config: Config, idp: FakeIdp, rsa_key: Any, rsa_key2: Any) -> None:
    now = [1000.0]
    engine = build(config, idp, clock=lambda: now[0])
    forged = rsa_key2.sign(claims())

    async def run() -> None:
        assert (await engine.check(request(rsa_key.sign(claims())))).allowed
        for _ in range(100):  # a flood of unknown kids right after a fetch: no refetch
            assert (await engine.check(request(forged))).reason is Reason.KEY_NOT_FOUND
        assert idp.calls["/jwks"] == 1
        now[0] += 6  # after the interval, one refetch ...
        for _ in range(100):
            assert (await engine.check(request(forged))).reason is Reason.KEY_NOT_FOUND
        assert idp.calls["/jwks"] == 2
        # ... and a rotated key is picked up by the next refetch
        idp.jwks = [rsa_key.public_jwk, rsa_key2.public_jwk]
        now[0] += 6
        assert (await engine.check(request(forged))).allowed
        assert idp.calls["/jwks"] == 3

    asyncio.run(run())


def test_cache_control_max_age_bounds_the_ttl(config: Config, idp: FakeIdp, rsa_key: Any) -> None:
    now = [0.0]
    idp.cache_control = "public, max-age=120"
    engine = build(config, idp, clock=lambda: now[0])

    async def at(t: float, jwks_fetches: int) -> None:
        now[0] = t
        assert (await engine.check(request(rsa_key.sign(claims())))).allowed
        # An expired document is served at once and refreshed in the background: wait for the
        # refresh's call to the IdP, and for the refresh to end.
        await idp.until_called("/jwks", jwks_fetches)
        await background_tasks_done(what="the background refresh")

    async def run() -> None:
        await at(0, 1)
        await at(119, 1)
        assert idp.calls["/jwks"] == 1
        await at(121, 2)
        assert idp.calls["/jwks"] == 2
        idp.cache_control = "max-age=0"  # floored: not a fetch per check
        await at(300, 3)
        await at(310, 3)
        assert idp.calls["/jwks"] == 3

    asyncio.run(run())


def test_cached_keys_survive_an_idp_outage(config: Config, idp: FakeIdp, rsa_key: Any) -> None:
    now = [0.0]
    engine = build(config, idp, clock=lambda: now[0])
    token = rsa_key.sign(claims())

    async def run() -> None:
        assert (await engine.check(request(token))).allowed
        idp.status = 500
        now[0] = 3600 + 10  # expired, within the stale window: served at once, refreshed behind
        for _ in range(20):
            assert (await engine.check(request(token))).allowed
        # The refresh runs in the background: wait for its call to the IdP, and for it to end.
        await idp.until_called("/.well-known/openid-configuration", 2)
        await background_tasks_done(what="the failed background refresh")
        assert idp.calls["/.well-known/openid-configuration"] == 2  # one failed background refresh
        now[0] = 3 * 3600  # beyond the stale window: fail closed
        assert (await engine.check(request(token))).reason is Reason.IDP_CALL_FAILED

    asyncio.run(run())


def test_static_keys_and_token_query_param(rsa_key: Any) -> None:
    config = make_config(
        {"type": "STATIC_KEYS", "keys": [rsa_key.public_jwk], "additionalValidationPolicy": {"issuers": [ISSUER]}},
        tokenQueryParam="access_token",
    )
    engine = build(config, FakeIdp())
    token = rsa_key.sign(claims())
    assert check(engine, CheckInput("GET", "api.example.com", f"/orders/1?access_token={token}", {}, {})).allowed
    d = check(engine, CheckInput("GET", "api.example.com", "/orders/1", {"authorization": f"Bearer {token}"}, {}))
    assert d.reason is Reason.TOKEN_MISSING


def test_custom_header_without_scheme(rsa_key: Any) -> None:
    config = make_config(
        {"type": "STATIC_KEYS", "keys": [rsa_key.public_jwk]}, tokenHeader="X-Api-Token", tokenAuthScheme=""
    )
    engine = build(config, FakeIdp())
    token = rsa_key.sign(claims())
    assert check(engine, CheckInput("GET", "api.example.com", "/orders/1", {"x-api-token": token}, {})).allowed


def test_context_extensions_select_deployment_and_route(rsa_key: Any) -> None:
    cfg = parse_config({"deployments": [
        {"name": "a", "pathPrefix": "/a", "authentication": {"type": "TOKEN_AUTHENTICATION", "validationPolicy": {"type": "STATIC_KEYS", "keys": [rsa_key.public_jwk]}},
         "routes": [{"name": "r0", "path": "/x"}, {"name": "admin", "path": "/{p*}", "authorization": {"type": "ANY_OF", "allowedScope": ["admin"]}}]},
        {"name": "b", "pathPrefix": "/", "authentication": {"type": "TOKEN_AUTHENTICATION", "isAnonymousAccessAllowed": True, "validationPolicy": {"type": "STATIC_KEYS", "keys": [rsa_key.public_jwk]}}},
    ]})
    engine = build(cfg, FakeIdp())
    token = rsa_key.sign(claims())
    def ce(path: str, ext: dict[str, str], tok: str | None = token) -> Decision:
        h = {"authorization": f"Bearer {tok}"} if tok else {}
        return check(engine, CheckInput("GET", "h", path, h, ext))
    # path says deployment b (anonymous), context_extensions say a
    assert ce("/zzz", {}, None).allowed
    assert ce("/zzz", {"deployment": "a"}, None).reason is Reason.TOKEN_MISSING
    d = ce("/zzz", {"deployment": "a", "route": "admin"})
    assert d.reason is Reason.INSUFFICIENT_SCOPE and d.route == "admin"
    assert ce("/zzz", {"deployment": "a", "route": "1"}).reason is Reason.INSUFFICIENT_SCOPE
    assert ce("/a/x", {"deployment": "a"}).route == "r0"
    assert ce("/x", {"deployment": "nope"}).reason is Reason.NO_MATCHING_POLICY
    assert ce("/x", {"deployment": "a", "route": "nope"}).reason is Reason.NO_MATCHING_POLICY


def test_anonymous_access(rsa_key: Any) -> None:
    cfg = parse_config({"deployments": [
        {"name": "pub", "pathPrefix": "/pub", "authentication": {"type": "TOKEN_AUTHENTICATION", "isAnonymousAccessAllowed": True,
         "validationPolicy": {"type": "STATIC_KEYS", "keys": [rsa_key.public_jwk]}},
         "routes": [{"path": "/open", "authorization": {"type": "ANONYMOUS"}}, {"path": "/closed"}],
         "headersFromClaims": {"x-auth-subject": "sub"}},
    ]})
    engine = build(cfg, FakeIdp())
    anon = check(engine, CheckInput("GET", "h", "/pub/open", {"x-auth-subject": "forged"}, {}))
    assert anon.allowed and anon.remove_headers == ("x-auth-subject",)
    assert check(engine, CheckInput("GET", "h", "/pub/closed", {}, {})).reason is Reason.TOKEN_MISSING
    bad = check(engine, CheckInput("GET", "h", "/pub/open", {"authorization": "Bearer a.b.c"}, {}))
    assert bad.reason is Reason.TOKEN_MALFORMED  # a token that is sent is validated
    good = check(engine, CheckInput("GET", "h", "/pub/open", {"authorization": f"Bearer {rsa_key.sign(claims())}"}, {}))
    assert good.allowed and good.upstream_headers == (("x-auth-subject", "alice"),)


def test_dot_segments_cannot_escape_the_policy(config: Config, idp: FakeIdp) -> None:
    """Not resolved, refused: extauthz and the upstream could resolve them differently."""
    d = check(build(config, idp), CheckInput("GET", "api.example.com", "/orders/../admin", {}, {}))
    assert d.reason is Reason.REQUEST_AMBIGUOUS


def test_tls_settings_are_shared_per_setting() -> None:
    assert TlsSettings() == TlsSettings(True, None)
