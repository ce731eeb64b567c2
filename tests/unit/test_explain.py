"""`extauthz explain` on locally signed tokens: every check shown with both values, and a
decision that is exactly the engine's (static keys, and remote keys on httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz.cli import main
from extauthz.config import Config, parse_config
from extauthz.decision import Reason
from extauthz.engine import Engine
from extauthz.explain import (
    CheckLine,
    ExplainRequest,
    Explanation,
    UsageError,
    build_input,
    clean_token,
    explain,
    render_text,
    to_json,
)
from extauthz.idp import Providers
from extauthz.response import http_status, www_authenticate
from tests.conftest import AUDIENCE, ISSUER, SigningKey, claims
from tests.fake_idp import DISCOVERY, INTROSPECT, JWKS, FakeIdp
from tests.policies import GET_ORDER, LIST_ORDERS, orders

# A token read 14 minutes before it expires: exp 10:00:00, now 09:46:00, 60 s of skew.
EXAMPLE_NOW = datetime(2026, 11, 21, 9, 46, tzinfo=UTC).timestamp()
EXAMPLE_EXP = datetime(2026, 11, 21, 10, 0, tzinfo=UTC).timestamp()


@pytest.fixture
def fake(rsa_key: SigningKey) -> FakeIdp:
    """Discovery, JWKS and introspection; it keeps every request, so offline runs can prove none."""
    return FakeIdp([rsa_key.public_jwk])


# -- configs ----------------------------------------------------------------------------------------

DEFAULT_CLAIMS = [{"key": "tenant", "values": ["acme"], "isRequired": True}]


def make_config(
    validation: dict[str, Any],
    *,
    verify_claims: list[dict[str, Any]] | None = None,
    skew: float = 0,
    issuers: list[str] | None = None,
    server: dict[str, Any] | None = None,
    **auth: Any,
) -> Config:
    extra = {
        "issuers": [ISSUER] if issuers is None else issuers,
        "audiences": [AUDIENCE],
        "verifyClaims": DEFAULT_CLAIMS if verify_claims is None else verify_claims,
    }
    deployment = orders(
        {**validation, "additionalValidationPolicy": extra},
        authentication={"maxClockSkewInSeconds": skew, **auth},
        routes=[GET_ORDER, LIST_ORDERS],
        headersFromClaims={"x-auth-subject": "sub"},
    )
    return parse_config({"server": server or {}, "deployments": [deployment]})


def static_keys(*keys: SigningKey, algorithms: list[str] | None = None) -> dict[str, Any]:
    policy: dict[str, Any] = {"type": "STATIC_KEYS", "keys": [k.public_jwk for k in keys]}
    if algorithms:
        policy["allowedAlgorithms"] = algorithms
    return policy


REMOTE_JWKS = {"type": "REMOTE_JWKS", "uri": JWKS}


@pytest.fixture
def static(rsa_key: SigningKey) -> Config:
    return make_config(static_keys(rsa_key))


# -- running explain, and the engine on its own for comparison ------------------------------------


def run(
    config: Config,
    token: str,
    *,
    fake: FakeIdp | None = None,
    clock: Callable[[], float] = time.time,
    **request: Any,
) -> Explanation:
    request.setdefault("path", "/orders/42")
    req = ExplainRequest(token=token, **request)
    factory = (fake or FakeIdp()).client_factory()
    result = asyncio.run(explain(config, req, client_factory=factory, clock=clock))
    if not req.offline:
        assert_same_as_engine(config, req, result, fake, clock)
    return result


def assert_same_as_engine(
    config: Config,
    req: ExplainRequest,
    result: Explanation,
    fake: FakeIdp | None,
    clock: Callable[[], float],
) -> None:
    """The decision explain prints is what a separately built engine answers for the request."""
    factory = (fake or FakeIdp()).client_factory()

    async def engine_decision() -> Any:
        providers = Providers(config, client_factory=factory)
        try:
            engine = Engine(config, providers.by_deployment, clock=clock)
            return await engine.check(build_input(config, req))
        finally:
            await providers.aclose()

    decision = asyncio.run(engine_decision())
    v = result.verdict
    assert v.exact
    assert v.allowed == decision.allowed
    if not decision.allowed:
        assert v.reason == decision.reason.value
        assert v.status == http_status(decision, config.server)
        assert v.www_authenticate == www_authenticate(decision)
        assert (v.event, v.message) == (decision.event, decision.message)
        # Every check is shown, and the first failure in the contract's order is the server's.
        first = next(c for c in result.checks if c.result == "FAIL")
        assert first.reason is decision.reason
        assert first.message == decision.message
    else:
        assert v.upstream_headers == decision.upstream_headers
        assert all(c.result != "FAIL" for c in result.checks)


def line(result: Explanation, name: str) -> CheckLine:
    found = [c for c in result.checks if c.name == name]
    assert len(found) == 1, [c.name for c in result.checks]
    return found[0]


def printed(result: Explanation, name: str) -> str:
    """The rendered line of one check, with the column padding collapsed."""
    for text in render_text(result).splitlines():
        if text.startswith(name + " "):
            return re.sub(r"^(\S+(?: \S+)?)\s+(PASS|FAIL|SKIP)  ", r"\1  \2  ", text)
    raise AssertionError(f"no {name!r} line in:\n{render_text(result)}")


# -- both values on a failing line, time left on a passing one --------------------------------------


def test_aud_failure_prints_both_values(static: Config, rsa_key: SigningKey) -> None:
    """aud  FAIL  token: ["client-c"]  policy audiences: ["https://api.example.com"]"""
    result = run(static, rsa_key.sign(claims(aud=["client-c"])))
    assert printed(result, "aud") == (
        'aud  FAIL  token: ["client-c"]  policy audiences: ["https://api.example.com"]'
    )
    v = result.verdict
    assert (v.allowed, v.status, v.reason) == (False, 401, "audience_mismatch")
    assert v.www_authenticate == 'Bearer realm="orders", error="invalid_token"'
    assert v.event == "tokenAuthentication.authenticationFailed"
    assert v.message == "JWT token not issued for the configured audience."
    assert result.exit_code == 1
    text = render_text(result)
    assert "reason            audience_mismatch" in text
    assert 'www-authenticate  Bearer realm="orders", error="invalid_token"' in text
    assert (
        "log               tokenAuthentication.authenticationFailed: "
        "JWT token not issued for the configured audience." in text
    )


def test_exp_pass_shows_time_left_and_skew(rsa_key: SigningKey) -> None:
    """exp  PASS  2026-11-21T10:00:00Z, 14m left (skew 60s)"""
    config = make_config(static_keys(rsa_key), skew=60)
    token = rsa_key.sign(claims(exp=int(EXAMPLE_EXP), iat=int(EXAMPLE_NOW)))
    result = run(config, token, clock=lambda: EXAMPLE_NOW)
    assert printed(result, "exp") == "exp  PASS  2026-11-21T10:00:00Z, 14m left (skew 60s)"
    assert result.verdict.allowed and result.exit_code == 0


# -- every check, failing ----------------------------------------------------------------------------


def test_every_failure_is_shown_not_just_the_first(static: Config, rsa_key: SigningKey) -> None:
    token = rsa_key.sign(claims(aud="other", tenant="globex", scope="orders.write"))
    result = run(static, token)
    failed = [c.name for c in result.checks if c.result == "FAIL"]
    assert failed == ["aud", "claim tenant", "scope"]
    assert result.verdict.reason == "audience_mismatch"  # the server reports the first


def test_iss_mismatch(static: Config, rsa_key: SigningKey) -> None:
    result = run(static, rsa_key.sign(claims(iss="https://evil.example.com")))
    assert printed(result, "iss") == (
        'iss  FAIL  token: "https://evil.example.com"  policy issuers: ["https://idp.example.com"]'
    )
    assert result.verdict.reason == "issuer_mismatch"
    assert result.verdict.message == "JWT token not issued by the configured issuers."


def test_expired_token(static: Config, rsa_key: SigningKey) -> None:
    now = EXAMPLE_NOW
    token = rsa_key.sign(claims(exp=int(now) - 312, iat=int(now) - 900))
    result = run(static, token, clock=lambda: now)
    assert printed(result, "exp") == (
        "exp  FAIL  2026-11-21T09:40:48Z, expired 5m12s ago (skew 0s, now 2026-11-21T09:46:00Z)"
    )
    assert result.verdict.reason == "token_expired"
    assert result.verdict.message == "Validation failed for 'exp' claim."


def test_expired_within_skew_passes(rsa_key: SigningKey) -> None:
    config = make_config(static_keys(rsa_key), skew=60)
    now = EXAMPLE_NOW
    result = run(config, rsa_key.sign(claims(exp=int(now) - 20)), clock=lambda: now)
    assert printed(result, "exp") == (
        "exp  PASS  2026-11-21T09:45:40Z, expired 20s ago, within the skew of 60s"
    )
    assert result.verdict.allowed


def test_exp_just_beyond_skew_fails(rsa_key: SigningKey) -> None:
    config = make_config(static_keys(rsa_key), skew=60)
    now = EXAMPLE_NOW
    result = run(config, rsa_key.sign(claims(exp=int(now) - 61)), clock=lambda: now)
    assert line(result, "exp").result == "FAIL"
    assert "(skew 60s" in line(result, "exp").detail
    assert result.verdict.reason == "token_expired"


def test_jwt_without_exp_is_refused(static: Config, rsa_key: SigningKey) -> None:
    result = run(static, rsa_key.sign(claims(exp=None)))
    assert printed(result, "exp") == "exp  FAIL  token: (absent)  a JWT access token must carry exp"
    assert result.verdict.reason == "claim_missing"


def test_nbf_in_the_future(static: Config, rsa_key: SigningKey) -> None:
    now = EXAMPLE_NOW
    result = run(static, rsa_key.sign(claims(nbf=int(now) + 300)), clock=lambda: now)
    assert printed(result, "nbf") == (
        "nbf  FAIL  2026-11-21T09:51:00Z, valid in 5m (skew 0s, now 2026-11-21T09:46:00Z)"
    )
    assert result.verdict.reason == "token_not_yet_valid"
    assert result.verdict.message == "Validation failed for 'nbf' claim."


def test_malformed_numeric_date(static: Config, rsa_key: SigningKey) -> None:
    result = run(static, rsa_key.sign(claims(nbf="tomorrow")))
    assert printed(result, "nbf") == 'nbf  FAIL  token: "tomorrow" is not a NumericDate'
    assert result.verdict.reason == "token_malformed"


# verifyClaims: (rule, claims override, result, printed detail, reason)
TENANT_REQUIRED = {"key": "tenant", "values": ["acme"], "isRequired": True}
TENANT_OPTIONAL = {"key": "tenant", "values": ["acme"], "isRequired": False}
PRESENCE_ONLY = {"key": "email_verified", "isRequired": True}
CLAIM_MODES = [
    pytest.param(TENANT_REQUIRED, {"tenant": "globex"}, "FAIL", 'token: "globex"  expected one of: ["acme"] (required)', "claim_value_mismatch", id="required-values-wrong"),
    pytest.param(TENANT_REQUIRED, {"tenant": None}, "FAIL", 'token: (absent)  expected one of: ["acme"] (required)', "claim_missing", id="required-values-absent"),
    pytest.param(PRESENCE_ONLY, {}, "FAIL", "token: (absent)  required (presence only)", "claim_missing", id="presence-only-absent"),
    pytest.param(PRESENCE_ONLY, {"email_verified": False}, "PASS", "token: false  required (presence only)", None, id="presence-only-present"),
    pytest.param(TENANT_OPTIONAL, {"tenant": None}, "PASS", 'token: (absent)  expected one of: ["acme"] (optional: checked only when present)', None, id="optional-absent"),
    pytest.param(TENANT_OPTIONAL, {"tenant": "globex"}, "FAIL", 'token: "globex"  expected one of: ["acme"] (optional: checked only when present)', "claim_value_mismatch", id="optional-wrong"),
    pytest.param({"key": "email_verified", "values": [True], "isRequired": True}, {"email_verified": True}, "PASS", 'token: true  expected one of: ["true"] (required)', None, id="boolean-by-json-text"),
    pytest.param({"key": "groups", "values": ["admins"], "isRequired": True}, {"groups": ["users", "admins"]}, "PASS", 'token: ["users", "admins"]  expected one of: ["admins"] (required)', None, id="array-any-element"),
]


@pytest.mark.parametrize(("rule", "over", "outcome", "detail", "reason"), CLAIM_MODES)
def test_verify_claims_modes(
    rsa_key: SigningKey,
    rule: dict[str, Any],
    over: dict[str, Any],
    outcome: str,
    detail: str,
    reason: str | None,
) -> None:
    config = make_config(static_keys(rsa_key), verify_claims=[rule])
    result = run(config, rsa_key.sign(claims(**over)))
    assert printed(result, f"claim {rule['key']}") == f"claim {rule['key']}  {outcome}  {detail}"
    assert result.verdict.reason == reason
    assert result.exit_code == (1 if reason else 0)


def test_scope_not_granted_is_403_naming_the_scope(static: Config, rsa_key: SigningKey) -> None:
    result = run(static, rsa_key.sign(claims(scope="orders.write profile")))
    assert printed(result, "scope") == (
        'scope  FAIL  token: ["orders.write", "profile"]  route requires any of: ["orders.read"]'
    )
    v = result.verdict
    assert (v.status, v.reason, v.error) == (403, "insufficient_scope", "insufficient_scope")
    assert v.www_authenticate == (
        'Bearer realm="orders", error="insufficient_scope", scope="orders.read"'
    )


def test_authentication_only_route_skips_scope(static: Config, rsa_key: SigningKey) -> None:
    result = run(static, rsa_key.sign(claims(scope="nothing")), path="/orders")
    assert line(result, "scope").result == "SKIP"
    assert line(result, "policy").facts["route"] == "list"
    assert result.verdict.allowed


def test_algorithm_not_allowed(rsa_key: SigningKey, ec_key: SigningKey) -> None:
    fake = FakeIdp([rsa_key.public_jwk, ec_key.public_jwk])
    config = make_config({**REMOTE_JWKS, "allowedAlgorithms": ["ES256"]})
    result = run(config, rsa_key.sign(claims()), fake=fake)
    assert printed(result, "alg") == 'alg  FAIL  token: "RS256"  allowed algorithms: ["ES256"]'
    assert line(result, "kid").result == "PASS"  # looked up anyway, for the report
    assert line(result, "signature").detail == "the algorithm is not allowed"
    assert result.verdict.reason == "algorithm_not_allowed"


def test_unknown_kid_lists_the_known_ones(static: Config, rsa_key2: SigningKey) -> None:
    result = run(static, rsa_key2.sign(claims()))  # kid rsa-2, the config only has rsa-1
    assert printed(result, "kid") == (
        'kid  FAIL  token kid: "rsa-2"  known kids: ["rsa-1"] (the static keys)'
    )
    assert line(result, "signature").result == "SKIP"
    assert result.verdict.reason == "key_not_found"
    assert any("WITHOUT a verified signature" in n for n in result.notes)


def test_bad_signature(static: Config, rsa_key: SigningKey, rsa_key2: SigningKey) -> None:
    forged = SigningKey(rsa_key.kid, "RS256", rsa_key2.private)  # right kid, wrong private key
    result = run(static, forged.sign(claims()))
    assert line(result, "kid").result == "PASS"
    sig = line(result, "signature")
    assert sig.result == "FAIL" and sig.reason is Reason.SIGNATURE_INVALID
    assert result.verdict.reason == "signature_invalid"
    # The claims are still shown, flagged as unverified.
    assert line(result, "aud").result == "PASS"
    assert not result.claims_verified


def test_not_a_jwt(static: Config) -> None:
    result = run(static, "not-a-jwt")
    assert line(result, "format").result == "FAIL"
    assert result.token_kind == "opaque"
    assert result.verdict.reason == "token_malformed"


def test_garbage_header(static: Config) -> None:
    result = run(static, "eyJub3QganNvbg.e30.c2ln")
    assert line(result, "format").result == "FAIL"
    assert [line(result, n).result for n in ("alg", "kid", "signature")] == ["SKIP"] * 3
    assert result.verdict.reason == "token_malformed"


def test_no_matching_policy(static: Config, rsa_key: SigningKey) -> None:
    result = run(static, rsa_key.sign(claims()), path="/invoices/1")
    assert line(result, "policy").result == "FAIL"
    assert (result.verdict.status, result.verdict.reason) == (403, "no_matching_policy")
    assert result.verdict.www_authenticate is None


# -- remote keys, introspection, IdP failures (httpx.MockTransport) -------------------------------


def test_remote_jwks_allow_reports_upstream_headers(fake: FakeIdp, rsa_key: SigningKey) -> None:
    config = make_config(REMOTE_JWKS)
    result = run(config, rsa_key.sign(claims()), fake=fake)
    assert printed(result, "kid") == f'kid  PASS  token kid: "rsa-1" found in the JWKS at {JWKS}'
    assert result.verdict.allowed and result.verdict.upstream_headers == (
        ("x-auth-subject", "alice"),
    )
    assert 'x-auth-subject: "alice"' in render_text(result)


def test_jwks_unknown_kid(fake: FakeIdp, rsa_key2: SigningKey) -> None:
    result = run(make_config(REMOTE_JWKS), rsa_key2.sign(claims()), fake=fake)
    assert line(result, "kid").detail == (
        f'token kid: "rsa-2"  known kids: ["rsa-1"] (the JWKS at {JWKS})'
    )
    assert result.verdict.reason == "key_not_found"


def test_jwks_failure_is_idp_call_failed_with_the_contract_message(
    fake: FakeIdp, rsa_key: SigningKey
) -> None:
    fake.status = 500
    config = make_config(REMOTE_JWKS, server={"denyStatusOnIdpFailure": 503})
    result = run(config, rsa_key.sign(claims()), fake=fake)
    message = (
        f"Unexpected response from the jwks_uri uri: {JWKS}, received (500, Internal Server Error)."
    )
    kid = line(result, "kid")
    assert kid.result == "FAIL" and kid.reason is Reason.IDP_CALL_FAILED and kid.message == message
    v = result.verdict
    assert (v.status, v.reason, v.error, v.www_authenticate) == (
        503,
        "idp_call_failed",
        "server_error",
        None,
    )
    assert v.event == "authentication.idpCallFailed" and v.message == message
    fields = dict(v.log_fields)
    assert fields["endpoint"] == "jwks_uri" and len(fields["tokenSha256"]) == 8


def test_discovery_issuer_is_used_when_none_is_configured(
    fake: FakeIdp, rsa_key: SigningKey
) -> None:
    config = make_config({"type": "REMOTE_DISCOVERY", "uri": DISCOVERY}, issuers=[])
    result = run(config, rsa_key.sign(claims(iss="https://elsewhere.example.com")), fake=fake)
    assert printed(result, "iss") == (
        'iss  FAIL  token: "https://elsewhere.example.com"  discovery issuer: ["https://idp.example.com"]'
    )


def introspection_config(tmp_path: Path, kind: str = "REMOTE_INTROSPECTION") -> Config:
    secret = tmp_path / "secret"
    secret.write_text("s3cret-value")
    uri = INTROSPECT if kind == "REMOTE_INTROSPECTION" else DISCOVERY
    return make_config(
        {
            "type": kind,
            "uri": uri,
            "clientDetails": {"clientId": "extauthz", "clientSecretFile": str(secret)},
        }
    )


def test_opaque_token_active(tmp_path: Path, fake: FakeIdp) -> None:
    fake.answer = {"active": True, **claims(client_id="svc", sub="svc")}
    result = run(introspection_config(tmp_path), "opaque-token-value", fake=fake)
    assert printed(result, "introspection") == (
        'introspection  PASS  {"active": true}, client_id "svc", sub "svc"'
    )
    assert line(result, "format").detail == "opaque token (not a JWT): it is introspected"
    assert result.verdict.allowed
    assert result.claims_verified


def test_opaque_token_inactive(tmp_path: Path, fake: FakeIdp) -> None:
    result = run(introspection_config(tmp_path), "revoked-token-value", fake=fake)
    assert printed(result, "introspection") == (
        'introspection  FAIL  IdP answer: {"active": false}  expected: {"active": true}'
    )
    assert [line(result, n).result for n in ("exp", "aud", "scope")] == ["SKIP"] * 3
    assert result.verdict.reason == "token_inactive"


def test_introspection_refused_credentials(tmp_path: Path, fake: FakeIdp) -> None:
    fake.status = 401
    result = run(introspection_config(tmp_path), "some-token-value", fake=fake)
    message = (
        f"Unexpected response from the introspection_endpoint uri: {INTROSPECT}, "
        "received (401, Unauthorized)."
    )
    assert line(result, "introspection").message == message
    assert (result.verdict.status, result.verdict.message) == (500, message)


def test_discovery_with_client_introspects_opaque_and_verifies_jwts(
    tmp_path: Path, fake: FakeIdp, rsa_key: SigningKey
) -> None:
    config = introspection_config(tmp_path, "REMOTE_DISCOVERY")
    jwt_result = run(config, rsa_key.sign(claims()), fake=fake)
    assert line(jwt_result, "signature").result == "PASS"
    assert not [c for c in jwt_result.checks if c.name == "introspection"]
    opaque = run(config, "opaque-token-value", fake=fake)
    assert line(opaque, "introspection").result == "FAIL"


# -- offline -----------------------------------------------------------------------------------------


def test_offline_remote_keys_make_no_call_and_say_so(fake: FakeIdp, rsa_key: SigningKey) -> None:
    result = run(make_config(REMOTE_JWKS), rsa_key.sign(claims(aud="x")), fake=fake, offline=True)
    assert fake.requests == []
    assert [line(result, n).result for n in ("kid", "signature")] == ["SKIP", "SKIP"]
    v = result.verdict
    assert not v.exact and "WITHOUT the signature check" in v.note
    assert (v.status, v.reason) == (401, "audience_mismatch")
    assert "WITHOUT the signature check" in render_text(result)


def test_offline_valid_claims_allow_with_the_caveat(fake: FakeIdp, rsa_key: SigningKey) -> None:
    result = run(make_config(REMOTE_JWKS), rsa_key.sign(claims()), fake=fake, offline=True)
    assert result.verdict.allowed and not result.verdict.exact
    assert result.exit_code == 0


OFFLINE_CASES = [
    pytest.param({}, id="valid"),
    pytest.param({"aud": "x", "tenant": "globex"}, id="aud-before-claims"),
    pytest.param({"exp": 1, "nbf": "soon"}, id="malformed-nbf-before-expired"),
    pytest.param({"iss": "https://evil.example.com"}, id="iss"),
    pytest.param({"tenant": None}, id="claim-missing"),
    pytest.param({"scope": "orders.write"}, id="scope"),
]


@pytest.mark.parametrize("over", OFFLINE_CASES)
def test_offline_decision_equals_the_online_one_for_a_good_signature(
    fake: FakeIdp, rsa_key: SigningKey, over: dict[str, Any]
) -> None:
    """Composed without the signature, the decision still follows the engine's order."""
    config = make_config(REMOTE_JWKS)
    token = rsa_key.sign(claims(**over))
    online = run(config, token, fake=fake).verdict
    offline = run(config, token, fake=fake, offline=True).verdict
    assert not offline.exact and online.exact
    assert (offline.allowed, offline.status, offline.reason, offline.www_authenticate) == (
        online.allowed,
        online.status,
        online.reason,
        online.www_authenticate,
    )
    assert (offline.event, offline.message) == (online.event, online.message)


