"""What an identity-provider failure says, precisely: which timeout ran out (connect, read, the
queue for a slot, the check's deadline), what opened a circuit, what /readyz shows, a discovery
document for another issuer, and the metric's outcomes, counted like the access line's idpCalls.

The IdP is ``FakeIdp`` on ``httpx.MockTransport``, or, where the phase of a real connection is
the point, a ``SilentPort`` on loopback (accepts, never answers).
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from extauthz.config import Config, parse_config
from extauthz.errors import (
    CircuitOpen,
    DeadlinePassed,
    IdpBadResponse,
    IdpBadStatus,
    IdpError,
    IdpUnreachable,
    QueueTimeout,
)
from extauthz.idp import Providers
from extauthz.idp.discovery import IssuerMismatch
from extauthz.idp.http import (
    CheckCalls,
    IdpEndpoint,
    IdpResponse,
    TlsSettings,
    check_deadline,
    check_idp_calls,
    make_client,
)
from extauthz.idp.resilience import CircuitBreaker
from extauthz.lifecycle import Runtime
from extauthz.logs import JsonLogger
from extauthz.metrics import IDP_OUTCOMES, Metrics
from tests.conftest import ISSUER, SigningKey
from tests.unit.test_idp_resilience import Outcomes
from tests.fake_idp import DISCOVERY, JWKS, FakeIdp
from tests.integration.faulty_idp import SilentPort
from tests.integration.serverproc import closed_port
from tests.waiting import wait_until_async

DOCS = Path(__file__).resolve().parents[2] / "docs"
PARSE = "Unable to parse response from Identity Provider"
WALL = 1_800_000_000.5  # 2027-01-15T08:00:00.500Z
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
SLACK = 0.25  # room for a busy machine beyond a bound


def unreachable(kind: str, uri: str = JWKS, endpoint: str = "jwks_uri") -> str:
    return (
        f"Unable to connect to the {endpoint} uri: {uri}, {kind}. "
        "Make sure that the URI is accessible from the network of the authorization service."
    )



def endpoint(
    idp: FakeIdp | None = None,
    *,
    uri: str = JWKS,
    timeout: float = 5.0,
    client: httpx.AsyncClient | None = None,
    **kwargs: Any,
) -> IdpEndpoint:
    """The JWKS endpoint at ``uri``, on ``idp`` (or on ``client``); ``kwargs`` as IdpEndpoint
    takes them (breaker, observer, max_outstanding, wall_clock)."""
    if client is None:
        assert idp is not None
        client = idp.client_factory()(None)
    return IdpEndpoint("jwks_uri", uri, client, timeout=timeout, **kwargs)


async def as_a_check(
    call: Callable[[], Any], *, deadline_in: float | None = None
) -> tuple[IdpError | None, int, float]:
    """``call()`` as a check makes it: with its own idpCalls counter and, when given, a deadline
    ``deadline_in`` seconds away. The IdpError it ended with (None: it answered), idpCalls, and
    the seconds it took."""
    calls = CheckCalls()
    check_idp_calls.set(calls)
    if deadline_in is not None:
        check_deadline.set(time.monotonic() + deadline_in)
    started = time.monotonic()
    try:
        await call()
    except IdpError as exc:
        return exc, calls.count, time.monotonic() - started
    return None, calls.count, time.monotonic() - started


def run_check(ep: IdpEndpoint, *, deadline_in: float | None = None) -> tuple[IdpError | None, int, float]:
    return asyncio.run(as_a_check(ep.call, deadline_in=deadline_in))


def run_real(uri: str, timeout: float, *, deadline_in: float | None = None) -> tuple[IdpError | None, int, float]:
    """:func:`run_check` on the JWKS endpoint at ``uri`` over a real pooled client."""

    async def run() -> tuple[IdpError | None, int, float]:
        client = make_client(TlsSettings())
        try:
            ep = endpoint(uri=uri, timeout=timeout, client=client)
            return await as_a_check(ep.call, deadline_in=deadline_in)
        finally:
            await client.aclose()

    return asyncio.run(run())


# -- 1. which timeout: connect, read, the queue -------------------------------------------------


@pytest.mark.parametrize(
    ("raised", "detail"),
    [
        (httpx.ConnectTimeout("timed out"), "connect timeout"),
        (httpx.PoolTimeout("timed out"), "connect timeout"),  # no connection was had: none sent
        (httpx.ReadTimeout("timed out"), "read timeout"),
        (httpx.WriteTimeout("timed out"), "read timeout"),
    ],
    ids=["connect", "pool", "read", "write"],
)
def test_a_transport_timeout_keeps_the_timeout_message_and_names_its_phase(
    raised: Exception, detail: str
) -> None:
    idp = FakeIdp()
    idp.error = raised
    error, calls, _ = run_check(endpoint(idp))
    assert isinstance(error, IdpUnreachable) and error.kind == "TIMEOUT"
    assert error.message == unreachable("TIMEOUT")  # the fixed text, unchanged
    assert dict(error.log_fields()) == {"endpoint": "jwks_uri", "uri": JWKS, "detail": detail}
    assert error.error_type == "timeout" and calls == 1


def test_a_tls_handshake_that_never_completes_is_a_connect_timeout() -> None:
    """Real loopback: the port accepts, the TLS handshake never gets an answer."""
    with SilentPort() as silent:
        uri = silent.url("https", "/jwks")
        error, calls, took = run_real(uri, 0.3)
    assert isinstance(error, IdpUnreachable) and error.message == unreachable("TIMEOUT", uri)
    assert error.detail == "connect timeout" and calls == 1
    assert 0.3 * 0.9 <= took < 0.3 + SLACK


def test_a_request_that_is_never_answered_is_a_read_timeout() -> None:
    """Real loopback: connected, the request sent, and no answer."""
    with SilentPort() as silent:
        uri = silent.url("http", "/jwks")
        error, calls, took = run_real(uri, 0.3)
        assert silent.accepted() == 1
    assert isinstance(error, IdpUnreachable) and error.message == unreachable("TIMEOUT", uri)
    assert error.detail == "read timeout" and calls == 1
    assert 0.3 * 0.9 <= took < 0.3 + SLACK


def test_a_call_that_waited_for_a_slot_says_so() -> None:
    """The outstanding-call cap made it wait: queued for a connection slot, the same message,
    and no verdict on the IdP (the breaker stays closed, /readyz shows no error)."""
    idp = FakeIdp()
    idp.delay = 0.5
    observer = Outcomes()
    ep = endpoint(idp, timeout=0.2, max_outstanding=1, breaker=CircuitBreaker(failure_threshold=1), observer=observer)

    async def run() -> list[tuple[IdpError | None, int, float]]:
        first = asyncio.ensure_future(as_a_check(ep.call))
        await idp.until_called("/jwks")
        # The queued check's own deadline ends before the held call lets its slot go (0.2 s):
        # it times out queued, whatever the machine's speed.
        return [await as_a_check(ep.call, deadline_in=0.1), await first]

    (queued, queued_calls, _), (held, held_calls, _) = asyncio.run(run())
    assert isinstance(queued, QueueTimeout) and queued.message == unreachable("TIMEOUT")
    assert dict(queued.log_fields())["detail"] == "queued for a connection slot"
    assert queued_calls == 0  # nothing was sent
    assert isinstance(held, IdpUnreachable) and held.detail == "connect timeout"  # MockTransport: no phases
    assert held_calls == 1
    assert sorted(observer.outcomes) == ["queue_timeout", "timeout"]
    assert ep.breaker.state == "open" and ep.last_error is held  # the held call, not the queued one


# -- 2. an open circuit names what opened it -------------------------------------------------


def test_an_open_circuit_names_the_failure_that_opened_it() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, cool_down_seconds=30, clock=lambda: now[0], wall_clock=lambda: WALL)
    idp = FakeIdp()
    idp.status = 500
    ep = endpoint(idp, breaker=breaker)
    for _ in range(2):
        assert isinstance(run_check(ep)[0], IdpBadStatus)
    error, calls, _ = run_check(ep)
    assert isinstance(error, CircuitOpen) and calls == 0
    assert error.message == f"Circuit open for the jwks_uri uri: {JWKS}; failing fast until 2027-01-15T08:00:30.500Z."
    assert dict(error.log_fields()) == {"endpoint": "jwks_uri", "uri": JWKS, "lastCause": "(500, Internal Server Error)"}

    now[0] = 31  # half-open: the probe times out reading, and the circuit opens again
    idp.status, idp.error = None, httpx.ReadTimeout("timed out")
    assert run_check(ep)[0].detail == "read timeout"  # type: ignore[union-attr]
    error = run_check(ep)[0]
    assert isinstance(error, CircuitOpen) and dict(error.log_fields())["lastCause"] == "TIMEOUT (read timeout)"


@pytest.mark.parametrize(
    ("failure", "cause"),
    [
        (IdpUnreachable("jwks_uri", JWKS, "CONNECTION_REFUSED"), "CONNECTION_REFUSED"),
        (IdpUnreachable("jwks_uri", JWKS, "TIMEOUT", detail="the check's deadline"), "TIMEOUT (the check's deadline)"),
        (IdpBadStatus("jwks_uri", JWKS, 401, "Unauthorized"), "(401, Unauthorized)"),
        (IdpBadResponse("jwks_uri", JWKS, "not JSON"), "unusable response (not JSON)"),
    ],
)
def test_each_failure_has_a_short_cause(failure: IdpError, cause: str) -> None:
    assert failure.cause == cause


# -- 3. /readyz: the last error, when and why ----------------------------------------------------


def test_readiness_shows_the_last_error_with_when_and_why_and_clears_it_on_success() -> None:
    idp = FakeIdp()
    idp.error = httpx.ReadTimeout("timed out")
    ep = endpoint(idp, wall_clock=lambda: WALL)
    assert ep.readiness() == {"endpoint": "jwks_uri", "uri": JWKS, "breaker": "closed", "lastSuccess": None, "lastError": None}
    run_check(ep)
    shown = ep.readiness()
    assert shown["lastError"] == {
        "message": unreachable("TIMEOUT"),
        "at": "2027-01-15T08:00:00.500Z",
        "outcome": "timeout",
        "detail": "read timeout",
    }
    assert json.loads(json.dumps(shown)) == shown  # strings and nulls only

    idp.error, idp.status = None, 503
    run_check(ep)
    assert ep.readiness()["lastError"] == {
        "message": f"Unexpected response from the jwks_uri uri: {JWKS}, received (503, Service Unavailable).",
        "at": "2027-01-15T08:00:00.500Z",
        "outcome": "5xx",
        "detail": None,
    }
    idp.status = None
    assert run_check(ep)[0] is None
    shown = ep.readiness()
    assert shown["lastError"] is None and shown["lastSuccess"] == "2027-01-15T08:00:00.500Z"


def test_userinfo_is_never_shown() -> None:
    """A discovered URI is the IdP's text and may carry user:password@; /readyz and the log
    fields show it without."""
    uri = "https://user:pw@idp.example.com/jwks"
    idp = FakeIdp()
    idp.status = 500
    ep = endpoint(idp, uri=uri)
    error = run_check(ep)[0]
    assert error is not None and dict(error.log_fields())["uri"] == JWKS
    assert error.message == f"Unexpected response from the jwks_uri uri: {JWKS}, received (500, Internal Server Error)."
    assert ep.readiness()["uri"] == JWKS and "pw" not in json.dumps(ep.readiness())
    for other in (IdpUnreachable("jwks_uri", uri, "TIMEOUT"), CircuitOpen("jwks_uri", uri, "2027-01-15T08:00:30.500Z")):
        assert "pw" not in other.message and JWKS in other.message


def remote_jwks_config(uri: str, **policy: Any) -> Config:
    return parse_config({"deployments": [{"name": "j", "pathPrefix": "/", "authentication": {
        "type": "TOKEN_AUTHENTICATION", "validationPolicy": {"type": "REMOTE_JWKS", "uri": uri, **policy}}}]})


def test_runtime_readiness_lists_each_endpoint_and_counts_a_refused_retry_twice() -> None:
    """The server's own Runtime on a refused port: /readyz shows CONNECTION_REFUSED, and the
    metric and idpCalls both count the retry."""
    uri = f"http://127.0.0.1:{closed_port()}/jwks"
    metrics = Metrics()
    runtime = Runtime(remote_jwks_config(uri), JsonLogger(stream=io.StringIO()), metrics)
    keys = runtime.providers.by_deployment["j"].keys
    assert keys is not None

    async def run() -> tuple[IdpError | None, int, float]:
        try:
            return await as_a_check(lambda: keys.keyset(None))
        finally:
            await runtime.providers.aclose()

    error, calls, _ = asyncio.run(run())
    assert isinstance(error, IdpUnreachable) and error.kind == "CONNECTION_REFUSED" and calls == 2
    (shown,) = runtime.readiness()["providers"]
    assert shown["uri"] == uri and shown["breaker"] == "closed" and shown["lastSuccess"] is None
    last = shown["lastError"]
    assert (last["message"], last["outcome"], last["detail"]) == (unreachable("CONNECTION_REFUSED", uri), "connection_refused", None)
    assert RFC3339.fullmatch(last["at"])
    sample = metrics.registry.get_sample_value
    assert sample("extauthz_idp_requests_total", {"endpoint": "jwks_uri", "outcome": "connection_refused"}) == calls
    assert sample("extauthz_idp_request_duration_seconds_count", {"endpoint": "jwks_uri"}) == calls


# -- 4. a discovery document for another issuer ------------------------------------------------------


def discovery_providers(idp: FakeIdp, issuers: list[str], observer: Outcomes | None = None) -> Providers:
    config = parse_config({"deployments": [{"name": "d", "pathPrefix": "/", "authentication": {
        "type": "TOKEN_AUTHENTICATION", "validationPolicy": {
            "type": "REMOTE_DISCOVERY", "uri": DISCOVERY,
            "additionalValidationPolicy": {"issuers": issuers}}}}]})
    return idp.providers(config, observer=observer, wall_clock=lambda: WALL)


def discover(providers: Providers) -> IdpError | None:
    discovery = providers.by_deployment["d"].discovery
    assert discovery is not None
    return asyncio.run(as_a_check(discovery.document))[0]


def test_a_discovery_document_for_another_issuer_is_its_own_error_and_shows_in_readyz() -> None:
    """OpenID Connect Discovery 1.0 §4.3: the document's issuer must be the configured one. The
    check fails with the unusable-answer message; detail names both issuers; /readyz shows it.
    The IdP answered as it should, so the breaker does not count it (another deployment may
    expect that issuer from the same endpoint)."""
    idp = FakeIdp(issuer="https://impostor.example.com")
    observer = Outcomes()
    providers = discovery_providers(idp, [ISSUER], observer)
    detail = f"issuer in the discovery document is 'https://impostor.example.com', the configured issuer is '{ISSUER}'"
    for _ in range(8):  # past the breaker's threshold (5)
        error = discover(providers)
        assert isinstance(error, IssuerMismatch) and error.message == PARSE
        assert dict(error.log_fields()) == {"endpoint": "discovery", "uri": DISCOVERY, "detail": detail}
    assert observer.outcomes == ["issuer_mismatch"] * 8 and idp.calls["/.well-known/openid-configuration"] == 8
    (ep,) = providers.endpoints.values()
    assert ep.breaker.state == "closed"
    assert ep.readiness()["lastError"] == {"message": PARSE, "at": "2027-01-15T08:00:00.500Z", "outcome": "issuer_mismatch", "detail": detail}


def test_issuer_mismatch_names_every_configured_issuer_and_cuts_the_documents() -> None:
    hostile = "https://x.example.com/\n{\"event\":\"forged\"}" + "a" * 500
    idp = FakeIdp(issuer=hostile)
    error = discover(discovery_providers(idp, [ISSUER, "https://other.example.com"]))
    assert isinstance(error, IssuerMismatch)
    assert error.detail.startswith("issuer in the discovery document is 'https://x.example.com/?{\"event\"")
    assert error.detail.endswith(f"…', the configured issuers are '{ISSUER}', 'https://other.example.com'")
    assert "\n" not in error.detail and len(error.detail) < 400


def test_a_matching_issuer_or_none_configured_is_fine() -> None:
    for issuers in ([ISSUER], []):
        providers = discovery_providers(FakeIdp(), issuers)
        assert discover(providers) is None
        (ep,) = providers.endpoints.values()
        assert ep.readiness()["lastError"] is None


def test_an_answer_of_the_wrong_shape_is_the_endpoints_failure() -> None:
    """Valid JSON without 'keys' is not a success: the metric, the breaker and /readyz say so."""
    idp = FakeIdp()
    idp.raw = b'{"active": true}'
    observer = Outcomes()
    providers = idp.providers(remote_jwks_config(JWKS), observer=observer)
    keys = providers.by_deployment["j"].keys
    assert keys is not None
    error = asyncio.run(as_a_check(lambda: keys.keyset(None)))[0]
    assert isinstance(error, IdpBadResponse) and error.detail == "no 'keys' array"
    (ep,) = providers.endpoints.values()
    assert observer.outcomes == ["bad_response"] and ep.last_error is error


# -- 5. the check's deadline ---------------------------------------------------------------------


def test_the_checks_deadline_cuts_a_call_before_its_timeout() -> None:
    idp = FakeIdp()
    idp.delay = 5
    observer = Outcomes()
    ep = endpoint(idp, timeout=5, breaker=CircuitBreaker(failure_threshold=1), observer=observer)
    error, calls, took = run_check(ep, deadline_in=0.2)
    assert isinstance(error, IdpUnreachable) and not isinstance(error, DeadlinePassed)
    assert error.message == unreachable("TIMEOUT") and error.detail == "the check's deadline"
    assert 0.2 * 0.9 <= took < 0.2 + SLACK and calls == 1
    assert observer.outcomes == ["timeout"]
    assert ep.breaker.state == "open" and ep.last_error is error  # counted like a timeout


def test_the_checks_deadline_bounds_the_retry_too() -> None:
    class RefusedThenSilent(FakeIdp):
        async def __call__(self, request: httpx.Request) -> httpx.Response:
            if not self.calls:
                self.calls[request.url.path] += 1
                raise httpx.ConnectError("[Errno 111] Connection refused")
            self.delay = 5
            return await super().__call__(request)

    observer = Outcomes()
    error, calls, took = run_check(endpoint(RefusedThenSilent(), observer=observer), deadline_in=0.3)
    assert isinstance(error, IdpUnreachable) and error.detail == "the check's deadline"
    assert calls == 2 and observer.outcomes == ["connection_refused", "timeout"]
    assert took < 0.3 + SLACK


def test_a_deadline_further_than_the_timeout_leaves_the_timeout_in_charge() -> None:
    with SilentPort() as silent:
        uri = silent.url("http", "/jwks")
        error, _, took = run_real(uri, 0.2, deadline_in=30)
    assert isinstance(error, IdpUnreachable) and error.detail == "read timeout"
    assert took < 0.2 + SLACK


@pytest.mark.parametrize("left", [0.0, -1.0])
def test_no_time_left_fails_at_once_without_going_out(left: float) -> None:
    idp = FakeIdp()
    observer = Outcomes()
    breaker = CircuitBreaker(failure_threshold=1)
    ep = endpoint(idp, breaker=breaker, observer=observer)
    error, calls, took = run_check(ep, deadline_in=left)
    assert isinstance(error, DeadlinePassed) and error.message == unreachable("TIMEOUT")
    assert dict(error.log_fields())["detail"] == "the check's deadline"
    assert idp.requests == [] and calls == 0 and took < SLACK
    assert observer.outcomes == ["deadline_exceeded"]
    # Nothing was learnt about the IdP: the breaker and /readyz are as they were.
    assert breaker.state == "closed" and ep.readiness()["lastError"] is None
    assert run_check(ep)[0] is None  # and with no deadline the call goes through


def test_a_background_refresh_is_bound_by_no_check(rsa_key: SigningKey) -> None:
    """A stale JWKS is served at once while one refresh runs in the background: the deadline of
    the check that started it does not cut it, and that check's idpCalls does not count it."""
    idp = FakeIdp([rsa_key.public_jwk])
    now = [0.0]
    providers = idp.providers(remote_jwks_config(JWKS, maxCacheDurationInHours=0.01), clock=lambda: now[0])
    keys = providers.by_deployment["j"].keys
    (jwks,) = providers._held.jwks.values()
    assert keys is not None

    async def run() -> tuple[tuple[IdpError | None, int, float], Any]:
        await keys.keyset(None)  # fetched
        now[0] = 100  # past its 36 s lifetime, well within the stale window
        idp.delay = 0.3  # the refresh takes longer than the check has
        served = await as_a_check(lambda: keys.keyset(None), deadline_in=0.05)
        refresh = jwks.cache._inflight
        assert refresh is not None
        return served, await refresh  # an IdpError here: the check's deadline cut it

    (error, calls, took), refreshed = asyncio.run(run())
    assert error is None and calls == 0 and took < 0.05
    assert refreshed.has_kid(rsa_key.kid) and idp.calls["/jwks"] == 2


