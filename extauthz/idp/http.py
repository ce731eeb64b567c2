"""The one place that talks HTTP to identity providers and translates httpx errors.

Every IdP request goes through :func:`fetch_json` on an injected ``httpx.AsyncClient``, so tests
can pass ``httpx.MockTransport`` and production gets one pooled client per TLS setting. Requests
are built whole (parsed URL, headers, encoded body, timeout) and handed to ``client.send``: the
client's request building merged defaults and parsed the URL again on every call, about a tenth
of an introspection call's CPU.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import ssl
import time
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import urlencode

import certifi
import httpx

from .. import tracing
from ..errors import (
    CircuitOpen,
    IdpBadResponse,
    IdpBadStatus,
    IdpError,
    IdpUnreachable,
    QueueTimeout,
)
from ..logs import rfc3339
from .resilience import CircuitBreaker

__all__ = [
    "IdpEndpoint",
    "IdpObserver",
    "IdpResponse",
    "TlsSettings",
    "fetch_json",
    "idp_call_counter",
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

# Counts the IdP calls made on behalf of the current check (access log field `idpCalls`).
idp_call_counter: ContextVar[list[int] | None] = ContextVar("idp_call_counter", default=None)


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
    """A pooled client over :func:`tls_context`."""
    client = httpx.AsyncClient(
        verify=tls_context(tls),
        follow_redirects=False,
        trust_env=False,
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
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
    counter = idp_call_counter.get()
    if counter is not None:
        counter[0] += 1


def _build_request(
    endpoint: str,
    url: httpx.URL,
    *,
    timeout: float,
    method: str = "GET",
    data: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> httpx.Request:
    """One whole IdP request: ``data`` form-encoded as the body, ``headers`` over the base ones."""
    all_headers = [*BASE_HEADERS, *(headers or {}).items()]
    body = None
    if data is not None:
        all_headers.append(_FORM)
        body = urlencode(data).encode()
    return httpx.Request(
        method,
        url,
        headers=all_headers,
        content=body,
        extensions={
            "timeout": httpx.Timeout(timeout).as_dict(),
            tracing.ENDPOINT_EXTENSION: endpoint,
        },
    )


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
) -> IdpResponse:
    """Call an IdP endpoint and return its JSON, or raise an :class:`~extauthz.errors.IdpError`.
    ``url`` is ``uri`` already parsed, when the caller keeps it."""
    _count_call()
    try:
        request = _build_request(
            endpoint,
            url if url is not None else httpx.URL(uri),
            timeout=timeout,
            method=method,
            data=data,
            headers=headers,
        )
        resp = await client.send(request, stream=True)
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
    except httpx.TimeoutException as exc:
        raise IdpUnreachable(endpoint, uri, "TIMEOUT") from exc
    except httpx.ConnectError as exc:
        raise IdpUnreachable(endpoint, uri, _unreachable_kind(exc), before_request=True) from exc
    except httpx.TransportError as exc:
        # Connected, then the peer closed or spoke something that is not HTTP.
        raise IdpBadResponse(endpoint, uri, type(exc).__name__) from exc
    return IdpResponse(parse_idp_json(endpoint, uri, bytes(body)), max_age)


class IdpObserver(Protocol):
    """Where IdP call outcomes and cache lookups are reported (metrics; tests)."""

    def idp_call(self, endpoint: str, outcome: str, seconds: float) -> None: ...

    def cache(self, cache: str, result: str) -> None: ...


class NullObserver:
    def idp_call(self, endpoint: str, outcome: str, seconds: float) -> None:
        pass

    def cache(self, cache: str, result: str) -> None:
        pass


class IdpEndpoint:
    """One IdP URL with everything that keeps calling it safe: the pooled client, the timeout,
    a circuit breaker, a cap on outstanding calls and one quick retry when the connection is
    refused. Every IdP request in extauthz goes through :meth:`call`."""

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
    ) -> None:
        self.name = name
        self.uri = uri
        try:
            self._url: httpx.URL | None = httpx.URL(uri)
        except httpx.InvalidURL:
            self._url = None  # each call fails as it parses the uri, and is denied then
        self._client = client
        self._timeout = timeout
        self.breaker = breaker or CircuitBreaker()
        self._slots = asyncio.Semaphore(max_outstanding)
        self._observer = observer or NullObserver()
        self.last_success: float | None = None  # wall clock
        self.last_error: IdpError | None = None

    async def call(
        self,
        *,
        method: str = "GET",
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> IdpResponse:
        if not self.breaker.allow():
            exc: IdpError = CircuitOpen(self.name, self.uri, rfc3339(self.breaker.open_until()))
            self._observer.idp_call(self.name, "circuit_open", 0.0)
            raise exc
        started = time.perf_counter()
        try:
            resp = await self._limited(method, data, headers)
        except QueueTimeout as exc:
            # Our own queue, not the IdP: no verdict on it (a flood of junk tokens waiting for a
            # slot must not open the circuit for every other check).
            self.breaker.abandon()
            self._observer.idp_call(self.name, exc.error_type, time.perf_counter() - started)
            raise
        except IdpError as exc:
            self.breaker.failure()
            self.last_error = exc
            self._observer.idp_call(self.name, exc.error_type, time.perf_counter() - started)
            raise
        except BaseException:
            self.breaker.abandon()  # cancelled: no verdict on the IdP
            raise
        self.breaker.success()
        self.last_success = time.time()
        self.last_error = None
        self._observer.idp_call(self.name, "ok", time.perf_counter() - started)
        return resp

    async def _limited(
        self, method: str, data: Mapping[str, str] | None, headers: Mapping[str, str] | None
    ) -> IdpResponse:
        # One deadline for the whole call: waiting for a slot, connecting, a retry and reading
        # together take at most timeoutSeconds, so a check never waits twice the timeout.
        # A call that had to queue gave the IdP less than its timeout: when the deadline passes,
        # that is our queue's doing, not the IdP's (QueueTimeout, not counted by the breaker).
        queued = self._slots.locked()
        try:
            async with asyncio.timeout(self._timeout), self._slots:
                return await self._call_once_or_twice(method, data, headers)
        except TimeoutError:
            if queued:
                raise QueueTimeout(self.name, self.uri) from None
            raise IdpUnreachable(self.name, self.uri, "TIMEOUT") from None

    async def _call_once_or_twice(
        self, method: str, data: Mapping[str, str] | None, headers: Mapping[str, str] | None
    ) -> IdpResponse:
        for attempt in (1, 2):
            try:
                return await fetch_json(
                    self._client,
                    self.name,
                    self.uri,
                    timeout=self._timeout,
                    method=method,
                    data=data,
                    headers=headers,
                    url=self._url,
                )
            except IdpUnreachable as exc:
                refused = exc.before_request and exc.kind == "CONNECTION_REFUSED"
                if attempt == 2 or not refused:
                    raise
            # A refused connection is often a restarting IdP or a stale pooled address: one quick
            # retry with jitter, so that many checks retrying do not arrive in lockstep.
            await asyncio.sleep(random.uniform(0.01, 0.05))
        raise AssertionError("unreachable")
