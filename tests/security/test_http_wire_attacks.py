"""Attacks on the HTTP wire's listener (``extauthz serve --http-listen``), against the real server
process, in raw bytes on raw sockets: what anything that is not Envoy could send to the port.

Heads and bodies over the limits, header floods, request lines and framing that are not HTTP/1.1
(smuggling shapes among them), slow clients (in the head, in the body, and empty lines before a
request), a hundred pipelined requests in one write, two hundred connections at once, upgrades,
CONNECT and HEAD. Each refused request is answered with its status and the connection closed, is
logged as ``http.badRequest`` without a byte of what was sent (every attack carries a marker that
must never reach the log), and the server keeps answering everyone else: every test ends with an
ordinary check, and the last one finds the process alive with no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from extauthz import http_wire
from tests.conftest import AUDIENCE, ISSUER, SigningKey, claims
from tests.integration.serverproc import ExtauthzProcess, free_port
from tests.policies import GET_ORDER, orders
from tests.waiting import wait_until, wait_until_async

HOST = b"api.example.com"
# In every attack, and so never in the log: nothing of a refused request is echoed.
MARKER = b"hw-attack-" + uuid.uuid4().hex.encode()
READ_SECONDS = 5.0


@dataclass
class Listener:
    server: ExtauthzProcess
    port: int
    token: str

    def bad_requests(self) -> list[dict[str, object]]:
        return self.server.events("http.badRequest")


@pytest.fixture(scope="module")
def listener(rsa_key: SigningKey, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listener]:
    static = {"type": "STATIC_KEYS", "keys": [rsa_key.public_jwk],
              "additionalValidationPolicy": {"issuers": [ISSUER], "audiences": [AUDIENCE]}}  # fmt: skip
    config = {
        "server": {"drainSeconds": 0},  # stopped at once: nothing in front of it to drain
        "deployments": [
            orders(static, routes=[GET_ORDER], headersFromClaims={"x-auth-subject": "sub"}),
            orders(
                static, name="any", pathPrefix="/any", headersFromClaims={"x-auth-subject": "sub"}
            ),
        ],
    }
    port = free_port()
    server = ExtauthzProcess(
        config, tmp_path_factory.mktemp("http-wire-attacks"), separate_stderr=True,
        grace_seconds=2, args=["--http-listen", f"127.0.0.1:{port}"],
    )  # fmt: skip
    with server:
        yield Listener(server, port, rsa_key.sign(claims()))


def request(
    path: str = "/orders/1",
    headers: dict[str, str] | None = None,
    *,
    method: str = "GET",
    token: str | None = None,
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {HOST.decode()}"]
    if token is not None:
        lines.append(f"authorization: Bearer {token}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def read_response(sock: socket.socket, buffer: bytearray, *, head_only: bool = False) -> Response:
    """One response off ``sock`` (``buffer`` keeps what was read past it)."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a whole response: {bytes(buffer[:200])!r}"
        buffer += chunk
    head, _, _ = bytes(buffer).partition(b"\r\n\r\n")
    del buffer[: len(head) + 4]
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    length = 0 if head_only else int(headers.get("content-length", "0"))
    while len(buffer) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed in a response's body"
        buffer += chunk
    body = bytes(buffer[:length])
    del buffer[:length]
    return Response(int(status_line.split()[1]), headers, body)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=READ_SECONDS)
    sock.settimeout(READ_SECONDS)
    return sock


def until_closed(sock: socket.socket) -> bytes:
    """Everything the server writes until it closes the connection (failing after READ_SECONDS
    of silence: a connection left open)."""
    out = bytearray()
    while chunk := sock.recv(65536):
        out += chunk
    return bytes(out)


def refused(listener: Listener, raw: bytes) -> bytes:
    """Send ``raw`` on a new connection; what came back before the server closed it."""
    with connect(listener.port) as sock:
        # Refused before it was all sent: what was answered is still there to read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)
        return until_closed(sock)


def assert_serving(listener: Listener) -> None:
    """An ordinary check on a new connection is answered, allowed and denied."""
    with connect(listener.port) as sock:
        buffer = bytearray()
        sock.sendall(request(token=listener.token) + request(headers={"x-request-id": "after"}))
        allowed, denied = read_response(sock, buffer), read_response(sock, buffer)
    assert (allowed.status, allowed.headers.get("x-auth-subject")) == (200, "alice")
    assert (denied.status, denied.headers["x-request-id"]) == (401, "after")


