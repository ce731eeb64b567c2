"""DYNAMIC_AUTHENTICATION: several identity providers for one deployment (docs/configuration.md,
"Several identity providers"). The selecting claim or header only chooses the server; the chosen
server verifies everything with its own keys and issuers, and its IdP failing fails only its own
tokens."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import httpx
import pytest

from extauthz.config import ConfigError, parse_config
from extauthz.explain import ExplainRequest, explain
from extauthz.logs import JsonLogger
from extauthz.metrics import Metrics
from extauthz.server import AuthorizationService
from tests.check_requests import ServicerContext, check_request
from tests.conftest import AUDIENCE, ISSUER, SigningKey, claims
from tests.fake_idp import JWKS, FakeIdp

PARTNER = "https://idp.partner.example"


def server(values: list[str], validation: dict[str, Any], **authentication: Any) -> dict[str, Any]:
    return {
        "values": values,
        "authentication": {"type": "TOKEN_AUTHENTICATION", "validationPolicy": validation, **authentication},
    }


def dynamic(servers: list[dict[str, Any]], select_by: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "deployments": [
            {
                "name": "orders",
                "pathPrefix": "/orders",
                "authentication": {
                    "type": "DYNAMIC_AUTHENTICATION",
                    "selectBy": select_by or {"claim": "iss"},
                    "servers": servers,
                },
                "headersFromClaims": {"x-auth-subject": "sub"},
            }
        ]
    }


def company(key: SigningKey) -> dict[str, Any]:
    """The company IdP: static keys, issuers left to the server's values."""
    return server([ISSUER], {"type": "STATIC_KEYS", "keys": [key.public_jwk],
                             "additionalValidationPolicy": {"audiences": [AUDIENCE]}})  # fmt: skip


def partner() -> dict[str, Any]:
    """The partner's IdP: a remote JWKS (the fake IdP), its own claim rule."""
    return server([PARTNER], {"type": "REMOTE_JWKS", "uri": JWKS, "additionalValidationPolicy": {
        "audiences": [AUDIENCE], "verifyClaims": [{"key": "tier", "values": ["gold"], "isRequired": True}]}})  # fmt: skip


class Harness:
    def __init__(self, config: dict[str, Any], idp: FakeIdp) -> None:
        self.idp = idp
        self.out = io.StringIO()
        self.metrics = Metrics()
        engine = idp.engine(parse_config(config))
        self.service = AuthorizationService(engine, JsonLogger(stream=self.out), self.metrics)

    def check(self, token: str | None, rid: str, **headers: str) -> Any:
        request = check_request("/orders/42", token=token, request_id=rid, headers=headers)
        return asyncio.run(self.service.Check(request, ServicerContext()))

    def lines(self, rid: str) -> list[dict[str, Any]]:
        parsed = [json.loads(line) for line in self.out.getvalue().splitlines()]
        return [line for line in parsed if line.get("requestId") == rid]

    def access(self, rid: str) -> dict[str, Any]:
        (line,) = [line for line in self.lines(rid) if line["event"] == "access"]
        return line


def reason(response: Any) -> str | None:
    if response.status.code == 0:
        return None
    return str(json.loads(response.denied_response.body)["reason"])


@pytest.fixture
def fleet(rsa_key: SigningKey, rsa_key2: SigningKey) -> Harness:
    return Harness(dynamic([company(rsa_key), partner()]), FakeIdp([rsa_key2.public_jwk]))


def test_each_server_allows_its_own_tokens_and_the_lines_name_it(
    fleet: Harness, rsa_key: SigningKey, rsa_key2: SigningKey
) -> None:
    assert reason(fleet.check(rsa_key.sign(claims()), "a")) is None
    assert reason(fleet.check(rsa_key2.sign(claims(iss=PARTNER, tier="gold")), "p")) is None
    assert fleet.access("a")["authServer"] == ISSUER
    assert fleet.access("p")["authServer"] == PARTNER
    fleet.metrics.flush()
    labels = {"deployment": "orders", "server": PARTNER, "decision": "allow", "reason": "none"}
    assert fleet.metrics.registry.get_sample_value("extauthz_auth_server_checks_total", labels) == 1


def test_each_server_applies_its_own_rules(fleet: Harness, rsa_key2: SigningKey) -> None:
    denied = fleet.check(rsa_key2.sign(claims(iss=PARTNER, tier="silver")), "p")
    assert reason(denied) == "claim_value_mismatch"
    (failure,) = [line for line in fleet.lines("p") if line["event"] != "access"]
    assert failure["authServer"] == PARTNER and failure["claim"] == "tier"


def test_a_token_claiming_the_other_issuer_is_verified_by_the_other_and_denied(
    fleet: Harness, rsa_key: SigningKey, rsa_key2: SigningKey
) -> None:
    # Signed by the company IdP, claiming the partner's iss: the partner's keys do not verify it.
    assert reason(fleet.check(rsa_key.sign(claims(iss=PARTNER, tier="gold")), "1")) == "key_not_found"
    # Signed by the partner, claiming the company's iss: the company's static keys do not either.
    assert reason(fleet.check(rsa_key2.sign(claims(tier="gold")), "2")) in ("key_not_found", "signature_invalid")
    assert fleet.access("1")["authServer"] == PARTNER and fleet.access("2")["authServer"] == ISSUER


