"""RFC 7662 token introspection, with a bounded cache keyed by the token's SHA-256.

* A positive answer is cached until the earlier of the token's ``exp`` and
  ``maxCacheDurationInHours``; an inactive answer for a few seconds (a revoked token stays revoked,
  but a token that was not yet known to a replica should not be refused for long).
* Entries are keyed by SHA-256 of the token, never the token, and the cache is an LRU with a hard
  ceiling on entries. Each entry is the claims as compact JSON: a (float, bytes) entry holds no
  object the garbage collector must visit, so a full cache does not lengthen its pauses, and it
  takes about a quarter of the memory of the parsed dict (510 against 1,947 bytes for an answer
  of 10 claims).
* Concurrent checks of the same new token share one IdP call.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote_plus

from ..bounded import BoundedCache
from ..config import ClientDetails
from ..errors import IdpBadResponse
from .http import IdpEndpoint, IdpObserver, IdpResponse, NullObserver

__all__ = ["ClientSecret", "IntrospectionClient"]

NEGATIVE_TTL_SECONDS = 10.0
MAX_ENTRIES = 20_000
# An answer's claims as compact JSON; a larger answer (an IdP that puts a whole profile in it) is
# used for its check and not kept, so the cache holds at most 20,000 x 16 KiB.
MAX_ENTRY_BYTES = 16 * 1024

_INACTIVE_ENTRY = b""  # cached for an inactive token
_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class ClientSecret:
    """A client secret that cannot be printed by accident."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "ClientSecret(***)"

    __str__ = __repr__


class IntrospectionClient:
    def __init__(
        self,
        endpoint: Callable[[], Awaitable[IdpEndpoint]],
        client: ClientDetails,
        secret: ClientSecret,
        *,
        max_cache_seconds: float,
        observer: IdpObserver | None = None,
        clock: Callable[[], float] = time.time,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self._endpoint = endpoint
        self._client = client
        self._secret = secret
        # client_secret_basic: the Authorization header, built once. RFC 6749 §2.3.1: both parts
        # are form-urlencoded before Basic encoding.
        self._basic: ClientSecret | None = None
        if client.auth_method != "client_secret_post":
            pair = f"{quote_plus(client.client_id)}:{quote_plus(secret.reveal())}"
            self._basic = ClientSecret("Basic " + base64.b64encode(pair.encode()).decode("ascii"))
        self._max_cache_seconds = max_cache_seconds
        self._observer = observer or NullObserver()
        self._clock = clock
        # SHA-256 of the token → (expires at, the claims as compact JSON or _INACTIVE_ENTRY). An
        # answer larger than MAX_ENTRY_BYTES is used once and not kept.
        self._cache: BoundedCache[bytes, tuple[float, bytes]] = BoundedCache(
            max_entries, MAX_ENTRY_BYTES, lru=True
        )
        self._inflight: dict[bytes, asyncio.Future[dict[str, Any] | None]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    async def introspect(self, token: str) -> dict[str, Any] | None:
        """The claims of an active token, None for an inactive one; raises IdpError."""
        key = hashlib.sha256(token.encode()).digest()
        hit = self._cache.get(key)
        if hit is not None:
            expires_at, entry = hit
            if self._clock() < expires_at:
                self._observer.cache("introspection", "hit")
                if entry == _INACTIVE_ENTRY:
                    return None
                claims: dict[str, Any] = json.loads(entry)
                return claims
            self._cache.discard(key)
        self._observer.cache("introspection", "miss")
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._fetch(key, token))
            self._inflight[key] = future
            future.add_done_callback(lambda _f: self._inflight.pop(key, None))
        return await asyncio.shield(future)

    def cached_until(self, token: str) -> float:
        """When the cached answer for ``token`` expires (wall clock); 0 when none is cached."""
        hit = self._cache.get(hashlib.sha256(token.encode()).digest())
        return hit[0] if hit is not None else 0.0

    async def _fetch(self, key: bytes, token: str) -> dict[str, Any] | None:
        endpoint = await self._endpoint()
        form = {"token": token, "token_type_hint": "access_token"}
        headers: dict[str, str] | None = None
        if self._basic is None:  # client_secret_post
            form.update(client_id=self._client.client_id, client_secret=self._secret.reveal())
        else:
            headers = {"authorization": self._basic.reveal()}

        def answer(resp: IdpResponse) -> dict[str, Any]:
            body = resp.data
            if not isinstance(body, dict) or not isinstance(body.get("active"), bool):
                # RFC 7662 §2.2: `active` is REQUIRED and a boolean; "yes" or 1 is not an answer.
                raise IdpBadResponse(endpoint.name, endpoint.uri, "no boolean 'active'")
            return body

        body = await endpoint.fetch(answer, method="POST", data=form, headers=headers)
        now = self._clock()
        if body["active"] is not True:
            self._store(key, now + NEGATIVE_TTL_SECONDS, _INACTIVE_ENTRY)
            return None
        claims = {k: v for k, v in body.items() if k != "active"}
        expires_at = now + self._max_cache_seconds
        exp = claims.get("exp")
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            expires_at = min(expires_at, float(exp))
        if expires_at > now:
            self._store(key, expires_at, _compact(claims).encode())
        return claims

    def _store(self, key: bytes, expires_at: float, entry: bytes) -> None:
        self._cache.put(key, (expires_at, entry), len(entry))
