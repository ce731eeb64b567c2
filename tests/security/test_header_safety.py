"""Identity headers are safe: a claim can never smuggle a header, and a client can never pre-set one.

``headersFromClaims`` turns attacker-influenced text (a display name, an e-mail, a group) into
upstream header values, so:
  * a value with CR, LF, NUL or another control character is never sent; the header is removed
    instead (``headers_to_remove``), so a client-sent copy cannot survive either;
  * non-string claims become their JSON text, deterministically;
  * on EVERY allow (claim present, claim absent, anonymous, introspected) each configured identity
    header is either set with OVERWRITE_IF_EXISTS_OR_ADD or listed in ``headers_to_remove``;
  * header names are validated when the config is loaded, and client-controlled values echoed in
    responses (``x-request-id``) cannot carry a line break either.
Everything is checked on the CheckResponse that ``AuthorizationService.Check`` returns, as Envoy
receives it; one test repeats the invariants against the real server process.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from extauthz._pb.envoy.config.core.v3 import base_pb2
from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from extauthz.config import ConfigError, parse_config
from extauthz.engine import Engine
from extauthz.logs import JsonLogger
from extauthz.metrics import Metrics
from extauthz.server import AuthorizationService
from tests.check_requests import check_request
from tests.conftest import ISSUER, SigningKey, claims
from tests.fake_idp import INTROSPECT, FakeIdp
from tests.security._support import jbytes, server_process, sign_raw

IDENTITY = {"x-auth-subject": "sub", "x-auth-email": "email", "x-auth-groups": "groups", "x-auth-tenant": "tenant"}
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
SECRET_ENV = "EXTAUTHZ_HEADER_SAFETY_SECRET"
# What HTTP/1.1 and HTTP/2 never allow in a field value (RFC 9110 §5.5): CTLs but HTAB, and DEL.
UNSAFE_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
FORGED = {name: "forged-by-client" for name in IDENTITY}


def config_dict(rsa: SigningKey) -> dict[str, Any]:
    static = {"type": "STATIC_KEYS", "keys": [rsa.public_jwk], "additionalValidationPolicy": {"issuers": [ISSUER]}}
    return {
        "deployments": [
            {"name": "api", "pathPrefix": "/api", "headersFromClaims": IDENTITY,
             "authentication": {"type": "TOKEN_AUTHENTICATION", "isAnonymousAccessAllowed": True, "validationPolicy": static},
             "routes": [{"name": "open", "path": "/open", "authorization": {"type": "ANONYMOUS"}},
                        {"name": "private", "path": "/{rest*}"}]},
            {"name": "lenient", "pathPrefix": "/lenient", "headersFromClaims": IDENTITY,
             "authentication": {"type": "TOKEN_AUTHENTICATION", "isAnonymousAccessAllowed": True, "validationPolicy": static}},
            {"name": "opaque", "pathPrefix": "/opaque", "headersFromClaims": IDENTITY,
             "authentication": {"type": "TOKEN_AUTHENTICATION", "validationPolicy": {
                 "type": "REMOTE_INTROSPECTION", "uri": INTROSPECT,
                 "clientDetails": {"clientId": "rs", "clientSecretEnv": SECRET_ENV}}}},
        ]
    }  # fmt: skip


class Checker:
    def __init__(self, rsa: SigningKey) -> None:
        os.environ[SECRET_ENV] = "header-safety-secret"
        self.rsa = rsa
        self.config = parse_config(config_dict(rsa))
        # Active only for the opaque tokens a test registers, with their claims.
        self.idp = FakeIdp()
        self.idp.active_prefix = None
        self.providers = self.idp.providers(self.config)
        self.service = AuthorizationService(Engine(self.config, self.providers.by_deployment), JsonLogger(io.StringIO()), Metrics())
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        self.loop.run_until_complete(self.providers.aclose())
        self.loop.close()
        del os.environ[SECRET_ENV]

    def check(self, path: str, token: str | None = None, headers: Mapping[str, str] = FORGED) -> ext.CheckResponse:
        return self.send(check_request(path, host="h", headers=headers, token=token))

    def send(self, request: ext.CheckRequest) -> ext.CheckResponse:
        return self.loop.run_until_complete(self.service.Check(request, None))  # type: ignore[arg-type]

    def signed(self, payload: bytes) -> str:
        return sign_raw(jbytes({"alg": "RS256", "kid": self.rsa.kid}), payload, self.rsa.private, "RS256")


@pytest.fixture(scope="module")
def checker(rsa_key: SigningKey) -> Iterator[Checker]:
    c = Checker(rsa_key)
    yield c
    c.close()


def upstream(resp: ext.CheckResponse) -> tuple[dict[str, str], list[str]]:
    """(headers set for the upstream, headers removed), after checking the allow's invariants."""
    assert resp.status.code == 0, resp
    ok = resp.ok_response
    set_ = {}
    for h in ok.headers:
        assert h.append_action == OVERWRITE, h  # never APPEND: a client copy cannot sit beside ours
        assert not UNSAFE_BYTES.search(h.header.value.encode()), h.header
        assert h.header.key not in set_
        set_[h.header.key] = h.header.value
    removed = list(ok.headers_to_remove)
    # Every identity header is accounted for exactly once: ours, or gone.
    assert set(set_) | set(removed) == set(IDENTITY), (set_, removed)
    assert not set(set_) & set(removed)
    assert not ok.response_headers_to_add
    return set_, removed


