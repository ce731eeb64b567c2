"""Property-based fuzzing of ``Authorization.Check``: whatever Envoy (or anything pretending to be
Envoy) sends, the answer is a valid CheckResponse from the contract's table, no exception escapes,
and memory does not grow with the number of checks.

In-process, ``AuthorizationService.Check`` is called directly with a CheckRequest and a dummy
context, over a config with every kind of deployment (static keys, remote JWKS and introspection
on an httpx.MockTransport, anonymous, query-parameter, legacy JWT_AUTHENTICATION); a shorter run
goes through the real server process over gRPC. Examples are derandomized so that CI sees the same
inputs every time.

At least 2,000 generated examples run, in-process and over gRPC, whatever the order the tests run
in or which of them run: every generating test is marked ``@at_least(n)`` and fails unless
Hypothesis called it with ``n`` examples or more, and the ``n`` of all of them add up to 2,000 or
more (``test_the_generating_tests_add_up_to_two_thousand_examples``).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import io
import json
import os
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import pytest
from hypothesis import HealthCheck, given, is_hypothesis_test, settings
from hypothesis import strategies as st

from extauthz._pb.envoy.config.core.v3 import base_pb2
from extauthz._pb.envoy.service.auth.v3 import attribute_context_pb2 as ac
from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from extauthz.config import parse_config
from extauthz.decision import OUTCOMES, Reason
from extauthz.engine import Engine
from extauthz.logs import JsonLogger
from extauthz.metrics import Metrics
from extauthz.server import AuthorizationService
from tests.check_requests import ServicerContext, check_request
from tests.conftest import AUDIENCE, ISSUER, SigningKey, claims
from tests.fake_idp import INTROSPECT, JWKS, FakeIdp
from tests.integration.serverproc import ExtauthzProcess
from tests.security._support import (
    DECISION_GRPC_CODES,
    DENIAL_HTTP_STATUSES,
    b64url,
    jbytes,
    server_process,
    sign_json,
)

SECRET_ENV = "EXTAUTHZ_FUZZ_CLIENT_SECRET"
CLAIM_HEADERS = {"x-auth-subject": "sub", "x-auth-tenant": "tenant", "x-auth-groups": "groups"}
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
MINIMUM_EXAMPLES: dict[str, int] = {}  # generating test → the examples it must run (at_least)
TOTAL_EXAMPLES = 2_000
T = TypeVar("T", bound=Callable[..., None])


def at_least(minimum: int) -> Callable[[T], T]:
    """For a ``@given`` test: it fails unless Hypothesis called it with ``minimum`` examples or more
    (with derandomized examples, a test whose inputs run out before ``max_examples`` says so)."""

    def decorate(test: T) -> T:
        handle = test.hypothesis  # type: ignore[attr-defined]
        inner, ran = handle.inner_test, [0]

        @functools.wraps(inner)
        def counting(*args: Any, **kwargs: Any) -> None:
            ran[0] += 1
            inner(*args, **kwargs)

        handle.inner_test = counting

        @functools.wraps(test)
        def run(*args: Any, **kwargs: Any) -> None:
            ran[0] = 0
            test(*args, **kwargs)
            print(f"{test.__name__}: {ran[0]} examples")
            assert ran[0] >= minimum, f"Hypothesis ran {ran[0]} examples, fewer than {minimum}"

        MINIMUM_EXAMPLES[test.__name__] = minimum
        return run  # type: ignore[return-value]

    return decorate


def fuzz_config(rsa: SigningKey, ec: SigningKey, *, remote: bool) -> dict[str, Any]:
    static = {"type": "STATIC_KEYS", "keys": [rsa.public_jwk, ec.public_jwk]}
    checks = {
        "issuers": [ISSUER],
        "audiences": [AUDIENCE],
        "verifyClaims": [{"key": "tenant", "values": ["acme", "true", "42"], "isRequired": False}],
    }

    def token_auth(source: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"type": "TOKEN_AUTHENTICATION", "validationPolicy": {**source, "additionalValidationPolicy": checks}, **extra}

    deployments: list[dict[str, Any]] = [
        {
            "name": "orders", "hosts": ["api.example.com", "*.example.org"], "pathPrefix": "/orders",
            "authentication": token_auth(static),
            "routes": [
                {"name": "get-order", "path": "/{id}", "methods": ["GET"],
                 "authorization": {"type": "ANY_OF", "allowedScope": ["orders.read"]}},
                {"name": "any", "path": "/{rest*}"},
                {"name": "root", "path": "/"},
            ],
            "headersFromClaims": CLAIM_HEADERS,
        },
        {
            "name": "pub", "pathPrefix": "/pub",
            "authentication": token_auth(static, isAnonymousAccessAllowed=True),
            "routes": [{"path": "/open/{p*}", "authorization": {"type": "ANONYMOUS"}}, {"path": "/closed"}],
            "headersFromClaims": CLAIM_HEADERS,
        },
        {"name": "q", "pathPrefix": "/q", "authentication": token_auth(static, tokenQueryParam="access_token")},
        {
            "name": "legacy", "pathPrefix": "/legacy",
            "authentication": {"type": "JWT_AUTHENTICATION", "issuers": [ISSUER], "audiences": [AUDIENCE],
                               "tokenHeader": "X-Api-Token", "tokenAuthScheme": "",
                               "publicKeys": {"type": "STATIC_KEYS", "keys": [rsa.public_jwk]}},
        },
    ]  # fmt: skip
    if remote:
        deployments += [
            {"name": "jwks", "pathPrefix": "/jwks", "authentication": token_auth({"type": "REMOTE_JWKS", "uri": JWKS})},
            {"name": "intro", "pathPrefix": "/intro", "authentication": token_auth(
                {"type": "REMOTE_INTROSPECTION", "uri": INTROSPECT,
                 "clientDetails": {"clientId": "extauthz", "clientSecretEnv": SECRET_ENV}})},
        ]  # fmt: skip
    return {"server": {"exposeDetailedErrors": True}, "deployments": deployments}


class Discard(io.StringIO):
    """A log stream that keeps nothing (a StringIO would grow with every check)."""

    def write(self, s: str) -> int:
        return len(s)


@dataclass
class World:
    service: AuthorizationService
    loop: asyncio.AbstractEventLoop
    tokens: list[str]  # interesting tokens: valid, expired, other key, ES256...
    ec: SigningKey  # signs the random claim sets (ES256 is much cheaper to sign than RS256)

    def strategy(self, make: Any) -> st.SearchStrategy[Any]:
        """``make(self)``, built once: a strategy built per example is validated per example."""
        cache: dict[Any, st.SearchStrategy[Any]] = self.__dict__.setdefault("_strategies", {})
        if make not in cache:
            cache[make] = make(self)
        return cache[make]

    def check(self, request: ext.CheckRequest) -> ext.CheckResponse:
        return self.loop.run_until_complete(self.service.Check(request, ServicerContext()))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def world(rsa_key: SigningKey, rsa_key2: SigningKey, ec_key: SigningKey) -> Iterator[World]:
    os.environ[SECRET_ENV] = "fuzz-client-secret"
    config = parse_config(fuzz_config(rsa_key, ec_key, remote=True))
    # Opaque tokens: opaque-good… are active, fail… get a 500, any other is inactive.
    idp = FakeIdp([rsa_key.public_jwk, ec_key.public_jwk])
    idp.active_prefix, idp.active_claims, idp.failing_prefix = "opaque-good", claims(), "fail"
    providers = idp.providers(config)
    service = AuthorizationService(Engine(config, providers.by_deployment), JsonLogger(Discard()), Metrics())
    loop = asyncio.new_event_loop()
    tokens = [
        rsa_key.sign(claims()),
        rsa_key.sign(claims(exp=1)),
        rsa_key.sign(claims(sub="a\r\nx-admin: 1", groups=["a", "b\n"])),
        rsa_key.sign(claims(tenant=True, groups=["g1", "g2"])),
        rsa_key2.sign(claims()),
        ec_key.sign(claims(scope=["orders.read"])),
        rsa_key.sign(claims(iss="https://evil.example.com")),
        "opaque-good-1", "opaque-bad-1", "fail-1",
    ]
    try:
        yield World(service, loop, tokens, ec_key)
    finally:
        loop.run_until_complete(providers.aclose())
        loop.close()
        del os.environ[SECRET_ENV]


# -- what every answer must look like ----------------------------------------------------------------

_DENY_STATUS = {3: {400}, 16: {401}, 7: {403}, 14: {500, 503}}
_REASONS = {r.value for r in Reason} - {Reason.INTERNAL_ERROR.value}
_UNSAFE = {chr(c) for c in range(0x20) if c != 0x09} | {"\x7f"}


def assert_valid_response(resp: ext.CheckResponse) -> None:
    wire = resp.SerializeToString()
    assert ext.CheckResponse.FromString(wire) == resp
    code = resp.status.code
    assert code in DECISION_GRPC_CODES, (code, resp.status.message)
    if code == 0:
        assert resp.HasField("ok_response") and not resp.HasField("denied_response")
        names = set()
        for h in resp.ok_response.headers:
            assert h.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
            assert not _UNSAFE & set(h.header.value), h.header
            names.add(h.header.key)
        # every identity header is either set (overwriting) or removed
        removed = set(resp.ok_response.headers_to_remove)
        assert not names & removed
        return
    assert resp.HasField("denied_response") and not resp.HasField("ok_response")
    assert resp.denied_response.status.code in DENIAL_HTTP_STATUSES
    assert resp.denied_response.status.code in _DENY_STATUS[code]
    body = json.loads(resp.denied_response.body)
    assert set(body) <= {"error", "reason", "request_id", "error_description"}
    assert {"error", "reason", "request_id"} <= set(body)
    assert body["reason"] in _REASONS, body
    assert body["error"] == OUTCOMES[Reason(body["reason"])].error
    headers = {h.header.key: h.header.value for h in resp.denied_response.headers}
    assert headers["content-type"] == "application/json"
    assert headers["x-extauthz-reason"] == body["reason"]
    assert headers["x-request-id"] == body["request_id"]
    for value in headers.values():
        assert not _UNSAFE & set(value), headers


# -- generators ----------------------------------------------------------------------------------

ODD_PATHS = [
    "", "/", "//", "/orders", "/orders/", "/orders/1", "/orders/%00", "/orders/\x00", "/orders/..",
    "/orders/../admin", "/orders/./1", "/orders//1", "/ORDERS/1", "/orders/1?access_token=x",
    "/orders/1#frag", "/orders/1;jsessionid=1", "/orders/%2e%2e/admin", "/pub/open/../../orders/1",
    "/pub/open/x", "/pub/closed", "/q/1?access_token=&access_token=", "/legacy/x", "/intro/x",
    "/jwks/x", "*", "orders/1", "/orders/\u202e\u0000\ud7ff", "/💥/orders", "/orders/" + "a" * 10_000,
    "/" + "../" * 500, "/orders/" + "%" * 100, "?", "#", "/orders?", "http://evil/orders/1",
]  # fmt: skip
HEADER_NAMES = [
    "authorization", "x-request-id", "x-auth-subject", "x-auth-tenant", "host", ":authority",
    ":path", ":method", "traceparent", "x-b3-traceid", "x-b3-spanid", "b3", "x-api-token",
    "cookie", "Authorization", "AUTHORIZATION", "x-forwarded-for", "",
]  # fmt: skip

# Lone surrogates cannot be signed through json.dumps(...).encode(): test_jwt_attacks covers them.
text = st.text(max_size=40)
huge = st.integers(min_value=-(10**400), max_value=10**400)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63), huge, st.floats(), text)
json_value = st.recursive(
    json_scalar, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=4,
)
numeric_date = st.one_of(
    st.integers(-(2**63), 2**63), huge, st.floats(), st.sampled_from([0, 1, 4_000_000_000]), text, st.booleans(),
)


def path_strategy() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(ODD_PATHS), st.text(max_size=80), st.builds(lambda s: "/orders/" + s, st.text(max_size=40)))


def token_strategy(w: World) -> st.SearchStrategy[str]:
    def mutate(token: str, at: int, char: str) -> str:
        i = at % (len(token) + 1)
        return token[:i] + char + token[i + 1 :]

    return st.one_of(
        st.sampled_from(w.tokens),
        st.builds(mutate, st.sampled_from(w.tokens[:4]), st.integers(0, 2000), st.sampled_from(list("A_-.=+/~ \x00é"))),
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=", max_size=120),
        st.builds(lambda a, b, c: f"{b64url(a)}.{b64url(b)}.{b64url(c)}", st.binary(max_size=40), st.binary(max_size=40), st.binary(max_size=40)),
        st.builds(lambda h: f"{b64url(jbytes(h))}.{b64url(jbytes(claims()))}.", st.dictionaries(st.sampled_from(["alg", "kid", "crit", "jku", "typ"]), json_value, max_size=3)),
        text,
    )


def auth_value(w: World) -> st.SearchStrategy[str]:
    return st.one_of(
        st.builds(lambda t: f"Bearer {t}", token_strategy(w)),
        st.builds(lambda s, t: f"{s} {t}", st.sampled_from(["bearer", "BEARER", "Basic", "DPoP", "Bearer ", ""]), token_strategy(w)),
        text,
    )


def headers_strategy(w: World, max_size: int = 6) -> st.SearchStrategy[dict[str, str]]:
    value = st.one_of(text, st.builds(lambda t: f"Bearer {t}", st.sampled_from(w.tokens)))
    return st.dictionaries(st.one_of(st.sampled_from(HEADER_NAMES), st.text(max_size=30)), value, max_size=max_size)


def http_strategy(w: World) -> st.SearchStrategy[ac.AttributeContext.HttpRequest]:
    def build(method: str, host: str, path: str, headers: dict[str, str], auth: str | None,
              query_token: str | None, body: str, raw_body: bytes, extras: dict[str, Any]) -> ac.AttributeContext.HttpRequest:
        h = dict(headers)
        if auth is not None:
            h["authorization"] = auth
        if query_token is not None:
            path = f"{path}?access_token={query_token}"
        return ac.AttributeContext.HttpRequest(
            method=method, host=host, path=path, headers=h, body=body, raw_body=raw_body, **extras
        )

    return st.builds(
        build,
        st.one_of(st.sampled_from(["GET", "POST", "DELETE", "get", "", "CONNECT"]), text),
        st.one_of(st.sampled_from(["api.example.com", "API.EXAMPLE.COM:443", "eu.example.org", "example.org", "", "[::1]:80"]), text),
        path_strategy(),
        headers_strategy(w),
        st.one_of(st.none(), auth_value(w)),
        st.one_of(st.none(), token_strategy(w)),
        st.text(max_size=50),
        st.binary(max_size=50),
        st.fixed_dictionaries({}, optional={"id": text, "scheme": text, "query": text, "fragment": text,
                                            "size": st.integers(-(2**63), 2**63 - 1), "protocol": text}),
    )


def request_strategy(w: World) -> st.SearchStrategy[ext.CheckRequest]:
    context_ext = st.dictionaries(
        st.sampled_from(["deployment", "route", "other"]),
        st.one_of(st.sampled_from(["orders", "pub", "q", "legacy", "jwks", "intro", "get-order", "0", "1", "99", "-1"]), text),
        max_size=2,
    )

    def build(http: ac.AttributeContext.HttpRequest, ctx: dict[str, str], shape: int) -> ext.CheckRequest:
        if shape == 0:
            return ext.CheckRequest()
        if shape == 1:
            return ext.CheckRequest(attributes=ac.AttributeContext(context_extensions=ctx))
        if shape == 2:
            return ext.CheckRequest(attributes=ac.AttributeContext(request=ac.AttributeContext.Request()))
        return ext.CheckRequest(attributes=ac.AttributeContext(request=ac.AttributeContext.Request(http=http), context_extensions=ctx))

    return st.builds(build, http_strategy(w), context_ext, st.sampled_from([0, 1, 2, 3, 3, 3, 3, 3, 3, 3]))


def signed_claims_strategy(w: World) -> st.SearchStrategy[str]:
    members = st.fixed_dictionaries(
        {},
        optional={
            "iss": st.one_of(st.just(ISSUER), text, json_value),
            "aud": st.one_of(st.just(AUDIENCE), st.lists(st.sampled_from([AUDIENCE, "", "x"]), max_size=3), json_value),
            "exp": numeric_date, "nbf": numeric_date, "iat": numeric_date,
            "sub": json_value, "tenant": json_value, "groups": json_value,
            "scope": st.one_of(st.sampled_from(["orders.read", "orders.read admin", ""]), json_value),
            "client_id": json_value, "azp": json_value, "scp": json_value,
        },
    )
    base = st.fixed_dictionaries({"iss": st.just(ISSUER), "aud": st.just(AUDIENCE), "exp": st.just(4_000_000_000)})
    return st.builds(
        lambda b, m, extra: sign_json({"alg": "ES256", "kid": w.ec.kid}, {**b, **m, **extra}, w.ec.private),
        base, members, st.dictionaries(st.text(max_size=8), json_value, max_size=2),
    )


CLAIM_PATHS = st.sampled_from(["/orders/1", "/orders/a/b", "/pub/open/x", "/pub/closed", "/jwks/x"])


# -- in-process properties ------------------------------------------------------------------------


@at_least(600)
@settings(FUZZ, max_examples=600)
@given(data=st.data())
def test_any_check_request_gets_a_valid_response(world: World, data: st.DataObject) -> None:
    assert_valid_response(world.check(data.draw(world.strategy(request_strategy))))


@at_least(300)
@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_genuinely_signed_random_claims_get_a_valid_response(world: World, data: st.DataObject) -> None:
    """The signature is good, so every claim check and the header rendering run on random claims."""
    token = data.draw(world.strategy(signed_claims_strategy))
    path = data.draw(CLAIM_PATHS)
    resp = world.check(check_request(path, token=token, headers={"x-auth-subject": "forged"}))
    assert_valid_response(resp)
    if resp.status.code == 0 and path.startswith("/orders"):
        # headersFromClaims are each set or removed, so no client copy survives
        set_names = {h.header.key for h in resp.ok_response.headers}
        assert set_names | set(resp.ok_response.headers_to_remove) == set(CLAIM_HEADERS)


@at_least(420)
@settings(FUZZ, max_examples=420)
@given(
    entries=st.lists(
        st.tuples(st.one_of(st.sampled_from(HEADER_NAMES), st.text(max_size=20)), st.text(max_size=30), st.binary(max_size=60)),
        max_size=8,
    ),
    raw_body=st.binary(max_size=100),
    path=path_strategy(),
    with_token=st.booleans(),
)
def test_non_utf8_bytes_in_header_map_and_raw_body(world: World, entries: list[tuple[str, str, bytes]],
                                                   raw_body: bytes, path: str, with_token: bool) -> None:
    """Envoy's encode_raw_headers: header_map with raw_value bytes that need not be UTF-8."""
    hm = [base_pb2.HeaderValue(key=k, value=v, raw_value=raw) for k, v, raw in entries]
    if with_token:
        hm.append(base_pb2.HeaderValue(key="authorization", raw_value=f"Bearer {world.tokens[0]}".encode()))
        hm.append(base_pb2.HeaderValue(key="authorization", raw_value=b"Bearer \xff\xfe"))
    resp = world.check(check_request(path, header_map=base_pb2.HeaderMap(headers=hm), raw_body=raw_body))
    assert_valid_response(resp)
    if with_token:
        # Two Authorization values joined with "," never vouch for an identity: a denial, or
        # (on an anonymous route) an allow that sets no identity header.
        assert resp.status.code != 0 or not resp.ok_response.headers


