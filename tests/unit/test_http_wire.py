"""The HTTP wire in-process, on a real loopback socket: the same decisions as the gRPC wire,
byte for byte where Envoy passes them to the client, and a listener no request can break.

Each test starts :func:`extauthz.http_wire.serve_http` and the gRPC servicer over one
:class:`~extauthz.serving.Serving`, sends raw HTTP/1.1 bytes and reads raw bytes back.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from extauthz import http_wire
from extauthz.answers import AnswerCache
from extauthz.config import Config, parse_config
from extauthz.http_wire import HttpWire, serve_http
from extauthz.logs import JsonLogger
from extauthz.metrics import Metrics
from extauthz.server import AuthorizationService
from extauthz.serving import Serving
from tests.check_requests import ServicerContext, check_request
from tests.conftest import AUDIENCE, ISSUER, SigningKey, claims
from tests.fake_idp import FakeIdp
from tests.policies import GET_ORDER, LIST_ORDERS, orders

HOST = "api.example.com"


def config_for(key: SigningKey) -> Config:
    static = {"type": "STATIC_KEYS", "keys": [key.public_jwk],
              "additionalValidationPolicy": {"issuers": [ISSUER], "audiences": [AUDIENCE]}}  # fmt: skip
    return parse_config({"server": {"exposeDetailedErrors": True}, "deployments": [
        orders(static, routes=[GET_ORDER, LIST_ORDERS], headersFromClaims={"x-auth-subject": "sub", "x-auth-tenant": "tenant"}),
        orders(static, name="named", pathPrefix="/named"),
    ]})  # fmt: skip


class Wires:
    """Both wires over one Serving, the HTTP one listening on loopback; its log."""

    def __init__(self, config: Config) -> None:
        self.out = io.StringIO()
        self.metrics = Metrics()
        engine = FakeIdp().engine(config)
        self.serving = Serving(AnswerCache(engine), JsonLogger(stream=self.out), self.metrics)
        self.grpc = AuthorizationService(self.serving, self.serving.log, self.metrics)
        self.port = 0

    async def send(self, raw: bytes, *, answers: int = 1) -> list[bytes]:
        """Write ``raw`` on one connection; the ``answers`` responses that come back."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(raw)
        await writer.drain()
        responses = [await read_response(reader) for _ in range(answers)]
        writer.close()
        return responses

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.getvalue().splitlines()]


async def read_response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    body = await asyncio.wait_for(reader.readexactly(length), 5) if length else b""
    return head + body


def run(config: Config, test: Callable[[Wires], Awaitable[None]]) -> Wires:
    wires = Wires(config)

    async def main() -> None:
        server = await serve_http(HttpWire(wires.serving), "127.0.0.1", 0)
        wires.port = server.sockets[0].getsockname()[1]
        try:
            await test(wires)
        finally:
            server.close()

    asyncio.run(main())
    return wires