def assert_refusal_logged(listener: Listener, before: int, status: int) -> None:
    """One more http.badRequest line, with this status and nothing of the request."""
    lines = wait_until(
        lambda: found if len(found := listener.bad_requests()) > before else None,
        timeout=READ_SECONDS, what="the http.badRequest line",
    )  # fmt: skip
    assert [line["status"] for line in lines[before:]] == [status]
    assert MARKER.decode() not in listener.server.text()


# -- limits of the head and the body ---------------------------------------------------------------

M = MARKER.decode()
OVERSIZED = [
    pytest.param(request(f"/orders/{M}" + "a" * 70_000), 431, id="request-line-over-64KiB"),
    pytest.param(request(headers={"x-big": M + "a" * 70_000}), 431, id="one-header-over-64KiB"),
    pytest.param(request(headers={f"x-h{i}": M for i in range(300)}), 431, id="300-headers"),
    pytest.param(request(headers={f"x-h{i}": M + "a" * 400 for i in range(190)}), 431, id="190-headers-over-64KiB"),
    pytest.param(request(body=MARKER + b"a" * (http_wire.MAX_BODY_BYTES + 1)), 413, id="body-over-1MiB"),
    pytest.param(
        request(headers={"transfer-encoding": "chunked"})
        + b"".join(b"%x\r\n%s\r\n" % (64 * 1024, MARKER + b"a" * (64 * 1024 - len(MARKER))) for _ in range(17))
        + b"0\r\n\r\n",
        413, id="chunked-body-over-1MiB",
    ),
    pytest.param(
        request(headers={"content-length": str(10 * 1024**3)}) + MARKER + b"a" * (http_wire.MAX_BODY_BYTES + 1),
        413, id="10GiB-announced",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "status"), OVERSIZED)
def test_an_oversized_request_is_refused_and_closed(
    listener: Listener, raw: bytes, status: int
) -> None:
    before = len(listener.bad_requests())
    answer = refused(listener, raw)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:100]
    assert answer.endswith(b"\r\ncontent-length: 0\r\n\r\n")  # nothing else, and closed
    assert_refusal_logged(listener, before, status)
    assert_serving(listener)


def test_a_request_just_inside_the_limits_is_checked(listener: Listener) -> None:
    """A 60 KiB header, 150 headers, a 1 MiB body (read and dropped): answered, and the next
    request on the same connection too."""
    big_body = MARKER + b"a" * (http_wire.MAX_BODY_BYTES - len(MARKER))
    raws = [
        request(headers={"x-big": "a" * 60_000, "x-request-id": "big-header"}),
        request(headers={**{f"x-h{i}": "v" for i in range(150)}, "x-request-id": "many-headers"}),
        request(headers={"x-request-id": "big-body"}, method="POST", body=big_body),
    ]
    with connect(listener.port) as sock:
        buffer = bytearray()
        for raw in raws:
            sock.sendall(raw)
            answer = read_response(sock, buffer)
            assert answer.status in (401, 403), answer
        sock.sendall(request(token=listener.token))
        assert read_response(sock, buffer).status == 200
    assert MARKER.decode() not in listener.server.text()


# -- not HTTP/1.1 ------------------------------------------------------------------------------------