@at_least(700)
@settings(FUZZ, max_examples=700)
@given(path=path_strategy(), method=st.text(max_size=10), host=st.text(max_size=30), data=st.data())
def test_odd_paths_methods_and_hosts(world: World, path: str, method: str, host: str, data: st.DataObject) -> None:
    token = world.tokens[data.draw(st.integers(0, len(world.tokens) - 1))]
    for headers in ({}, {"authorization": f"Bearer {token}"}):
        resp = world.check(check_request(path, method=method, host=host, headers=headers))
        assert_valid_response(resp)


@at_least(10)
@settings(FUZZ, max_examples=10)
@given(n=st.integers(1000, 5000), seed=st.integers(0, 2**32), token_at=st.sampled_from([None, 0, 1]))
def test_thousands_of_headers(world: World, n: int, seed: int, token_at: int | None) -> None:
    headers = {f"x-h{seed}-{i}": "v" * (i % 50) for i in range(n)}
    if token_at is not None:
        headers["authorization"] = f"Bearer {world.tokens[token_at]}"
    resp = world.check(check_request("/orders/1", headers=headers))
    assert_valid_response(resp)
    assert (resp.status.code == 0) == (token_at == 0)


@at_least(15)  # every one of the 15 combinations
@settings(FUZZ, max_examples=20)
@given(size=st.sampled_from([8 * 1024, 64 * 1024, 1024 * 1024]), where=st.sampled_from(["authorization", "x-request-id", "path", "x-big", "host"]))
def test_oversized_headers(world: World, size: int, where: str) -> None:
    big = "A" * size
    headers = {"x-request-id": "rid"}
    path = "/orders/1"
    host = "api.example.com"
    if where == "authorization":
        headers["authorization"] = f"Bearer {big}"
    elif where == "path":
        path = "/orders/" + big
    elif where == "host":
        host = big
    else:
        headers[where] = big
    resp = world.check(check_request(path, host=host, headers=headers))
    assert_valid_response(resp)
    assert resp.status.code != 0
    body = json.loads(resp.denied_response.body)
    assert len(resp.denied_response.body) < 4096  # nothing of the oversized input is echoed
    if where == "x-request-id":
        assert body["request_id"] != big