def http_request(path: str, headers: dict[str, str], method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {HOST}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parsed(response: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = [(k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in header_lines)]
    return int(status_line.split()[1]), headers, body


def cases(key: SigningKey) -> list[tuple[str, dict[str, str]]]:
    good = key.sign(claims())
    return [
        ("/orders/42", {"authorization": f"Bearer {good}", "x-request-id": "r-allow", "x-auth-subject": "forged"}),
        ("/orders/42", {"x-request-id": "r-missing"}),
        ("/orders/42", {"authorization": "Token abc", "x-request-id": "r-scheme"}),
        ("/orders/42", {"authorization": "Bearer not.a.jwt", "x-request-id": "r-malformed"}),
        ("/orders/42", {"authorization": f"Bearer {key.sign(claims(exp=1))}", "x-request-id": "r-expired"}),
        ("/orders/42", {"authorization": f"Bearer {key.sign(claims(scope='other'))}", "x-request-id": "r-scope"}),
        ("/elsewhere", {"authorization": f"Bearer {good}", "x-request-id": "r-nopolicy"}),
        ("/orders/../admin", {"authorization": f"Bearer {good}", "x-request-id": "r-ambiguous"}),
        ("/whatever/7", {"authorization": f"Bearer {good}", "x-request-id": "r-named", "x-extauthz-deployment": "named"}),
    ]


def test_every_decision_is_the_grpc_wire_s_byte_for_byte(rsa_key: SigningKey) -> None:
    config = config_for(rsa_key)
    seen: list[tuple[Any, Any]] = []

    async def test(wires: Wires) -> None:
        for path, headers in cases(rsa_key):
            (raw,) = await wires.send(http_request(path, headers))
            ext_headers = {k: v for k, v in headers.items() if not k.startswith("x-extauthz-")}
            extensions = {"deployment": headers["x-extauthz-deployment"]} if "x-extauthz-deployment" in headers else None
            grpc = await wires.grpc.Check(check_request(path, host=HOST, headers=ext_headers, context_extensions=extensions), ServicerContext())
            seen.append((parsed(raw), grpc))

    wires = run(config, test)
    for (status, headers, body), grpc in seen:
        if grpc.status.code == 0:
            assert status == 200 and body == b""
            wanted = [(h.header.key, h.header.value) for h in grpc.ok_response.headers]
            assert [(k, v) for k, v in headers if k.startswith("x-auth-")] == wanted
            removed = dict(headers).get("x-envoy-auth-headers-to-remove")
            assert removed == (", ".join(grpc.ok_response.headers_to_remove) or None)
        else:
            denied = grpc.denied_response
            assert status == denied.status.code
            assert [(k, v) for k, v in headers if k != "content-length"] == [(h.header.key, h.header.value) for h in denied.headers]
            assert body.decode() == denied.body
    reasons = [json.loads(body)["reason"] if body else "allow" for (_, _, body), _ in seen]
    assert reasons == ["allow", "token_missing", "token_missing", "token_malformed", "token_expired",
                       "insufficient_scope", "no_matching_policy", "request_ambiguous", "allow"]  # fmt: skip
    access = [line for line in wires.lines() if line["event"] == "access"]
    assert len(access) == 2 * len(seen) and {a["requestId"] for a in access} >= {"r-allow", "r-named"}
    wires.metrics.flush()
    per_wire = {w: wires.metrics.registry.get_sample_value(
        "extauthz_checks_total", {"deployment": "orders", "decision": "allow", "reason": "none", "wire": w}) for w in ("grpc", "http")}
    assert per_wire == {"grpc": 1, "http": 1}


def test_a_remembered_allow_and_pipelined_requests_answer_in_order(rsa_key: SigningKey) -> None:
    token = rsa_key.sign(claims())

    async def test(wires: Wires) -> None:
        batch = b"".join(
            http_request("/orders/42", {"authorization": f"Bearer {token}" if i % 2 == 0 else "Basic x", "x-request-id": f"p-{i}"})
            for i in range(6)
        )
        responses = await wires.send(batch, answers=6)
        assert [parsed(r)[0] for r in responses] == [200, 401, 200, 401, 200, 401]
        assert [dict(parsed(r)[1]).get("x-request-id") for r in responses[1::2]] == ["p-1", "p-3", "p-5"]

    wires = run(config_for(rsa_key), test)
    access = [line["requestId"] for line in wires.lines() if line["event"] == "access"]
    assert access == [f"p-{i}" for i in range(6)]


def test_a_head_request_gets_the_denial_without_its_body(rsa_key: SigningKey) -> None:
    async def test(wires: Wires) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", wires.port)
        writer.write(http_request("/orders/42", {"x-request-id": "h-1"}, method="HEAD"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status, headers, _ = parsed(head)
        assert status == 403 and int(dict(headers)["content-length"]) > 0  # GET-only route: no policy
        writer.write(http_request("/orders/42", {"x-request-id": "h-2"}))  # the next request
        assert parsed(await read_response(reader))[0] == 401  # still framed right
        writer.close()

    run(config_for(rsa_key), test)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET /orders/1 HTTP/1.1\r\nhost: h\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(300)) + b"\r\n", 431),
        (b"GET /orders/1 HTTP/1.1\r\nhost: h\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
        (b"POST /orders/1 HTTP/1.1\r\nhost: h\r\ncontent-length: 2000000\r\n\r\n" + b"a" * 1_100_000, 413),
    ],
)
def test_a_request_that_cannot_be_read_is_refused_and_the_listener_stays_up(
    rsa_key: SigningKey, raw: bytes, status: int
) -> None:
    async def test(wires: Wires) -> None:
        (response,) = await wires.send(raw)
        assert parsed(response)[0] == status
        (after,) = await wires.send(http_request("/orders/42", {"x-request-id": "after"}))
        assert parsed(after)[0] == 401  # the next connection is served

    wires = run(config_for(rsa_key), test)
    (bad,) = [line for line in wires.lines() if line["event"] == "http.badRequest"]
    assert bad["status"] == status and "aaaa" not in json.dumps(bad)


def test_a_client_sending_one_byte_at_a_time_is_cut_off(rsa_key: SigningKey, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_wire, "HEAD_SECONDS", 0.3)

    async def test(wires: Wires) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", wires.port)
        request = http_request("/orders/42", {"x-request-id": "slow"})
        others = asyncio.ensure_future(wires.send(http_request("/orders/42", {"x-request-id": "other"})))
        for byte in request[:4]:  # a few bytes at the slow client's own pace, then nothing more
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)
        assert parsed((await others)[0])[0] == 401  # others are not held up
        response = await asyncio.wait_for(reader.read(), 5)
        assert response.startswith(b"HTTP/1.1 408")
        writer.close()

    run(config_for(rsa_key), test)


