"""Live config reload: watch the file, wait until it has settled, re-validate, swap the engine.

Kubernetes updates a mounted ConfigMap by swapping a symlink (``..data``), so the file is watched
by polling ``stat()`` through the link (inode, size, mtime) and, when that changes, by hashing the
content; editors that rewrite in place are seen the same way.

A changed file is applied only once it has settled: the same content (its SHA-256) read by two
checks at least one poll interval apart. ``cat new.yaml > config.yaml`` writes in place, and a
check that catches it half-way may well read valid YAML (the first half of the deployments list)
that would drop issuers and routes; a write still going on changes the content between the two
reads, so that half is never applied. A change therefore takes effect one to two poll intervals
(1 to 2 s by default) after the write ends. SIGHUP makes a check happen at once, but it cannot
shorten the interval: the content it reads is applied by a later check a poll interval on, if
still the same. A writer that stalls mid-file for longer than a poll interval defeats this, so
update the file by atomic replace: write a temporary file in the same directory, then rename it
over the config, as Kubernetes does for ConfigMaps. A reader then sees the old file or the new
one, never a part of either, and settling only delays the reload.

A new file that does not validate is logged with every error and ignored: the old policy keeps
serving. A valid one builds a complete new engine first and is then swapped in with one
assignment, so every check runs entirely on the old policy or entirely on the new one. The new
engine takes over the IdP providers whose settings did not change, with their caches and
breakers (:class:`extauthz.idp.Providers`, ``previous=``): a reload fetches no key again.
The new file is read and validated in a thread: checks are answered on the old policy meanwhile.
The file's digest is taken again after that read; if it changed meanwhile, the read is discarded
and the new content has to settle in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import Config, ConfigError, load_config
from .logs import JsonLogger

__all__ = ["ConfigWatcher"]

POLL_SECONDS = 1.0


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)  # follows the ConfigMap's symlinks
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


@dataclass(frozen=True)
class Change:
    """Content that differs from the one in force, and when a check first read it."""

    digest: str
    first_seen: float  # the watcher's clock (monotonic seconds)


def settle(
    digest: str, now: float, current: str | None, pending: Change | None, interval: float
) -> tuple[Change | None, bool]:
    """What a check that read content ``digest`` at ``now`` makes of it: the change still waiting
    to settle (if any), and whether to apply the content now.

    ``current`` is the content last applied (or rejected as invalid); ``pending`` the change an
    earlier check saw. The content is applied when an earlier check, at least ``interval`` ago,
    read the very same content."""
    if digest == current:
        return None, False  # unchanged, or changed back before it settled
    if pending is None or pending.digest != digest:
        return Change(digest, now), False  # new content (or still being written): wait
    if now - pending.first_seen < interval:
        return pending, False  # read again too soon (a SIGHUP just after a poll): wait on
    return None, True


def _load_if_unchanged(path: Path, digest: str) -> Config | None:
    """The config in ``path`` if its content is still ``digest`` once read, else None (a new
    write began meanwhile). Raises ConfigError for an invalid file."""
    config = load_config(path)
    return config if _digest(path) == digest else None


class ConfigWatcher:
    def __init__(
        self,
        path: str | Path,
        apply: Callable[[Config], None],
        logger: JsonLogger,
        *,
        poll_seconds: float = POLL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = Path(path)
        self._apply = apply
        self._log = logger
        self._poll_seconds = poll_seconds
        self._clock = clock
        self._fingerprint = _fingerprint(self._path)
        self._current = _digest(self._path)  # the content in force (applied or rejected)
        self._pending: Change | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def poke(self) -> None:
        """Check now (SIGHUP), even if ``stat()`` shows no change. A changed content still has to
        settle: a later check, a poll interval on, applies it."""
        self._fingerprint = None
        self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_seconds)
            self._wake.clear()
            await self.check_once()

    async def check_once(self) -> bool:
        """One poll: note a change, or apply one that has settled; True when a new config was
        applied."""
        fingerprint = _fingerprint(self._path)
        if fingerprint is None:
            self._pending = None  # gone for now (replaced by delete and create): not settled
            return False
        if fingerprint == self._fingerprint and self._pending is None:
            return False  # the common case: nothing changed, nothing is waiting
        self._fingerprint = fingerprint
        digest = _digest(self._path)
        if digest is None:
            self._pending = None
            return False
        self._pending, ready = settle(
            digest, self._clock(), self._current, self._pending, self._poll_seconds
        )
        if not ready:
            return False
        try:
            # Reading and validating a large config takes seconds (about 4 s for 10,000
            # deployments here): in a thread, so that checks go on being answered meanwhile.
            config = await asyncio.to_thread(_load_if_unchanged, self._path, digest)
            if config is None:
                self._fingerprint = None  # rewritten while being read: start settling again
                return False
            self._current = digest
            self._apply(config)
        except ConfigError as exc:
            self._current = digest  # logged once, not at every poll until the file changes
            self._log.error(
                "config.reloadFailed",
                message="The new config is invalid; the previous policy keeps serving.",
                errors=exc.errors,
                config=str(self._path),
            )
            return False
        self._log.info("config.reloaded", message=config.summary(), config=str(self._path))
        return True
