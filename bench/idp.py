"""A small, fast identity provider for the bench: a JWKS and an RFC 7662 introspection endpoint.

    python -m bench.idp --port P --jwks FILE [--latency-ms 5]

* ``GET /jwks``: the JWKS from FILE (``cache-control: max-age=3600``).
* ``POST /introspect``: ``{"active": true, ...}`` for any token (claims that every bench policy
  accepts), after ``--latency-ms``; a request without client credentials gets 401.
* ``GET /_bench/stats``: ``{"jwks": n, "introspect": n, "distinct": n}``, the calls so far and how
  many distinct tokens were introspected ("IdP calls" in the report).
* ``GET /_bench/latency?ms=X``: change the introspection latency while running.

Plain asyncio streams with HTTP/1.1 keep-alive: the IdP must cost little next to what it measures,
and the only client is extauthz's httpx pool.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from bench.keys import AUDIENCE, CLIENT_ID, ISSUER, SCOPE


def active_answer(sub: str) -> dict[str, Any]:
    """An ``active: true`` introspection answer with claims every bench policy accepts."""
    now = int(time.time())
    return {
        "active": True,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "scope": SCOPE,
        "client_id": CLIENT_ID,
        "sub": sub,
        "token_type": "Bearer",
        "iat": now,
        "exp": now + 3600,
    }


class Idp:
    """The routes; :class:`bench.chaos_idp.ChaosIdp` overrides :meth:`serve_jwks` and
    :meth:`introspection_answer`."""

    def __init__(self, jwks: dict[str, Any], latency_ms: float, jwks_max_age: int = 3600) -> None:
        self.jwks_body = json.dumps(jwks).encode()
        self.jwks_max_age = jwks_max_age
        self.latency = latency_ms / 1000.0
        self.calls = {"jwks": 0, "introspect": 0}
        self.tokens: set[str] = set()

    def stats(self) -> dict[str, int]:
        return {**self.calls, "distinct": len(self.tokens)}

    async def route(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes, str]:
        url = urlsplit(target)
        if url.path == "/jwks" and method == "GET":
            return self.serve_jwks()
        if url.path == "/introspect" and method == "POST":
            return await self.introspect(headers, body)
        if url.path == "/_bench/stats":
            return 200, json.dumps(self.stats()).encode(), ""
        if url.path == "/_bench/latency":
            ms = float(parse_qs(url.query).get("ms", ["0"])[0])
            self.latency = ms / 1000.0
            return 200, json.dumps({"latency_ms": ms}).encode(), ""
        if url.path == "/healthz":
            return 200, b'{"status":"ok"}', ""
        return 404, b'{"error":"not_found"}', ""

    def serve_jwks(self) -> tuple[int, bytes, str]:
        self.calls["jwks"] += 1
        return 200, self.jwks_body, f"cache-control: max-age={self.jwks_max_age}\r\n"

    async def introspect(self, headers: dict[str, str], body: bytes) -> tuple[int, bytes, str]:
        self.calls["introspect"] += 1
        form = parse_qs(body.decode("latin-1"))
        token = form.get("token", [""])[0]
        self.tokens.add(token)
        if "authorization" not in headers and "client_secret" not in form:
            return 401, b'{"error":"invalid_client"}', ""
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        answer = self.introspection_answer(token)
        if answer is None:
            return 200, b'{"active":false}', ""
        return 200, json.dumps(answer).encode(), ""

    def introspection_answer(self, token: str) -> dict[str, Any] | None:
        """The answer to an authenticated introspection of ``token``; None: inactive. Here every
        token is active."""
        return active_answer("opaque-" + token[-12:])

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                parts = request_line.decode("latin-1").split()
                if len(parts) < 2:
                    return
                headers: dict[str, str] = {}
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                body = await reader.readexactly(length) if length else b""
                status, payload, extra = await self.route(parts[0], parts[1], headers, body)
                close = headers.get("connection", "").lower() == "close"
                writer.write(
                    (
                        f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                        f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n"
                        f"{extra}{'connection: close' if close else 'connection: keep-alive'}"
                        "\r\n\r\n"
                    ).encode()
                    + payload
                )
                await writer.drain()
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()


async def serve_until_signalled(handle: Any, port: int) -> None:
    """Serve ``handle`` (an asyncio stream handler) on 127.0.0.1:port until SIGTERM or SIGINT."""
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def parser(doc: str) -> argparse.ArgumentParser:
    """The command line every bench IdP takes: ``--port`` and ``--jwks`` (served at start)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--jwks", required=True, help="JWKS JSON file served at start")
    return p


def read_jwks(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        jwks: dict[str, Any] = json.load(f)
    return jwks


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--latency-ms", type=float, default=5.0, help="introspection answer delay")
    args = p.parse_args()
    idp = Idp(read_jwks(args.jwks), args.latency_ms)
    asyncio.run(serve_until_signalled(idp.handle, args.port))


if __name__ == "__main__":
    main()
