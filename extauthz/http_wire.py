"""The HTTP wire: Envoy's ``http_service`` ext_authz protocol (and Istio's ``envoyExtAuthzHttp``).

Envoy sends the original request's method, path (with query) and the headers its
``authorization_request.allowed_headers`` name (Host and Authorization always) to this listener;
a 200 allows (Envoy copies the identity headers its ``allowed_upstream_headers`` name onto the
upstream request, and removes the ones ``x-envoy-auth-headers-to-remove`` lists), anything else
is the denial Envoy sends to the client as it is. The deployment (and route) Envoy's per-route
``context_extensions`` name on the gRPC wire come as ``x-extauthz-deployment`` (and
``x-extauthz-route``) headers that Envoy sets with ``headers_to_add``.

An ``asyncio.Protocol`` over ``httptools`` (the parser uvicorn uses), not a framework: a
framework costs more per request than the whole check. The request is read into a
:class:`~extauthz.engine.CheckInput`, answered by :class:`~extauthz.serving.Serving` exactly as
on the gRPC wire, and written out by :class:`~extauthz.response.HttpRenderer`. A remembered
allow is answered without a task, from bytes rendered once.

Bounded: the request head (64 KiB, 200 headers), a body (read and dropped, at most 1 MiB), the
time a request may take to arrive, head and body, from its first byte (10 s: one byte a second
gets nowhere, in the head, in the body or as empty lines before it), the requests pipelined
ahead of their answers (32: reading pauses beyond), and the idle time of a connection (5 min).
A request that cannot be read is answered 400 (413, 431, 408) and the connection closed, with
an ``http.badRequest`` line; nothing of the request is echoed.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Mapping
from typing import cast

import httptools
from opentelemetry.trace import Span, SpanKind

from . import tracing
from .config import ServerSettings
from .decision import Reason, deny
from .dpop import xfcc_sha256
from .engine import CheckInput
from .idp.http import CheckCalls
from .logs import current_trace_id
from .response import HttpRenderer, http_status
from .serving import Serving, request_id_of

__all__ = ["WIRE", "HttpWire", "serve_http"]

WIRE = "http"  # the wire label of the metrics
SPAN_NAME = "envoy.service.auth.v3.Authorization/Check"  # the same check, whichever wire
MAX_HEAD_BYTES = 64 * 1024  # Envoy's own default max_request_headers_kb is 60
MAX_HEADERS = 200
MAX_BODY_BYTES = 1024 * 1024
HEAD_SECONDS = 10.0
IDLE_SECONDS = 300.0  # keep Envoy's cluster idle_timeout below this (docs/wires.md)
MAX_PIPELINED = 32
# Envoy names the deployment and the route of a check in these request headers, set with
# authorization_request.headers_to_add (a client-sent copy is never forwarded: Envoy sends only
# the headers its allowed_headers name).
DEPLOYMENT_HEADER = "x-extauthz-deployment"
ROUTE_HEADER = "x-extauthz-route"
# Envoy's deadline for the check, in milliseconds, when its router sets it.
DEADLINE_HEADER = "x-envoy-expected-rq-timeout-ms"

_BAD_REQUEST = {
    400: b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
    408: b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
    413: b"HTTP/1.1 413 Content Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
    431: (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n"
        b"content-length: 0\r\n\r\n"
    ),
}
# How long a connection being closed still reads (and drops) what the client sends after the
# answer: closed with unread bytes, the kernel would reset it, and the client could lose the answer.
_LINGER_SECONDS = 1.0
# Answered if rendering a decision itself fails: a denial with nothing taken from the request.
_FALLBACK_DENIAL = HttpRenderer(ServerSettings()).render(
    deny(Reason.INTERNAL_ERROR, ""), "unavailable"
)


class _BadRequest(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


class _Request:
    """One request as read off the connection."""

    __slots__ = ("head_only", "inp", "keep_alive", "request_id", "started")

    def __init__(self, inp: CheckInput, request_id: str, head_only: bool, keep_alive: bool) -> None:
        self.inp = inp
        self.request_id = request_id
        self.head_only = head_only  # HEAD: the answer has no body (RFC 9110 §9.3.2)
        self.keep_alive = keep_alive
        self.started = time.perf_counter()


class HttpWire:
    """The listener's shared state: what answers (:class:`Serving`, the same object the gRPC
    wire uses, so a reload reaches both) and how decisions are written."""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving
        self._renderer = HttpRenderer(serving.answers.config.server)

    def renderer(self) -> HttpRenderer:
        settings = self.serving.answers.config.server
        if self._renderer.settings is not settings:  # a reloaded config
            self._renderer = HttpRenderer(settings)
        return self._renderer

    def connection(self) -> _Connection:
        return _Connection(self)

    def answer_now(self, request: _Request) -> bytes | None:
        """The response to a request whose answer is remembered, given again without a task:
        an allow from bytes rendered once, a denial (an expired token's) from its template with
        this request's id. None: :meth:`answer` must run."""
        serving = self.serving
        inp = request.inp
        path = inp.path
        answer = serving.again(inp, path) if not tracing.enabled() else None
        if answer is None:
            return None
        decision = answer.decision
        if decision.allowed:
            response = answer.http_wire
            if response is None:
                response = answer.http_wire = self.renderer().render(decision, "")
            status = 200
        else:
            renderer = self.renderer()
            response = renderer.render(decision, request.request_id, head_only=request.head_only)
            status = http_status(decision, renderer.settings)
        elapsed = time.perf_counter() - request.started
        serving.record(
            decision, inp.method, path, request.request_id, elapsed, 0, status, WIRE, True
        )
        return response

    async def answer(self, request: _Request, remaining: float | None) -> bytes:
        """The response to one request, never an exception but CancelledError."""
        if not tracing.enabled():
            return await self._answer(request, remaining, None)
        try:
            parent = tracing.extract_parent((), request.inp.headers)
        except Exception:  # noqa: BLE001 (a malformed trace context must not fail the check)
            parent = None
        attributes = {"network.protocol.name": "http", "extauthz.wire": WIRE}
        with tracing.tracer().start_as_current_span(
            SPAN_NAME, context=parent, kind=SpanKind.SERVER, attributes=attributes
        ) as span:
            current_trace_id.set(format(span.get_span_context().trace_id, "032x"))
            return await self._answer(request, remaining, span)

    async def _answer(self, request: _Request, remaining: float | None, span: Span | None) -> bytes:
        serving = self.serving
        inp, request_id = request.inp, request.request_id
        path = inp.path
        # answer_now found nothing to give again (or tracing is on): the engine decides.
        calls = CheckCalls()
        decision = await serving.decide(inp, request_id, request.started, remaining, calls, WIRE)
        try:
            settings = serving.answers.config.server
            response = self.renderer().render(decision, request_id, head_only=request.head_only)
            status = 200 if decision.allowed else http_status(decision, settings)
            elapsed = time.perf_counter() - request.started
            serving.record(
                decision, inp.method, path, request_id, elapsed, calls.count, status, WIRE
            )
        except Exception as exc:  # noqa: BLE001 (fail closed: a fixed denial, never a crash)
            response, status = _FALLBACK_DENIAL, 500
            decision = serving.answer_failed(exc, request_id, decision.deployment)
        if span is not None:
            serving.annotate(span, decision, inp.method, path, request_id, status)
        return response


class _Connection(asyncio.Protocol):
    """One keep-alive connection from Envoy: requests parsed as they arrive, answered in order."""

    def __init__(self, wire: HttpWire) -> None:
        self._wire = wire
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[_Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._paused = False
        # The request being read.
        self._url = bytearray()
        self._headers: dict[str, str] = {}
        self._head_bytes = 0
        self._body_bytes = 0
        self._reading_head = False
        # From a request's first byte (an empty line before it counts) until it is read whole:
        # it has HEAD_SECONDS, and bytes that keep coming do not give it more.
        self._arriving = False
        self._bad: _BadRequest | None = None  # the limit a callback found exceeded
        self._last = False  # close once the queued requests are answered
        self._refusal: bytes | None = None  # and then answer this, for a request not read

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass, but is one).
        self._transport = cast(asyncio.Transport, transport)
        self._arm(IDLE_SECONDS, 408)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()  # Envoy gave up on the check: Serving logs it as cancelled

    def data_received(self, data: bytes) -> None:
        if self._closing or self._refusal is not None:
            return
        if not self._arriving:
            self._start_arriving()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Envoy checks the request that asks for an upgrade like any other; nothing after it
            # is HTTP/1.1 any more: answer what was read, then close.
            self._last = True
            if self._transport is not None:
                self._transport.pause_reading()
            if self._arriving:  # the upgrade came before a request was read whole
                self._refuse(400, "an upgrade before its request was read")
            elif not self._queue and self._task is None:
                self._close()  # the request was answered already (a remembered allow)
        except httptools.HttpParserError:
            # httptools wraps what a callback raises (a limit reached) in its own error.
            bad = self._bad or _BadRequest(400, "not an HTTP/1.1 request")
            self._refuse(bad.status, bad.why)

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if not self._arriving:  # pipelined after another in the same bytes: its own time
            self._start_arriving()
        self._url.clear()
        self._headers = {}
        self._head_bytes = self._body_bytes = 0
        self._reading_head = True

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        if len(self._headers) >= MAX_HEADERS:
            self._fail(431, f"more than {MAX_HEADERS} headers")
        key = name.decode("latin-1").lower()
        text = value.decode("utf-8", "replace")
        previous = self._headers.get(key)
        # Repeated headers are one, joined with "," (RFC 9110 §5.3), as Envoy sends them on the
        # gRPC wire: a repeated credential header then fails the token's shape, closed.
        self._headers[key] = text if previous is None else f"{previous},{text}"

    def on_headers_complete(self) -> None:
        self._reading_head = False

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > MAX_BODY_BYTES:
            self._fail(413, f"a body over {MAX_BODY_BYTES} bytes")

    def on_message_complete(self) -> None:
        self._arriving = False
        headers = self._headers
        method = self._parser.get_method().decode("ascii", "replace")
        try:
            path = self._url.decode("utf-8")
        except UnicodeDecodeError:
            path = self._url.decode("latin-1")  # routing refuses it as not in normal form
        extensions: dict[str, str] = {}
        deployment = headers.get(DEPLOYMENT_HEADER)
        if deployment is not None:
            extensions["deployment"] = deployment
            route = headers.get(ROUTE_HEADER)
            if route is not None:
                extensions["route"] = route
        host = headers.get("host", "")
        # For sender-constrained tokens, what Envoy set: the scheme it received the request with
        # (RFC 9449 §4.3 htu) and the client certificate's SHA-256 (RFC 8705 §3), when forwarded.
        scheme = headers.get("x-forwarded-proto", "")
        certificate = xfcc_sha256(headers.get("x-forwarded-client-cert"))
        inp = CheckInput(method, host, path, headers, extensions, scheme, "", certificate)
        keep_alive = self._parser.should_keep_alive()
        request = _Request(inp, request_id_of(headers), method == "HEAD", keep_alive)
        self._queue.append(request)
        if len(self._queue) >= MAX_PIPELINED and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        if self._task is None:
            self._next()

    # -- answering, in order -----------------------------------------------------------------

    def _next(self) -> None:
        """Answer the queued requests in order: remembered allows at once, the others in a task
        (its end answers the ones behind it)."""
        transport = self._transport
        wire = self._wire
        while self._queue and not self._closing and transport is not None:
            request = self._queue[0]
            try:
                response = wire.answer_now(request)
            except Exception:  # noqa: BLE001 (the slow path answers it, and fails closed)
                response = None
            if response is None:
                self._task = asyncio.ensure_future(self._answer_in_task(request))
                return
            self._queue.popleft()
            transport.write(response)  # an allow: no body, HEAD or not
            if not request.keep_alive:
                self._close()
                return
        self._task = None
        if self._last and not self._queue:
            if self._refusal is not None and transport is not None and not self._closing:
                transport.write(self._refusal)
            self._close()
            return
        if self._paused and transport is not None and not self._closing:
            self._paused = False
            transport.resume_reading()
        if not self._queue and not self._arriving:
            self._arm(IDLE_SECONDS, 408)

    async def _answer_in_task(self, request: _Request) -> None:
        remaining = _deadline_of(request.inp.headers)
        response = await self._wire.answer(request, remaining)
        if self._closing or self._transport is None:
            return
        self._queue.popleft()
        self._transport.write(response)
        if not request.keep_alive:
            self._close()
            return
        self._next()

    # -- limits --------------------------------------------------------------------------------

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._fail(431, f"a request head over {MAX_HEAD_BYTES} bytes")

    def _fail(self, status: int, why: str) -> None:
        self._bad = _BadRequest(status, why)
        raise self._bad

    def _start_arriving(self) -> None:
        self._arriving = True
        self._arm(HEAD_SECONDS, 408)

    def _arm(self, seconds: float, status: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(seconds, self._expired, status)

    def _expired(self, status: int) -> None:
        if self._arriving:
            self._refuse(status, "the request did not arrive in time")
        elif not self._queue and self._task is None:
            self._close()  # idle: Envoy opens another when it needs one

    def _close(self) -> None:
        """Close once what was written has gone: the end of the stream sent after it, and what
        the client still sends read and dropped for _LINGER_SECONDS (a 413 cut in a body, say)."""
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        transport.resume_reading()  # data_received drops it: self._closing
        asyncio.get_running_loop().call_later(_LINGER_SECONDS, transport.close)

    def _refuse(self, status: int, why: str) -> None:
        """Answer a request that cannot be read and close, once the requests read before it
        have their answers (in order, as ever): nothing of it is echoed."""
        if self._closing or self._transport is None or self._refusal is not None:
            return
        self._wire.serving.log.warning("http.badRequest", message=f"Refused {why}.", status=status)
        self._refusal = _BAD_REQUEST[status]
        self._last = True
        if self._queue:
            self._transport.pause_reading()  # _next writes the refusal after their answers
            return
        self._transport.write(self._refusal)
        self._close()


def _deadline_of(headers: Mapping[str, str]) -> float | None:
    """Envoy's deadline for the check in seconds, when its router told it; None otherwise."""
    value = headers.get(DEADLINE_HEADER)
    if value is None or not value.isdigit() or len(value) > 9:
        return None
    return int(value) / 1000


async def serve_http(
    wire: HttpWire, host: str, port: int, tls: ssl.SSLContext | None = None
) -> asyncio.Server:
    """Listen on ``host:port`` (SO_REUSEPORT, like the gRPC port under ``--workers N``), over
    ``tls`` when given (``server.tls``: :func:`extauthz.tls.http_ssl_context`)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        wire.connection, host, port, reuse_port=True, backlog=1024, ssl=tls
    )
