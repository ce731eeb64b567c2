"""The shared cache (``server.sharedCache``): introspection answers shared by a fleet through
Redis or Valkey, so that N replicas ask the IdP about a token once rather than N times.

What is stored, and why it can be trusted no more than it must:

* **Keys** are ``extauthz:v1:<kind>:<hex HMAC-SHA256>`` of the token (with the scope of the
  policy that asked, so that two IdPs never answer for each other), under a key derived from the
  fleet's signing key. Anyone who can read Redis sees no token, nor a plain hash of one that a
  guessed token could be tested against.
* **Values** are ``<hex MAC>.<JSON>``: the answer with its own expiry, and an HMAC-SHA256 over
  the Redis key and the JSON together, under a second derived key. An entry that does not verify
  (written by someone without the key, altered, or copied under another token's key) is ignored,
  counted as ``rejected`` and logged ``cache.entryRejected``, never with its content: the check
  then asks the IdP as if nothing were there.
* **Lifetimes**: an active answer until the earlier of the token's ``exp`` and the policy's
  ``maxCacheDurationInHours``, an inactive one for the local cache's negative TTL; Redis expires
  the key then too, and a reader checks the expiry written in the value as well.

Redis is an optimisation, never an authority nor a dependency: every call is bounded by
``timeoutMilliseconds``, and a slow, down or erroring Redis is a miss, never an exception to the
caller, so it can neither allow, deny nor fail a check. It going away is logged once
(``cache.sharedUnavailable``), and its return once (``cache.sharedRestored``); while it is away
it is tried again at most once a second, so that a dead Redis does not add its timeout to every
check.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import ssl
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .config import ConfigError, SharedCacheSettings
from .logs import rfc3339

__all__ = [
    "ENTRY_REJECTED_EVENT",
    "RESTORED_EVENT",
    "UNAVAILABLE_EVENT",
    "SharedCache",
    "SharedEntry",
    "open_shared_cache",
]

UNAVAILABLE_EVENT = "cache.sharedUnavailable"
RESTORED_EVENT = "cache.sharedRestored"
ENTRY_REJECTED_EVENT = "cache.entryRejected"

KEY_PREFIX = "extauthz:v1:"
# A signing key shorter than SHA-256's output would weaken every MAC made with it.
MIN_SIGNING_KEY_BYTES = 32
# While Redis is unavailable, one call in this many seconds tries it again; the others skip it.
RETRY_SECONDS = 1.0
# A value larger than this is not an answer this code wrote (it writes at most 16 KiB of claims).
MAX_VALUE_BYTES = 64 * 1024
MAX_CONNECTIONS = 64

# (level, event, fields), as the IdP layer reports: the fields never hold a token nor a value.
Report = Callable[[str, str, dict[str, Any]], None]
# (cache, result): extauthz_cache_events_total{cache="shared"}.
Count = Callable[[str, str], None]

_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class SharedEntry:
    """An answer read back: ``claims`` None for an inactive token; ``expires_at`` wall clock."""

    __slots__ = ("claims", "expires_at")

    def __init__(self, expires_at: float, claims: dict[str, Any] | None) -> None:
        self.expires_at = expires_at
        self.claims = claims


class _Rejected(Exception):
    """An entry that does not verify; the message says why, never what it held."""


class SharedCache:
    """Get and put introspection answers in Redis; see the module's docstring."""

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
    ) -> None:
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
        self._client = client
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
        # The pool refuses a call beyond its connections with an error; counted here first, a
        # burst of new tokens skips the cache rather than passing for a Redis that went away.
        self._calls = asyncio.Semaphore(max_calls)

    # -- keys and values: pure, what the tests check ------------------------------------------

    def key(self, kind: str, scope: str, token: str) -> str:
        """The Redis key of ``token``'s answer from the policy ``scope``."""
        message = scope.encode() + b"\x00" + token.encode()
        digest = hmac.new(self._key_key, message, hashlib.sha256).hexdigest()
        return f"{KEY_PREFIX}{kind}:{digest}"

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
            async with self._calls, asyncio.timeout(self._timeout):
                value = await self._client.get(key)
        except Exception as exc:  # noqa: BLE001 - whatever Redis or its client does, never a reason to fail a check
            self._unavailable(exc)
            self._count("shared", "error")
            return None
        self._restored()
        if value is None:
            self._count("shared", "miss")
            return None
        try:
            entry = self.unseal(key, bytes(value))
        except _Rejected as why:
            self._count("shared", "rejected")
            self._report(
                "WARNING",
                ENTRY_REJECTED_EVENT,
                {
                    "message": f"A shared cache entry was ignored: {why}. The IdP is asked"
                    " instead; someone who is not this fleet may be writing to the cache.",
                    "kind": kind,
                },
            )
            return None
        self._count("shared", "miss" if entry is None else "hit")
        return entry

    async def put(self, key: str, expires_at: float, claims: dict[str, Any] | None) -> None:
        """Store an answer until ``expires_at`` (wall clock); nothing when it is already past
        or Redis cannot take it."""
        ttl_ms = int((expires_at - self._clock()) * 1000)
        if ttl_ms <= 0 or not self._may_try() or self._calls.locked():
            return
        value = self.seal(key, expires_at, claims)
        if len(value) > MAX_VALUE_BYTES:
            return  # a whole profile in an answer: not worth the other replicas' memory
        try:
            async with self._calls, asyncio.timeout(self._timeout):
                await self._client.set(key, value, px=ttl_ms)
        except Exception as exc:  # noqa: BLE001 - as in get(): logged once, never raised
            self._unavailable(exc)
            return
        self._restored()

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

    def readiness(self) -> dict[str, Any]:
        """What /readyz shows; it never makes the replica unready."""
        state: dict[str, Any] = {
            "uri": self.display_uri,
            "available": self._available,
            "since": rfc3339(self._since),
        }
        if not self._available:
            state["lastError"] = self._last_error
        return state

    async def aclose(self) -> None:
        try:
            async with asyncio.timeout(1.0):
                await self._client.aclose()
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


def display_uri(uri: str) -> str:
    """``uri`` without its userinfo: what logs and /readyz may show."""
    scheme, _, rest = uri.partition("://")
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"


def open_shared_cache(settings: SharedCacheSettings, report: Report, count: Count) -> SharedCache:
    """The shared cache of ``settings``: its secrets read, its connection pool made (it connects
    at the first call, so an unreachable Redis does not hold the start). ConfigError when a
    secret cannot be read or the signing key is too short."""
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
    return SharedCache(
        client,
        signing_key,
        timeout_seconds=settings.timeout_seconds,
        display_uri=display_uri(settings.uri),
        report=report,
        count=count,
    )