def test_the_generating_tests_add_up_to_two_thousand_examples() -> None:
    """At least 2,000 generated examples, in-process and over gRPC: every @given test of this module
    is marked at_least(n), each fails on its own unless it ran n examples or more, and the n add up
    to 2,000 or more. Nothing here depends on which tests ran before."""
    generating = {name for name, f in globals().items() if name.startswith("test_") and is_hypothesis_test(f)}
    assert generating == MINIMUM_EXAMPLES.keys(), "a @given test without @at_least"
    assert sum(MINIMUM_EXAMPLES.values()) >= TOTAL_EXAMPLES, MINIMUM_EXAMPLES


# -- memory -----------------------------------------------------------------------------------------


def _retained(world: World, mix: list[ext.CheckRequest], rounds: int, codes: set[int] | None = None) -> int:
    """Bytes still allocated after ``rounds`` more rounds of ``mix``, once one round warmed up."""
    seen = codes if codes is not None else set()

    def round_() -> None:
        for req in mix:
            code = world.check(req).status.code
            assert code in DECISION_GRPC_CODES
            seen.add(code)

    round_()
    gc.collect()
    tracemalloc.start()
    try:
        round_()
        gc.collect()
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(rounds):
            round_()
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return after - before


def _get(path: str, token: str, rid: str = "m") -> ext.CheckRequest:
    return check_request(path, token=token, request_id=rid)