@pytest.mark.parametrize(("idle", "head"), [(0.3, 10.0), (0.6, 0.3)])
def test_each_deadline_holds_whichever_is_armed_last(
    rsa_key: SigningKey, monkeypatch: pytest.MonkeyPatch, idle: float, head: float
) -> None:
    """The connection's one timer moves lazily: an idle connection is closed IDLE_SECONDS after
    its last answer, and a slow request gets 408 HEAD_SECONDS after its first byte, whichever of
    the two is the shorter."""
    monkeypatch.setattr(http_wire, "IDLE_SECONDS", idle)
    monkeypatch.setattr(http_wire, "HEAD_SECONDS", head)

    async def test(wires: Wires) -> None:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", wires.port)
        for rid in ("first", "second"):  # answered, then idle
            writer.write(http_request("/orders/42", {"x-request-id": rid}))
            assert parsed(await read_response(reader))[0] == 401
        answered = loop.time()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed for idleness
        assert idle - 0.1 <= loop.time() - answered <= idle + 1.0
        writer.close()
        if head > 1:
            return  # a slow request's 408 would take HEAD_SECONDS
        reader, writer = await asyncio.open_connection("127.0.0.1", wires.port)
        writer.write(b"GET /orders/42 HTTP/1.1\r\n")  # and nothing more
        began = loop.time()
        response = await asyncio.wait_for(reader.read(), 5)
        assert response.startswith(b"HTTP/1.1 408")
        assert head - 0.1 <= loop.time() - began <= head + 1.0
        writer.close()

    run(config_for(rsa_key), test)


def test_an_upgrade_request_is_checked_and_the_connection_then_closed(rsa_key: SigningKey) -> None:
    async def test(wires: Wires) -> None:
        raw = http_request("/orders/42", {"x-request-id": "u-1", "upgrade": "websocket", "connection": "upgrade"})
        reader, writer = await asyncio.open_connection("127.0.0.1", wires.port)
        writer.write(raw + b"garbage after the upgrade")
        assert parsed(await read_response(reader))[0] == 401
        assert await asyncio.wait_for(reader.read(), 5) == b""  # then closed
        writer.close()

    run(config_for(rsa_key), test)
