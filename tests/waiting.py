"""Waiting for something to happen, always with a deadline: the one way tests wait.

    line = wait_until(lambda: find_line(), timeout=5, what="the access line")   # its value
    await wait_until_async(lambda: idp.calls["/jwks"] == 2, timeout=5, what="the JWKS refresh")
    await background_tasks_done()   # what the code under test started in the background ended
    stays(lambda: allowed() == 20, seconds=0.2, what="20 allowed checks")       # and no more

A condition is asked until it returns something truthy, which is returned; when the deadline
passes first, the test fails naming ``what`` (``TimedOut``, an AssertionError, so that a caller
that wants what there is at the deadline can catch it). Nothing here sleeps to let something
happen: it asks, and asks again a little later, until it has happened.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["TimedOut", "background_tasks_done", "stays", "wait_until", "wait_until_async"]

T = TypeVar("T")

INTERVAL = 0.05  # between two questions to another process or thread
ASYNC_INTERVAL = 0.001  # between two questions inside the test's own event loop


class TimedOut(AssertionError):
    """The deadline passed before the condition held."""


class _Asking(Generic[T]):
    """Asks ``condition``; raises TimedOut once the deadline has passed without an answer."""

    def __init__(self, condition: Callable[[], T | None], timeout: float, what: str) -> None:
        self.condition, self.timeout, self.what = condition, timeout, what
        self.deadline = time.monotonic() + timeout

    def answer(self) -> T | None:
        result = self.condition()
        if not result and time.monotonic() > self.deadline:
            raise TimedOut(f"timed out after {self.timeout:g}s waiting for {self.what}")
        return result


def wait_until(
    condition: Callable[[], T | None], *, timeout: float, what: str, interval: float = INTERVAL
) -> T:
    """Ask ``condition`` until it returns something truthy and return that; fail the test with
    ``what`` once ``timeout`` seconds have passed."""
    asking = _Asking(condition, timeout, what)
    while not (result := asking.answer()):
        time.sleep(interval)
    return result


async def wait_until_async(
    condition: Callable[[], T | None],
    *,
    timeout: float = 5.0,
    what: str,
    interval: float = ASYNC_INTERVAL,
) -> T:
    """``wait_until`` for a test that runs in an event loop: the loop keeps turning between two
    questions, so the tasks the condition waits on make progress."""
    asking = _Asking(condition, timeout, what)
    while not (result := asking.answer()):
        await asyncio.sleep(interval)
    return result


async def background_tasks_done(
    *, timeout: float = 5.0, what: str = "the background tasks to finish"
) -> None:
    """Once every task of the running loop but the caller's has finished: a refresh the code under
    test started in the background has fetched, and stored what it fetched."""
    me = asyncio.current_task()
    await wait_until_async(
        lambda: all(task.done() for task in asyncio.all_tasks() if task is not me),
        timeout=timeout,
        what=what,
    )


def stays(
    condition: Callable[[], object], *, seconds: float, what: str, interval: float = INTERVAL
) -> None:
    """``condition`` holds every time it is asked during ``seconds`` (nothing more arrives, say);
    fail the test at the first time it does not."""
    until = time.monotonic() + seconds
    while True:
        assert condition(), f"{what} stopped holding"
        if time.monotonic() > until:
            return
        time.sleep(interval)
