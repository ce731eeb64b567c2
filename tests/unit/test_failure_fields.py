"""Every failure line says what was compared (docs/logs.md, "What a failure line compared"): the
fields of each token denial, read from the step that failed, and never a token or (unless asked)
a claim value."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from extauthz.config import Config, parse_config
from extauthz.decision import Decision, Reason
from extauthz.logs import token_hash
from tests.check_requests import check_input
from tests.conftest import AUDIENCE, ISSUER, SigningKey, claims
from tests.fake_idp import DISCOVERY, JWKS, FakeIdp
from tests.policies import GET_ORDER, LIST_ORDERS, orders


def config_for(validation_type: str = "REMOTE_DISCOVERY", **server: Any) -> Config:
    validation = {
        "type": validation_type,
        "allowedAlgorithms": ["RS256", "PS256"],
        "uri": DISCOVERY if validation_type == "REMOTE_DISCOVERY" else JWKS,
        "additionalValidationPolicy": {
            "issuers": [ISSUER],
            "audiences": [AUDIENCE],
            "verifyClaims": [{"key": "tenant", "values": ["acme"], "isRequired": True}],
        },
    }
    deployment = orders(validation, authentication={"maxClockSkewInSeconds": 30}, routes=[GET_ORDER, LIST_ORDERS])
    return parse_config({"server": server, "deployments": [deployment]})


def decide(config: Config, idp: FakeIdp, path: str = "/orders/42", **request: Any) -> Decision:
    return asyncio.run(idp.engine(config).check(check_input(path, host="api.example.com", **request)))


def fields_of(decision: Decision) -> dict[str, Any]:
    return dict(decision.log_fields)


@pytest.fixture
def idp(rsa_key: SigningKey) -> FakeIdp:
    return FakeIdp([rsa_key.public_jwk])


def test_issuer_mismatch_shows_both_issuers_trailing_slash_included(idp: FakeIdp, rsa_key: SigningKey) -> None:
    token = rsa_key.sign(claims(iss=ISSUER + "/"))
    d = decide(config_for(), idp, token=token)
    assert d.reason is Reason.ISSUER_MISMATCH
    assert d.message == "JWT token not issued by the configured issuers."  # the fixed sentence
    assert fields_of(d) == {"tokenSha256": token_hash(token), "tokenIss": ISSUER + "/", "issuers": [ISSUER]}


def test_audience_mismatch_shows_the_token_and_policy_audiences(idp: FakeIdp, rsa_key: SigningKey) -> None:
    token = rsa_key.sign(claims(aud=["other", "api"]))
    f = fields_of(decide(config_for(), idp, token=token))
    assert f["tokenAud"] == ["other", "api"] and f["audiences"] == [AUDIENCE]


@pytest.mark.parametrize("claim", ["exp", "nbf"])
def test_dates_show_the_claim_now_and_skew(idp: FakeIdp, rsa_key: SigningKey, claim: str) -> None:
    when = int(time.time()) + (-600 if claim == "exp" else 600)
    token = rsa_key.sign(claims(**{claim: when}))
    before = time.time()
    d = decide(config_for(), idp, token=token)
    f = fields_of(d)
    assert d.reason is (Reason.TOKEN_EXPIRED if claim == "exp" else Reason.TOKEN_NOT_YET_VALID)
    assert f[claim] == when and f["skewSeconds"] == 30
    assert before <= f["now"] <= time.time()


def test_scope_shows_granted_and_required(idp: FakeIdp, rsa_key: SigningKey) -> None:
    f = fields_of(decide(config_for(), idp, token=rsa_key.sign(claims(scope="orders.write profile"))))
    assert f["tokenScopes"] == ["orders.write", "profile"] and f["requiredScopes"] == ["orders.read"]


def test_unknown_kid_shows_the_known_kids_and_the_jwks_uri(idp: FakeIdp, rsa_key: SigningKey, rsa_key2: SigningKey) -> None:
    token = rsa_key2.sign(claims())
    for validation_type in ("REMOTE_DISCOVERY", "REMOTE_JWKS"):
        d = decide(config_for(validation_type), idp, token=token)
        assert d.reason is Reason.KEY_NOT_FOUND
        f = fields_of(d)
        assert f["kid"] == "rsa-2" and f["knownKids"] == ["rsa-1"] and f["jwksUri"] == JWKS


def test_algorithm_not_allowed_shows_the_allowed_ones(idp: FakeIdp, ec_key: SigningKey) -> None:
    d = decide(config_for(), FakeIdp([ec_key.public_jwk]), token=ec_key.sign(claims()))
    assert d.reason is Reason.ALGORITHM_NOT_ALLOWED
    f = fields_of(d)
    assert f["alg"] == "ES256" and f["allowedAlgorithms"] == ["PS256", "RS256"]


def test_claim_values_only_when_asked(idp: FakeIdp, rsa_key: SigningKey) -> None:
    token = rsa_key.sign(claims(tenant="globex"))
    quiet = fields_of(decide(config_for(), idp, token=token))
    assert quiet == {"tokenSha256": token_hash(token), "claim": "tenant"}
    told = fields_of(decide(config_for(logClaimValues=True), idp, token=token))
    assert told["claimValue"] == "globex" and told["expectedValues"] == ["acme"]


def test_a_long_value_from_the_token_is_cut(idp: FakeIdp, rsa_key: SigningKey) -> None:
    f = fields_of(decide(config_for(), idp, token=rsa_key.sign(claims(iss="x" * 5000))))
    assert len(f["tokenIss"]) <= 257


@pytest.mark.parametrize(
    ("headers", "found", "field"),
    [
        ({"authorization": "Token abc.def"}, "it carries a 'Token' credential, not 'Bearer'", ("foundScheme", "Token")),
        ({"authorization": "Basic YTpi"}, "it carries a 'Basic' credential, not 'Bearer'", ("foundScheme", "Basic")),
        ({"authorization": "secretvalue123"}, "it holds a value without the 'Bearer' scheme", None),
        ({"authorization": "s3cr3t-w0rd rest"}, "it carries another scheme than 'Bearer'", None),
        ({"authorization": "  "}, "it is empty", None),
        ({"x-access-token": "abc"}, "the request has 'x-access-token' instead", ("foundHeaders", ["x-access-token"])),
    ],
)
def test_a_missing_token_names_what_was_sent_instead(
    idp: FakeIdp, headers: dict[str, str], found: str, field: tuple[str, Any] | None
) -> None:
    d = decide(config_for(), idp, headers=headers)
    assert d.reason is Reason.TOKEN_MISSING
    assert d.message.startswith("No token was found in the 'authorization' header")
    assert found in d.message
    assert dict(d.log_fields) == (dict([field]) if field else {})
    for value in headers.values():  # never the value
        if value.strip():
            assert value.split(" ")[-1] not in d.message


def test_a_missing_token_names_a_query_parameter_sent_instead(idp: FakeIdp) -> None:
    d = decide(config_for(), idp, path="/orders/42?access_token=abc")
    assert "the query parameter 'access_token' instead" in d.message and "abc" not in d.message


def test_no_matching_route_keeps_the_deployment_and_lists_the_routes(idp: FakeIdp) -> None:
    d = decide(config_for(), idp, path="/orders/42", method="DELETE")
    assert d.reason is Reason.NO_MATCHING_POLICY and d.deployment == "orders"
    assert fields_of(d) == {"routesTried": ["GET /{id}", "GET /"]}


def test_no_deployment_lists_the_nearest_prefixes(idp: FakeIdp) -> None:
    d = decide(config_for(), idp, path="/order")
    assert d.reason is Reason.NO_MATCHING_POLICY and d.deployment == ""
    assert fields_of(d) == {"nearestPrefixes": ["/orders"]}
