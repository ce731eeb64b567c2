"""The IdP layer on httpx.MockTransport: introspection, its cache, the breaker, error mapping."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from extauthz.config import Config, ConfigError, parse_config
from extauthz.decision import Reason
from extauthz.engine import CheckInput
from extauthz.errors import IdpBadResponse, IdpBadStatus, IdpUnreachable
from extauthz.idp import Providers
from extauthz.idp.http import IdpEndpoint
from extauthz.idp.introspection import IntrospectionClient
from extauthz.idp.resilience import CircuitBreaker
from tests.check_requests import check_input
from tests.conftest import AUDIENCE, ISSUER
from tests.fake_idp import INTROSPECT, JWKS, FakeIdp
from tests.waiting import wait_until_async


def config(auth_method: str = "client_secret_basic", **avp: Any) -> Config:
    return parse_config({"deployments": [{
        "name": "opaque", "pathPrefix": "/",
        "authentication": {"type": "TOKEN_AUTHENTICATION", "validationPolicy": {
            "type": "REMOTE_INTROSPECTION", "uri": INTROSPECT, "timeoutSeconds": 1,
            "clientDetails": {"clientId": "rs client", "clientSecretEnv": "EXTAUTHZ_TEST_SECRET", "authMethod": auth_method},
            "additionalValidationPolicy": {"issuers": [ISSUER], "audiences": [AUDIENCE], **avp},
        }},
        "routes": [{"path": "/{p*}", "authorization": {"type": "ANY_OF", "allowedScope": ["orders.read"]}}],
    }]})


@pytest.fixture(autouse=True)
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("EXTAUTHZ_TEST_SECRET", "s3cr&t")
    return "s3cr&t"


def req(token: str) -> CheckInput:
    return check_input("/x", token=token, host="h")


def introspection_client(idp: FakeIdp) -> IntrospectionClient:
    """The opaque deployment's introspection client, on ``idp``."""
    client = idp.providers(config()).by_deployment["opaque"].introspection
    assert isinstance(client, IntrospectionClient)
    return client


def endpoint(
    idp: FakeIdp, *, timeout: float = 5, name: str = "jwks_uri", uri: str = JWKS, **kwargs: Any
) -> IdpEndpoint:
    """One IdP endpoint (the JWKS, unless told) answered by ``idp``; ``kwargs`` as IdpEndpoint
    takes them (max_outstanding, breaker, observer)."""
    return IdpEndpoint(name, uri, idp.client_factory()(None), timeout=timeout, **kwargs)


def test_active_token_is_allowed_and_inactive_is_token_inactive() -> None:
    idp = FakeIdp()
    e = idp.engine(config())

    async def run() -> None:
        assert (await e.check(req("good-1"))).allowed
        d = await e.check(req("revoked-1"))
        assert d.reason is Reason.TOKEN_INACTIVE

    asyncio.run(run())


def test_basic_auth_is_form_encoded_and_form_is_rfc7662(secret: str) -> None:
    idp = FakeIdp()
    asyncio.run(idp.engine(config()).check(req("good-1")))
    r = idp.requests[0]
    assert r.method == "POST"
    assert parse_qs(r.content.decode()) == {"token": ["good-1"], "token_type_hint": ["access_token"]}
    user, _, pw = base64.b64decode(r.headers["authorization"].split()[1]).decode().partition(":")
    assert (user, pw) == ("rs+client", "s3cr%26t")


def test_client_secret_post(secret: str) -> None:
    idp = FakeIdp()
    asyncio.run(idp.engine(config("client_secret_post")).check(req("good-1")))
    r = idp.requests[0]
    assert "authorization" not in r.headers
    form = parse_qs(r.content.decode())
    assert form["client_id"] == ["rs client"] and form["client_secret"] == [secret]