# -- claim values that must never become header values ----------------------------------------------

CONTROL_VALUES = {
    "cr": "alice\r", "lf": "alice\n", "crlf_header_injection": "alice\r\nx-admin: true",
    "lf_set_cookie": "alice\nSet-Cookie: session=attacker", "crlf_response_splitting": "a\r\n\r\nHTTP/1.1 200 OK",
    "nul": "alice\x00admin", "leading_nul": "\x00alice", "soh": "\x01", "backspace": "alice\x08\x08\x08\x08\x08admin",
    "vertical_tab": "a\x0bb", "form_feed": "a\x0cb", "escape_sequence": "\x1b[31malice", "unit_separator": "a\x1fb",
    "del": "alice\x7f",
}  # fmt: skip


@pytest.mark.parametrize("value", CONTROL_VALUES.values(), ids=CONTROL_VALUES.keys())
def test_claim_with_control_characters_is_removed_not_sent(checker: Checker, value: str) -> None:
    resp = checker.check("/api/x", checker.rsa.sign(claims(sub=value, email=f"{value}@example.com", groups=["ok", value])))
    set_, removed = upstream(resp)
    assert {"x-auth-subject", "x-auth-email", "x-auth-groups"} <= set(removed)
    assert set_ == {"x-auth-tenant": "acme"}


@pytest.mark.parametrize("value", CONTROL_VALUES.values(), ids=CONTROL_VALUES.keys())
def test_claim_with_control_characters_from_introspection_is_removed(checker: Checker, value: str) -> None:
    token = f"opaque-{abs(hash(value))}"
    checker.idp.active[token] = {"sub": value, "tenant": "acme", "exp": 4_000_000_000}
    set_, removed = upstream(checker.check("/opaque/x", token))
    assert "x-auth-subject" in removed and "x-auth-subject" not in set_


NON_STRING = [
    ("integer", 42, "42"),
    ("negative_float", -1.5, "-1.5"),
    ("true", True, "true"),
    ("false", False, "false"),
    ("list_of_strings", ["admins", "dev"], "admins,dev"),
    ("object", {"role": "admin", "level": 3}, '{"role":"admin","level":3}'),
    ("mixed_list", [1, "a", None], '[1,"a",null]'),
    ("nested_list", [["a"]], '[["a"]]'),
    # JSON escapes keep a nested CR/LF as the two characters \r\n: safe to send
    ("object_holding_crlf", {"x": "a\r\nb"}, '{"x":"a\\r\\nb"}'),
    ("empty_list", [], ""),
    ("empty_string", "", ""),
    ("unicode", "Zoë 山田", "Zoë 山田"),
    ("tab_inside", "a\tb", "a\tb"),  # HTAB is a legal field-value character
]


@pytest.mark.parametrize(("value", "expected"), [(v, e) for _, v, e in NON_STRING], ids=[n for n, _, _ in NON_STRING])
def test_non_string_claims_become_their_json_text(checker: Checker, value: Any, expected: str) -> None:
    set_, _ = upstream(checker.check("/api/x", checker.rsa.sign(claims(sub=value))))
    assert set_["x-auth-subject"] == expected


