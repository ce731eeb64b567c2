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
* The client secret comes from a :class:`SecretSource`: ``clientSecretFile`` is read again when
  the file changes (:class:`SecretFile`), ``clientSecretEnv`` is read once (:class:`FixedSecret`).
* With ``server.sharedCache``, the local cache stays in front of the fleet's shared one
  (:mod:`extauthz.shared_cache`): a local miss reads the shared cache before calling the IdP,
  within the same single flight, and an IdP answer, active or inactive, is written there for the
  other replicas. The single flight holds across the fleet: one replica takes a lease and asks,
  the others wait for its answer in the shared cache (:meth:`SharedCache.lease`). What the
  shared cache says is never more than what this replica would have kept: its expiry is cut to
  the local lifetimes. An eviction (:meth:`IntrospectionClient.evict`)
  drops a token's answer by the same SHA-256.
* A reloaded config whose introspection settings did not change keeps the answers: the new
  generation's client is :meth:`IntrospectionClient.rebound` to its own endpoint lookup and
  shares the cache, the calls in flight and the secret with the old one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote_plus

from ..bounded import BoundedCache
from ..config import ClientDetails
from ..errors import IdpBadResponse
from ..verified import token_digest
from .http import IdpEndpoint, IdpObserver, IdpResponse, NullObserver

if TYPE_CHECKING:
    from ..shared_cache import SharedCache

__all__ = [
    "SECRET_RELOADED_EVENT",
    "SECRET_RELOAD_FAILED_EVENT",
    "ClientSecret",
    "FixedSecret",
    "IntrospectionClient",
    "SecretFile",
    "SecretSource",
    "SecretUnusable",
    "read_secret_file",
]

SECRET_RELOADED_EVENT = "idp.secretReloaded"
SECRET_RELOAD_FAILED_EVENT = "idp.secretReloadFailed"

# (level, event, fields): a log line about a secret file. Its fields name the file, never what
# it holds.
Report = Callable[[str, str, dict[str, Any]], None]

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


class SecretUnusable(Exception):
    """A client secret file that cannot be used; the message says why, naming only the file."""


class SecretSource(Protocol):
    def current(self) -> ClientSecret:
        """The secret to send now."""
        ...


class FixedSecret:
    """``clientSecretEnv``: a process's environment cannot be changed from outside it, so the
    value read at load is the value for the life of the process (a new one needs a restart)."""

    __slots__ = ("_secret",)

    def __init__(self, secret: ClientSecret) -> None:
        self._secret = secret

    def current(self) -> ClientSecret:
        return self._secret


def _file_state(path: str) -> tuple[int, int, int, int] | None:
    """What tells a changed file apart, through symlinks (a Kubernetes Secret volume swaps its
    ``..data`` link): device, inode, size and modification time; None when it cannot be had."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_secret_file(path: str) -> str:
    """The secret in ``path``: the whole file less one trailing newline (``echo`` and editors
    add one; it is never part of the secret). SecretUnusable when unreadable or empty."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise SecretUnusable(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretUnusable(f"{path} is not UTF-8 text") from None
    if text.endswith("\n"):
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    if not text.strip():
        raise SecretUnusable(f"{path} is empty")
    return text