def test_memory_stays_bounded_over_thousands_of_checks(world: World, ec_key: SigningKey) -> None:
    """A fixed mix of allows (each user's token on its own API), denials of every kind, IdP
    failures and malformed requests, 600 checks a round: once the caches are warm, two more
    rounds (1,200 checks) leave next to nothing behind (under 50 bytes a check)."""
    users = {p: [ec_key.sign(claims(sub=f"{p}-user-{i}")) for i in range(20)]
             for p in ("/orders/1", "/pub/open/x", "/jwks/1")}
    denials = [*world.tokens[1:], *(f"garbage.{i}.x" for i in range(100))]
    mix: list[ext.CheckRequest] = []
    for i in range(600):
        if i % 2:
            path = list(users)[i % 3]
            mix.append(_get(path, users[path][i % 20], f"m-{i % 97}"))
        else:
            path = ["/orders/1", "/nowhere", "/q/1", "/intro/x", "/orders/a/b"][i % 5]
            mix.append(_get(path, denials[i % len(denials)], f"m-{i % 97}"))
    codes: set[int] = set()
    growth = _retained(world, mix, rounds=2, codes=codes)
    assert codes >= {0, 16, 7, 14}  # the mix reaches allows, 401s, 403s and IdP failures
    print(f"retained over 1,200 checks: {growth} bytes")
    assert growth < 60_000, f"{growth} bytes retained over 1,200 checks"