def test_no_server_for_the_value_is_issuer_mismatch_with_the_contract_message(
    fleet: Harness, rsa_key: SigningKey
) -> None:
    denied = fleet.check(rsa_key.sign(claims(iss="https://evil.example\nx")), "e")
    assert reason(denied) == "issuer_mismatch" and denied.status.code == 16
    assert 'Bearer realm="orders", error="invalid_token"' in [
        h.header.value for h in denied.denied_response.headers if h.header.key == "www-authenticate"
    ]
    (failure,) = [line for line in fleet.lines("e") if line["event"] != "access"]
    assert failure["message"] == "No authentication server is configured for 'https://evil.examplex'."
    assert failure["selectBy"] == "claim iss" and failure["servers"] == [ISSUER, PARTNER]
    assert "authServer" not in fleet.access("e")
    # No iss at all, and an opaque token (no claims to read): the same denial, an empty value.
    assert reason(fleet.check(rsa_key.sign(claims(iss=None)), "n")) == "issuer_mismatch"
    assert reason(fleet.check("opaque-token-value", "o")) == "issuer_mismatch"
    (opaque,) = [line for line in fleet.lines("o") if line["event"] != "access"]
    assert opaque["message"] == "No authentication server is configured for ''."


def test_a_missing_token_is_still_token_missing(fleet: Harness) -> None:
    assert reason(fleet.check(None, "m")) == "token_missing"


def test_one_idp_down_fails_only_its_own_tokens(
    fleet: Harness, rsa_key: SigningKey, rsa_key2: SigningKey
) -> None:
    fleet.idp.error = httpx.ConnectError("refused")
    assert reason(fleet.check(rsa_key2.sign(claims(iss=PARTNER, tier="gold")), "p")) == "idp_call_failed"
    assert reason(fleet.check(rsa_key.sign(claims(sub="another")), "a")) is None


def test_the_default_server_takes_every_other_value_and_opaque_tokens(rsa_key: SigningKey) -> None:
    introspecting = server(["*"], {"type": "REMOTE_INTROSPECTION", "uri": "https://idp.example.com/introspect",
                                   "clientDetails": {"clientId": "extauthz", "clientSecretEnv": "DYN_TEST_SECRET"}})  # fmt: skip
    idp = FakeIdp()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DYN_TEST_SECRET", "s3cret")
        h = Harness(dynamic([company(rsa_key), introspecting]), idp)
    assert reason(h.check("good-opaque", "o")) is None
    assert h.access("o")["authServer"] == "*"
    assert reason(h.check("bad-opaque", "b")) == "token_inactive"
    assert reason(h.check(rsa_key.sign(claims()), "a")) is None and h.access("a")["authServer"] == ISSUER


def test_selection_by_header_is_decided_for_every_request(
    rsa_key: SigningKey, rsa_key2: SigningKey
) -> None:
    config = dynamic([company(rsa_key), partner()], select_by={"header": "X-Tenant"})
    config["deployments"][0]["authentication"]["servers"][0]["values"] = ["acme"]
    config["deployments"][0]["authentication"]["servers"][1]["values"] = ["partner"]
    h = Harness(config, FakeIdp([rsa_key2.public_jwk]))
    token = rsa_key.sign(claims())
    assert reason(h.check(token, "1", **{"x-tenant": "acme"})) is None
    assert reason(h.check(token, "2", **{"x-tenant": "acme"})) is None
    # The same token, another header: not the remembered allow, the partner's verdict.
    assert reason(h.check(token, "3", **{"x-tenant": "partner"})) == "key_not_found"
    assert reason(h.check(token, "4")) == "issuer_mismatch"


def test_selection_by_claim_is_remembered_like_any_decision(fleet: Harness, rsa_key: SigningKey) -> None:
    token = rsa_key.sign(claims())
    for rid in ("1", "2", "3"):
        assert reason(fleet.check(token, rid)) is None
    fleet.metrics.flush()
    hits = fleet.metrics.registry.get_sample_value(
        "extauthz_cache_events_total", {"cache": "answer", "result": "hit"}
    )
    assert hits == 2
    assert fleet.access("3")["authServer"] == ISSUER


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: s[1]["authentication"].update(tokenHeader="X-Token"), "tokenHeader differs"),
        (lambda s: s[1]["authentication"].update(isAnonymousAccessAllowed=True), "isAnonymousAccessAllowed differs"),
        (lambda s: s[1].update(values=[ISSUER]), "is taken by an earlier server"),
        (lambda s: s[1].update(values=["*", PARTNER]), "'*' (the default server) stands alone"),
    ],
)
def test_config_errors_name_the_server(change: Any, expected: str, rsa_key: SigningKey) -> None:
    config = dynamic([company(rsa_key), partner()])
    change(config["deployments"][0]["authentication"]["servers"])
    with pytest.raises(ConfigError) as caught:
        parse_config(config)
    assert any(expected in e and "deployments[0].authentication" in e for e in caught.value.errors), caught.value.errors


def test_select_by_takes_a_claim_or_a_header(rsa_key: SigningKey) -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        parse_config(dynamic([company(rsa_key)], select_by={"claim": "iss", "header": "x-tenant"}))


def test_explain_shows_the_server_and_matches_the_server(rsa_key: SigningKey, rsa_key2: SigningKey) -> None:
    config = parse_config(dynamic([company(rsa_key), partner()]))
    idp = FakeIdp([rsa_key2.public_jwk])
    token = rsa_key2.sign(claims(iss=PARTNER, tier="gold"))
    report = asyncio.run(explain(config, ExplainRequest(token=token, path="/orders/1"),
                                 client_factory=idp.client_factory()))  # fmt: skip
    (step,) = [c for c in report.checks if c.name == "server"]
    assert step.result == "PASS" and PARTNER in step.detail and "REMOTE_JWKS" in step.detail
    assert report.verdict.allowed is True and report.verdict.exact
    wrong = asyncio.run(explain(config, ExplainRequest(token=rsa_key.sign(claims(iss="https://x")), path="/orders/1"),
                                client_factory=idp.client_factory()))  # fmt: skip
    assert wrong.verdict.reason == "issuer_mismatch"
