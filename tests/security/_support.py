"""What the security tests share: raw JWS building, the engine on the in-process IdP
(``tests/fake_idp.py``), an attacker web server and the real server process.

Tokens here are built byte by byte (``sign_raw``) rather than with pyjwt's encoder, so that a test
can put exactly the bytes an attacker would send on the wire: duplicate JSON members, padding,
UTF-16, a JSON array as payload, a header the encoder would refuse to write.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.server
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from jwt.algorithms import get_default_algorithms

from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from extauthz.config import Config
from extauthz.decision import Decision
from extauthz.engine import CheckInput, Engine
from extauthz.idp import Providers
from tests.check_requests import check_input, check_request
from tests.conftest import AUDIENCE, ISSUER
from tests.fake_idp import JWKS, FakeIdp
from tests.integration.serverproc import ExtauthzProcess
from tests.policies import GET_ORDER, orders

ROOT = Path(__file__).resolve().parents[2]
JWKS_URI = JWKS
T = TypeVar("T")

# Every status a CheckResponse may carry (docs/decisions.md): OK, UNAUTHENTICATED, PERMISSION_DENIED,
# UNAVAILABLE. INTERNAL (13) is extauthz's own fail-closed bug path and must never show up here.
DECISION_GRPC_CODES = frozenset({0, 3, 16, 7, 14})
DENIAL_HTTP_STATUSES = frozenset({400, 401, 403, 500, 503})


# -- JWS bytes ------------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def jbytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


_ALGORITHMS = get_default_algorithms()


def signature(alg: str, key: Any, signing_input: bytes) -> bytes:
    """A signature made with ``key`` (a private key object, or bytes for HMAC)."""
    if alg.startswith("HS"):
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
        return hmac.new(key, signing_input, digest).digest()
    return bytes(_ALGORITHMS[alg].sign(signing_input, key))


def sign_raw(header: bytes | str, payload: bytes | str, key: Any, alg: str) -> str:
    """A compact JWS over exactly these header and payload segments.

    ``bytes`` are base64url-encoded; a ``str`` is used as the segment as is (for padding and
    alphabet tricks, the signature then covers the odd segment, as an issuer that emits it would)."""
    h = header if isinstance(header, str) else b64url(header)
    p = payload if isinstance(payload, str) else b64url(payload)
    return f"{h}.{p}.{b64url(signature(alg, key, f'{h}.{p}'.encode()))}"


def sign_json(header: dict[str, Any], payload: Any, key: Any, alg: str | None = None) -> str:
    return sign_raw(jbytes(header), jbytes(payload), key, alg or str(header["alg"]))


def split(token: str) -> tuple[str, str, str]:
    h, p, s = token.split(".")
    return h, p, s


# -- the IdP side ---------------------------------------------------------------------------------


def build_engine(config: Config, idp: FakeIdp) -> tuple[Engine, Providers]:
    providers = idp.providers(config)
    return Engine(config, providers.by_deployment), providers


def run_check(engine: Engine, providers: Providers, req: CheckInput) -> Decision:
    async def once() -> Decision:
        try:
            return await engine.check(req)
        finally:
            await providers.aclose()

    return asyncio.run(once())


class AttackerServer:
    """A web server on loopback standing in for attacker.example: any hit means a URL taken from a
    token was fetched."""

    def __init__(self) -> None:
        hits = self.hits = []  # type: list[str]

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                hits.append(f"{self.command} {self.path}")
                body = b'{"keys": []}'
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _any  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> AttackerServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


# -- policy ---------------------------------------------------------------------------------------


def validation(source: dict[str, Any]) -> dict[str, Any]:
    return {
        **source,
        "additionalValidationPolicy": {
            "issuers": [ISSUER],
            "audiences": [AUDIENCE],
            "verifyClaims": [{"key": "tenant", "values": ["acme"], "isRequired": True}],
        },
    }


def corpus_config(source: dict[str, Any]) -> dict[str, Any]:
    """``orders`` reads the Authorization header, ``query`` reads ``?access_token=``; both check
    iss, aud, tenant and (on /{id}) the orders.read scope."""
    return {
        "deployments": [
            orders(validation(source), routes=[GET_ORDER], headersFromClaims={"x-auth-subject": "sub"}),
            orders(
                validation(source),
                authentication={"tokenQueryParam": "access_token"},
                name="query",
                pathPrefix="/q",
                routes=[GET_ORDER],
            ),
        ]
    }


# -- the server as a user runs it -----------------------------------------------------------------


def server_process(
    config: Mapping[str, Any], workdir: Path, env: Mapping[str, str] | None = None
) -> ExtauthzProcess:
    """``python -m extauthz serve`` as this suite runs it: stderr kept apart from the JSON lines
    on stdout, so that a traceback is found wherever it went."""
    return ExtauthzProcess(config, workdir, env=env, separate_stderr=True, grace_seconds=2)


@dataclass(frozen=True)
class Sent:
    """What a client puts in front of Envoy: request headers and the path (query included)."""

    headers: Mapping[str, str]
    path: str = "/orders/42"

    def check_input(self) -> CheckInput:
        return check_input(self.path, headers=self.headers, request_id="attack")

    def check_request(self) -> ext.CheckRequest:
        return check_request(self.path, headers=self.headers, request_id="attack")


def bearer(token: str, path: str = "/orders/42") -> Sent:
    return Sent({"authorization": f"Bearer {token}"}, path)


def scan(haystack: str, needles: Mapping[str, str]) -> list[str]:
    """Names of the needles found in ``haystack``."""
    return [name for name, needle in needles.items() if needle and needle in haystack]
