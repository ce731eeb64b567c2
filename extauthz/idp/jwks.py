"""REMOTE_JWKS: keys from a JWKS URI, cached, re-fetched once on an unknown ``kid``."""

from __future__ import annotations

from ..config import ASYMMETRIC_ALGORITHMS
from ..errors import IdpBadResponse, IdpError
from ..keys import KeySet, keyset_from_jwks
from .cache import CachedDocument, CacheSettings
from .http import IdpEndpoint, IdpResponse

__all__ = ["JwksProvider", "cache_ttl"]

MIN_TTL_SECONDS = 30.0  # however the IdP sets Cache-Control, do not fetch on every check
# A flood of tokens with forged kids may cause at most one JWKS fetch per this interval.
UNKNOWN_KID_REFETCH_SECONDS = 5.0
_ALL_ALGORITHMS = frozenset(ASYMMETRIC_ALGORITHMS)


def cache_ttl(max_age: float | None, max_cache_seconds: float) -> float:
    """The response's max-age, capped by ``maxCacheDurationInHours`` and floored at 30 s."""
    ttl = max_cache_seconds if max_age is None else min(max_age, max_cache_seconds)
    return max(ttl, min(MIN_TTL_SECONDS, max_cache_seconds))


class JwksProvider:
    def __init__(self, endpoint: IdpEndpoint, settings: CacheSettings) -> None:
        self.endpoint = endpoint
        self._max_cache_seconds = settings.max_cache_seconds
        self._clock = settings.clock
        self.cache: CachedDocument[KeySet] = CachedDocument(self._load, settings)

    async def _load(self) -> tuple[KeySet, float]:
        return await self.endpoint.fetch(self._read)

    def _read(self, resp: IdpResponse) -> tuple[KeySet, float]:
        """The keys and their lifetime; IdpBadResponse, the endpoint's failure, when none."""
        keys = resp.data.get("keys") if isinstance(resp.data, dict) else None
        if not isinstance(keys, list):
            raise IdpBadResponse(self.endpoint.name, self.endpoint.uri, "no 'keys' array")
        keyset = keyset_from_jwks(keys, _ALL_ALGORITHMS)
        if not keyset.keys:
            raise IdpBadResponse(self.endpoint.name, self.endpoint.uri, "no usable signing keys")
        return keyset, cache_ttl(resp.max_age, self._max_cache_seconds)

    async def keyset(self, kid: str | None) -> KeySet:
        keys = await self.cache.get()
        if kid is None or keys.has_kid(kid):
            return keys
        fetched_at = self.cache.fetched_at
        if fetched_at is not None and self._clock() - fetched_at < UNKNOWN_KID_REFETCH_SECONDS:
            return keys
        # The IdP may have rotated its keys since the last fetch.
        try:
            return await self.cache.refresh()
        except IdpError:
            return keys  # the old keys are still good for the tokens they signed