def test_list_claim_with_a_crlf_element_is_removed_whole(checker: Checker) -> None:
    set_, removed = upstream(checker.check("/api/x", checker.rsa.sign(claims(groups=["users", "admins\r\nx-admin: 1"]))))
    assert "x-auth-groups" in removed and "x-auth-groups" not in set_


def test_json_null_claim_is_removed(checker: Checker) -> None:
    token = checker.signed(jbytes(claims())[:-1] + b',"email":null}')
    _, removed = upstream(checker.check("/api/x", token))
    assert "x-auth-email" in removed


@pytest.mark.parametrize("claim", ["sub", "email", "client_id"])
def test_claim_with_a_lone_surrogate_still_gets_an_answer(checker: Checker, claim: str) -> None:
    token = checker.signed(jbytes(claims(**{claim: None}))[:-1] + f',"{claim}":"x\\udc00"'.encode() + b"}")
    resp = checker.check("/api/x", token)
    if resp.status.code == 0:
        set_, _ = upstream(resp)
        assert all(v.encode() for v in set_.values())
    else:
        assert json.loads(resp.denied_response.body)["reason"] == "token_malformed"


# -- client-sent copies never survive an allow ------------------------------------------------------


def test_allow_with_claims_overwrites_every_client_copy(checker: Checker) -> None:
    set_, removed = upstream(checker.check("/api/x", checker.rsa.sign(claims(email="a@example.com", groups=["g"]))))
    assert set_ == {"x-auth-subject": "alice", "x-auth-email": "a@example.com", "x-auth-groups": "g", "x-auth-tenant": "acme"}
    assert removed == []


def test_allow_without_the_claims_removes_the_client_copies(checker: Checker) -> None:
    set_, removed = upstream(checker.check("/api/x", checker.rsa.sign(claims(sub=None, tenant=None))))
    assert set_ == {}
    assert sorted(removed) == sorted(IDENTITY)


@pytest.mark.parametrize("path", ["/api/open", "/lenient/anything"], ids=["anonymous_route", "deployment_without_routes"])
def test_anonymous_allow_removes_every_client_copy(checker: Checker, path: str) -> None:
    set_, removed = upstream(checker.check(path, None))
    assert set_ == {} and sorted(removed) == sorted(IDENTITY)


def test_anonymous_route_with_a_valid_token_sets_the_headers(checker: Checker) -> None:
    set_, _ = upstream(checker.check("/api/open", checker.rsa.sign(claims())))
    assert set_["x-auth-subject"] == "alice"


def test_introspected_allow_overwrites_and_removes(checker: Checker) -> None:
    checker.idp.active["opaque-good"] = {"sub": "bob", "groups": ["a", "b"], "exp": 4_000_000_000}
    set_, removed = upstream(checker.check("/opaque/x", "opaque-good"))
    assert set_ == {"x-auth-subject": "bob", "x-auth-groups": "a,b"}
    assert sorted(removed) == ["x-auth-email", "x-auth-tenant"]


def test_client_copies_in_mixed_case_and_header_map_form_change_nothing(checker: Checker) -> None:
    """Envoy lower-cases names; with encode_raw_headers it sends header_map instead, repeats included."""
    token = checker.rsa.sign(claims(sub=None))
    hm = [base_pb2.HeaderValue(key="authorization", raw_value=f"Bearer {token}".encode())]
    hm += [base_pb2.HeaderValue(key="X-Auth-Subject", raw_value=b"forged-1"), base_pb2.HeaderValue(key="x-auth-subject", raw_value=b"forged-2")]
    resp = checker.send(check_request("/api/x", host="h", header_map=base_pb2.HeaderMap(headers=hm)))
    _, removed = upstream(resp)
    assert "x-auth-subject" in removed


def test_a_denial_sets_no_identity_header(checker: Checker) -> None:
    resp = checker.check("/api/x", checker.rsa.sign(claims(exp=1)))
    names = {h.header.key for h in resp.denied_response.headers}
    assert resp.status.code == 16 and not names & set(IDENTITY)


# -- client values echoed into response headers --------------------------------------------------------

