"""The admin HTTP listener (docs/metrics.md): /healthz, /readyz, /metrics, and ``POST
/cache/evict`` (docs/cli.md, :class:`~extauthz.shared_cache.Evictor`).

A few fixed endpoints do not justify a web framework; this is a minimal HTTP/1.1 responder
on asyncio streams that closes each connection after one answer.

Anything can connect to this port, so reading a request is bounded in size and in time: a request
line or a header line longer than ``MAX_LINE_BYTES`` (the stream never buffers more than that),
more than ``MAX_HEADER_LINES`` header lines, or a request line that is not ``METHOD TARGET
HTTP/x.y`` gets a short JSON 400 or 431 and the connection is closed (after dropping what the
client still sends, within ``LINGER_BYTES`` and ``LINGER_SECONDS``, so that it can read that
answer); a request whose head (and body, for the one POST) has not arrived within
``REQUEST_SECONDS`` is cut off without an answer. A body is read only for ``POST /cache/evict``,
only as long as its ``content-length`` says, and at most ``MAX_EVICT_BODY_BYTES`` (else 413).
None of these is an error of the server, so none is logged (an escaping exception would have
asyncio print a traceback, which is not a JSON log line).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .shared_cache import MAX_EVICT_BODY_BYTES, EvictRefused, parse_evict_body

__all__ = ["AdminServer"]

MAX_LINE_BYTES = 8 * 1024  # a request line or one header line; probes and scrapers send ~100 B
MAX_HEADER_LINES = 100  # a Prometheus scrape sends about ten
REQUEST_SECONDS = 5.0  # the whole request head, however slowly it trickles in
LINGER_BYTES = 1024 * 1024  # after a refusal, what is still read and dropped before closing...
LINGER_SECONDS = 1.0  # ...and for how long at most

JSON = "application/json"
EVICT_PATH = "/cache/evict"

# The token's SHA-256 → the HTTP status and JSON body to answer (extauthz.shared_cache.Evictor).
Evict = Callable[[bytes], Awaitable[tuple[int, dict[str, Any]]]]


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes


class RefusedRequest(Exception):
    """A request this listener does not read to the end: answered with ``answer``, then closed."""

    def __init__(self, status: HTTPStatus, error: str) -> None:
        super().__init__(error)
        self.answer = Answer(status, JSON, json.dumps({"error": error}).encode())


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string
    content_length: int | None = None  # the header's value; None when absent


def parse_request_line(line: bytes) -> Request:
    """``GET /readyz?x HTTP/1.1`` → GET, /readyz; anything else is a 400."""
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/") or not parts[1].startswith("/"):
        raise RefusedRequest(HTTPStatus.BAD_REQUEST, "bad_request")
    return Request(parts[0], parts[1].split("?", 1)[0])


async def read_line(reader: asyncio.StreamReader, too_long: RefusedRequest) -> bytes:
    """One CRLF- or LF-terminated line, what came before the end of the stream, or ``too_long``
    raised once the line exceeds the stream's limit (``MAX_LINE_BYTES``)."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        return exc.partial  # the client closed (or half-closed) its side
    except asyncio.LimitOverrunError:
        raise too_long from None


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """The request line, parsed, after reading (and ignoring) the header lines; None when the
    client connected and sent nothing."""
    request_line = await read_line(
        reader, RefusedRequest(HTTPStatus.BAD_REQUEST, "request_line_too_long")
    )
    if not request_line:
        return None
    request = parse_request_line(request_line)
    header_too_large = RefusedRequest(
        HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "header_fields_too_large"
    )
    for _ in range(MAX_HEADER_LINES + 1):  # the header lines, then the empty line that ends them
        line = await read_line(reader, header_too_large)
        if line in (b"\r\n", b"\n", b""):
            return request
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"content-length":
            text = value.strip()
            if not text.isdigit() or request.content_length is not None:
                raise RefusedRequest(HTTPStatus.BAD_REQUEST, "bad_content_length")
            request = Request(request.method, request.path, int(text))
    raise header_too_large  # too many header lines