def test_offline_static_keys_still_check_the_signature(
    static: Config, rsa_key2: SigningKey
) -> None:
    forged = SigningKey("rsa-1", "RS256", rsa_key2.private)
    result = run(static, forged.sign(claims()), offline=True)
    assert line(result, "signature").result == "FAIL"
    assert result.verdict.exact and result.verdict.reason == "signature_invalid"


def test_offline_malformed_token_is_decided_exactly(fake: FakeIdp) -> None:
    result = run(make_config(REMOTE_JWKS), "not-a-jwt", fake=fake, offline=True)
    assert result.verdict.exact and result.verdict.reason == "token_malformed"
    assert fake.requests == []


def test_offline_opaque_token_is_undecided(tmp_path: Path, fake: FakeIdp) -> None:
    result = run(introspection_config(tmp_path), "opaque-token-value", fake=fake, offline=True)
    assert fake.requests == []
    assert line(result, "introspection").result == "SKIP"
    assert result.verdict.allowed is None and result.exit_code == 1
    assert "UNDECIDED" in render_text(result)


# -- the request, and what is never printed -----------------------------------------------------------


def test_token_is_never_printed_only_its_hash(static: Config, rsa_key: SigningKey) -> None:
    token = rsa_key.sign(claims(aud="x"))
    result = run(static, token)
    outputs = render_text(result) + json.dumps(to_json(result))
    for part in token.split("."):
        assert part not in outputs
    assert f"sha256:{result.token_id}" in render_text(result)
    assert to_json(result)["token"]["sha256Prefix"] == result.token_id


