"""The admin port under hostile requests: oversized, malformed or slow requests get a short 4xx or
a closed connection, never a traceback, and the port goes on answering.

The oversized and malformed requests go to the real server (``python -m extauthz serve``, stderr
kept apart from the JSON lines on stdout); the slow one to an AdminServer in this process, with a
request deadline short enough for a test.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from extauthz.admin import AdminServer
from tests.conftest import SigningKey, claims
from tests.integration.serverproc import ExtauthzProcess, free_port

HUGE_REQUEST_LINE = b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nhost: admin\r\n\r\n"
MANY_HEADERS = (
    b"GET /healthz HTTP/1.1\r\n"
    + b"".join(b"x-filler-%d: y\r\n" % i for i in range(10_000))
    + b"\r\n"
)
HUGE_HEADER = b"GET /healthz HTTP/1.1\r\nx-big: " + b"b" * 100_000 + b"\r\n\r\n"


def exchange(port: int, request: bytes) -> int | None:
    """Send ``request`` and read the answer: its status, or None if the server closed (or reset)
    the connection without one. A refusal may come, and the connection close, before the whole
    request is sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            raise  # the server neither answered nor closed: that is a failure
        except OSError:  # reset, broken pipe, not connected: closed on us mid-request
            return None
    if not answer:
        return None
    return int(answer.split(b" ", 2)[1])


def healthz(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        return int(response.status)


REFUSING_JWKS = f"http://127.0.0.1:{free_port()}/jwks"  # nothing listens there


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExtauthzProcess]:
    config: dict[str, Any] = {
        "deployments": [{
            "name": "orders", "pathPrefix": "/orders",
            # timeoutSeconds 1: the warm start gives the refusing IdP 1 s before serving anyway.
            "authentication": {"type": "TOKEN_AUTHENTICATION", "validationPolicy": {
                "type": "REMOTE_JWKS", "uri": REFUSING_JWKS, "timeoutSeconds": 1}},
        }]
    }  # fmt: skip
    with ExtauthzProcess(config, tmp_path_factory.mktemp("admin"), separate_stderr=True) as proc:
        yield proc


@pytest.mark.parametrize(
    ("request_bytes", "statuses"),
    [
        (HUGE_REQUEST_LINE, {400}),
        (MANY_HEADERS, {431}),
        (HUGE_HEADER, {431}),
        (b"HELLO\r\n\r\n", {400}),
        (b"GET /healthz\r\n\r\n", {400}),  # no HTTP version
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200) + b"\r\n\r\n", {400}),  # TLS
    ],
    ids=[
        "100KB-request-line",
        "10000-header-lines",
        "100KB-header",
        "garbage",
        "no-version",
        "tls",
    ],
)
def test_a_hostile_request_gets_a_4xx_or_a_close_and_no_traceback(
    server: ExtauthzProcess, request_bytes: bytes, statuses: set[int]
) -> None:
    status = exchange(server.admin_port, request_bytes)
    assert status is None or status in statuses
    assert healthz(server.admin_port) == 200  # still answering, after the handler has finished
    assert server.stderr() == ""
    assert all(line.startswith("{") for line in server.text().splitlines()), server.text()


def test_a_normal_request_still_gets_its_answer(server: ExtauthzProcess) -> None:
    request = b"GET /healthz?probe=1 HTTP/1.1\r\nhost: admin\r\nuser-agent: kubelet\r\n\r\n"
    assert exchange(server.admin_port, request) == 200
    assert exchange(server.admin_port, b"POST /healthz HTTP/1.1\r\n\r\n") == 405
    assert exchange(server.admin_port, b"GET /nope HTTP/1.0\n\n") == 404  # bare LF is accepted
    assert server.stderr() == ""


def test_a_slow_request_is_cut_off_without_an_answer() -> None:
    """A client that sends half a request head and then nothing is disconnected once the request
    deadline passes; nothing reaches the loop's exception handler."""
    port = free_port()
    unhandled: list[dict[str, Any]] = []

    async def run() -> tuple[bytes, bytes]:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: unhandled.append(ctx))
        admin = AdminServer(CollectorRegistry(), lambda: (True, {}), request_seconds=0.2)
        await admin.start("127.0.0.1", port)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: adm")  # ...and then nothing
            await writer.drain()
            async with asyncio.timeout(10):  # a deadline for the test, not a synchronisation
                cut_off = await reader.read()  # b"" once the server closes
            writer.close()
            await writer.wait_closed()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
            async with asyncio.timeout(10):
                answer = await reader.read()
            writer.close()
            await writer.wait_closed()
            return cut_off, answer
        finally:
            await admin.stop()

    cut_off, answer = asyncio.run(run())
    assert cut_off == b""
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"status": "ok"}
    assert unhandled == []


def readyz_providers(server: ExtauthzProcess) -> list[dict[str, Any]]:
    status, body = server.admin("readyz")
    assert status == 200
    ready = json.loads(body)
    assert ready["ready"] is True
    return list(ready["providers"])


def test_readyz_shows_each_endpoints_last_error_what_when_and_why(
    server: ExtauthzProcess, rsa_key: SigningKey
) -> None:
    """Before any check the JWKS endpoint is listed with the warm start's refused calls as its
    lastError (the server serves anyway once the warm-start budget has passed, its breaker
    closed); after a check's refused call (and its retry) lastError says what (the log line's
    message), when (RFC 3339) and how (the metric's outcome, and a detail when there is one)."""
    (before,) = readyz_providers(server)
    warm_start_error = before.pop("lastError")
    assert before == {"endpoint": "jwks_uri", "uri": REFUSING_JWKS, "breaker": "closed", "lastSuccess": None}
    assert warm_start_error["outcome"] == "connection_refused"
    checked = server.check(rsa_key.sign(claims()), path="/orders/1")
    assert not checked.allowed
    (after,) = readyz_providers(server)
    error = after["lastError"]
    assert error["at"] >= warm_start_error["at"]  # the check's call, not the warm start's
    assert error.keys() == {"message", "at", "outcome", "detail"}
    assert error["message"] == server.line(checked.request_id, "authentication.idpCallFailed")["message"]
    assert error["message"].endswith(", CONNECTION_REFUSED. Make sure that the URI is accessible "
                                     "from the network of the authorization service.")
    assert (error["outcome"], error["detail"]) == ("connection_refused", None)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z", error["at"]), error
    assert after["breaker"] == "closed" and after["lastSuccess"] is None


def test_the_server_log_has_only_json_lines(server: ExtauthzProcess) -> None:
    """After every test above, stdout is still one JSON object per line and stderr is empty."""
    assert server.stderr() == ""
    for line in server.text().splitlines():
        assert isinstance(json.loads(line), dict)
