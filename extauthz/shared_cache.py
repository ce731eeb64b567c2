"""The shared cache (``server.sharedCache``): what a fleet of replicas learns about tokens,
shared through Redis or Valkey, so that N replicas ask the IdP about a token once rather than N
times. Three kinds of entries:

* ``introspection``: RFC 7662 answers, read after a local miss (:mod:`extauthz.idp.introspection`).
* ``jwt``: the claims of a JWT whose signature a replica verified with its keys. Written in the
  background once a replica has verified a token itself (never awaited by the check, and skipped
  when every connection is busy, as any call). Read **only when this replica cannot verify the
  token without the IdP**: no keys can be had (the JWKS or discovery document is not loaded and
  cannot be fetched), or the token's ``kid`` is not among the keys it holds, after its own
  attempt to fetch them again (one per 5 s at most, :mod:`extauthz.idp.jwks`). A replica that
  never saw the JWKS can then still answer for a token the fleet verified while the IdP is down,
  and the common case (keys at hand) costs no Redis round trip: a local signature check is
  cheaper than one. A signature that fails with a key the replica holds is never looked up. A
  key the IdP withdraws stops vouching for this replica's own verified tokens at once, but an
  entry the fleet made with it is still read for a ``kid`` this replica does not hold, until it
  expires or is evicted: bounded, like a shared introspection answer, by
  ``maxCacheDurationInHours`` and the token's ``exp``. The entry's scope is the policy's key
  source (the JWKS or discovery URI, or the static keys' SHA-256), so that another deployment's
  keys never vouch for a token; the algorithm, ``iss``, ``aud``, ``exp``/``nbf``, claim and scope
  checks all run again on the claims read back, against this replica's policy and clock. It
  lives until the earlier of the token's ``exp`` and ``maxCacheDurationInHours``.
* ``dpop``: the ``jti`` of each DPoP proof accepted (RFC 9449 §11.1), under the proof key's
  thumbprint, recorded with ``SET NX PX``: a ``jti`` another replica recorded is a replay. While
  Redis is unavailable, each replica's own memory alone decides (a proof replayed to another
  replica within the window is then not caught: the price of not failing every DPoP check when
  Redis is down).

What is stored, and why it can be trusted no more than it must:

* **Keys** are ``extauthz:v1:<kind>:<hex HMAC-SHA256>`` of the token's SHA-256 (with the scope
  of the policy that asked, so that two IdPs never answer for each other), under a key derived
  from the fleet's signing key. The HMAC is over the token's SHA-256 rather than the token so
  that whoever holds the signing key can find a token's entries from its SHA-256 alone
  (``POST /cache/evict``, ``extauthz evict``); without the key, nobody can: anyone who can read
  Redis sees no token, nor a plain hash of one that a guessed token could be tested against.
* **Values** are ``<hex MAC>.<JSON>``: the answer with its own expiry, and an HMAC-SHA256 over
  the Redis key and the JSON together, under a second derived key. An entry that does not verify
  (written by someone without the key, altered, or copied under another token's key) is ignored,
  counted as ``rejected`` and logged ``cache.entryRejected``, never with its content: the check
  then goes on as if nothing were there (an introspection asks the IdP; a JWT is denied as it
  would be without a shared cache).
* **Lifetimes**: an active answer until the earlier of the token's ``exp`` and the policy's
  ``maxCacheDurationInHours``, an inactive one for the local cache's negative TTL; Redis expires
  the key then too, and a reader checks the expiry written in the value as well.

Redis is an optimisation, never an authority nor a dependency: every call is bounded by
``timeoutMilliseconds``, and a slow, down or erroring Redis is a miss, never an exception to the
caller, so it can neither allow, deny nor fail a check. It going away is logged once
(``cache.sharedUnavailable``), and its return once (``cache.sharedRestored``); while it is away
it is tried again at most once a second, so that a dead Redis does not add its timeout to every
check.

**Eviction** (``POST /cache/evict``, ``extauthz evict``): the token's ``introspection`` and
``jwt`` entries are deleted (never the DPoP ``jti`` values: forgetting one would let a proof be
replayed; evicting can only ever cost an IdP call), and its SHA-256 is published on the channel
``extauthz:v1:evict``, with a MAC under a third key derived from the signing key, so that nobody
without the key can make replicas drop their caches. Every replica subscribes (a background
task, reconnecting a second after Redis goes away) and drops the token from its local caches
(introspection answers, verified tokens, remembered answers) and deletes its own scopes' entries
too (a replica whose config differs from the evicter's). A message published while a replica
was not subscribed is lost: so a replica that subscribes again after an outage drops every
local answer, rather than keep one that was evicted meanwhile. Without a shared cache, an
eviction is the replica's alone (:class:`Evictor`). Each eviction is one ``cache.evicted`` line
per replica, with the first 8 hex characters of the SHA-256 only, and where it came from
(``admin``, ``cli``, ``channel``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .config import ConfigError, SharedCacheSettings
from .logs import JsonLogger, rfc3339
from .verified import token_digest

if TYPE_CHECKING:
    from .config import Config, KeySource

__all__ = [
    "ENTRY_REJECTED_EVENT",
    "EVICTED_EVENT",
    "EVICT_CHANNEL",
    "MAX_EVICT_BODY_BYTES",
    "RESTORED_EVENT",
    "SUBSCRIPTION_LOST_EVENT",
    "SUBSCRIPTION_RESTORED_EVENT",
    "TOKEN_KINDS",
    "UNAVAILABLE_EVENT",
    "EvictRefused",
    "Evictor",
    "SharedCache",
    "SharedEntry",
    "check_secrets",
    "introspection_scope",
    "jwt_scope",
    "open_shared_cache",
    "parse_evict_body",
    "parse_sha256",
    "read_signing_key",
    "token_scopes",
]

UNAVAILABLE_EVENT = "cache.sharedUnavailable"
RESTORED_EVENT = "cache.sharedRestored"
ENTRY_REJECTED_EVENT = "cache.entryRejected"
EVICTED_EVENT = "cache.evicted"
SUBSCRIPTION_LOST_EVENT = "cache.evictionsUnheard"
SUBSCRIPTION_RESTORED_EVENT = "cache.evictionsHeard"

EVICT_CHANNEL = "extauthz:v1:evict"
# The kinds whose entries answer for a token: what an eviction deletes. Never "dpop": a jti
# forgotten would let its proof be replayed.
TOKEN_KINDS = ("introspection", "jwt")

KEY_PREFIX = "extauthz:v1:"
# A signing key shorter than SHA-256's output would weaken every MAC made with it.
MIN_SIGNING_KEY_BYTES = 32
# While Redis is unavailable, one call in this many seconds tries it again; the others skip it.
RETRY_SECONDS = 1.0
# A value larger than this is not an answer this code wrote (it writes at most 16 KiB of claims).
MAX_VALUE_BYTES = 64 * 1024
MAX_CONNECTIONS = 64
# A call that runs out of time is a miss; only this many in a row make the server unavailable
# (skipped for a second): one slow answer on a loaded machine is not an outage. A refused or
# broken connection is one at once.
SLOW_CALLS_BEFORE_UNAVAILABLE = 3
# A replica waiting on another's IdP call reads the shared cache after 2 ms, then at intervals
# growing by half up to 25 ms: an IdP answering in 5 ms is seen within a few milliseconds of it.
FIRST_POLL_SECONDS = 0.002
MAX_POLL_SECONDS = 0.025

# (level, event, fields), as the IdP layer reports: the fields never hold a token nor a value.
Report = Callable[[str, str, dict[str, Any]], None]
# (cache, result): extauthz_cache_events_total{cache="shared"}.
Count = Callable[[str, str], None]
# (operation, seconds): extauthz_shared_cache_duration_seconds{operation}.
Observe = Callable[[str, float], None]
# What a replica does with an eviction: the token's SHA-256, or None for every token (after a
# gap in the subscription, when evictions may have been missed).
OnEvict = Callable[[bytes | None], Awaitable[None]]

_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def introspection_scope(source: KeySource) -> str:
    """An introspection answer's scope: the configured URI (introspection endpoint or discovery
    document) and the client. Two policies share answers only when both match."""
    assert source.client is not None
    return f"{source.uri}\x00{source.client.client_id}"


def jwt_scope(source: KeySource) -> str:
    """A verified JWT's scope: where its keys come from (the JWKS or discovery URI, or the
    static keys themselves, by SHA-256), so that only keys from the same source vouch for it."""
    if source.type == "STATIC_KEYS":
        keys = json.dumps(list(source.static_keys), sort_keys=True, separators=(",", ":"))
        return f"STATIC_KEYS\x00{hashlib.sha256(keys.encode()).hexdigest()}"
    return f"{source.type}\x00{source.uri}"


def token_scopes(config: Config) -> list[tuple[str, str]]:
    """Every (kind, scope) under which ``config``'s policies keep a token's entries: what an
    eviction deletes."""
    found: dict[tuple[str, str], None] = {}
    for deployment in config.deployments:
        for policy in deployment.policies:
            source = policy.auth.keys
            if source.client is not None:
                found[("introspection", introspection_scope(source))] = None
            if source.type != "REMOTE_INTROSPECTION":
                found[("jwt", jwt_scope(source))] = None
    return list(found)


class SharedEntry:
    """An answer read back: ``claims`` None for an inactive token; ``expires_at`` wall clock."""

    __slots__ = ("claims", "expires_at")

    def __init__(self, expires_at: float, claims: dict[str, Any] | None) -> None:
        self.expires_at = expires_at
        self.claims = claims


class _Rejected(Exception):
    """An entry that does not verify; the message says why, never what it held."""


class _Unavailable(Exception):
    """A Redis call that failed or took too long (already logged, if it is news)."""


class SharedCache:
    """Get and put the fleet's entries in Redis, evict a token's, and hear of evictions; see the
    module's docstring."""

    def __init__(
        self,
        client: Any,
        signing_key: bytes,
        *,
        timeout_seconds: float,
        display_uri: str,
        report: Report,
        count: Count,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        max_calls: int = MAX_CONNECTIONS,
        observe: Observe = lambda _operation, _seconds: None,
        subscriber: Any = None,
    ) -> None:
        """``subscriber``: a second client, without a read timeout, for the eviction channel
        (a subscription waits for messages as long as there are none)."""
        if len(signing_key) < MIN_SIGNING_KEY_BYTES:
            raise ValueError(f"the signing key must hold at least {MIN_SIGNING_KEY_BYTES} bytes")
        # Two keys derived from the one the fleet shares: a value's MAC can then never be
        # obtained as some token's key name, whatever tokens a client sends.
        self._key_key = hmac.new(
            signing_key, b"extauthz shared cache: keys", hashlib.sha256
        ).digest()
        self._mac_key = hmac.new(
            signing_key, b"extauthz shared cache: MACs", hashlib.sha256
        ).digest()
        self._evict_key = hmac.new(
            signing_key, b"extauthz shared cache: evictions", hashlib.sha256
        ).digest()
        self._client = client
        self._subscriber = subscriber
        # Whether the eviction channel is listened to: its own state, apart from the calls' (a
        # server may refuse SUBSCRIBE alone, and that must not turn the cache off).
        self._subscribed = False
        self._subscription_lost = False  # said so once, until subscribed again
        self._observe = observe
        self._writes: set[asyncio.Task[Any]] = set()  # background writes, until done
        self._timeout = timeout_seconds
        self.display_uri = display_uri
        self._report = report
        self._count = count
        self._clock = clock
        self._monotonic = monotonic
        self._available = True
        self._since = clock()
        self._last_error = ""
        self._next_try = 0.0  # monotonic: when an unavailable Redis may be tried again
        self._slow_calls = 0  # calls that ran out of time in a row
        # The pool refuses a call beyond its connections with an error; counted here first, a
        # burst of new tokens skips the cache rather than passing for a Redis that went away.
        self._calls = asyncio.Semaphore(max_calls)

    # -- keys and values: pure, what the tests check ------------------------------------------

    def key(self, kind: str, scope: str, token: str) -> str:
        """The Redis key of ``token``'s answer from the policy ``scope``."""
        return self.key_for_digest(kind, scope, token_digest(token))

    def key_for_digest(self, kind: str, scope: str, digest: bytes) -> str:
        """The Redis key of the entry of kind ``kind`` for the token (or DPoP ``jti``) whose
        SHA-256 is ``digest``, from the policy ``scope``: keyed, so that only the fleet can
        find a token's entry from its SHA-256."""
        message = scope.encode() + b"\x00" + digest
        name = hmac.new(self._key_key, message, hashlib.sha256).hexdigest()
        return f"{KEY_PREFIX}{kind}:{name}"

    def eviction_message(self, digest: bytes) -> bytes:
        """What is published on EVICT_CHANNEL to evict the token whose SHA-256 is ``digest``:
        ``<hex SHA-256>.<hex MAC>``."""
        text = digest.hex().encode()
        return text + b"." + hmac.new(self._evict_key, text, hashlib.sha256).hexdigest().encode()

    def read_eviction(self, message: bytes) -> bytes | None:
        """The SHA-256 an eviction message names, if this fleet's key made it; else None."""
        text, dot, mac = message.partition(b".")
        if not dot or len(text) != 64 or len(mac) != 64:
            return None
        expected = hmac.new(self._evict_key, text, hashlib.sha256).hexdigest().encode()
        if not hmac.compare_digest(mac, expected):
            return None
        try:
            return bytes.fromhex(text.decode("ascii"))
        except ValueError:
            return None

    def _mac(self, key: str, body: bytes) -> str:
        # The key is ASCII without a newline: key and body cannot be split two ways.
        return hmac.new(self._mac_key, key.encode() + b"\n" + body, hashlib.sha256).hexdigest()

    def seal(self, key: str, expires_at: float, claims: dict[str, Any] | None) -> bytes:
        """The value stored under ``key``."""
        body = _compact({"expiresAt": expires_at, "active": claims is not None, "claims": claims})
        data = body.encode()
        return self._mac(key, data).encode() + b"." + data

    def unseal(self, key: str, value: bytes) -> SharedEntry | None:
        """The entry ``value`` holds if it was sealed under ``key`` with this fleet's key; None
        once expired; raises _Rejected when it does not verify."""
        if len(value) > MAX_VALUE_BYTES:
            raise _Rejected("larger than any entry extauthz writes")
        mac, dot, data = value.partition(b".")
        if not dot:
            raise _Rejected("not an entry extauthz writes")
        try:
            expected = self._mac(key, data).encode()
        except UnicodeError:
            raise _Rejected("not an entry extauthz writes") from None
        if not hmac.compare_digest(mac, expected):
            raise _Rejected("its MAC does not verify under this key")
        try:
            body = json.loads(data)
        except ValueError:
            raise _Rejected("its JSON does not parse") from None
        if not isinstance(body, dict):
            raise _Rejected("not an entry extauthz writes")
        expires_at, active, claims = body.get("expiresAt"), body.get("active"), body.get("claims")
        if not isinstance(expires_at, int | float) or isinstance(expires_at, bool):
            raise _Rejected("no numeric expiresAt")
        if active is True and isinstance(claims, dict):
            entry = SharedEntry(float(expires_at), claims)
        elif active is False and claims is None:
            entry = SharedEntry(float(expires_at), None)
        else:
            raise _Rejected("active and claims disagree")
        return entry if self._clock() < entry.expires_at else None

    # -- Redis ---------------------------------------------------------------------------

    async def get(self, kind: str, key: str) -> SharedEntry | None:
        """The verified, unexpired entry under ``key``; None for anything else, whatever Redis
        does."""
        if not self._may_try() or self._calls.locked():
            self._count("shared", "error")
            return None
        try:
            value = await self._call("get", self._client.get, key)
        except _Unavailable:
            self._count("shared", "error")
            return None
        if value is None:
            self._count("shared", "miss")
            return None
        try:
            entry = self.unseal(key, bytes(value))
        except _Rejected as why:
            self._rejected(kind, why)
            return None
        self._count("shared", "miss" if entry is None else "hit")
        return entry

    def _rejected(self, kind: str, why: _Rejected) -> None:
        """An entry that does not verify: counted, logged (why, never what) and ignored."""
        self._count("shared", "rejected")
        self._report(
            "WARNING",
            ENTRY_REJECTED_EVENT,
            {
                "message": f"A shared cache entry was ignored: {why}. It is answered as if"
                " nothing were there; someone who is not this fleet may be writing to the"
                " cache.",
                "kind": kind,
            },
        )

    async def _call(
        self, operation: str, method: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> Any:
        """One Redis call within the timeout, timed; _Unavailable (logged once) whatever goes
        wrong. The caller has checked :meth:`_may_try` and the free connections."""
        started = self._monotonic()
        try:
            async with self._calls, asyncio.timeout(self._timeout):
                result = await method(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - whatever Redis or its client does, never a reason to fail a check
            slow = isinstance(exc, TimeoutError)
            self._slow_calls = self._slow_calls + 1 if slow else 0
            if not slow or self._slow_calls >= SLOW_CALLS_BEFORE_UNAVAILABLE:
                self._unavailable(exc)
            raise _Unavailable from None
        finally:
            self._observe(operation, self._monotonic() - started)
        self._slow_calls = 0
        self._restored()
        return result

    def _busy(self) -> bool:
        """Redis is not to be called now: unavailable (and not yet to be tried again), or every
        connection busy (a burst skips the cache rather than pass for a Redis gone away)."""
        return not self._may_try() or self._calls.locked()

    async def put(self, key: str, expires_at: float, claims: dict[str, Any] | None) -> None:
        """Store an answer until ``expires_at`` (wall clock); nothing when it is already past
        or Redis cannot take it."""
        ttl_ms = int((expires_at - self._clock()) * 1000)
        if ttl_ms <= 0 or self._busy():
            return
        value = self.seal(key, expires_at, claims)
        if len(value) > MAX_VALUE_BYTES:
            return  # a whole profile in an answer: not worth the other replicas' memory
        with contextlib.suppress(_Unavailable):  # logged once, never raised
            await self._call("set", self._client.set, key, value, px=ttl_ms)

    def put_later(self, key: str, expires_at: float, claims: dict[str, Any]) -> None:
        """:meth:`put` in the background: the check that learnt the answer does not wait for
        it. Bounded as every call is (the connections), and skipped when all are busy."""
        if expires_at <= self._clock() or self._busy():
            return
        self._in_background(self.put(key, expires_at, claims))

    def _in_background(self, call: Coroutine[Any, Any, Any]) -> None:
        """Run a Redis call without waiting for it, kept until done."""
        task = asyncio.ensure_future(call)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def add(self, kind: str, key: str, expires_at: float) -> bool | None:
        """Record ``key`` until ``expires_at`` unless it is there already (``SET NX PX``):
        True when recorded, False when an entry this fleet wrote is there (a DPoP ``jti``
        seen by another replica), None when Redis cannot say (the caller decides alone)."""
        ttl_ms = int((expires_at - self._clock()) * 1000)
        if ttl_ms <= 0 or self._busy():
            return None
        value = self.seal(key, expires_at, {})
        try:
            if await self._call("add", self._client.set, key, value, px=ttl_ms, nx=True):
                return True
            existing = await self._call("get", self._client.get, key)
            if existing is not None:
                try:
                    if self.unseal(key, bytes(existing)) is not None:
                        return False
                except _Rejected as why:
                    self._rejected(kind, why)
            # Gone meanwhile, or not this fleet's: it is no record of ours, so write ours over.
            await self._call("set", self._client.set, key, value, px=ttl_ms)
        except _Unavailable:
            return None
        return True

    # -- the fleet's single flight --------------------------------------------------------

    async def lease(self, key: str, seconds: float) -> bool | None:
        """Take the fleet's lease on asking the IdP for the entry ``key`` (``SET NX PX``), held
        ``seconds`` at most: True, this replica asks; False, another replica is asking now (wait
        for its answer, :meth:`wait_for`); None, Redis cannot say (ask). A lease grants nothing
        but a bounded wait, so it carries no MAC: a forged one costs a waiter ``seconds``."""
        ttl_ms = int(seconds * 1000)
        if ttl_ms <= 0 or self._busy():
            return None
        try:
            taken = await self._call(
                "lease", self._client.set, _lease_key(key), b"1", px=ttl_ms, nx=True
            )
        except _Unavailable:
            return None
        return bool(taken)

    def release_later(self, key: str) -> None:
        """Give the lease on ``key`` back in the background: the replica that held it failed to
        get an answer, and the waiting ones ask for themselves at once rather than at the end
        of the lease."""
        if not self._busy():
            self._in_background(self._release(key))

    async def _release(self, key: str) -> None:
        with contextlib.suppress(_Unavailable):
            await self._call("release", self._client.delete, _lease_key(key))

    async def wait_for(self, kind: str, key: str, seconds: float) -> SharedEntry | None:
        """The entry another replica is fetching under its lease, read as it lands: polled (the
        entry and the lease in one ``MGET``) at growing intervals for at most ``seconds``. None
        when the lease ends without an entry (that replica's IdP call failed), the time is up,
        or Redis cannot say: the caller then asks the IdP itself."""
        until = self._monotonic() + seconds
        pause = FIRST_POLL_SECONDS
        while True:
            left = until - self._monotonic()
            if left <= 0:
                return None
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 1.5, MAX_POLL_SECONDS)
            if self._busy():
                return None
            try:
                value, lease = await self._call("poll", self._client.mget, key, _lease_key(key))
            except _Unavailable:
                return None
            if value is not None:
                try:
                    entry = self.unseal(key, bytes(value))
                except _Rejected as why:
                    self._rejected(kind, why)
                    return None
                if entry is not None:
                    self._count("shared", "hit")
                    return entry
            if lease is None:
                return None

    async def evict(self, digest: bytes, scopes: Iterable[tuple[str, str]]) -> int | None:
        """Delete the entries of the token whose SHA-256 is ``digest`` under each (kind, scope)
        and publish the eviction to every replica: the number of entries deleted, None when
        Redis could not be told (then no replica heard of it)."""
        keys = [self.key_for_digest(kind, scope, digest) for kind, scope in scopes]
        if not self._may_try():
            return None
        try:
            deleted = await self._call("delete", self._client.delete, *keys) if keys else 0
            message = self.eviction_message(digest)
            await self._call("publish", self._client.publish, EVICT_CHANNEL, message)
        except _Unavailable:
            return None
        return int(deleted)

    async def delete(self, digest: bytes, scopes: Iterable[tuple[str, str]]) -> None:
        """Delete the token's entries under each (kind, scope), as a replica does on hearing of
        an eviction; nothing when Redis cannot."""
        keys = [self.key_for_digest(kind, scope, digest) for kind, scope in scopes]
        if keys and not self._busy():
            with contextlib.suppress(_Unavailable):
                await self._call("delete", self._client.delete, *keys)

    async def subscribe(self, on_evict: OnEvict) -> None:
        """Hear evictions until cancelled: each message that verifies is ``on_evict(digest)``;
        one that does not is ignored and logged ``cache.entryRejected`` (kind ``eviction``).
        Redis gone: tried again every second; subscribed again after a gap, ``on_evict(None)``
        (every token), since evictions published meanwhile were missed."""
        if self._subscriber is None:
            return
        subscribed_before = False
        while True:
            pubsub = self._subscriber.pubsub(ignore_subscribe_messages=True)
            try:
                async with asyncio.timeout(max(self._timeout, 1.0)):
                    await pubsub.subscribe(EVICT_CHANNEL)
                self._subscription_restored()
                if subscribed_before:
                    await on_evict(None)
                subscribed_before = True
                while True:
                    message = await pubsub.get_message(timeout=RETRY_SECONDS * 5)
                    if message is None or message.get("type") != "message":
                        continue
                    data = message.get("data")
                    digest = self.read_eviction(data) if isinstance(data, bytes) else None
                    if digest is None:
                        self._report(
                            "WARNING",
                            ENTRY_REJECTED_EVENT,
                            {
                                "message": "An eviction message was ignored: its MAC does not"
                                " verify under this key; someone who is not this fleet may be"
                                " publishing on the channel.",
                                "kind": "eviction",
                            },
                        )
                        continue
                    await on_evict(digest)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis went away: try again in a second
                self._subscription_failed(exc)
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await pubsub.aclose()
            await asyncio.sleep(RETRY_SECONDS)

    def _may_try(self) -> bool:
        if self._available:
            return True
        now = self._monotonic()
        if now < self._next_try:
            return False
        self._next_try = now + RETRY_SECONDS
        return True

    def _unavailable(self, exc: BaseException) -> None:
        self._next_try = self._monotonic() + RETRY_SECONDS
        # The exception's class only: a Redis error's text may quote what was sent.
        self._last_error = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
        if not self._available:
            return
        self._available, self._since = False, self._clock()
        self._report(
            "WARNING",
            UNAVAILABLE_EVENT,
            {
                "message": "The shared cache cannot be reached; checks go on with the local"
                " cache and the IdP, and it is tried again every second.",
                "uri": self.display_uri,
                "detail": self._last_error,
            },
        )

    def _restored(self) -> None:
        if self._available:
            return
        self._available, self._since = True, self._clock()
        self._report(
            "INFO",
            RESTORED_EVENT,
            {"message": "The shared cache answers again.", "uri": self.display_uri},
        )

    def _subscription_failed(self, exc: BaseException) -> None:
        self._subscribed = False
        if self._subscription_lost:
            return
        self._subscription_lost = True
        self._report(
            "WARNING",
            SUBSCRIPTION_LOST_EVENT,
            {
                "message": "The eviction channel cannot be listened to; evictions published"
                " meanwhile are missed (every local answer is dropped once it is back). Tried"
                " again every second.",
                "uri": self.display_uri,
                "channel": EVICT_CHANNEL,
                "detail": "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__,
            },
        )

    def _subscription_restored(self) -> None:
        self._subscribed = True
        if not self._subscription_lost:
            return
        self._subscription_lost = False
        self._report(
            "INFO",
            SUBSCRIPTION_RESTORED_EVENT,
            {
                "message": "The eviction channel is listened to again.",
                "uri": self.display_uri,
                "channel": EVICT_CHANNEL,
            },
        )

    def readiness(self) -> dict[str, Any]:
        """What /readyz shows; it never makes the replica unready."""
        state: dict[str, Any] = {
            "uri": self.display_uri,
            "available": self._available,
            "since": rfc3339(self._since),
        }
        if not self._available:
            state["lastError"] = self._last_error
        if self._subscriber is not None:
            state["evictionsSubscribed"] = self._subscribed
        return state

    async def aclose(self) -> None:
        for task in list(self._writes):
            task.cancel()
        for client in (self._client, self._subscriber):
            if client is None:
                continue
            try:
                async with asyncio.timeout(1.0):
                    await client.aclose()
            except Exception:  # noqa: BLE001 - leaving: a Redis that is gone has nothing to close
                pass


def _read_secret(path: str | None, env: str | None, what: str) -> bytes | None:
    """The value of a ``<what>File`` (less one trailing newline) or ``<what>Env``; ConfigError
    naming the file or variable, never the value."""
    where = f"server.sharedCache.{what}"
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ConfigError([f"{where}File: cannot read {path}: {exc.strerror}"]) from None
        data = data.removesuffix(b"\n").removesuffix(b"\r")
        if not data.strip():
            raise ConfigError([f"{where}File: {path} is empty"])
        return data
    if env is not None:
        value = os.environ.get(env, "").strip()
        if not value:
            raise ConfigError([f"{where}Env: environment variable {env} is not set"])
        return value.encode()
    return None


def _lease_key(key: str) -> str:
    """The lease on asking the IdP for the entry ``key``: ``extauthz:v1:lease:<kind>:<hex>``."""
    return f"{KEY_PREFIX}lease:{key.removeprefix(KEY_PREFIX)}"


def display_uri(uri: str) -> str:
    """``uri`` without its userinfo: what logs and /readyz may show."""
    scheme, _, rest = uri.partition("://")
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"


def read_signing_key(settings: SharedCacheSettings) -> bytes:
    """The fleet's signing key; ConfigError (naming the YAML path and the file or variable,
    never the value) when it cannot be read or is shorter than MIN_SIGNING_KEY_BYTES."""
    signing_key = _read_secret(settings.signing_key_file, settings.signing_key_env, "signingKey")
    assert signing_key is not None  # the config requires one of the two
    if len(signing_key) < MIN_SIGNING_KEY_BYTES:
        source = "signingKeyFile" if settings.signing_key_file is not None else "signingKeyEnv"
        raise ConfigError(
            [
                f"server.sharedCache.{source}: the signing key must hold at least"
                f" {MIN_SIGNING_KEY_BYTES} bytes (openssl rand -hex 32)"
            ]
        )
    return signing_key


def check_secrets(settings: SharedCacheSettings) -> list[str]:
    """What ``check-config`` reports about the shared cache's secrets: each source that cannot
    be read (or a signing key too short), by its YAML path; empty when all can."""
    errors: list[str] = []
    try:
        read_signing_key(settings)
    except ConfigError as exc:
        errors.extend(exc.errors)
    try:
        _read_secret(settings.password_file, settings.password_env, "password")
    except ConfigError as exc:
        errors.extend(exc.errors)
    return errors


def open_shared_cache(
    settings: SharedCacheSettings,
    report: Report,
    count: Count,
    observe: Observe = lambda _operation, _seconds: None,
    *,
    subscribe: bool = True,
) -> SharedCache:
    """The shared cache of ``settings``: its secrets read, its connection pool made (it connects
    at the first call, so an unreachable Redis does not hold the start), and with ``subscribe``
    a second client for the eviction channel. ConfigError when a secret cannot be read or the
    signing key is too short."""
    signing_key = read_signing_key(settings)
    password = _read_secret(settings.password_file, settings.password_env, "password")
    options: dict[str, Any] = {
        "password": password.decode() if password is not None else None,
        "socket_timeout": settings.timeout_seconds,
        "socket_connect_timeout": settings.timeout_seconds,
        "max_connections": MAX_CONNECTIONS,
        # One immediate retry: a pooled connection that a restarted Redis closed is replaced at
        # once, within the same call's timeout, rather than failing that call.
        "retry": Retry(NoBackoff(), 1),
    }
    if settings.uri.startswith("rediss://"):
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        if settings.ca_file is not None:
            options["ssl_ca_certs"] = settings.ca_file
    client = aioredis.Redis.from_url(settings.uri, **options)
    subscriber = None
    if subscribe:
        # No read timeout: a subscription waits for messages as long as there are none; a PING
        # every few seconds tells a dead connection from a quiet channel.
        quiet = {**options, "socket_timeout": None, "max_connections": 2}
        subscriber = aioredis.Redis.from_url(settings.uri, **quiet, health_check_interval=5)
    return SharedCache(
        client,
        signing_key,
        timeout_seconds=settings.timeout_seconds,
        display_uri=display_uri(settings.uri),
        report=report,
        count=count,
        observe=observe,
        subscriber=subscriber,
    )


# -- evictions: POST /cache/evict, extauthz evict, and the eviction channel ----------------

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
