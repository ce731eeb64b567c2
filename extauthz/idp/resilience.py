"""Circuit breaking for identity-provider endpoints, written once for all of them.

closed ──N consecutive failures──▶ open ──cool-down elapsed──▶ half-open ──probe ok──▶ closed
                                     ▲                              │
                                     └────────probe fails───────────┘

While open, calls fail at once with :class:`~extauthz.errors.CircuitOpen` instead of waiting for
a timeout, so a dead IdP costs a check microseconds, not ``timeoutSeconds``. In half-open, exactly
one call probes the IdP; the others keep failing fast until it answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

__all__ = ["BreakerState", "CircuitBreaker"]

BreakerState = Literal["closed", "open", "half_open"]

DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_COOL_DOWN_SECONDS = 30.0


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        cool_down_seconds: float = DEFAULT_COOL_DOWN_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cool_down_seconds = cool_down_seconds
        self._clock = clock
        self._wall_clock = wall_clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self.cool_down_seconds:
            return "half_open"
        return "open"

    def open_until(self) -> float:
        """Wall-clock time at which the next probe is allowed (for the log message)."""
        assert self._opened_at is not None
        remaining = self.cool_down_seconds - (self._clock() - self._opened_at)
        return self._wall_clock() + max(0.0, remaining)

    def allow(self) -> bool:
        """May a call go out now? In half-open, only the first caller probes."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def abandon(self) -> None:
        """A call that was let through ended without a verdict (cancelled): free the probe slot."""
        self._probing = False

    def failure(self) -> None:
        self._failures += 1
        if self._probing or self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
        self._probing = False
