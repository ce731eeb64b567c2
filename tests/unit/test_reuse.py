"""Answering an allowed credential again without validating it (``AnswerCache.reuse``).

A reused allow must never outlive anything the original validation rested on: the token's
exp and nbf (with the skew), the route it was allowed on, the JWKS and discovery documents (a fetch
or the end of their TTL ends every answer), and the introspection answer's cache lifetime. The
servicer's fast lane must log and count a reused allow exactly as the whole path does.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from typing import Any

import pytest

from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from extauthz.answers import Answer, AnswerCache
from extauthz.config import Config, parse_config
from extauthz.decision import Decision, Reason
from extauthz.logs import JsonLogger
from extauthz.metrics import Metrics
from extauthz.server import AuthorizationService
from tests.check_requests import check_input, check_request
from tests.conftest import claims
from tests.fake_idp import FakeIdp
from tests.unit.test_engine import discovery_policy, make_config
from tests.unit.test_idp_resilience import config as introspection_config
from tests.waiting import background_tasks_done

HOST = "api.example.com:443"


class Clocks:
    """The engine's wall clock and the IdP layer's monotonic clock, moved by hand."""

    def __init__(self, wall: float) -> None:
        self.wall = wall
        self.mono = 1_000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def build(config: Config, idp: FakeIdp, clocks: Clocks) -> AnswerCache:
    return AnswerCache(idp.engine(config, clock=lambda: clocks.mono, wall_clock=lambda: clocks.wall))


def warmed(engine: AnswerCache, key: Any) -> AnswerCache:
    """The engine once a first check has fetched the IdP's documents. The check that fetches
    them is never remembered: the documents changed under it."""
    throwaway = key.sign(claims(sub="warm-up"))
    assert checked(engine, throwaway).allowed and reused(engine, throwaway) is None
    return engine


def checked(engine: AnswerCache, token: str, path: str = "/orders/42", method: str = "GET") -> Decision:
    return asyncio.run(engine.check(check_input(path, token=token, method=method, host=HOST)))


def again(engine: AnswerCache, token: str, path: str = "/orders/42", method: str = "GET", host: str = HOST) -> Answer | None:
    return engine.reuse(check_input(path, token=token, method=method, host=host))


def reused(engine: AnswerCache, token: str, path: str = "/orders/42", method: str = "GET") -> Decision | None:
    answer = again(engine, token, path, method)
    return answer.decision if answer is not None else None


@pytest.fixture
def clocks() -> Clocks:
    return Clocks(time.time())


def test_an_allowed_credential_is_answered_again_without_the_idp(rsa_key: Any, rsa_key2: Any, clocks: Clocks) -> None:
    idp = FakeIdp([rsa_key.public_jwk])
    engine = warmed(build(make_config(discovery_policy()), idp, clocks), rsa_key)
    token = rsa_key.sign(claims(exp=int(clocks.wall) + 600))
    assert reused(engine, token) is None  # nothing allowed yet
    first = checked(engine, token)
    assert first.allowed
    calls = dict(idp.calls)
    assert reused(engine, token) is first
    assert reused(engine, token, path="/orders/42?verbose=1") is first  # same route, query aside
    assert idp.calls == calls
    assert reused(engine, rsa_key.sign(claims(sub="bob"))) is None  # another credential
    assert again(engine, token, host="") is None


def test_a_reused_allow_ends_at_exp_plus_the_skew(rsa_key: Any, clocks: Clocks) -> None:
    config = make_config(discovery_policy(), maxClockSkewInSeconds=30)
    engine = warmed(build(config, FakeIdp([rsa_key.public_jwk]), clocks), rsa_key)
    exp = int(clocks.wall) + 10
    token = rsa_key.sign(claims(exp=exp))
    assert checked(engine, token).allowed
    clocks.wall = exp + 30  # the last instant the skew still covers
    assert reused(engine, token) is not None
    clocks.wall = exp + 30.5
    assert reused(engine, token) is None
    assert checked(engine, token).reason is Reason.TOKEN_EXPIRED


def test_a_reused_allow_never_starts_before_nbf_minus_the_skew(rsa_key: Any, clocks: Clocks) -> None:
    config = make_config(discovery_policy(), maxClockSkewInSeconds=30)
    engine = warmed(build(config, FakeIdp([rsa_key.public_jwk]), clocks), rsa_key)
    nbf = int(clocks.wall) + 20
    token = rsa_key.sign(claims(nbf=nbf, exp=nbf + 600))
    assert checked(engine, token).allowed  # within the skew of nbf
    clocks.wall = nbf - 31  # the wall clock stepped back
    assert reused(engine, token) is None
    assert checked(engine, token).reason is Reason.TOKEN_NOT_YET_VALID


def test_an_answer_holds_for_its_own_route_only(rsa_key: Any, clocks: Clocks) -> None:
    engine = warmed(build(make_config(discovery_policy()), FakeIdp([rsa_key.public_jwk]), clocks), rsa_key)
    token = rsa_key.sign(claims(scope="orders.read"))
    assert checked(engine, token, path="/orders/42").route == "get-order"
    assert checked(engine, token, path="/orders/").route == "list"
    assert (d := reused(engine, token, path="/orders/42")) is not None and d.route == "get-order"
    assert (d := reused(engine, token, path="/orders/")) is not None and d.route == "list"
    # Another route the token was never allowed on, and a method no route covers.
    assert reused(engine, token, path="/orders/42", method="POST") is None
    assert checked(engine, token, path="/orders/42", method="POST").reason is Reason.NO_MATCHING_POLICY
    assert reused(engine, token, path="/orders/42", method="POST") is None


def test_a_jwks_fetch_ends_every_answer(rsa_key: Any, rsa_key2: Any, clocks: Clocks) -> None:
    idp = FakeIdp([rsa_key.public_jwk])
    engine = warmed(build(make_config(discovery_policy()), idp, clocks), rsa_key)
    old = rsa_key.sign(claims())
    assert checked(engine, old).allowed and reused(engine, old) is not None
    # The IdP rotates: key 1 withdrawn. A token with the new kid makes extauthz fetch the JWKS.
    idp.jwks = [rsa_key2.public_jwk]
    clocks.advance(6)  # past the unknown-kid refetch interval
    assert checked(engine, rsa_key2.sign(claims())).allowed  # fetched the JWKS again
    assert reused(engine, old) is None
    assert checked(engine, old).reason is Reason.KEY_NOT_FOUND


def test_answers_stop_with_the_jwks_ttl_until_it_is_fetched_again(rsa_key: Any, clocks: Clocks) -> None:
    idp = FakeIdp([rsa_key.public_jwk])
    idp.cache_control = "max-age=60"
    engine = warmed(build(make_config(discovery_policy()), idp, clocks), rsa_key)
    token = rsa_key.sign(claims(exp=int(clocks.wall) + 3600))
    assert checked(engine, token).allowed
    clocks.advance(59)
    assert reused(engine, token) is not None
    clocks.advance(2)  # the JWKS and the discovery document are past their TTL
    assert reused(engine, token) is None
    jwks_calls = idp.calls["/jwks"]

    async def check_then_let_the_refresh_run() -> Decision:
        engine_decision = await engine.check(check_input("/orders/42", token=token, host=HOST))
        # The stale documents are refreshed in the background: wait for the JWKS call, and for
        # the refresh to end.
        await idp.until_called("/jwks", jwks_calls + 1)
        await background_tasks_done(what="the background refresh")
        return engine_decision

    assert asyncio.run(check_then_let_the_refresh_run()).allowed
    assert idp.calls["/jwks"] == jwks_calls + 1
    assert checked(engine, token).allowed  # remembered again under the new documents
    assert reused(engine, token) is not None


def test_an_introspected_answer_lives_as_long_as_its_cache_entry(clocks: Clocks, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXTAUTHZ_TEST_SECRET", "s")
    introspector = FakeIdp()
    introspector.answer = {"active": True, "iss": "https://idp.example.com", "aud": "https://api.example.com",
                           "scope": "orders.read", "exp": int(clocks.wall) + 120}
    engine = build(introspection_config(), introspector, clocks)

    def check_opaque() -> Decision:
        return asyncio.run(engine.check(check_input("/x", token="good-1", host=HOST)))

    def reuse_opaque() -> Answer | None:
        return again(engine, "good-1", "/x")

    assert check_opaque().allowed and introspector.calls["/introspect"] == 1
    clocks.wall += 119
    assert reuse_opaque() is not None
    clocks.wall += 2  # past exp: the introspection cache entry has expired with it
    assert reuse_opaque() is None
    assert check_opaque().reason is Reason.TOKEN_EXPIRED


def test_an_introspected_answer_ends_with_max_cache_duration_before_exp(
    clocks: Clocks, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXTAUTHZ_TEST_SECRET", "s")
    raw = {"deployments": [{"name": "opaque", "pathPrefix": "/", "authentication": {
        "type": "TOKEN_AUTHENTICATION", "validationPolicy": {
            "type": "REMOTE_INTROSPECTION", "uri": "https://idp.example.com/introspect",
            "maxCacheDurationInHours": 0.01,  # 36 s
            "clientDetails": {"clientId": "c", "clientSecretEnv": "EXTAUTHZ_TEST_SECRET"}}}}]}
    introspector = FakeIdp()
    introspector.answer = {"active": True, "scope": "orders.read", "exp": int(clocks.wall) + 3600}
    engine = build(parse_config(raw), introspector, clocks)
    request = check_input("/x", token="good-1", host=HOST)
    assert asyncio.run(engine.check(request)).allowed
    clocks.wall += 35
    assert engine.reuse(request) is not None
    clocks.wall += 2
    assert engine.reuse(request) is None
    introspector.answer = {"active": False}  # revoked meanwhile: the IdP is asked again
    assert asyncio.run(engine.check(request)).reason is Reason.TOKEN_INACTIVE
    assert introspector.calls["/introspect"] == 2


def _request(token: str, request_id: str) -> ext.CheckRequest:
    return check_request("/orders/42?x=1", token=token, host=HOST, request_id=request_id)


def test_the_fast_lane_answers_logs_and_counts_like_the_whole_path(rsa_key: Any, clocks: Clocks) -> None:
    config = make_config(discovery_policy())
    engine = build(config, FakeIdp([rsa_key.public_jwk]), clocks)
    out = io.StringIO()
    metrics = Metrics()
    service = AuthorizationService(engine, JsonLogger(stream=out), metrics)
    token = rsa_key.sign(claims(exp=int(clocks.wall) + 600))

    async def run() -> list[ext.CheckResponse]:
        return [await service.Check(_request(token, f"rid-{i}"), None) for i in range(3)]  # type: ignore[arg-type]

    first, second, third = asyncio.run(run())
    assert first == second == third  # as messages: a Struct's keys may serialize in another order
    assert first.status.code == 0 and first.ok_response.headers[0].header.value == "alice"
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    access = [line for line in lines if line["event"] == "access"]
    assert [a["requestId"] for a in access] == ["rid-0", "rid-1", "rid-2"]
    assert [a["idpCalls"] for a in access] == [2, 0, 0]  # discovery + JWKS, then none
    varying = ("ts", "requestId", "latencyMs", "idpCalls")
    same = [{k: v for k, v in a.items() if k not in varying} for a in access]
    assert same[0] == same[1] == same[2] == {
        "level": "INFO", "event": "access", "deployment": "orders", "route": "get-order", "method": "GET",
        "path": "/orders/42", "status": 200, "decision": "allow", "reason": "none",
    }
    assert token not in out.getvalue()
    metrics.flush()
    value = metrics.registry.get_sample_value(
        "extauthz_checks_total", {"deployment": "orders", "decision": "allow", "reason": "none", "wire": "grpc"})
    assert value == 3
    assert metrics.registry.get_sample_value("extauthz_check_duration_seconds_count") == 3
    answered = metrics.registry.get_sample_value("extauthz_cache_events_total", {"cache": "answer", "result": "hit"})
    assert answered == 1  # the first check fetched the documents; the second was remembered


def test_an_allow_given_again_is_serialized_once_and_kept_with_its_answer(rsa_key: Any, clocks: Clocks) -> None:
    engine = warmed(build(make_config(discovery_policy()), FakeIdp([rsa_key.public_jwk]), clocks), rsa_key)
    service = AuthorizationService(engine, JsonLogger(stream=io.StringIO()), Metrics())
    token = rsa_key.sign(claims(exp=int(clocks.wall) + 600))

    async def run() -> list[Any]:
        return [await service.check_wire(_request(token, f"rid-{i}"), None) for i in range(3)]  # type: ignore[arg-type]

    first, second, third = asyncio.run(run())
    assert isinstance(first, ext.CheckResponse)  # the whole path: a message, serialized by gRPC
    assert isinstance(second, bytes) and third is second  # given again: the bytes kept with the answer
    assert ext.CheckResponse.FromString(second) == first
    answer = again(engine, token)
    assert answer is not None and answer.wire is second


def test_an_expired_tokens_denial_is_given_again_until_the_keys_change(rsa_key: Any, rsa_key2: Any, clocks: Clocks) -> None:
    idp = FakeIdp([rsa_key.public_jwk])
    config = make_config(discovery_policy(), maxClockSkewInSeconds=30)
    engine = warmed(build(config, idp, clocks), rsa_key)
    exp = int(clocks.wall) - 60
    token = rsa_key.sign(claims(exp=exp, iat=exp - 300))
    denial = checked(engine, token)
    assert denial.reason is Reason.TOKEN_EXPIRED
    assert reused(engine, token) is denial
    clocks.wall = exp + 30  # the clock stepped back inside the skew: the token is valid again
    assert reused(engine, token) is None
    assert checked(engine, token).allowed
    clocks.wall = exp + 31
    assert reused(engine, token) is None  # the allow ended at exp + skew
    assert checked(engine, token).reason is Reason.TOKEN_EXPIRED
    # Keys rotate: the remembered denial goes, and the token is now refused for its key.
    idp.jwks = [rsa_key2.public_jwk]
    clocks.advance(6)
    assert checked(engine, rsa_key2.sign(claims())).allowed
    assert reused(engine, token) is None
    assert checked(engine, token).reason is Reason.KEY_NOT_FOUND


def test_the_fast_lane_answers_an_expired_token_like_the_whole_path(rsa_key: Any, clocks: Clocks) -> None:
    config = make_config(discovery_policy())
    engine = build(config, FakeIdp([rsa_key.public_jwk]), clocks)
    out = io.StringIO()
    service = AuthorizationService(engine, JsonLogger(stream=out), Metrics())
    token = rsa_key.sign(claims(exp=int(clocks.wall) - 10))

    async def run() -> list[ext.CheckResponse]:
        return [await service.Check(_request(token, f"rid-{i}"), None) for i in range(3)]  # type: ignore[arg-type]

    responses = asyncio.run(run())
    for i, resp in enumerate(responses):
        headers = {h.header.key: h.header.value for h in resp.denied_response.headers}
        assert resp.denied_response.status.code == 401
        assert headers["x-extauthz-reason"] == "token_expired" and headers["x-request-id"] == f"rid-{i}"
        assert headers["www-authenticate"] == 'Bearer realm="orders", error="invalid_token"'
        assert json.loads(resp.denied_response.body)["request_id"] == f"rid-{i}"
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    access = [line for line in lines if line["event"] == "access"]
    assert [(a["status"], a["reason"], a["decision"]) for a in access] == [(401, "token_expired", "deny")] * 3
    assert [a["idpCalls"] for a in access] == [2, 0, 0]
    failures = [line for line in lines if line["event"] not in ("access",)]
    assert [f["requestId"] for f in failures] == ["rid-0", "rid-1", "rid-2"]
    assert {f["message"] for f in failures} == {"Validation failed for 'exp' claim."}


def test_check_metrics_stay_bounded_without_a_flushing_loop() -> None:
    metrics = Metrics()
    for _ in range(25_000):
        metrics.check("orders", "allow", "none", 0.0002)
    labels = {"deployment": "orders", "decision": "allow", "reason": "none", "wire": "grpc"}
    assert metrics.registry.get_sample_value("extauthz_checks_total", labels) == 20_000
    metrics.flush()
    assert metrics.registry.get_sample_value("extauthz_checks_total", labels) == 25_000
    assert metrics.registry.get_sample_value("extauthz_check_duration_seconds_count") == 25_000
