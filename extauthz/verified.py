"""A bounded cache of JWTs whose signature was verified, keyed by the token's SHA-256.

A token seen again costs a hash and a dict lookup instead of a parse and a signature check. What
is cached is only the cryptographic fact "this key signed these claims": every check still runs
the time, issuer, audience, claim and scope checks against its own policy and the current time,
and a hit counts only while the key that verified it is still in the deployment's current key set
(a key the IdP withdraws stops vouching at once).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .bounded import BoundedCache
from .keys import VerificationKey
from .tokens import MAX_TOKEN_BYTES

__all__ = ["Verified", "VerifiedTokens", "token_digest"]

MAX_ENTRIES = 16_384


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class Verified:
    claims: Mapping[str, Any]
    alg: str
    kid: str | None
    key: VerificationKey
    expires_at: float  # a while after the token's exp: an entry is useless after it


class VerifiedTokens:
    """Verified tokens by SHA-256, least recently used first out, each dropped past its
    ``expires_at``. A token is at most 16 KiB, so an entry is too."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._entries: BoundedCache[bytes, Verified] = BoundedCache(
            max_entries, MAX_TOKEN_BYTES, lru=True
        )

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes, now: float) -> Verified | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if now > entry.expires_at:
            self._entries.discard(digest)
            return None
        return entry

    def put(self, digest: bytes, entry: Verified, size: int) -> None:
        """Remember ``entry`` for a token of ``size`` characters."""
        self._entries.put(digest, entry, size)

    def evict(self, digest: bytes | None) -> int:
        """Forget the token whose SHA-256 is ``digest`` (every token, for None): the number of
        entries dropped."""
        if digest is None:
            dropped = len(self._entries)
            self._entries.clear()
            return dropped
        found = digest in self._entries
        self._entries.discard(digest)
        return int(found)
