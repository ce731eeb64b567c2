"""Evicting one token from every cache: ``POST /cache/evict`` on the admin port, ``extauthz
evict``, and the eviction channel every replica of a fleet listens to (docs/cli.md,
docs/metrics.md).

A token is named by its SHA-256 (``tokenSha256``, 64 hex characters), never sent itself. The
replica asked drops the token from its local caches (introspection answers, verified tokens,
remembered answers); with ``server.sharedCache`` it also deletes the token's shared entries and
publishes the eviction, which every replica hears within a second and acts on the same way
(:meth:`~extauthz.shared_cache.SharedCache.subscribe`). Evicting can only ever cost an IdP call:
nothing here can allow a request, and the DPoP ``jti`` records are never evicted.

Each eviction is one ``cache.evicted`` line per replica, with the first 8 hex characters of the
SHA-256 only, and where it came from (``admin``, ``cli``, ``channel``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

from .logs import JsonLogger
from .shared_cache import EVICTED_EVENT, SharedCache

__all__ = ["MAX_EVICT_BODY_BYTES", "EvictRefused", "Evictor", "parse_evict_body", "parse_sha256"]

# {"tokenSha256": "<64 hex>"} is 82 bytes: room for whitespace, not for a token sent by mistake.
MAX_EVICT_BODY_BYTES = 1024
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
# A replica hears its own evictions on the channel too: within this long, not logged twice.
_ECHO_SECONDS = 10.0

# The local caches: drop the token whose SHA-256 is given (every token, for None); how many
# entries were dropped.
DropLocal = Callable[[bytes | None], int]
# The (kind, scope) pairs of the config being served: where its shared entries are.
Scopes = Callable[[], list[tuple[str, str]]]


class EvictRefused(Exception):
    """A request to evict that cannot be read; the message says why, never what was sent."""


def parse_sha256(text: object) -> bytes:
    """The SHA-256 named by 64 hex characters; EvictRefused otherwise."""
    if not isinstance(text, str) or _HEX64.fullmatch(text) is None:
        raise EvictRefused("tokenSha256 must be the token's SHA-256: 64 hex characters")
    return bytes.fromhex(text)


def parse_evict_body(body: bytes) -> bytes:
    """The SHA-256 in ``{"tokenSha256": "<64 hex>"}``; EvictRefused for anything else."""
    if len(body) > MAX_EVICT_BODY_BYTES:
        raise EvictRefused(f"the body is larger than {MAX_EVICT_BODY_BYTES} bytes")
    try:
        data = json.loads(body)
    except ValueError:
        raise EvictRefused('the body must be JSON: {"tokenSha256": "<64 hex>"}') from None
    if not isinstance(data, dict) or set(data) != {"tokenSha256"}:
        raise EvictRefused('the body must be {"tokenSha256": "<64 hex>"} and nothing else')
    return parse_sha256(data["tokenSha256"])


class Evictor:
    """One replica's evictions: asked (:meth:`evict`) or heard on the channel (:meth:`heard`)."""

    def __init__(
        self,
        drop_local: DropLocal,
        shared: SharedCache | None,
        scopes: Scopes,
        logger: JsonLogger,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._drop_local = drop_local
        self._shared = shared
        self._scopes = scopes
        self._logger = logger
        self._monotonic = monotonic
        self._published: dict[bytes, float] = {}  # what this replica published, and when

    async def evict(self, digest: bytes, source: str) -> tuple[int, dict[str, Any]]:
        """Evict the token here, and through the shared cache when there is one: the HTTP
        status and the JSON body to answer. 503 when the shared cache could not be told (the
        other replicas keep their answers: try again)."""
        evicted = self._drop_local(digest)
        shared: int | None = None
        if self._shared is not None:
            self._forget_old_echoes()
            self._published[digest] = self._monotonic()
            shared = await self._shared.evict(digest, self._scopes())
            if shared is None:
                self._published.pop(digest, None)
        body: dict[str, Any] = {
            "evicted": evicted + (shared or 0),
            "shared": shared is not None,
            "tokenSha256": digest.hex()[:8],
        }
        status = 200
        if self._shared is not None and shared is None:
            status = 503
            body["error"] = "shared_cache_unavailable"
            body["message"] = (
                "Evicted here only: the shared cache could not be reached, so the other replicas"
                " were not told. Try again."
            )
        elif self._shared is None:
            body["message"] = "Evicted on this replica only: no server.sharedCache is configured."
        self._log(digest, source, evicted, shared)
        return status, body

    async def heard(self, digest: bytes | None) -> None:
        """An eviction published by a replica (this one included), or None after a gap in the
        subscription (every token: evictions may have been missed). Never raises."""
        evicted = self._drop_local(digest)
        if digest is None:
            self._logger.warning(
                EVICTED_EVENT,
                message="Subscribed again to the eviction channel after an outage: every local"
                " answer is dropped, since evictions published meanwhile were missed.",
                tokenSha256="*",
                source="channel",
                evicted=evicted,
            )
            return
        if self._published.pop(digest, None) is not None:
            return  # our own, already logged
        if self._shared is not None:
            await self._shared.delete(digest, self._scopes())  # this config's scopes too
        self._log(digest, "channel", evicted, None)

    def _forget_old_echoes(self) -> None:
        now = self._monotonic()
        for digest, at in list(self._published.items()):
            if now - at > _ECHO_SECONDS:
                del self._published[digest]

    def _log(self, digest: bytes, source: str, evicted: int, shared: int | None) -> None:
        fields: dict[str, Any] = {"tokenSha256": digest.hex()[:8], "source": source}
        fields["evicted"] = evicted
        if shared is not None:
            fields["sharedDeleted"] = shared
        self._logger.info(
            EVICTED_EVENT,
            message="A token was evicted from the caches; its next check asks the IdP again.",
            **fields,
        )