def test_terminal_control_characters_in_claims_are_escaped(
    static: Config, rsa_key: SigningKey
) -> None:
    result = run(static, rsa_key.sign(claims(tenant="\x1b[31mred\x1b[0m")))
    text = render_text(result)
    assert "\x1b" not in text
    assert '"\\u001b[31mred\\u001b[0m"' in text


def test_json_has_the_same_facts(static: Config, rsa_key: SigningKey) -> None:
    result = run(static, rsa_key.sign(claims(aud=["client-c"])))
    data = to_json(result)
    assert [(c["check"], c["result"]) for c in data["checks"]] == [
        (c.name, c.result) for c in result.checks
    ]
    aud = next(c for c in data["checks"] if c["check"] == "aud")
    assert aud["actual"] == ["client-c"] and aud["expected"] == [AUDIENCE]
    assert aud["reason"] == "audience_mismatch"
    assert data["decision"] == {
        "allowed": False,
        "exact": True,
        "note": result.verdict.note,
        "deployment": "orders",
        "route": "get-order",
        "status": 401,
        "reason": "audience_mismatch",
        "error": "invalid_token",
        "wwwAuthenticate": 'Bearer realm="orders", error="invalid_token"',
        "log": {
            "event": "tokenAuthentication.authenticationFailed",
            "reason": "audience_mismatch",
            "message": "JWT token not issued for the configured audience.",
            "tokenSha256": result.verdict.log_fields[0][1],
            "tokenAud": ["client-c"],
            "audiences": [AUDIENCE],
        },
    }


