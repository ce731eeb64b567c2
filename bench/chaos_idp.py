"""The IdP of the chaos scenarios: bench/idp.py's IdP, plus what the scenarios need to break it.

    python -m bench.chaos_idp --port P --jwks FILE [--jwks-max-age 30]

It is :class:`bench.idp.Idp` (same HTTP/1.1 keep-alive handling, same ``/_bench/stats``) with:

* ``POST /_chaos/jwks`` (body: a JWKS): publish these keys from now on (key rotation);
* ``GET /_chaos/slow?ms=X``: answer ``/jwks`` and ``/introspect`` only after X ms (a slow IdP);
* ``GET /_chaos/stats``: calls, every JWKS fetch with its time and the kids it served, and the
  connections open now and at most;
* ``POST /introspect`` answers ``active: true`` only for tokens this IdP "issued": an opaque token
  ``op-<nonce>-<mac>`` whose mac is the HMAC-SHA256 of the nonce under the secret in the
  environment variable ``CHAOS_IDP_TOKEN_SECRET`` (:func:`opaque_token`). Anything else is
  ``active: false``. The harness mints tokens with the same secret, so it knows independently
  which opaque tokens are valid.

The process is killed (SIGKILL) and restarted on the same port by scenario 2: the JWKS it serves
comes from the file each time it starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from bench.idp import Idp, active_answer, parser, read_jwks, serve_until_signalled

SECRET_ENV = "CHAOS_IDP_TOKEN_SECRET"
_MAC_HEX = 24


def _mac(secret: bytes, nonce: str) -> str:
    return hmac.new(secret, nonce.encode(), hashlib.sha256).hexdigest()[:_MAC_HEX]


def opaque_token(secret: bytes, nonce: str | None = None) -> str:
    """An opaque token the chaos IdP introspects as active."""
    nonce = nonce or secrets.token_hex(12)
    return f"op-{nonce}-{_mac(secret, nonce)}"


def forged_opaque_token() -> str:
    """Same shape as :func:`opaque_token`, but no secret behind it: inactive at the IdP."""
    return f"op-{secrets.token_hex(12)}-{secrets.token_hex(_MAC_HEX // 2)}"


def is_issued(secret: bytes, token: str) -> bool:
    parts = token.split("-")
    if len(parts) != 3 or parts[0] != "op":
        return False
    return hmac.compare_digest(parts[2], _mac(secret, parts[1]))


def kids(jwks: dict[str, Any]) -> list[str]:
    return [str(k.get("kid")) for k in jwks.get("keys", [])]


class ChaosIdp(Idp):
    def __init__(self, jwks: dict[str, Any], secret: bytes, jwks_max_age: int) -> None:
        super().__init__(jwks, latency_ms=0.0, jwks_max_age=jwks_max_age)
        self.secret = secret
        self.current_kids = kids(jwks)
        self.slow = 0.0
        self.fetches: list[tuple[float, list[str]]] = []
        self.open_connections = 0
        self.max_open_connections = 0
        self.active_answers = 0

    def chaos_stats(self) -> dict[str, Any]:
        return {
            **self.stats(),
            "active": self.active_answers,
            "jwks_fetches": self.fetches,
            "kids": self.current_kids,
            "slow_ms": self.slow * 1000,
            "open_connections": self.open_connections,
            "max_open_connections": self.max_open_connections,
        }

    async def route(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes, str]:
        url = urlsplit(target)
        path = url.path
        if path == "/_chaos/jwks" and method == "POST":
            jwks = json.loads(body)
            self.jwks_body = json.dumps(jwks).encode()
            self.current_kids = kids(jwks)
            return 200, json.dumps({"kids": self.current_kids}).encode(), ""
        if path == "/_chaos/slow":
            self.slow = float(parse_qs(url.query).get("ms", ["0"])[0]) / 1000.0
            return 200, json.dumps({"slow_ms": self.slow * 1000}).encode(), ""
        if path == "/_chaos/stats":
            return 200, json.dumps(self.chaos_stats()).encode(), ""
        if path in ("/jwks", "/introspect") and self.slow > 0:
            await asyncio.sleep(self.slow)
        return await super().route(method, target, headers, body)

    def serve_jwks(self) -> tuple[int, bytes, str]:
        self.fetches.append((time.time(), self.current_kids))
        return super().serve_jwks()

    def introspection_answer(self, token: str) -> dict[str, Any] | None:
        if not is_issued(self.secret, token):
            return None
        self.active_answers += 1
        return active_answer("opaque-" + token[3:15])

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        self.max_open_connections = max(self.max_open_connections, self.open_connections)
        try:
            await super().handle(reader, writer)
        finally:
            self.open_connections -= 1


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--jwks-max-age", type=int, default=30, help="Cache-Control max-age of /jwks")
    args = p.parse_args()
    secret = os.environ.get(SECRET_ENV, "").encode()
    if not secret:
        raise SystemExit(f"{SECRET_ENV} is not set")
    idp = ChaosIdp(read_jwks(args.jwks), secret, args.jwks_max_age)
    asyncio.run(serve_until_signalled(idp.handle, args.port))


if __name__ == "__main__":
    main()