@pytest.mark.parametrize("rid", ["abc\r\nx-admin: 1", "abc\nx", "a\x00b", 'a"b', "x" * 10_000, "\x1b[2J"],
                         ids=["crlf", "lf", "nul", "quote", "huge", "escape"])
def test_unsafe_request_id_is_replaced_not_echoed(checker: Checker, rid: str) -> None:
    resp = checker.check("/api/x", None, {"x-request-id": rid})
    headers = {h.header.key: h.header.value for h in resp.denied_response.headers}
    assert headers["x-request-id"] != rid
    assert re.fullmatch(r"[0-9a-f-]{36}", headers["x-request-id"])
    assert json.loads(resp.denied_response.body)["request_id"] == headers["x-request-id"]


# -- header names come from the config, and are validated there ---------------------------------------


def with_headers(rsa: SigningKey, headers: dict[str, str]) -> dict[str, Any]:
    cfg = config_dict(rsa)
    cfg["deployments"] = cfg["deployments"][:1]
    cfg["deployments"][0]["headersFromClaims"] = headers
    return cfg


BAD_NAMES = {
    "crlf": "x-a\r\nx-admin", "lf": "x-a\nb", "nul": "x-a\x00", "space": "x auth", "colon": "x-auth:sub",
    "empty": "", "non_ascii": "x-ä", "pseudo_authority": ":authority", "pseudo_path": ":path",
    "host": "Host", "authorization": "Authorization", "cookie": "cookie", "content_length": "content-length",
    "transfer_encoding": "transfer-encoding", "connection": "connection", "te": "te", "upgrade": "upgrade",
    "x_request_id": "x-request-id", "x_forwarded_for": "x-forwarded-for", "x_forwarded_proto": "X-Forwarded-Proto",
    "x_envoy_original_path": "x-envoy-original-path", "separator_slash": "x/a", "parens": "x(a)",
}  # fmt: skip


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_invalid_or_reserved_header_names_are_refused(rsa_key: SigningKey, name: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(with_headers(rsa_key, {name: "sub"}))
    assert any(e.startswith("deployments[0].headersFromClaims") for e in err.value.errors), err.value.errors


@pytest.mark.parametrize("name", ["keep-alive", "proxy-connection"])
def test_hop_by_hop_header_names_are_refused(rsa_key: SigningKey, name: str) -> None:
    with pytest.raises(ConfigError):
        parse_config(with_headers(rsa_key, {name: "sub"}))


def test_header_names_differing_only_in_case_are_refused(rsa_key: SigningKey) -> None:
    with pytest.raises(ConfigError):
        parse_config(with_headers(rsa_key, {"X-User": "sub", "x-user": "email"}))


def test_empty_claim_name_is_refused(rsa_key: SigningKey) -> None:
    with pytest.raises(ConfigError):
        parse_config(with_headers(rsa_key, {"x-auth-subject": ""}))


def test_valid_header_names_are_lower_cased(rsa_key: SigningKey) -> None:
    config = parse_config(with_headers(rsa_key, {"X-Auth-Subject": "sub", "x_weird.but~legal!": "tenant"}))
    assert dict(config.deployments[0].headers_from_claims) == {"x-auth-subject": "sub", "x_weird.but~legal!": "tenant"}


# -- the same invariants from the real server process ----------------------------------------------------


def test_invariants_hold_over_grpc(rsa_key: SigningKey, tmp_path: Any) -> None:
    config = config_dict(rsa_key)
    config["deployments"] = config["deployments"][:2]
    with server_process(config, tmp_path) as server:
        def check(path: str, token: str | None) -> ext.CheckResponse:
            return server.send(check_request(path, host="h", headers=FORGED, token=token))

        set_, removed = upstream(check("/api/x", rsa_key.sign(claims(sub="a\r\nx-admin: 1", groups=["g"]))))
        assert set_ == {"x-auth-groups": "g", "x-auth-tenant": "acme"} and sorted(removed) == ["x-auth-email", "x-auth-subject"]
        set_, removed = upstream(check("/api/open", None))
        assert set_ == {} and sorted(removed) == sorted(IDENTITY)
        set_, _ = upstream(check("/lenient/x", rsa_key.sign(claims(sub=7))))
        assert set_["x-auth-subject"] == "7"