def test_token_goes_where_the_policy_reads_it(rsa_key: SigningKey) -> None:
    config = make_config(static_keys(rsa_key), tokenQueryParam="access_token")
    token = rsa_key.sign(claims())
    inp = build_input(config, ExplainRequest(token=token, path="/orders/42?x=1"))
    assert inp.headers == {}
    assert inp.raw_path.startswith("/orders/42?x=1&access_token=")
    assert run(config, token).verdict.allowed


def test_deployment_flag_is_context_extensions(static: Config, rsa_key: SigningKey) -> None:
    req = ExplainRequest(token="t", deployment="orders")
    inp = build_input(static, req)
    assert inp.context_extensions == {"deployment": "orders"} and inp.path == "/orders"
    with pytest.raises(UsageError, match="no such deployment"):
        build_input(static, ExplainRequest(token="t", deployment="nope"))


def test_several_deployments_need_a_path_or_a_deployment(rsa_key: SigningKey) -> None:
    config = parse_config(
        {
            "deployments": [
                {
                    "name": name,
                    "pathPrefix": f"/{name}",
                    "authentication": {
                        "type": "TOKEN_AUTHENTICATION",
                        "validationPolicy": static_keys(rsa_key),
                    },
                }
                for name in ("a", "b")
            ]
        }
    )
    with pytest.raises(UsageError, match="give --path"):
        build_input(config, ExplainRequest(token="t"))
    assert build_input(config, ExplainRequest(token="t", path="/b/1")).path == "/b/1"