# -- 6. and 7. the metric's outcomes, counted like idpCalls ------------------------------------------


def test_every_outcome_is_of_the_documented_vocabulary() -> None:
    errors: list[IdpError] = [
        IdpUnreachable("jwks_uri", JWKS, kind) for kind in ("TIMEOUT", "CONNECTION_REFUSED", "DNS_FAILURE", "TLS_ERROR")
    ]
    errors += [IdpBadStatus("jwks_uri", JWKS, status, "x") for status in (101, 302, 401, 500, 599, 999)]
    errors += [
        IdpBadResponse("jwks_uri", JWKS, "not JSON"),
        IssuerMismatch(DISCOVERY, "https://x", (ISSUER,)),
        QueueTimeout("jwks_uri", JWKS),
        QueueTimeout("jwks_uri", JWKS, sent=True),
        DeadlinePassed("jwks_uri", JWKS),
        CircuitOpen("jwks_uri", JWKS, "2027-01-15T08:00:30.500Z"),
    ]
    outcomes = {error.error_type for error in errors} | {"ok", "cancelled"}
    assert outcomes == IDP_OUTCOMES
    assert all(re.fullmatch(r"[a-z0-9_]+", outcome) for outcome in outcomes)  # never a class name
    page = (DOCS / "metrics.md").read_text(encoding="utf-8")
    assert sorted(o for o in IDP_OUTCOMES if f"`{o}`" not in page) == []