def test_claims_of_an_active_token_are_checked() -> None:
    idp = FakeIdp()
    idp.answer = {"active": True, "iss": ISSUER, "aud": "https://other", "scope": "orders.read"}
    assert asyncio.run(idp.engine(config()).check(req("good"))).reason is Reason.AUDIENCE_MISMATCH
    idp.answer = {"active": True, "iss": ISSUER, "aud": AUDIENCE, "scope": "x"}
    assert asyncio.run(idp.engine(config()).check(req("good"))).reason is Reason.INSUFFICIENT_SCOPE
    idp.answer = {"active": True, "iss": ISSUER, "aud": AUDIENCE, "scope": "orders.read", "exp": 1}
    assert asyncio.run(idp.engine(config()).check(req("good"))).reason is Reason.TOKEN_EXPIRED
    idp.answer = {"active": True, "iss": ISSUER, "aud": AUDIENCE, "scope": "orders.read"}  # no exp: fine
    assert asyncio.run(idp.engine(config()).check(req("good"))).allowed


@pytest.mark.parametrize("active", ["yes", "true", 1, None])
def test_active_must_be_boolean_true(active: Any) -> None:
    idp = FakeIdp()
    idp.answer = {"active": active} if active is not None else {"sub": "x"}
    d = asyncio.run(idp.engine(config()).check(req("good")))
    assert d.reason is Reason.IDP_CALL_FAILED
    assert d.message == "Unable to parse response from Identity Provider"


def test_single_flight_64_concurrent_checks_one_call() -> None:
    idp = FakeIdp()
    idp.delay = 0.05
    e = idp.engine(config())

    async def run() -> list[Any]:
        return await asyncio.gather(*(e.check(req("good-new")) for _ in range(64)))

    assert all(d.allowed for d in asyncio.run(run()))
    assert idp.calls["/introspect"] == 1


def test_positive_and_negative_cache() -> None:
    idp = FakeIdp()
    now = [1000.0]
    e = idp.engine(config(), wall_clock=lambda: now[0])

    async def run() -> None:
        for _ in range(5):
            assert (await e.check(req("good-a"))).allowed
            assert (await e.check(req("bad-a"))).reason is Reason.TOKEN_INACTIVE
        assert idp.calls["/introspect"] == 2
        now[0] += 11  # the negative entry is short-lived, the positive one is not
        assert (await e.check(req("good-a"))).allowed
        assert (await e.check(req("bad-a"))).reason is Reason.TOKEN_INACTIVE
        assert idp.calls["/introspect"] == 3

    asyncio.run(run())


def test_cache_is_bounded() -> None:
    client = introspection_client(FakeIdp())
    client._cache.max_entries = 100  # the ceiling is a module constant in production

    async def run() -> None:
        for i in range(300):
            await client.introspect(f"good-{i}")

    asyncio.run(run())
    assert len(client) == 100


def test_a_cached_answer_is_the_same_claims_and_holds_nothing_the_collector_visits() -> None:
    idp = FakeIdp()
    idp.answer = {"active": True, "sub": "svc", "aud": ["a", "b"], "cnf": {"x5t#S256": "t"}, "exp": 4_000_000_000}
    client = introspection_client(idp)

    async def run() -> list[dict[str, Any] | None]:
        return [await client.introspect("t1"), await client.introspect("t1")]

    fetched, cached = asyncio.run(run())
    assert idp.calls["/introspect"] == 1 and fetched == cached == {"sub": "svc", "aud": ["a", "b"], "cnf": {"x5t#S256": "t"}, "exp": 4_000_000_000}
    assert cached is not fetched  # each hit is its own copy: no caller can change the cache
    gc.collect()  # untracks tuples of atoms, as every collection does
    (entry,) = client._cache.values()
    assert not gc.is_tracked(entry) and entry[1] == b'{"sub":"svc","aud":["a","b"],"cnf":{"x5t#S256":"t"},"exp":4000000000}'


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (500, f"Unexpected response from the introspection_endpoint uri: {INTROSPECT}, received (500, Internal Server Error)."),
        (401, f"Unexpected response from the introspection_endpoint uri: {INTROSPECT}, received (401, Unauthorized)."),
    ],
)
def test_http_errors(status: int, message: str) -> None:
    idp = FakeIdp()
    idp.status = status
    d = asyncio.run(idp.engine(config()).check(req("good")))
    assert d.reason is Reason.IDP_CALL_FAILED and d.message == message
    assert dict(d.log_fields)["endpoint"] == "introspection_endpoint"