class SecretFile:
    """``clientSecretFile``, read again when it changes: a ``stat`` before each use (what an
    introspection call costs is a network round trip; a ``stat`` is a few microseconds), and a
    read of the whole file only when device, inode, size or mtime differ.

    A check never sees half a rotation: the new secret replaces the old in one assignment, and
    only once the file read whole is the file that was stat'ed (a file rewritten while being
    read is read again at the next use). A new file that cannot be used (unreadable, empty)
    leaves the old secret in use and is reported once, until the file changes again; the
    report names the file, never its content. Kubernetes replaces a Secret volume's files
    atomically; elsewhere, write a temporary file and rename it over the old one.
    """

    def __init__(self, path: str, report: Report | None = None) -> None:
        self.path = path
        self._report: Report = report or (lambda level, event, fields: None)
        self._seen = _file_state(path)  # before reading: a change while reading is seen later
        self._secret = ClientSecret(read_secret_file(path))  # SecretUnusable: refuse the config
        self._failure: str | None = None  # the last problem reported, until the file works

    def current(self) -> ClientSecret:
        state = _file_state(self.path)
        if state == self._seen:
            return self._secret
        try:
            value = read_secret_file(self.path)
        except SecretUnusable as exc:
            if _file_state(self.path) == state:  # else it is being written: look again next time
                self._seen = state
                self._failed(str(exc))
            return self._secret
        if _file_state(self.path) != state:
            return self._secret  # rewritten while it was read: what was read may be half of it
        self._seen, self._failure = state, None
        if value != self._secret.reveal():  # else touched, or written back as it was
            self._secret = ClientSecret(value)
            self._report(
                "INFO",
                SECRET_RELOADED_EVENT,
                {
                    "message": "The client secret file changed: introspection calls send the"
                    " new secret from now on.",
                    "clientSecretFile": self.path,
                },
            )
        return self._secret

    def _failed(self, reason: str) -> None:
        if reason == self._failure:
            return
        self._failure = reason
        self._report(
            "ERROR",
            SECRET_RELOAD_FAILED_EVENT,
            {
                "message": f"The client secret file changed but cannot be used ({reason}); the"
                " previous secret is still sent.",
                "clientSecretFile": self.path,
            },
        )


class _Shared:
    """What every generation of one introspection client shares: the answers, the calls in
    flight, the secret, and the fleet's shared cache with this client's scope in it."""

    __slots__ = ("cache", "inflight", "remote", "scope", "secret")

    def __init__(
        self, secret: SecretSource, max_entries: int, remote: SharedCache | None, scope: str
    ) -> None:
        self.secret = secret
        self.remote = remote
        self.scope = scope
        # SHA-256 of the token → (expires at, the claims as compact JSON or _INACTIVE_ENTRY). An
        # answer larger than MAX_ENTRY_BYTES is used once and not kept.
        self.cache: BoundedCache[bytes, tuple[float, bytes]] = BoundedCache(
            max_entries, MAX_ENTRY_BYTES, lru=True
        )
        self.inflight: dict[bytes, asyncio.Future[dict[str, Any] | None]] = {}