def test_calls_refused_at_once_have_no_duration() -> None:
    metrics = Metrics()
    for outcome in ("circuit_open", "deadline_exceeded", "ok"):
        metrics.idp_call("jwks_uri", outcome, 0.01)
    sample = metrics.registry.get_sample_value
    assert sample("extauthz_idp_request_duration_seconds_count", {"endpoint": "jwks_uri"}) == 1
    assert sample("extauthz_idp_requests_total", {"endpoint": "jwks_uri", "outcome": "circuit_open"}) == 1


@pytest.mark.parametrize(
    ("errors", "outcomes"),
    [
        ([httpx.ConnectError("[Errno 111] Connection refused")], ["connection_refused", "ok"]),
        ([httpx.ConnectError("[Errno 111] Connection refused")] * 2, ["connection_refused", "connection_refused"]),
        ([], ["ok"]),
    ],
    ids=["refused-then-answered", "refused-twice", "answered"],
)
def test_each_attempt_that_goes_out_is_counted_once_in_both(errors: list[Exception], outcomes: list[str]) -> None:
    idp = FakeIdp()
    idp.errors = list(errors)
    observer = Outcomes()
    _, calls, _ = run_check(endpoint(idp, observer=observer))
    assert observer.outcomes == outcomes and calls == len(outcomes) == len(idp.requests)


def waiting_for_a_slot(ep: IdpEndpoint) -> bool:
    """A call is queued for one of the endpoint's outstanding-call slots."""
    return bool(ep._slots._waiters)  # noqa: SLF001 (asyncio.Semaphore keeps its waiters there)


def test_a_cancelled_attempt_is_counted_cancelled_and_a_cancelled_wait_not_at_all() -> None:
    idp = FakeIdp()
    idp.delay = 5
    observer = Outcomes()
    ep = endpoint(idp, max_outstanding=1, observer=observer)

    async def run() -> list[int]:
        counters = [CheckCalls(), CheckCalls()]

        async def check(calls: CheckCalls) -> IdpResponse:
            check_idp_calls.set(calls)
            return await ep.call()

        out = asyncio.ensure_future(check(counters[0]))
        await idp.until_called("/jwks")
        waiting = asyncio.ensure_future(check(counters[1]))
        await wait_until_async(lambda: waiting_for_a_slot(ep), what="the second call queued")
        for task in (waiting, out):
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return [c.count for c in counters]

    assert asyncio.run(run()) == [1, 0]
    assert observer.outcomes == ["cancelled"]
    assert ep.breaker.state == "closed" and ep.breaker.allow()
