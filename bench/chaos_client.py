"""The chaos scenarios' load client: every response recorded, so each can be judged.

wrk (bench/loadgen.py) counts statuses; a scenario must know, for each request, which token it
sent, when, and what came back (status and ``x-extauthz-reason``) to count false allows and false
denials. This is a small asyncio HTTP/1.1 client over keep-alive loopback connections to Envoy:

    streams = [Stream("valid", connections=8, pick=lambda: ("valid", "/api/items", tok), rate=400)]
    async with Load("127.0.0.1", port, streams) as load:
        await asyncio.sleep(10)
    load.records  # one Record per request

Each stream has its own connections (a slow kind of token does not slow the others) and an
optional rate (requests/s over its connections; ``None`` = closed loop). Everything runs on the
harness's one event loop: no threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import NamedTuple

HOST_HEADER = "api.bench.example"
REQUEST_TIMEOUT_S = 15.0


class Record(NamedTuple):
    stream: str
    kind: str  # what the token is (the scenario's label), which fixes the expected answer
    t_send: float  # time.time() just before the request was written
    t_recv: float  # time.time() when the whole answer was read (or the error seen)
    status: int  # HTTP status, 0 on a connection error or timeout
    reason: str  # x-extauthz-reason ("" when absent)
    request_id: str  # the x-request-id sent
    error: str  # "" or connect | reset | timeout


Pick = Callable[[], tuple[str, str, str | None]]  # -> (kind, path, token or None)


@dataclass
class Stream:
    name: str
    connections: int
    pick: Pick
    rate: float | None = None  # requests/s over all the stream's connections; None: closed loop


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class HttpError(Exception):
    pass


async def read_response(reader: asyncio.StreamReader) -> tuple[Response, bool]:
    """One HTTP/1.1 response; also whether the server will close the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise HttpError(f"bad status line {lines[0]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(chunks)
    else:
        length = int(headers.get("content-length", "0") or 0)
        body = await reader.readexactly(length) if length else b""
    close = headers.get("connection", "").lower() == "close" or parts[0] == "HTTP/1.0"
    return Response(status, headers, body), close


async def http_request(
    host: str,
    port: int,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 5.0,
) -> Response:
    """One request on a fresh connection (control calls: the IdP's ``/_chaos/*``, ``/readyz``)."""

    async def go() -> Response:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            lines.append(f"Content-Length: {len(body)}")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            resp, _ = await read_response(reader)
            return resp
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    return await asyncio.wait_for(go(), timeout)


def request_bytes(path: str, token: str | None, request_id: str) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {HOST_HEADER}\r\n{auth}x-request-id: {request_id}\r\n\r\n"
    ).encode("latin-1")


@dataclass
class Load:
    host: str
    port: int
    streams: list[Stream]
    records: list[Record] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        for stream in self.streams:
            for i in range(stream.connections):
                self._tasks.append(asyncio.ensure_future(self._worker(stream, i)))

    async def stop(self) -> None:
        """Stop sending; requests already sent are awaited (each has its own timeout)."""
        self._stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def __aenter__(self) -> Load:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _worker(self, stream: Stream, index: int) -> None:
        interval = stream.connections / stream.rate if stream.rate else 0.0
        # spread the connections of a paced stream over one interval
        next_at = time.monotonic() + interval * index / max(1, stream.connections)
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        append = self.records.append
        try:
            while not self._stop.is_set():
                if interval:
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._stop.wait(), delay)
                        if self._stop.is_set():
                            break
                    # a late request is not followed by a burst to catch up
                    next_at = max(next_at + interval, time.monotonic())
                kind, path, token = stream.pick()
                rid = str(uuid.uuid4())
                t_send = time.time()
                status, reason, error = 0, "", ""
                try:
                    if writer is None or reader is None:
                        reader, writer = await asyncio.wait_for(
                            asyncio.open_connection(self.host, self.port), REQUEST_TIMEOUT_S
                        )
                    assert reader is not None and writer is not None
                    writer.write(request_bytes(path, token, rid))
                    resp, close = await asyncio.wait_for(read_response(reader), REQUEST_TIMEOUT_S)
                    status, reason = resp.status, resp.headers.get("x-extauthz-reason", "")
                    if close:
                        writer.close()
                        reader = writer = None
                except TimeoutError:
                    error = "timeout"
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, HttpError):
                    error = "connect" if writer is None else "reset"
                if error:
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                append(Record(stream.name, kind, t_send, time.time(), status, reason, rid, error))
                if error:
                    await asyncio.sleep(0.01)
        finally:
            if writer is not None:
                writer.close()