H = b"host: api.example.com\r\n"
MALFORMED = {
    "tls-client-hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + MARKER + b"\r\n\r\n",
    "unknown-version": b"GET /orders/1 HTTP/9.9\r\n" + H + b"x-m: " + MARKER + b"\r\n\r\n",
    "lower-case-method": b"get /orders/" + MARKER + b" HTTP/1.1\r\n" + H + b"\r\n",
    "bad-method": b"G@T /orders/" + MARKER + b" HTTP/1.1\r\n" + H + b"\r\n",
    "space-in-path": b"GET /orders/1 " + MARKER + b" HTTP/1.1\r\n" + H + b"\r\n",
    "control-in-path": b"GET /orders/\x01" + MARKER + b" HTTP/1.1\r\n" + H + b"\r\n",
    "bytes-over-0x7f-in-path": b"GET /orders/\xff\xfe" + MARKER + b" HTTP/1.1\r\n" + H + b"\r\n",
    "bare-lf": b"GET /orders/1 HTTP/1.1\nhost: api.example.com\nx-m: " + MARKER + b"\n\n",
    "nul-in-value": b"GET /orders/1 HTTP/1.1\r\n" + H + b"x-m: a\x00" + MARKER + b"\r\n\r\n",
    "header-without-colon": b"GET /orders/1 HTTP/1.1\r\n" + H + MARKER + b"\r\n\r\n",
    "empty-header-name": b"GET /orders/1 HTTP/1.1\r\n" + H + b": " + MARKER + b"\r\n\r\n",
    "space-before-colon": b"GET /orders/1 HTTP/1.1\r\n" + H + b"x-m : " + MARKER + b"\r\n\r\n",
    "obsolete-line-folding": b"GET /orders/1 HTTP/1.1\r\n" + H + b"x-m: a\r\n " + MARKER + b"\r\n\r\n",
    # Request smuggling's shapes: the body's length told two ways, or not at all clearly.
    "content-length-and-chunked": b"POST /orders/1 HTTP/1.1\r\n" + H
    + b"content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /orders/" + MARKER + b" HTTP/1.1\r\n\r\n",
    "two-content-lengths": b"POST /orders/1 HTTP/1.1\r\n" + H + b"content-length: 5\r\ncontent-length: 6\r\n\r\n" + MARKER,
    "negative-content-length": b"POST /orders/1 HTTP/1.1\r\n" + H + b"content-length: -1\r\n\r\n" + MARKER,
    "chunked-not-last": b"POST /orders/1 HTTP/1.1\r\n" + H + b"transfer-encoding: chunked, gzip\r\n\r\n" + MARKER,
    "bad-chunk-size": b"POST /orders/1 HTTP/1.1\r\n" + H + b"transfer-encoding: chunked\r\n\r\nzz\r\n" + MARKER + b"\r\n0\r\n\r\n",
}  # fmt: skip


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_what_is_not_http_1_1_is_400_and_closed(listener: Listener, raw: bytes) -> None:
    before = len(listener.bad_requests())
    assert (
        refused(listener, raw)
        == b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    )
    assert_refusal_logged(listener, before, 400)
    assert_serving(listener)


def test_http_1_0_and_0_9_are_checked_and_closed(listener: Listener) -> None:
    """Older versions the parser reads are checked like any request, answered in HTTP/1.1 and,
    not being keep-alive, closed."""
    for raw in (
        b"GET /orders/1 HTTP/1.0\r\nhost: api.example.com\r\nx-request-id: v10\r\n\r\n",
        b"GET /orders/1\r\n\r\n",
    ):
        answer = refused(listener, raw)
        assert answer.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), answer[:100]
    assert listener.server.line("v10", "access")["reason"] == "token_missing"
    assert_serving(listener)


def test_a_smuggled_request_after_a_good_one_is_never_checked(listener: Listener) -> None:
    """A good request, then one with both a content-length and chunked: the first is answered,
    then the second refused, and the request hidden in its body never reaches the engine."""
    hidden = f"/orders/{MARKER.decode()}"
    raw = (
        request(headers={"x-request-id": "first"})
        + b"POST /orders/1 HTTP/1.1\r\n" + H + b"content-length: 40\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
        + request(hidden, {"x-request-id": "hidden"})
    )  # fmt: skip
    before = len(listener.bad_requests())
    answer = refused(listener, raw)
    assert answer.startswith(b"HTTP/1.1 401 ") and b"x-request-id: first" in answer
    assert answer.endswith(
        b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    )
    assert_refusal_logged(listener, before, 400)
    assert not listener.server.lines_for("hidden")
    assert_serving(listener)


# -- slow clients -------------------------------------------------------------------------------------

TRICKLE_SECONDS = 0.2  # one byte every 0.2 s: in 10 s, fifty bytes
SLOW = 20
CHECKS = 50
CUT_OFF = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"


async def trickle(
    port: int, first: bytes, then: Iterator[bytes], started: list[int]
) -> tuple[float, bytes]:
    """A client that sends ``first`` at once, then the bytes of ``then`` one every
    TRICKLE_SECONDS until the server closes: how long after its first byte that was, and what the
    server said."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    began = time.monotonic()
    answered = asyncio.ensure_future(reader.read())  # all the server says, until it closes
    writer.write(first or next(then))
    started.append(1)
    try:
        while time.monotonic() - began < http_wire.HEAD_SECONDS + READ_SECONDS:
            done, _ = await asyncio.wait({answered}, timeout=TRICKLE_SECONDS)  # the client's pace
            if done:
                return time.monotonic() - began, answered.result()
            writer.write(next(then))
        return time.monotonic() - began, b"(still open)"
    finally:
        answered.cancel()
        writer.close()


async def check_latencies(port: int, token: str) -> list[float]:
    """CHECKS sequential checks on one keep-alive connection, allowed and denied in turn."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    seconds = []
    for i in range(CHECKS):
        sent = request(token=token) if i % 2 else request(headers={"x-request-id": f"fast-{i}"})
        began = time.perf_counter()
        writer.write(sent)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_SECONDS)
        length = next(
            int(line[15:]) for line in head.split(b"\r\n") if line.startswith(b"content-length: ")
        )
        await asyncio.wait_for(reader.readexactly(length), READ_SECONDS)
        seconds.append(time.perf_counter() - began)
    writer.close()
    return seconds