def test_html_is_unparseable() -> None:
    idp = FakeIdp()
    idp.raw = b"<html>oops</html>"
    d = asyncio.run(idp.engine(config()).check(req("good")))
    assert d.message == "Unable to parse response from Identity Provider"


def test_breaker_opens_fails_fast_and_recovers() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=3, cool_down_seconds=30, clock=lambda: now[0], wall_clock=lambda: 1_800_000_000 + now[0])
    idp = FakeIdp()
    idp.status = 503
    ep = endpoint(idp, timeout=1, breaker=breaker)

    async def run() -> None:
        for _ in range(3):
            with pytest.raises(IdpBadStatus):
                await ep.call()
        assert breaker.state == "open"
        for _ in range(10):
            with pytest.raises(Exception) as exc:
                await ep.call()
            assert str(exc.value) == (
                f"Circuit open for the jwks_uri uri: {JWKS}; failing fast until 2027-01-15T08:00:30.000Z."
            )
        assert idp.calls["/jwks"] == 3
        now[0] = 31  # half-open: one probe
        idp.status = None  # healthy again
        await ep.call()
        assert breaker.state == "closed" and idp.calls["/jwks"] == 4

    asyncio.run(run())


def test_half_open_probe_failure_reopens() -> None:
    now = [0.0]
    b = CircuitBreaker(failure_threshold=1, cool_down_seconds=10, clock=lambda: now[0])
    b.failure()
    assert not b.allow()
    now[0] = 10
    assert b.allow() and not b.allow()  # one probe only
    b.failure()
    assert b.state == "open"


def test_refused_connection_is_retried_once() -> None:
    idp = FakeIdp()
    idp.error = httpx.ConnectError("[Errno 111] Connection refused")
    with pytest.raises(IdpUnreachable) as exc:
        asyncio.run(endpoint(idp, timeout=1).call())
    assert idp.calls["/jwks"] == 2 and exc.value.kind == "CONNECTION_REFUSED"
    assert exc.value.message == (
        f"Unable to connect to the jwks_uri uri: {JWKS}, CONNECTION_REFUSED. "
        "Make sure that the URI is accessible from the network of the authorization service."
    )


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (httpx.ConnectTimeout("timed out"), "TIMEOUT"),
        (httpx.ReadTimeout("timed out"), "TIMEOUT"),
        (httpx.ConnectError("[Errno -2] Name or service not known"), "DNS_FAILURE"),
        (httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"), "TLS_ERROR"),
    ],
)
def test_transport_errors_map_to_the_contract_kinds(exc: Exception, kind: str) -> None:
    idp = FakeIdp()
    idp.error = exc
    discovery = endpoint(idp, timeout=1, name="discovery", uri="https://idp/.well-known")
    with pytest.raises(IdpUnreachable) as info:
        asyncio.run(discovery.call())
    assert info.value.kind == kind


def test_closed_socket_is_unparseable() -> None:
    idp = FakeIdp()
    idp.error = httpx.RemoteProtocolError("Server disconnected without sending a response.")
    with pytest.raises(IdpBadResponse):
        asyncio.run(endpoint(idp, timeout=1).call())


def test_missing_secret_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXTAUTHZ_TEST_SECRET")
    with pytest.raises(ConfigError) as exc:
        Providers(config())
    assert exc.value.errors == [
        "deployments[0].authentication.validationPolicy.clientDetails.clientSecretEnv: "
        "environment variable EXTAUTHZ_TEST_SECRET is not set"
    ]


def slow_idp(seconds: float) -> FakeIdp:
    """An IdP that answers the JWKS (with no keys) only after ``seconds``."""
    idp = FakeIdp()
    idp.delay = seconds
    return idp


async def timed_calls(ep: IdpEndpoint, n: int) -> list[tuple[float, IdpUnreachable | None]]:
    """``n`` concurrent calls: how long each took, and the IdpUnreachable it ended with, if any."""

    async def timed() -> tuple[float, IdpUnreachable | None]:
        started = asyncio.get_running_loop().time()
        try:
            await ep.call()
            error = None
        except IdpUnreachable as exc:
            error = exc
        return asyncio.get_running_loop().time() - started, error

    return await asyncio.gather(*(timed() for _ in range(n)))


