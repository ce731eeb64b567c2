"""One remote document, cached: TTL, single-flight refresh, and stale-while-error.

Written once and wrapped around every provider (JWKS, discovery), so none of them re-implements
caching:

* fresh: served from memory (``hit``);
* expired, but within the stale window: served from memory at once (``stale``) while one refresh
  runs in the background; a failed refresh is reported through ``on_stale`` and not retried for
  ``RETRY_SECONDS``, so an IdP outage costs checks no latency and the IdP no flood;
* nothing usable: the caller waits for the fetch (``miss``); concurrent callers share it, and a
  caller that is cancelled does not cancel it for the others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from ..errors import IdpError
from .http import check_deadline, check_idp_calls

__all__ = ["CacheResult", "CachedDocument"]

T = TypeVar("T")
CacheResult = Literal["hit", "miss", "stale"]

RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class CacheSettings:
    """How one remote document is cached, and where its outcomes are reported."""

    max_cache_seconds: float
    stale_seconds: float
    on_stale: Callable[[IdpError], None] = lambda _e: None
    on_result: Callable[[CacheResult], None] = lambda _r: None
    on_fetched: Callable[[], None] = lambda: None  # a new value replaced the cached one
    clock: Callable[[], float] = time.monotonic


class CachedDocument(Generic[T]):
    """``load()`` returns ``(value, ttl_seconds)`` or raises IdpError."""

    def __init__(
        self, load: Callable[[], Awaitable[tuple[T, float]]], settings: CacheSettings
    ) -> None:
        self._load = load
        self._on_result = settings.on_result
        self._stale_seconds = settings.stale_seconds
        self._on_stale = settings.on_stale
        self._on_fetched = settings.on_fetched
        self._clock = settings.clock
        self._value: T | None = None
        self._expires_at = 0.0
        self.fetched_at: float | None = None  # monotonic time of the last successful fetch
        self._failed_at: float | None = None
        self._inflight: asyncio.Future[T] | None = None

    def fresh(self) -> T | None:
        """The cached value while it is within its TTL, else None; no fetch, no metrics."""
        return self._value if self._clock() < self._expires_at else None

    def latest(self) -> T | None:
        """The last value fetched, fresh, stale or past its stale window; no fetch, no metrics."""
        return self._value

    def past_ttl(self) -> bool:
        """A value is cached but its TTL has run out (it may still be served stale)."""
        return self._value is not None and self._clock() >= self._expires_at

    async def get(self) -> T:
        now = self._clock()
        if self._value is not None:
            if now < self._expires_at:
                self._on_result("hit")
                return self._value
            if now < self._expires_at + self._stale_seconds:
                self._on_result("stale")
                recently_failed = (
                    self._failed_at is not None and now - self._failed_at < RETRY_SECONDS
                )
                if self._inflight is None and not recently_failed:
                    self._inflight = asyncio.ensure_future(self._fetch_for_no_check())
                    self._inflight.add_done_callback(self._background_done)
                return self._value
        self._on_result("miss")
        return await self.refresh()

    async def _fetch_for_no_check(self) -> T:
        # The check that started this refresh is answered from the cache and does not wait for
        # it: its deadline does not bound the refresh (timeoutSeconds does), and its access line
        # does not count the request (idpCalls). The task has its own copy of the context.
        check_deadline.set(None)
        check_idp_calls.set(None)
        return await self._fetch()

    def _background_done(self, future: asyncio.Future[T]) -> None:
        if not future.cancelled() and isinstance(future.exception(), IdpError):
            # Keys the IdP published before it failed still verify its tokens; say so once.
            self._on_stale(future.exception())  # type: ignore[arg-type]

    async def refresh(self) -> T:
        """Fetch now, joining a fetch already under way."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._fetch())
        return await asyncio.shield(self._inflight)

    async def _fetch(self) -> T:
        try:
            value, ttl = await self._load()
        except IdpError:
            self._failed_at = self._clock()
            raise
        finally:
            self._inflight = None
        self._value = value
        self.fetched_at = self._clock()
        self._expires_at = self.fetched_at + ttl
        self._failed_at = None
        self._on_fetched()
        return value