def test_slow_clients_are_cut_off_and_hold_nobody_up(listener: Listener) -> None:
    """Twenty clients at one byte per 0.2 s (in the head; in the body after a whole head; empty
    lines before any request): the others' checks keep a p99 under 50 ms meanwhile, and each slow
    one gets 408 and is closed HEAD_SECONDS after its first byte, the bytes it kept sending
    notwithstanding."""
    head = b"GET /orders/1 HTTP/1.1\r\nhost: api.example.com\r\nx-pad: " + MARKER + b"a" * 200
    kinds: list[tuple[bytes, Callable[[], Iterator[bytes]]]] = [
        (b"", lambda: (bytes([byte]) for byte in head)),  # the head, never whole in time
        (
            request(method="POST", headers={"content-length": "100000"}),
            lambda: itertools.repeat(b"a"),
        ),
        (b"", lambda: itertools.repeat(b"\r\n")),  # empty lines, which the parser skips
    ]
    before = len(listener.bad_requests())

    async def attack() -> tuple[list[tuple[float, bytes]], list[float]]:
        started: list[int] = []
        slow = [
            asyncio.ensure_future(trickle(listener.port, first, then(), started))
            for first, then in (kinds[i % len(kinds)] for i in range(SLOW))
        ]
        await wait_until_async(
            lambda: len(started) == SLOW, timeout=READ_SECONDS, what="the slow clients"
        )
        latencies = await check_latencies(listener.port, listener.token)
        return list(await asyncio.gather(*slow)), latencies

    ended, latencies = asyncio.run(attack())
    p99 = statistics.quantiles(latencies, n=100)[98]
    assert p99 < 0.050, f"p99 {p99 * 1000:.1f} ms over {CHECKS} checks beside {SLOW} slow clients"
    for seconds, answer in ended:
        assert answer == CUT_OFF
        assert http_wire.HEAD_SECONDS - 0.5 <= seconds <= http_wire.HEAD_SECONDS + 2.0, seconds
    lines = wait_until(
        lambda: found if len(found := listener.bad_requests()) >= before + SLOW else None,
        timeout=READ_SECONDS, what="the slow clients' http.badRequest lines",
    )  # fmt: skip
    assert [line["status"] for line in lines[before:]].count(408) == SLOW
    assert MARKER.decode() not in listener.server.text()
    assert_serving(listener)


# -- many requests, many connections ----------------------------------------------------------------

PIPELINED = 100
CONNECTIONS = 200


def test_a_hundred_pipelined_requests_are_answered_in_order(listener: Listener) -> None:
    """One write of a hundred requests, past the 32 read ahead of their answers: allowed (the
    remembered answer), denied and HEAD in turn, each answered in order and framed right."""
    kinds = ["allow", "deny", "head"]
    raw = b"".join(
        request(token=listener.token, headers={"x-request-id": f"p-{i}"}) if kinds[i % 3] == "allow"
        else request(headers={"x-request-id": f"p-{i}"}, method="HEAD" if kinds[i % 3] == "head" else "GET")
        for i in range(PIPELINED)
    )  # fmt: skip
    with connect(listener.port) as sock:
        sock.sendall(raw)
        buffer = bytearray()
        answers = [
            read_response(sock, buffer, head_only=kinds[i % 3] == "head") for i in range(PIPELINED)
        ]
    for i, answer in enumerate(answers):
        if kinds[i % 3] == "allow":
            assert (answer.status, answer.headers["x-auth-subject"]) == (200, "alice"), i
        else:  # HEAD: the GET-only route has no policy for it
            assert answer.status == (401 if kinds[i % 3] == "deny" else 403), i
            assert answer.headers["x-request-id"] == f"p-{i}"
            assert int(answer.headers["content-length"]) > 0 and (answer.body == b"") == (
                kinds[i % 3] == "head"
            )
    assert not buffer  # nothing more than a hundred answers
    logged = wait_until(
        lambda: found if len(found := [line["requestId"] for line in listener.server.events("access")
                                       if str(line.get("requestId", "")).startswith("p-")]) == PIPELINED else None,
        timeout=READ_SECONDS, what="the hundred access lines",
    )  # fmt: skip
    assert logged == [f"p-{i}" for i in range(PIPELINED)]
    assert_serving(listener)