def test_one_token_alternating_between_two_deployments_retains_nothing(world: World, ec_key: SigningKey) -> None:
    token = ec_key.sign(claims())
    mix = [_get("/orders/1", token), _get("/pub/open/x", token)] * 100
    growth = _retained(world, mix, rounds=1)
    assert growth < 60_000, f"{growth} bytes retained over 200 checks"


# -- through the real server over gRPC -----------------------------------------------------------------


@pytest.fixture(scope="module")
def grpc_server(rsa_key: SigningKey, ec_key: SigningKey, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExtauthzProcess]:
    with server_process(fuzz_config(rsa_key, ec_key, remote=False), tmp_path_factory.mktemp("fuzz")) as proc:
        yield proc


@at_least(150)
@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_over_grpc_any_check_request_gets_a_valid_response(world: World, grpc_server: ExtauthzProcess, data: st.DataObject) -> None:
    resp = grpc_server.send(data.draw(world.strategy(request_strategy)))
    assert_valid_response(resp)


@at_least(60)
@settings(FUZZ, max_examples=60)
@given(garbage=st.binary(max_size=300))
def test_over_grpc_garbage_bytes_never_bring_the_server_down(grpc_server: ExtauthzProcess, garbage: bytes) -> None:
    """Bytes that are not a CheckRequest: a valid CheckResponse if they happen to parse, else an RPC
    error from the protobuf layer; the server keeps serving either way."""
    assert grpc_server.channel is not None
    call = grpc_server.channel.unary_unary(
        "/envoy.service.auth.v3.Authorization/Check",
        request_serializer=lambda b: b,
        response_deserializer=ext.CheckResponse.FromString,
    )
    try:
        resp = call(garbage, timeout=10)
    except grpc.RpcError as err:
        assert err.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), err
    else:
        assert_valid_response(resp)
    assert grpc_server.proc is not None and grpc_server.proc.poll() is None


def test_over_grpc_the_server_is_still_healthy_and_logged_no_internal_error(grpc_server: ExtauthzProcess, rsa_key: SigningKey) -> None:
    ok = grpc_server.send(check_request("/orders/1", token=rsa_key.sign(claims())))
    assert ok.status.code == 0
    events = [line.get("event") for line in grpc_server.lines()]
    assert "server.internalError" not in events
    assert "Traceback" not in grpc_server.stderr()

