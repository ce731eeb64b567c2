"""The pure token checks: claims, time, scope, algorithms, keys."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from extauthz.config import parse_config
from extauthz.decision import Denial, Reason
from extauthz.keys import keyset_from_jwks
from extauthz.validation import (
    check_claims,
    check_scope,
    read_header,
    scopes_of,
    verify_signature,
)
from tests.conftest import AUDIENCE, ISSUER, claims

NOW = 1_900_000_000.0


def policy(verify_claims: list[dict[str, Any]] | None = None, skew: float = 0, **avp: Any) -> Any:
    extra: dict[str, Any] = {"issuers": [ISSUER], "audiences": [AUDIENCE], **avp}
    if verify_claims is not None:
        extra["verifyClaims"] = verify_claims
    cfg = parse_config(
        {
            "deployments": [
                {
                    "name": "d",
                    "pathPrefix": "/",
                    "authentication": {
                        "type": "TOKEN_AUTHENTICATION",
                        "maxClockSkewInSeconds": skew,
                        "validationPolicy": {
                            "type": "REMOTE_JWKS",
                            "uri": "https://idp.example.com/jwks",
                            "additionalValidationPolicy": extra,
                        },
                    },
                }
            ]
        }
    )
    return cfg.deployments[0].auth


def reason(result: Denial | None) -> Reason | None:
    return result.reason if result else None


def run(c: dict[str, Any], p: Any = None, now: float = NOW) -> Denial | None:
    p = p or policy()
    return check_claims(c, p, now, p.issuers)


def test_valid_claims_pass() -> None:
    assert run(claims(exp=NOW + 10)) is None


@pytest.mark.parametrize(
    ("exp_offset", "skew", "expected"),
    [
        (-1, 0, Reason.TOKEN_EXPIRED),
        (0, 0, None),  # exp == now is still valid; expired strictly after
        (-30, 60, None),  # an expired token within the clock skew is accepted
        (-61, 60, Reason.TOKEN_EXPIRED),
    ],
)
def test_exp_with_skew(exp_offset: int, skew: int, expected: Reason | None) -> None:
    d = run(claims(exp=NOW + exp_offset), policy(skew=skew))
    assert reason(d) is expected
    if d:
        assert d.message == "Validation failed for 'exp' claim."


@pytest.mark.parametrize(
    ("nbf_offset", "skew", "expected"),
    [(10, 0, Reason.TOKEN_NOT_YET_VALID), (10, 30, None), (0, 0, None)],
)
def test_nbf_with_skew(nbf_offset: int, skew: int, expected: Reason | None) -> None:
    d = run(claims(exp=NOW + 100, nbf=NOW + nbf_offset), policy(skew=skew))
    assert reason(d) is expected
    if d:
        assert d.message == "Validation failed for 'nbf' claim."


@pytest.mark.parametrize("bad", ["1900000000", 1e400, True, None.__class__, [1]])
def test_time_claims_must_be_numbers(bad: Any) -> None:
    value = float("nan") if bad is None.__class__ else bad
    assert reason(run(claims(exp=value))) is Reason.TOKEN_MALFORMED


def test_missing_exp_is_refused() -> None:
    d = run(claims(exp=None))
    assert d and d.reason is Reason.CLAIM_MISSING and d.message == "JWT token missing required claim 'exp'."


def test_issuer_mismatch_is_exact() -> None:
    for iss in (ISSUER + "/", ISSUER.upper(), None):
        d = run(claims(exp=NOW + 5, iss=iss))
        assert d and d.reason is Reason.ISSUER_MISMATCH
        assert d.message == "JWT token not issued by the configured issuers."


@pytest.mark.parametrize(
    ("aud", "ok"),
    [(AUDIENCE, True), (["x", AUDIENCE], True), (["x", ""], False), ("other", False), (None, False)],
)
def test_audience_intersection(aud: Any, ok: bool) -> None:
    d = run(claims(exp=NOW + 5, aud=aud))
    assert (d is None) is ok
    if d:
        assert d.reason is Reason.AUDIENCE_MISMATCH
        assert d.message == "JWT token not issued for the configured audience."


def test_no_audiences_configured_skips_the_check() -> None:
    p = policy(audiences=[])
    assert run(claims(exp=NOW + 5, aud="anything"), p) is None


REQUIRED_PRESENCE = [{"key": "email_verified", "isRequired": True}]
OPTIONAL_VALUES = [{"key": "tenant", "values": ["acme"], "isRequired": False}]
REQUIRED_VALUES = [{"key": "tenant", "values": ["acme", "globex"], "isRequired": True}]


@pytest.mark.parametrize(
    ("rules", "extra", "expected"),
    [
        # presence only: isRequired and no values
        (REQUIRED_PRESENCE, {"email_verified": False}, None),
        (REQUIRED_PRESENCE, {}, Reason.CLAIM_MISSING),
        (REQUIRED_PRESENCE, {"email_verified": None}, Reason.CLAIM_MISSING),
        # optional: values checked only when present
        (OPTIONAL_VALUES, {"tenant": None}, None),
        (OPTIONAL_VALUES, {"tenant": "acme"}, None),
        (OPTIONAL_VALUES, {"tenant": "globex"}, Reason.CLAIM_VALUE_MISMATCH),
        # required with values
        (REQUIRED_VALUES, {"tenant": None}, Reason.CLAIM_MISSING),
        (REQUIRED_VALUES, {"tenant": "globex"}, None),
        (REQUIRED_VALUES, {"tenant": "Acme"}, Reason.CLAIM_VALUE_MISMATCH),
        # array claims match if any element matches
        (REQUIRED_VALUES, {"tenant": ["x", "acme"]}, None),
        (REQUIRED_VALUES, {"tenant": ["x", "y"]}, Reason.CLAIM_VALUE_MISMATCH),
        (REQUIRED_VALUES, {"tenant": []}, Reason.CLAIM_VALUE_MISMATCH),
        # booleans and numbers compare by their JSON text
        ([{"key": "email_verified", "values": ["true"], "isRequired": True}], {"email_verified": True}, None),
        ([{"key": "email_verified", "values": [True]}], {"email_verified": "true"}, None),
        ([{"key": "email_verified", "values": ["true"]}], {"email_verified": False}, Reason.CLAIM_VALUE_MISMATCH),
        ([{"key": "level", "values": ["42"]}], {"level": 42}, None),
        ([{"key": "level", "values": [42]}], {"level": 42.5}, Reason.CLAIM_VALUE_MISMATCH),
        ([{"key": "level", "values": ["1"]}], {"level": True}, Reason.CLAIM_VALUE_MISMATCH),
    ],
)
def test_verify_claims_semantics(rules: Any, extra: dict[str, Any], expected: Reason | None) -> None:
    c = claims(exp=NOW + 5)
    c.update(extra)
    c = {k: v for k, v in c.items() if v is not None or k == "email_verified"}
    if extra.get("email_verified", 0) is None or extra.get("tenant", 0) is None:
        c = {k: v for k, v in c.items() if v is not None}
    d = run(c, policy(verify_claims=rules))
    assert reason(d) is expected
    key = rules[0]["key"]
    if expected is Reason.CLAIM_MISSING:
        assert d and d.message == f"JWT token missing required claim '{key}'."
    if expected is Reason.CLAIM_VALUE_MISMATCH:
        assert d and d.message == f"JWT token does not have the expected claim value for '{key}'."


@pytest.mark.parametrize(
    ("scope_claims", "granted"),
    [
        ({"scope": "a orders.read b"}, True),
        ({"scope": ["a", "orders.read"]}, True),
        ({"scope": "orders.readx"}, False),
        ({"scope": ["orders.write"]}, False),
        ({"scp": ["orders.read"]}, True),
        ({}, False),
        ({"scope": 7}, False),
    ],
)
def test_scope_string_or_array(scope_claims: dict[str, Any], granted: bool) -> None:
    d = check_scope(scope_claims, ("orders.read", "admin"))
    assert (d is None) is granted
    if d:
        assert d.reason is Reason.INSUFFICIENT_SCOPE


def test_scopes_are_separated_by_spaces_only() -> None:
    """RFC 6749 §3.3: a tab or a no-break space does not separate scopes."""
    assert scopes_of({"scope": " a  b\tc "}) == {"a", "b\tc"}


ALLOWED = frozenset({"RS256", "ES256"})


def test_header_algorithm_allow_list(rsa_key: Any) -> None:
    token = rsa_key.sign(claims())
    h = read_header(token, ALLOWED)
    assert not isinstance(h, Denial) and h.alg == "RS256" and h.kid == "rsa-1"
    d = read_header(token, frozenset({"ES256"}))
    assert isinstance(d, Denial) and d.reason is Reason.ALGORITHM_NOT_ALLOWED


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "HS256"])
def test_none_and_hmac_never_pass(alg: str, rsa_key: Any) -> None:
    key = "secret-for-hmac-test-32-bytes-long!!" if alg == "HS256" else None
    token = jwt.encode(claims(), key, algorithm="HS256" if alg == "HS256" else "none")
    if alg != "HS256":
        head, payload, _ = token.split(".")
        import base64
        import json as _json

        head = base64.urlsafe_b64encode(_json.dumps({"alg": alg, "typ": "JWT"}).encode()).decode().rstrip("=")
        token = f"{head}.{payload}."
    d = read_header(token, ALLOWED)
    assert isinstance(d, Denial) and d.reason is Reason.ALGORITHM_NOT_ALLOWED


def test_malformed_tokens() -> None:
    for token in ["abc", "a.b", "a.b.c.d.e", "!!!.???.xxx", "e30.e30"]:
        d = read_header(token, ALLOWED)
        assert isinstance(d, Denial) and d.reason is Reason.TOKEN_MALFORMED, token


def test_kid_lookup_and_signature(rsa_key: Any, rsa_key2: Any, ec_key: Any) -> None:
    keys = keyset_from_jwks([rsa_key.public_jwk, ec_key.public_jwk], ALLOWED)
    good = rsa_key.sign(claims())
    h = read_header(good, ALLOWED)
    assert not isinstance(h, Denial)
    assert verify_signature(good, h, keys) == jwt.decode(good, options={"verify_signature": False})

    forged = rsa_key2.sign(claims(), kid="rsa-1")  # right kid, wrong key
    h2 = read_header(forged, ALLOWED)
    assert not isinstance(h2, Denial)
    d = verify_signature(forged, h2, keys)
    assert isinstance(d, Denial) and d.reason is Reason.SIGNATURE_INVALID

    unknown = rsa_key2.sign(claims())  # kid rsa-2 is not in the set
    h3 = read_header(unknown, ALLOWED)
    assert not isinstance(h3, Denial)
    d = verify_signature(unknown, h3, keys)
    assert isinstance(d, Denial) and d.reason is Reason.KEY_NOT_FOUND

    es = ec_key.sign(claims())
    h4 = read_header(es, ALLOWED)
    assert not isinstance(h4, Denial)
    assert isinstance(verify_signature(es, h4, keys), dict)


def test_key_cannot_verify_another_algorithm(rsa_key: Any, ec_key: Any) -> None:
    """An ES256 token naming the RSA key's kid is refused, not tried with the RSA key."""
    keys = keyset_from_jwks([rsa_key.public_jwk], ALLOWED)
    token = ec_key.sign(claims(), kid="rsa-1")
    h = read_header(token, ALLOWED)
    assert not isinstance(h, Denial)
    d = verify_signature(token, h, keys)
    assert isinstance(d, Denial) and d.reason is Reason.ALGORITHM_NOT_ALLOWED


def test_crit_header_is_refused(rsa_key: Any) -> None:
    token = rsa_key.sign(claims(), crit=["exp"])
    d = read_header(token, ALLOWED)
    assert isinstance(d, Denial) and d.reason is Reason.TOKEN_MALFORMED


def test_now_is_an_argument() -> None:
    c = claims(exp=100.0)
    assert run(c, now=99.0) is None
    assert reason(run(c, now=101.0)) is Reason.TOKEN_EXPIRED
    assert time.time() > 100