def test_two_hundred_connections_at_once_are_each_answered(listener: Listener) -> None:
    """Two hundred connections open together, a request on each, every one answered with its own
    request id, and the server answering a new one after they close."""
    sockets = [connect(listener.port) for _ in range(CONNECTIONS)]
    try:
        for i, sock in enumerate(sockets):
            sock.sendall(request(headers={"x-request-id": f"c-{i}"}))
        for i, sock in enumerate(sockets):
            answer = read_response(sock, bytearray())
            assert (answer.status, answer.headers["x-request-id"]) == (401, f"c-{i}")
    finally:
        for sock in sockets:
            sock.close()
    assert_serving(listener)


# -- upgrades, CONNECT and HEAD ----------------------------------------------------------------------

UPGRADE = {"upgrade": "websocket", "connection": "upgrade"}


@pytest.mark.parametrize("allowed", [False, True], ids=["denied", "remembered-allow"])
def test_an_upgrade_request_is_answered_once_then_closed(listener: Listener, allowed: bool) -> None:
    """A request asking for an upgrade is checked like any other, answered once and the
    connection closed: what follows it is not HTTP/1.1 any more, and is never read as a request.
    An allow given again from memory (answered at once) is no exception."""
    if allowed:  # remembered: the same request allowed once before
        with connect(listener.port) as sock:
            sock.sendall(request(token=listener.token))
            assert read_response(sock, bytearray()).status == 200
    before = len(listener.bad_requests())
    token = listener.token if allowed else None
    answer = refused(
        listener,
        request(token=token, headers={**UPGRADE, "x-request-id": "up"}) + request(f"/orders/{M}"),
    )
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert answer.startswith(
        b"HTTP/1.1 200 OK\r\n" if allowed else b"HTTP/1.1 401 Unauthorized\r\n"
    ), answer
    assert len(listener.bad_requests()) == before
    assert MARKER.decode() not in listener.server.text()
    assert_serving(listener)


def test_a_connect_request_is_checked_and_closed(listener: Listener) -> None:
    """CONNECT's target is no path in normal form: 400 request_ambiguous, and closed."""
    answer = refused(
        listener,
        b"CONNECT api.example.com:443 HTTP/1.1\r\nhost: api.example.com:443\r\nx-request-id: tunnel\r\n\r\n"
        + MARKER,
    )
    assert (
        answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        and b"x-extauthz-reason: request_ambiguous" in answer
    )
    assert answer.count(b"HTTP/1.1 ") == 1
    assert MARKER.decode() not in listener.server.text()
    assert_serving(listener)


def test_head_requests_get_headers_only_and_keep_the_connection_framed(listener: Listener) -> None:
    """HEAD: a denial's headers (its content-length too) without the body; an allow, decided and
    then given again from memory, as for GET; and after each, the next request on the connection
    is read where it starts."""
    with connect(listener.port) as sock:
        buffer = bytearray()
        answers = []
        for raw, head_only in [
            (request("/any/1", {"x-request-id": "head-denied"}, method="HEAD"), True),
            (request("/any/1", {"x-request-id": "after-head"}), False),
            (request("/any/1", token=listener.token, method="HEAD"), True),
            (request("/any/1", token=listener.token, method="HEAD"), True),  # remembered
            (request("/any/1", {"x-request-id": "last"}), False),
        ]:
            sock.sendall(raw)
            answers.append(read_response(sock, buffer, head_only=head_only))
    denied, after, allowed, again, last = answers
    assert (denied.status, denied.headers["x-request-id"]) == (401, "head-denied")
    assert int(denied.headers["content-length"]) > 0 and denied.body == b""
    assert (after.status, json.loads(after.body)["request_id"]) == (401, "after-head")
    for answer in (allowed, again):
        assert (
            answer.status,
            answer.headers["x-auth-subject"],
            answer.headers["content-length"],
        ) == (200, "alice", "0")
    assert (last.status, json.loads(last.body)["request_id"]) == (401, "last")
    assert not buffer


# -- and after all that ------------------------------------------------------------------------------


def test_the_server_is_still_up_and_never_wrote_a_traceback(listener: Listener) -> None:
    """The process runs, answers, and wrote nothing to stderr but what it means to: no traceback,
    no marker; every http.badRequest line is the refusal's fields, never the request's."""
    assert listener.server.proc is not None and listener.server.proc.poll() is None
    assert_serving(listener)
    stderr = listener.server.stderr()
    assert "Traceback" not in stderr and MARKER.decode() not in stderr
    for line in listener.bad_requests():
        assert set(line) <= {"ts", "level", "event", "requestId", "message", "status"}, line
        assert str(line["message"]).startswith("Refused ")