def test_waiting_for_a_slot_counts_against_the_same_timeout() -> None:
    """A call queued behind the outstanding-call cap still ends within timeoutSeconds overall,
    not after waiting for a slot and then again for the IdP."""
    ep = endpoint(slow_idp(0.3), timeout=0.5, max_outstanding=1, breaker=CircuitBreaker(failure_threshold=100))
    results = [(t, "ok" if e is None else e.kind) for t, e in asyncio.run(timed_calls(ep, 3))]
    assert [o for _, o in results].count("ok") == 1
    assert all(o in ("ok", "TIMEOUT") for _, o in results)
    assert max(t for t, _ in results) < 0.5 + 0.25  # the deadline, with room for a busy machine


# -- hardening: what the IdP sends is not trusted, and only its own failures count -------------

PARSE = "Unable to parse response from Identity Provider"
TIMEOUT_MESSAGE = (
    f"Unable to connect to the jwks_uri uri: {JWKS}, TIMEOUT. "
    "Make sure that the URI is accessible from the network of the authorization service."
)


class Outcomes:
    """An IdpObserver that keeps the outcome of every call."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []

    def idp_call(self, endpoint: str, outcome: str, seconds: float) -> None:
        self.outcomes.append(outcome)

    def cache(self, cache: str, result: str) -> None:
        pass


class Phrasing(FakeIdp):
    """An IdP that answers every call with this status and a reason phrase of its own."""

    def __init__(self, status: int, phrase: bytes) -> None:
        super().__init__()
        self.answer_status, self.phrase = status, phrase

    def respond(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(self.answer_status, content=b"{}", extensions={"reason_phrase": self.phrase})


@pytest.mark.parametrize(
    ("status", "sent", "shown"),
    [
        (599, b"IDP-REASON-MARKER token=abc", "Unknown"),  # no standard phrase: Unknown
        (503, b"IDP-REASON-MARKER", "Service Unavailable"),  # the standard phrase, not theirs
    ],
)
def test_the_log_message_names_the_standard_reason_phrase_never_the_idps(
    status: int, sent: bytes, shown: str
) -> None:
    d = asyncio.run(Phrasing(status, sent).engine(config()).check(req("good")))
    assert d.reason is Reason.IDP_CALL_FAILED
    assert d.message == (
        f"Unexpected response from the introspection_endpoint uri: {INTROSPECT}, received ({status}, {shown})."
    )
    assert "MARKER" not in repr(d)


def test_waiting_for_a_slot_is_not_an_idp_failure() -> None:
    """Checks queued behind the outstanding-call cap time out locally: they fail closed with the
    TIMEOUT message, but the breaker does not count them and the metric calls them queue_timeout
    (or timeout, for the one that got its slot late and had sent its request when time ran out).
    The one call that reached the IdP and was answered in time leaves the circuit closed."""
    observer = Outcomes()
    breaker = CircuitBreaker(failure_threshold=1)
    ep = endpoint(slow_idp(0.3), timeout=0.5, max_outstanding=1, breaker=breaker, observer=observer)
    results = asyncio.run(timed_calls(ep, 4))
    errors = [e for _, e in results if e is not None]
    assert len(errors) == 3
    for error in errors:
        assert isinstance(error, IdpUnreachable) and error.kind == "TIMEOUT"
        assert error.message == TIMEOUT_MESSAGE
    assert sorted(observer.outcomes) == ["ok", "queue_timeout", "queue_timeout", "timeout"]
    assert breaker.state == "closed" and breaker.allow()
    assert ep.last_error is None  # the IdP did nothing wrong
    assert max(t for t, _ in results) < 0.5 + 0.25  # still bounded by the one deadline


def test_an_idp_that_times_out_with_a_free_slot_is_counted() -> None:
    """The IdP had the whole timeoutSeconds: that timeout is its own failure, as before."""
    observer = Outcomes()
    breaker = CircuitBreaker(failure_threshold=1)
    ep = endpoint(slow_idp(5), timeout=0.2, breaker=breaker, observer=observer)  # it hangs
    with pytest.raises(IdpUnreachable) as info:
        asyncio.run(ep.call())
    assert info.value.message == TIMEOUT_MESSAGE
    assert observer.outcomes == ["timeout"] and breaker.state == "open"


class CountingBreaker(CircuitBreaker):
    """A CircuitBreaker that counts the calls it let through."""

    let_through = 0

    def allow(self) -> bool:
        allowed = super().allow()
        self.let_through += allowed
        return allowed


def test_a_cancelled_wait_for_a_slot_frees_the_half_open_probe() -> None:
    """The half-open probe that is still queued when its check is cancelled leaves no verdict."""
    idp = slow_idp(0.2)
    now = [0.0]
    breaker = CountingBreaker(failure_threshold=1, cool_down_seconds=1, clock=lambda: now[0])
    ep = endpoint(idp, timeout=1, max_outstanding=1, breaker=breaker)

    async def run() -> None:
        busy = asyncio.ensure_future(ep.call())  # holds the one slot
        await idp.until_called("/jwks")
        breaker.failure()
        now[0] = 1.0  # half-open
        probe = asyncio.ensure_future(ep.call())
        await wait_until_async(
            lambda: breaker.let_through == 2, what="the half-open probe, let through to queue for the slot"
        )
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        assert breaker.allow()  # the probe slot is free again
        await busy

    asyncio.run(run())


def nested(depth: int, opening: bytes = b"[", closing: bytes = b"]") -> bytes:
    return opening * depth + closing * depth


def answering(body: bytes) -> FakeIdp:
    """An IdP whose every answer is 200 with these bytes."""
    idp = FakeIdp()
    idp.raw = body
    return idp


@pytest.mark.parametrize(
    "body",
    [
        nested(200_000),  # 400 KB: well under the 1 MiB cap, and json.loads' recursion limit
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b'{"keys":' + nested(65) + b"}",  # one level past the bound
        b'{"keys": [' + b" " * (2 * 1024 * 1024) + b"]}",  # past the 1 MiB cap
    ],
    ids=["arrays-200000", "objects-100000", "depth-66", "oversized"],
)
def test_deeply_nested_or_oversized_json_is_unparseable_and_counted_by_the_breaker(body: bytes) -> None:
    observer = Outcomes()
    breaker = CircuitBreaker(failure_threshold=1)
    ep = endpoint(answering(body), breaker=breaker, observer=observer)
    with pytest.raises(IdpBadResponse) as info:
        asyncio.run(ep.call())
    assert info.value.message == PARSE
    assert observer.outcomes == ["bad_response"] and breaker.state == "open"


def test_deeply_nested_introspection_answer_is_idp_call_failed() -> None:
    d = asyncio.run(answering(nested(200_000)).engine(config()).check(req("good")))
    assert d.reason is Reason.IDP_CALL_FAILED and d.message == PARSE


def test_json_nested_up_to_the_bound_is_parsed() -> None:
    """64 levels are parsed; brackets and escaped quotes inside strings are not nesting."""
    inside_strings = '"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\"[[[[[[[[\\\\"'
    documents = [
        nested(64),
        b"[" * 32 + b'{"k":' * 32 + b"1" + b"}" * 32 + b"]" * 32,
        ('{"keys": [{"kid": ' + inside_strings + ', "x5c": [' + ", ".join([inside_strings] * 100) + "]}]}").encode(),
    ]
    for body in documents:
        json.loads(body)  # valid JSON, 64 levels at most
        assert asyncio.run(endpoint(answering(body)).call()).data is not None


def test_an_answer_too_large_to_keep_is_used_once_and_not_cached() -> None:
    """The cache is bounded in bytes: an answer over 16 KiB is not kept (20,000 of them could
    otherwise hold gigabytes)."""
    idp = FakeIdp()
    idp.answer = {"active": True, "sub": "svc", "profile": "x" * 20_000, "exp": 4_000_000_000}
    client = introspection_client(idp)

    async def run() -> list[dict[str, Any] | None]:
        return [await client.introspect("big"), await client.introspect("big")]

    first, second = asyncio.run(run())
    assert first == second and first is not None and first["sub"] == "svc"
    assert idp.calls["/introspect"] == 2 and len(client) == 0
