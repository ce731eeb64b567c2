"""One remote document, cached: TTL, single-flight refresh, and stale-while-error.

Written once and wrapped around every provider (JWKS, discovery), so none of them re-implements
caching. Concurrent callers of an expired entry share one fetch; a caller that is cancelled does not
cancel the fetch for the others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, Literal, TypeVar

from ..errors import IdpError

__all__ = ["CachedDocument", "CacheResult"]

T = TypeVar("T")
CacheResult = Literal["hit", "miss", "stale"]


class CachedDocument(Generic[T]):
    """``load()`` returns ``(value, ttl_seconds)`` or raises IdpError."""

    def __init__(
        self,
        load: Callable[[], Awaitable[tuple[T, float]]],
        *,
        stale_seconds: float,
        on_stale: Callable[[IdpError], None] = lambda _e: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._stale_seconds = stale_seconds
        self._on_stale = on_stale
        self._clock = clock
        self._value: T | None = None
        self._expires_at = 0.0
        self.fetched_at: float | None = None  # monotonic time of the last successful fetch
        self.last_error: IdpError | None = None
        self.last_result: CacheResult = "miss"
        self._inflight: asyncio.Future[T] | None = None

    @property
    def value(self) -> T | None:
        return self._value

    async def get(self) -> T:
        now = self._clock()
        if self._value is not None and now < self._expires_at:
            self.last_result = "hit"
            return self._value
        try:
            value = await self.refresh()
            self.last_result = "miss"
            return value
        except IdpError as exc:
            if self._value is not None and now < self._expires_at + self._stale_seconds:
                # Keys the IdP published before it failed still verify its tokens.
                self.last_result = "stale"
                self._on_stale(exc)
                return self._value
            raise

    async def refresh(self) -> T:
        """Fetch now, joining a fetch already under way."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._fetch())
        return await asyncio.shield(self._inflight)

    async def _fetch(self) -> T:
        try:
            value, ttl = await self._load()
        except IdpError as exc:
            self.last_error = exc
            raise
        finally:
            self._inflight = None
        self._value = value
        self.fetched_at = self._clock()
        self._expires_at = self.fetched_at + ttl
        self.last_error = None
        return value
