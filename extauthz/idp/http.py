"""The one place that talks HTTP to identity providers and translates httpx errors.

Every IdP request goes through :func:`fetch_json` on an injected ``httpx.AsyncClient``, so tests
can pass ``httpx.MockTransport`` and production gets one pooled client per TLS setting. Requests
are built whole (parsed URL, headers, encoded body, timeout) and handed to the client's
transport: the client's request building merged defaults and parsed the URL again on every call,
and its sending layer (auth, cookies, hooks) has nothing to do for an IdP call.

Each call is bounded by its endpoint's ``timeoutSeconds`` and by what is left of the check's own
deadline (:data:`check_deadline`), whichever ends first; a failure says which bound ran out and
in which phase (``detail``), and every attempt that goes out is counted once, alike in the
access line's ``idpCalls`` (:class:`CheckCalls`) and in the metric (:class:`IdpObserver`).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol, TypeVar
from urllib.parse import urlencode

import certifi
import httpx

from .. import tracing
from ..errors import (
    CHECK_DEADLINE,
    CONNECT_TIMEOUT,
    READ_TIMEOUT,
    CircuitOpen,
    DeadlinePassed,
    IdpBadResponse,
    IdpBadStatus,
    IdpError,
    IdpUnreachable,
    QueueTimeout,
)
from ..logs import rfc3339
from .resilience import CircuitBreaker
from .transport import AiohttpTransport

__all__ = [
    "CheckCalls",
    "IdpEndpoint",
    "IdpObserver",
    "IdpResponse",
    "TlsSettings",
    "check_deadline",
    "check_idp_calls",
    "fetch_json",
    "json_nesting_exceeds",
    "make_client",
    "parse_idp_json",
    "standard_reason_phrase",
    "tls_context",
]

MAX_BODY_BYTES = 1024 * 1024  # a JWKS, discovery document or introspection answer is small
# A JWKS, a discovery document or an introspection answer nests a few levels; json.loads recurses
# once per level, and a 1 MiB body can nest half a million deep.
MAX_JSON_DEPTH = 64
MAX_OUTSTANDING_CALLS = 64  # per endpoint; the pooled client holds as many connections
# Every IdP request's own headers (requests are sent whole, so the client's defaults do not apply).
BASE_HEADERS = (("accept", "application/json"), ("user-agent", "extauthz"))
_FORM = ("content-type", "application/x-www-form-urlencoded")


class CheckCalls:
    """The IdP calls made on behalf of one check: ``count``, each attempt that went out, a retry
    included (the access line's ``idpCalls``, as extauthz_idp_requests_total counts them);
    ``in_flight``, the endpoint and URI of the call under way (what a cancelled check was
    waiting for); and ``when_abandoned``, told the outcome of that call once it ends, should the
    check have been cancelled meanwhile (the call goes on: other checks may share it)."""

    __slots__ = ("count", "in_flight", "when_abandoned")

    def __init__(self) -> None:
        self.count = 0
        self.in_flight: tuple[str, str] | None = None
        self.when_abandoned: Callable[[str, str, str, IdpError | None], None] | None = None


# The current check's calls (set by the server for each check; None: no check's, e.g. a
# background refresh).
check_idp_calls: ContextVar[CheckCalls | None] = ContextVar("check_idp_calls", default=None)
# The time.monotonic() value by which the current check must have answered (set by the server
# for each check); None: no deadline but each endpoint's timeoutSeconds. An IdP call never
# outlives its check: there is no one left to use its answer.
check_deadline: ContextVar[float | None] = ContextVar("check_deadline", default=None)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TlsSettings:
    verify: bool = True
    ca_file: str | None = None


@dataclass(frozen=True, slots=True)
class IdpResponse:
    data: Any
    max_age: float | None  # Cache-Control max-age, when the IdP sent one


def tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """The trust every IdP connection uses (the client's, and ``probe``'s own handshakes): the
    public roots (certifi) plus ``caFile``, which adds trust and never replaces it; or, with
    ``isSslVerifyDisabled``, no verification at all."""
    if not tls.verify:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx = ssl.create_default_context(cafile=certifi.where())
    if tls.ca_file:
        ctx.load_verify_locations(cafile=tls.ca_file)
    return ctx


def make_client(
    tls: TlsSettings, max_connections: int = MAX_OUTSTANDING_CALLS
) -> httpx.AsyncClient:
    """A pooled client over :func:`tls_context`: httpx's API on aiohttp's connections
    (:class:`~extauthz.idp.transport.AiohttpTransport`, about a fifth of httpcore's CPU)."""
    client = httpx.AsyncClient(
        transport=AiohttpTransport(tls_context(tls), max_connections),
        follow_redirects=False,
        trust_env=False,
        headers=dict(BASE_HEADERS),
    )
    tracing.instrument_client(client)
    return client


def _unreachable_kind(exc: BaseException) -> str:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, socket.gaierror):
            return "DNS_FAILURE"
        if isinstance(cur, ssl.SSLError):
            return "TLS_ERROR"
        if isinstance(cur, ConnectionRefusedError):
            return "CONNECTION_REFUSED"
        text = str(cur)
        if (
            "Name or service not known" in text
            or "nodename nor servname" in text
            or ("Temporary failure in name resolution" in text)
        ):
            return "DNS_FAILURE"
        if "CERTIFICATE_VERIFY_FAILED" in text or "SSL" in text:
            return "TLS_ERROR"
        cur = cur.__cause__ or cur.__context__
    return "CONNECTION_REFUSED"


def _max_age(headers: httpx.Headers) -> float | None:
    cc = headers.get("cache-control")
    if not cc:
        return None
    for part in cc.split(","):
        name, _, value = part.strip().partition("=")
        if name.lower() in ("no-store", "no-cache"):
            return 0.0
        if name.lower() == "max-age":
            try:
                return max(0.0, float(value.strip('"')))
            except ValueError:
                return None
    return None


def standard_reason_phrase(status: int) -> str:
    """The phrase to print for an IdP's status code: RFC 9110 §15's, or ``Unknown``."""
    # RFC 9112 §4: the reason phrase is advisory and a client SHOULD ignore it. The IdP's own
    # text is never printed: it could carry anything (a token, a secret, a log-injection line).
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


# The bytes that make up JSON's structure; every other byte is deleted, and `{}` count as `[]`.
_OPEN_CLOSE_AS_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_STRING = re.compile(rb'"[^"]*"')  # a string, once its escapes are gone: linear, no backtracking


def json_nesting_exceeds(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON text nests arrays and objects deeper than ``limit``: found with a bounded
    number of passes over the bytes (each linear, in C), before json.loads recurses into it.

    Exact for valid JSON; for invalid JSON any answer will do, as json.loads rejects it anyway.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False  # too few brackets to nest that deep: every usual answer stops here
    # RFC 8259 §7: in a string, a backslash escapes the next character. Dropping escaped
    # backslashes and then escaped quotes leaves only the quotes that open and close strings.
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    skeleton = unescaped.translate(_OPEN_CLOSE_AS_BRACKETS, _NOT_STRUCTURE)
    brackets = _STRING.sub(b"", skeleton)  # brackets inside strings are not structure
    # Each pass takes the innermost level off every nest, so what is left after `limit` passes
    # nests deeper than `limit`. A run of opening brackets as long as the depth still to find
    # ends it early: the usual attack, [[[[...]]]], in the first pass.
    for peeled in range(limit):
        if b"[" * (limit + 1 - peeled) in brackets:
            return True
        if b"[]" not in brackets:
            return False
        brackets = brackets.replace(b"[]", b"")
    return b"[]" in brackets


def parse_idp_json(endpoint: str, uri: str, body: bytes) -> Any:
    """The JSON an IdP answered, or IdpBadResponse: not JSON, nested too deep, too big to hold."""
    if json_nesting_exceeds(body):
        raise IdpBadResponse(endpoint, uri, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(body)
    except ValueError as exc:  # UnicodeDecodeError included
        raise IdpBadResponse(endpoint, uri, "not JSON") from exc
    except RecursionError as exc:  # the depth check above should make this unreachable
        raise IdpBadResponse(endpoint, uri, "JSON nested too deep") from exc
    except MemoryError:
        raise IdpBadResponse(endpoint, uri, "JSON too large to hold") from None


def _count_call() -> None:
    calls = check_idp_calls.get()
    if calls is not None:
        calls.count += 1


# httpcore's `trace` extension: an async callback with each event's name and details.
Tracer = Callable[[str, dict[str, Any]], Any]


def _build_request(
    endpoint: str,
    url: httpx.URL,
    *,
    timeout: float,
    method: str = "GET",
    data: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    trace: Tracer | None = None,
) -> httpx.Request:
    """One whole IdP request: ``data`` form-encoded as the body, ``headers`` over the base ones,
    ``trace`` as httpcore's trace extension (it hears of each phase: connect, TLS, send, read)."""
    all_headers = [*BASE_HEADERS, *(headers or {}).items()]
    body = None
    if data is not None:
        all_headers.append(_FORM)
        body = urlencode(data).encode()
    extensions: dict[str, Any] = {
        "timeout": httpx.Timeout(timeout).as_dict(),
        tracing.ENDPOINT_EXTENSION: endpoint,
    }
    if trace is not None:
        extensions["trace"] = trace
    return httpx.Request(method, url, headers=all_headers, content=body, extensions=extensions)


async def _send(client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
    """``client.send(request, stream=True)``, straight to the client's transport (where the
    OpenTelemetry instrumentation sits): the client's own layer (auth, cookies, event hooks,
    redirects) has nothing to do for an IdP call, yet costs tens of microseconds of it (and an
    IdP's cookies are never kept). A closed client gets ``send``'s own error, and a client with
    event hooks (``extauthz probe`` records each phase with them) goes through ``send``."""
    transport = getattr(client, "_transport", None)
    hooks = client.event_hooks
    if (
        not isinstance(transport, httpx.AsyncBaseTransport)
        or client.is_closed
        or hooks["request"]
        or hooks["response"]
    ):
        return await client.send(request, stream=True)
    response = await transport.handle_async_request(request)
    response.request = request
    return response


async def fetch_json(
    client: httpx.AsyncClient,
    endpoint: str,
    uri: str,
    *,
    timeout: float,
    method: str = "GET",
    data: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    url: httpx.URL | None = None,
    trace: Tracer | None = None,
) -> IdpResponse:
    """Call an IdP endpoint and return its JSON, or raise an :class:`~extauthz.errors.IdpError`.
    ``url`` is ``uri`` already parsed, when the caller keeps it; ``trace`` hears of the phases
    of the request (httpcore's trace extension)."""
    request = _build_request(
        endpoint,
        url if url is not None else httpx.URL(uri),
        timeout=timeout,
        method=method,
        data=data,
        headers=headers,
        trace=trace,
    )
    _count_call()  # the request goes out now: one attempt, as the metric counts it
    try:
        resp = await _send(client, request)
        try:
            if not 200 <= resp.status_code < 300:
                status = resp.status_code
                raise IdpBadStatus(endpoint, uri, status, standard_reason_phrase(status))
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise IdpBadResponse(endpoint, uri, "response larger than 1 MiB")
            max_age = _max_age(resp.headers)
        finally:
            await resp.aclose()
    except httpx.ConnectTimeout as exc:
        raise IdpUnreachable(endpoint, uri, "TIMEOUT", detail=CONNECT_TIMEOUT) from exc
    except httpx.PoolTimeout as exc:
        # No connection came free in the client's pool: like a connect that did not complete,
        # nothing was sent.
        raise IdpUnreachable(endpoint, uri, "TIMEOUT", detail=CONNECT_TIMEOUT) from exc
    except httpx.TimeoutException as exc:  # ReadTimeout, WriteTimeout: connected, then stalled
        raise IdpUnreachable(endpoint, uri, "TIMEOUT", detail=READ_TIMEOUT) from exc
    except httpx.ConnectError as exc:
        raise IdpUnreachable(endpoint, uri, _unreachable_kind(exc), before_request=True) from exc
    except httpx.TransportError as exc:
        # Connected, then the peer closed or spoke something that is not HTTP.
        raise IdpBadResponse(endpoint, uri, type(exc).__name__) from exc
    return IdpResponse(parse_idp_json(endpoint, uri, bytes(body)), max_age)


class IdpObserver(Protocol):
    """Where IdP call outcomes and cache lookups are reported (metrics; tests).

    ``idp_call`` is told of each attempt that went out, with how it ended, and of each call that
    ended before any did (``circuit_open``, ``deadline_exceeded``, ``queue_timeout``); the
    outcomes are the fixed vocabulary of docs/metrics.md (:attr:`IdpError.error_type`, ``ok``,
    ``cancelled``)."""

    def idp_call(self, endpoint: str, outcome: str, seconds: float) -> None: ...

    def cache(self, cache: str, result: str) -> None: ...


class NullObserver:
    def idp_call(self, endpoint: str, outcome: str, seconds: float) -> None:
        pass

    def cache(self, cache: str, result: str) -> None:
        pass


def _the_response(resp: IdpResponse) -> IdpResponse:
    return resp


class _Progress:
    """How far one call has got: the attempt under way (what the metric counts, and its time)
    and whether its request has started to go out (what a timeout cut: the connection, or the
    exchange)."""

    __slots__ = ("attempts", "in_flight", "sending", "started")

    def __init__(self) -> None:
        self.started = time.perf_counter()  # of the call, then of each attempt
        self.attempts = 0
        self.in_flight = False  # an attempt went out and its outcome is not reported yet
        self.sending = False  # connected (TCP, TLS): its request started to go out

    def attempt(self) -> None:
        self.started = time.perf_counter()
        self.attempts += 1
        self.in_flight = True
        self.sending = False

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    async def trace(self, event: str, info: dict[str, Any]) -> None:
        # httpcore names the phases `connection.connect_tcp`, `connection.start_tls`, then
        # `http11.send_request_headers` (or http2's) once a connection is had, new or pooled.
        if event.endswith("send_request_headers.started"):
            self.sending = True


class IdpEndpoint:
    """One IdP URL with everything that keeps calling it safe: the pooled client, the timeout
    (and the check's deadline), a circuit breaker, a cap on outstanding calls and one quick
    retry when the connection is refused. Every IdP request in extauthz goes through
    :meth:`fetch` (or :meth:`call`), and what went wrong last stays on the endpoint for /readyz
    and for the circuit-open message."""

    def __init__(
        self,
        name: str,
        uri: str,
        client: httpx.AsyncClient,
        *,
        timeout: float,
        breaker: CircuitBreaker | None = None,
        max_outstanding: int = MAX_OUTSTANDING_CALLS,
        observer: IdpObserver | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.uri = uri
        self.display_uri = tracing.url_without_userinfo(uri)  # as logs and /readyz show it
        try:
            self._url: httpx.URL | None = httpx.URL(uri)
        except httpx.InvalidURL:
            self._url = None  # each call fails as it parses the uri, and is denied then
        self._client = client
        self._timeout = timeout
        self.breaker = breaker or CircuitBreaker()
        self._slots = asyncio.Semaphore(max_outstanding)
        self._observer = observer or NullObserver()
        self._wall_clock = wall_clock
        self.last_success: float | None = None  # wall clock
        # The last failure of a call that reached the IdP (never a CircuitOpen, a QueueTimeout or
        # a DeadlinePassed: those say nothing about it) and when it happened; cleared by a
        # success.
        self.last_error: IdpError | None = None
        self.last_error_at = 0.0  # wall clock
        # The cause of the last failure the breaker counted: while the circuit is open, the one
        # that opened it (no call goes out to fail again), named by every CircuitOpen.
        self._breaker_cause = ""

    async def call(
        self,
        *,
        method: str = "GET",
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> IdpResponse:
        """The IdP's answer, or an IdpError; see :meth:`fetch`."""
        return await self.fetch(_the_response, method=method, data=data, headers=headers)

    @property
    def budget(self) -> float:
        """How long a call here may take now: ``timeoutSeconds``, or what is left of the
        check's deadline when that is sooner."""
        deadline = check_deadline.get()
        if deadline is None:
            return self._timeout
        return max(0.0, min(self._timeout, deadline - time.monotonic()))

    async def fetch(
        self,
        read: Callable[[IdpResponse], T],
        *,
        method: str = "GET",
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> T:
        """``read`` of the IdP's answer. ``read`` raises IdpBadResponse for an answer that is
        JSON but not what the endpoint must send: that is a failure of this endpoint like any
        other (the breaker counts it, the metric says so, /readyz shows it), not a success."""
        budget, by_deadline = self._timeout, False
        deadline = check_deadline.get()
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                # No time left: nothing goes out, and nothing is learnt about the IdP.
                passed = DeadlinePassed(self.name, self.uri)
                self._observer.idp_call(self.name, passed.error_type, 0.0)
                raise passed
            if left < budget:
                budget, by_deadline = left, True
        if not self.breaker.allow():
            until = rfc3339(self.breaker.open_until())
            exc: IdpError = CircuitOpen(self.name, self.uri, until, self._breaker_cause)
            self._observer.idp_call(self.name, exc.error_type, 0.0)
            raise exc
        progress = _Progress()
        calls = check_idp_calls.get()
        if calls is not None:
            calls.in_flight = (self.name, self.display_uri)
        try:
            value = read(await self._limited(budget, by_deadline, progress, method, data, headers))
        except QueueTimeout as exc:
            # Our own queue, not the IdP: no verdict on it (a flood of junk tokens waiting for a
            # slot must not open the circuit for every other check).
            self.breaker.abandon()
            self._report(progress, exc.error_type)
            self._ended(calls, exc.error_type, exc)
            raise
        except IdpError as exc:
            if exc.idp_at_fault:
                self.breaker.failure()
                self._breaker_cause = exc.cause
            else:
                # The IdP answered as it should, though not as this deployment expects (a
                # discovery document for another issuer): shown in /readyz, not held against it.
                self.breaker.success()
            self.last_error, self.last_error_at = exc, self._wall_clock()
            self._report(progress, exc.error_type)
            self._ended(calls, exc.error_type, exc)
            raise
        except asyncio.CancelledError:
            self.breaker.abandon()  # cancelled: no verdict on the IdP
            if progress.in_flight:
                self._report(progress, "cancelled")
            # Still in flight as far as its check knows: the check is being cancelled too, and
            # its server names the call it was waiting for.
            raise
        except BaseException:
            self.breaker.abandon()
            raise
        self.breaker.success()
        self.last_success = self._wall_clock()
        self.last_error = None
        self._report(progress, "ok")
        self._ended(calls, "ok", None)
        return value

    def _ended(self, calls: CheckCalls | None, outcome: str, error: IdpError | None) -> None:
        """The call of ``calls``'s check is over: no longer in flight, and its outcome told to
        the check's server if the check was cancelled while it waited."""
        if calls is None:
            return
        calls.in_flight = None
        if calls.when_abandoned is not None:
            calls.when_abandoned(self.name, self.display_uri, outcome, error)

    def _report(self, progress: _Progress, outcome: str) -> None:
        """The outcome of the attempt under way, or of a call that ended before its first one
        (``queue_timeout``); nothing for a call cut between a reported attempt and its retry."""
        if progress.in_flight or not progress.attempts:
            progress.in_flight = False
            self._observer.idp_call(self.name, outcome, progress.seconds())

    def readiness(self) -> dict[str, Any]:
        """This endpoint as /readyz shows it (docs/metrics.md): JSON strings and nulls only."""
        error = self.last_error
        last_error = None
        if error is not None:
            last_error = {
                "message": error.message,
                "at": rfc3339(self.last_error_at),
                "outcome": error.error_type,
                "detail": error.detail or None,
            }
        return {
            "endpoint": self.name,
            "uri": self.display_uri,
            "breaker": self.breaker.state,
            "lastSuccess": rfc3339(self.last_success) if self.last_success else None,
            "lastError": last_error,
        }

    async def _limited(
        self,
        budget: float,
        by_deadline: bool,
        progress: _Progress,
        method: str,
        data: Mapping[str, str] | None,
        headers: Mapping[str, str] | None,
    ) -> IdpResponse:
        # One deadline for the whole call: waiting for a slot, connecting, a retry and reading
        # together take at most `budget` (timeoutSeconds, or less when the check's deadline is
        # nearer), so a check never waits twice the timeout.
        # A call that had to queue gave the IdP less than its timeout: when the deadline passes,
        # that is our queue's doing, not the IdP's (QueueTimeout, not counted by the breaker).
        ends = time.monotonic() + budget
        queued = self._slots.locked()
        try:
            async with asyncio.timeout(budget), self._slots:
                return await self._call_once_or_twice(ends, progress, method, data, headers)
        except TimeoutError:
            raise self._timed_out(queued, by_deadline, progress) from None
        except IdpUnreachable as exc:
            if exc.kind != "TIMEOUT":
                raise
            raise self._timed_out(queued, by_deadline, progress, exc.detail) from exc

    def _timed_out(
        self, queued: bool, by_deadline: bool, progress: _Progress, detail: str = ""
    ) -> IdpUnreachable:
        """The TIMEOUT a call ends with, saying which bound ran out, and where."""
        if queued:
            return QueueTimeout(self.name, self.uri, sent=progress.in_flight)
        if by_deadline:
            detail = CHECK_DEADLINE  # counted by the breaker like any timeout: the IdP was slow
        elif not detail:
            detail = READ_TIMEOUT if progress.sending else CONNECT_TIMEOUT
        return IdpUnreachable(self.name, self.uri, "TIMEOUT", detail=detail)

    async def _call_once_or_twice(
        self,
        ends: float,
        progress: _Progress,
        method: str,
        data: Mapping[str, str] | None,
        headers: Mapping[str, str] | None,
    ) -> IdpResponse:
        for attempt in (1, 2):
            progress.attempt()
            try:
                return await fetch_json(
                    self._client,
                    self.name,
                    self.uri,
                    # httpx's own timeouts end just before the call's: a connection cut by
                    # one of them is closed by httpcore (one cut in its TLS handshake by a
                    # cancellation is left to the garbage collector), and it names its phase.
                    timeout=max(ends - time.monotonic() - _HTTPX_FIRST, _MIN_HTTPX_TIMEOUT),
                    method=method,
                    data=data,
                    headers=headers,
                    url=self._url,
                    trace=progress.trace,
                )
            except IdpUnreachable as exc:
                refused = exc.before_request and exc.kind == "CONNECTION_REFUSED"
                if attempt == 2 or not refused:
                    raise
                # That attempt went out and ended: it is counted on its own, as idpCalls counts
                # it, and the retry is another.
                self._report(progress, exc.error_type)
            # A refused connection is often a restarting IdP or a stale pooled address: one quick
            # retry with jitter, so that many checks retrying do not arrive in lockstep.
            await asyncio.sleep(random.uniform(0.01, 0.05))
        raise AssertionError("unreachable")


_HTTPX_FIRST = 0.01  # how much earlier httpx's timeouts end than the call's own
_MIN_HTTPX_TIMEOUT = 0.001  # a retry that starts with nothing left still gets a valid timeout