def test_pasted_bearer_prefix_is_removed() -> None:
    assert clean_token("  Bearer abc.def.ghi\n") == (
        "abc.def.ghi",
        "A leading 'Bearer ' was removed from the token given.",
    )
    assert clean_token("abc") == ("abc", None)


# -- the command line ------------------------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path: Path, rsa_key: SigningKey) -> Path:
    validation = {**static_keys(rsa_key), "additionalValidationPolicy": {"audiences": [AUDIENCE]}}
    cfg = {"deployments": [orders(validation)]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_exit_codes(
    config_file: Path, tmp_path: Path, rsa_key: SigningKey, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good"
    good.write_text(rsa_key.sign(claims()) + "\n")
    assert main(["explain", "--config", str(config_file), "--token-file", str(good)]) == 0
    assert "ALLOW" in capsys.readouterr().out

    bad = rsa_key.sign(claims(aud="x"))
    assert main(["explain", "--config", str(config_file), "--token", bad, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["decision"]["reason"] == "audience_mismatch"

    assert main(["explain", "--config", str(tmp_path / "missing.yaml"), "--token", bad]) == 2
    assert (
        main(["explain", "--config", str(config_file), "--token-file", str(tmp_path / "no")]) == 2
    )
    assert main(["explain", "--config", str(config_file), "--token", bad, "--deployment", "x"]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "no such deployment" in err


def test_cli_reads_the_token_from_stdin(
    config_file: Path,
    rsa_key: SigningKey,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--token-file - keeps the token out of argv (and so out of ps and shell history)."""
    monkeypatch.setattr("sys.stdin", io.StringIO("Bearer " + rsa_key.sign(claims()) + "\n"))
    assert main(["explain", "--config", str(config_file), "--token-file", "-"]) == 0
    captured = capsys.readouterr()
    assert "ALLOW" in captured.out
    assert "A leading 'Bearer ' was removed" in captured.err


def test_cli_requires_one_token_source_or_the_request(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A token, or the request as sent (tests/unit/test_explain_request.py): without either,
    there is nothing to explain."""
    assert main(["explain", "--config", str(config_file)]) == 2
    assert "give --token, --token-file, --header or --request" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--config", str(config_file), "--token", "a", "--token-file", "b"])
    assert exc.value.code == 2


def test_a_token_already_in_the_path_is_not_sent_twice(rsa_key: SigningKey) -> None:
    """--token and the policy's query parameter in --path: which one to check is unclear."""
    config = make_config(static_keys(rsa_key), tokenQueryParam="access_token")
    req = ExplainRequest(token="t", path="/orders/42?access_token=other")
    with pytest.raises(UsageError, match="not both"):
        build_input(config, req)