class IntrospectionClient:
    def __init__(
        self,
        endpoint: Callable[[], Awaitable[IdpEndpoint]],
        client: ClientDetails,
        secret: ClientSecret | SecretSource,
        *,
        max_cache_seconds: float,
        observer: IdpObserver | None = None,
        clock: Callable[[], float] = time.time,
        max_entries: int = MAX_ENTRIES,
        shared: _Shared | None = None,
        shared_cache: SharedCache | None = None,
        scope: str = "",
    ) -> None:
        """``shared_cache``: the fleet's, if any; ``scope`` names the IdP and client whose
        answers these are (its URI and client id), so that in the shared cache a token's
        answer from one IdP is never taken for another's."""
        self._endpoint = endpoint
        self._client = client
        if shared is None:
            source = FixedSecret(secret) if isinstance(secret, ClientSecret) else secret
            shared = _Shared(source, max_entries, shared_cache, scope)
        self._shared = shared
        self._cache = shared.cache
        self._inflight = shared.inflight
        # client_secret_basic: the Authorization header, built once per secret (a rotated file
        # builds it again). RFC 6749 §2.3.1: both parts are form-urlencoded before Basic encoding.
        self._basic: tuple[ClientSecret, ClientSecret] | None = None
        self._max_cache_seconds = max_cache_seconds
        self._observer = observer or NullObserver()
        self._clock = clock

    def rebound(self, endpoint: Callable[[], Awaitable[IdpEndpoint]]) -> IntrospectionClient:
        """The same client (its answers, calls in flight and secret) finding its endpoint with
        ``endpoint``: what a reloaded config whose introspection settings did not change uses."""
        return IntrospectionClient(
            endpoint,
            self._client,
            self._shared.secret,
            max_cache_seconds=self._max_cache_seconds,
            observer=self._observer,
            clock=self._clock,
            shared=self._shared,
        )

    def _authorization(self, secret: ClientSecret) -> ClientSecret:
        """The client_secret_basic header for ``secret``."""
        if self._basic is None or self._basic[0] is not secret:
            pair = f"{quote_plus(self._client.client_id)}:{quote_plus(secret.reveal())}"
            header = ClientSecret("Basic " + base64.b64encode(pair.encode()).decode("ascii"))
            self._basic = (secret, header)
        return self._basic[1]

    def __len__(self) -> int:
        return len(self._cache)

    async def introspect(self, token: str) -> dict[str, Any] | None:
        """The claims of an active token, None for an inactive one; raises IdpError."""
        key = token_digest(token)
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

    def evict(self, digest: bytes | None) -> int:
        """Forget the answer for the token whose SHA-256 is ``digest`` (every answer, for None):
        its next check asks again. The number of answers dropped."""
        if digest is None:
            dropped = len(self._cache)
            self._cache.clear()
            return dropped
        found = digest in self._cache
        self._cache.discard(digest)
        return int(found)

    def cached_until(self, token: str) -> float:
        """When the cached answer for ``token`` expires (wall clock); 0 when none is cached."""
        hit = self._cache.get(token_digest(token))
        return hit[0] if hit is not None else 0.0

    async def _fetch(self, key: bytes, token: str) -> dict[str, Any] | None:
        remote = self._shared.remote
        remote_key = ""
        leased: bool | None = None
        if remote is not None:
            remote_key = remote.key("introspection", self._shared.scope, token)
            entry = await remote.get("introspection", remote_key)  # None whatever Redis does
            if entry is not None:
                return self._from_remote(key, entry.expires_at, entry.claims)
            # The single flight holds across the fleet: one replica asks the IdP about a new
            # token, the others wait for its answer in the shared cache, for no longer than
            # they would wait for the IdP itself, then ask it themselves.
            budget = (await self._endpoint()).budget
            leased = await remote.lease(remote_key, budget)
            if leased is False:
                entry = await remote.wait_for("introspection", remote_key, budget)
                if entry is not None:
                    return self._from_remote(key, entry.expires_at, entry.claims)
        try:
            claims, expires_at = await self._ask_idp(key, token)
        except BaseException:
            if remote is not None and leased:
                remote.release_later(remote_key)  # the waiting replicas ask at once
            raise
        if remote is not None:
            # Awaited (within timeoutMilliseconds) rather than left running: the next replica
            # asked about this token, perhaps by the client's very next request, finds it. Then
            # the lease goes: a replica that later misses the entry (evicted, expired) must not
            # wait on a lease nobody holds.
            await remote.put(remote_key, expires_at, claims)
            if leased:
                remote.release_later(remote_key)
        return claims

    def _from_remote(
        self, key: bytes, expires_at: float, claims: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        """Keep what another replica learnt, for no longer than this one would have kept the
        IdP's answer."""
        now = self._clock()
        if claims is None:
            self._store(key, min(expires_at, now + NEGATIVE_TTL_SECONDS), _INACTIVE_ENTRY)
            return None
        expires_at = min(expires_at, self._expiry(claims, now))
        if expires_at > now:
            self._store(key, expires_at, _compact(claims).encode())
        return claims

    def _expiry(self, claims: dict[str, Any], now: float) -> float:
        """Until when an active answer is kept: the earlier of ``exp`` and the cache's limit."""
        expires_at = now + self._max_cache_seconds
        exp = claims.get("exp")
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            expires_at = min(expires_at, float(exp))
        return expires_at

    async def _ask_idp(self, key: bytes, token: str) -> tuple[dict[str, Any] | None, float]:
        """The IdP's answer (claims, None when inactive), kept in the local cache, and until
        when it may be kept."""
        endpoint = await self._endpoint()
        form = {"token": token, "token_type_hint": "access_token"}
        headers: dict[str, str] | None = None
        secret = self._shared.secret.current()  # a rotated file: the new secret, whole
        if self._client.auth_method == "client_secret_post":
            form.update(client_id=self._client.client_id, client_secret=secret.reveal())
        else:
            headers = {"authorization": self._authorization(secret).reveal()}

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
            return None, now + NEGATIVE_TTL_SECONDS
        claims = {k: v for k, v in body.items() if k != "active"}
        expires_at = self._expiry(claims, now)
        if expires_at > now:
            self._store(key, expires_at, _compact(claims).encode())
        return claims, expires_at

    def _store(self, key: bytes, expires_at: float, entry: bytes) -> None:
        self._cache.put(key, (expires_at, entry), len(entry))
