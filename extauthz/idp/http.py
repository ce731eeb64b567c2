"""The one place that talks HTTP to identity providers and translates httpx errors.

Every IdP request goes through :func:`fetch_json` on an injected ``httpx.AsyncClient``, so tests
can pass ``httpx.MockTransport`` and production gets one pooled client per TLS setting.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import certifi
import httpx

from ..errors import IdpBadResponse, IdpBadStatus, IdpUnreachable

__all__ = ["IdpResponse", "TlsSettings", "fetch_json", "idp_call_counter", "make_client"]

MAX_BODY_BYTES = 1024 * 1024  # a JWKS, discovery document or introspection answer is small

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


def make_client(tls: TlsSettings, max_connections: int = 32) -> httpx.AsyncClient:
    """A pooled client. ``caFile`` adds trust on top of the public roots; it does not replace them."""
    verify: ssl.SSLContext | bool
    if not tls.verify:
        verify = False
    else:
        verify = ssl.create_default_context(cafile=certifi.where())
        if tls.ca_file:
            verify.load_verify_locations(cafile=tls.ca_file)
    return httpx.AsyncClient(
        verify=verify,
        follow_redirects=False,
        trust_env=False,
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        headers={"accept": "application/json", "user-agent": "extauthz"},
    )


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
        if "Name or service not known" in text or "nodename nor servname" in text or (
            "Temporary failure in name resolution" in text
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


def _count_call() -> None:
    counter = idp_call_counter.get()
    if counter is not None:
        counter[0] += 1


async def fetch_json(
    client: httpx.AsyncClient,
    endpoint: str,
    uri: str,
    *,
    timeout: float,
    method: str = "GET",
    data: Mapping[str, str] | None = None,
    auth: httpx.Auth | None = None,
) -> IdpResponse:
    """Call an IdP endpoint and return its JSON, or raise an :class:`~extauthz.errors.IdpError`."""
    _count_call()
    try:
        async with client.stream(
            method,
            uri,
            data=data,
            auth=auth if auth is not None else httpx.USE_CLIENT_DEFAULT,
            timeout=httpx.Timeout(timeout),
        ) as resp:
            if not 200 <= resp.status_code < 300:
                try:
                    phrase = HTTPStatus(resp.status_code).phrase
                except ValueError:
                    phrase = resp.reason_phrase or "Unknown"
                raise IdpBadStatus(endpoint, uri, resp.status_code, phrase)
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise IdpBadResponse(endpoint, uri, "response larger than 1 MiB")
            max_age = _max_age(resp.headers)
    except httpx.TimeoutException as exc:
        raise IdpUnreachable(endpoint, uri, "TIMEOUT") from exc
    except httpx.ConnectError as exc:
        raise IdpUnreachable(endpoint, uri, _unreachable_kind(exc)) from exc
    except httpx.TransportError as exc:
        # Connected, then the peer closed or spoke something that is not HTTP.
        raise IdpBadResponse(endpoint, uri, type(exc).__name__) from exc
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IdpBadResponse(endpoint, uri, "not JSON") from exc
    return IdpResponse(parsed, max_age)