async def read_body(reader: asyncio.StreamReader, request: Request, limit: int) -> bytes:
    """The body ``content-length`` announces; 411 without one, 413 over ``limit``."""
    if request.content_length is None:
        raise RefusedRequest(HTTPStatus.LENGTH_REQUIRED, "length_required")
    if request.content_length > limit:
        raise RefusedRequest(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body_too_large")
    try:
        return await reader.readexactly(request.content_length)
    except asyncio.IncompleteReadError:
        raise RefusedRequest(HTTPStatus.BAD_REQUEST, "incomplete_body") from None


async def drop_the_rest(reader: asyncio.StreamReader) -> None:
    """Read and drop what the client is still sending, up to the linger bounds. Closing a socket
    with unread data resets the connection, and the client may then never read the refusal."""
    remaining = LINGER_BYTES
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(LINGER_SECONDS):
            while remaining > 0 and (chunk := await reader.read(min(remaining, 64 * 1024))):
                remaining -= len(chunk)


def response_bytes(answer: Answer, *, head_only: bool) -> bytes:
    head = (
        f"HTTP/1.1 {answer.status} {HTTPStatus(answer.status).phrase}\r\n"
        f"content-type: {answer.content_type}\r\ncontent-length: {len(answer.body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + (b"" if head_only else answer.body)


class AdminServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        readiness: Callable[[], tuple[bool, dict[str, Any]]],
        *,
        before_scrape: Callable[[], None] = lambda: None,
        request_seconds: float = REQUEST_SECONDS,
        evict: Evict | None = None,
    ) -> None:
        """``evict``: what ``POST /cache/evict`` does; without it, the path is not found."""
        self._evict = evict
        self._registry = registry
        self._readiness = readiness
        self._before_scrape = before_scrape
        self._request_seconds = request_seconds
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        # `limit` bounds what the stream buffers while it looks for the end of a line.
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_LINE_BYTES)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _route(self, request: Request) -> Answer:
        if request.path == EVICT_PATH and self._evict is not None:
            return Answer(405, JSON, b'{"error":"method_not_allowed"}')  # POST only
        if request.method not in ("GET", "HEAD"):
            return Answer(405, JSON, b'{"error":"method_not_allowed"}')
        if request.path == "/healthz":
            return Answer(200, JSON, b'{"status":"ok"}')
        if request.path == "/readyz":
            ready, detail = self._readiness()
            body = json.dumps({"ready": ready, **detail}, default=str).encode()
            return Answer(200 if ready else 503, JSON, body)
        if request.path == "/metrics":
            self._before_scrape()
            return Answer(200, CONTENT_TYPE_LATEST, generate_latest(self._registry))
        return Answer(404, JSON, b'{"error":"not_found"}')

    def _evicting(self, request: Request) -> bool:
        return self._evict is not None and request.path == EVICT_PATH and request.method == "POST"

    async def _evict_answer(self, body: bytes) -> Answer:
        assert self._evict is not None
        try:
            digest = parse_evict_body(body)
        except EvictRefused as refused:
            error = {"error": "bad_request", "message": str(refused)}
            return Answer(400, JSON, json.dumps(error).encode())
        status, answer = await self._evict(digest)
        return Answer(status, JSON, json.dumps(answer).encode())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(self._request_seconds):
                    request = await read_request(reader)
                    body = b""
                    if request is not None and self._evicting(request):
                        body = await read_body(reader, request, MAX_EVICT_BODY_BYTES)
            except RefusedRequest as refused:
                writer.write(response_bytes(refused.answer, head_only=False))
                await writer.drain()
                writer.write_eof()
                await drop_the_rest(reader)
                return
            if request is None:
                return  # connected and closed without a word
            if self._evicting(request):
                answer = await self._evict_answer(body)
            else:
                answer = self._route(request)
            writer.write(response_bytes(answer, head_only=request.method == "HEAD"))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass  # too slow: cut off; or the client went away first
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
