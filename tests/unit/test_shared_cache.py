"""The shared cache's keys and MACs, and how it behaves when Redis misbehaves, over an in-memory
stand-in for the Redis client (the real server is tests/integration/test_shared_cache.py)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from extauthz.config import ClientDetails, ConfigError, SharedCacheSettings, parse_config
from extauthz.idp.introspection import NEGATIVE_TTL_SECONDS, ClientSecret, IntrospectionClient
from extauthz.shared_cache import (
    ENTRY_REJECTED_EVENT,
    RESTORED_EVENT,
    UNAVAILABLE_EVENT,
    SharedCache,
    display_uri,
    open_shared_cache,
)

KEY = b"k" * 32
TOKEN = "opaque-token-value-123"
SCOPE = "https://idp.example.com/introspect\x00extauthz"
NOW = 1_800_000_000.0


class FakeRedis:
    """get/set with PX, and a switch that makes every call fail or hang."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.ttl_ms: dict[str, int] = {}
        self.mode = "ok"  # "error", "hang"

    async def _misbehave(self) -> None:
        if self.mode == "error":
            raise ConnectionError("Connection refused")
        if self.mode == "hang":
            await asyncio.sleep(10)

    async def get(self, key: str) -> bytes | None:
        await self._misbehave()
        return self.data.get(key)

    async def set(self, key: str, value: bytes, px: int, nx: bool = False) -> bool | None:
        await self._misbehave()
        if nx and key in self.data:
            return None  # as Redis answers SET NX on a key that is there
        self.data[key], self.ttl_ms[key] = value, px
        return True

    async def aclose(self) -> None:
        pass


class Env:
    def __init__(self, key: bytes = KEY) -> None:
        self.redis = FakeRedis()
        self.lines: list[tuple[str, str, dict[str, Any]]] = []
        self.counts: list[str] = []
        self.now = NOW
        self.mono = 0.0
        self.cache = SharedCache(
            self.redis,
            key,
            timeout_seconds=0.05,
            display_uri="redis://127.0.0.1:6379",
            report=lambda level, event, fields: self.lines.append((level, event, fields)),
            count=lambda cache, result: self.counts.append(f"{cache}:{result}"),
            clock=lambda: self.now,
            monotonic=lambda: self.mono,
        )

    def events(self, event: str) -> list[dict[str, Any]]:
        return [fields for _, e, fields in self.lines if e == event]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_the_key_is_an_hmac_of_scope_and_token_never_the_token() -> None:
    env = Env()
    key = env.cache.key("introspection", SCOPE, TOKEN)
    prefix, digest = key.rsplit(":", 1)
    assert prefix == "extauthz:v1:introspection"
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert TOKEN not in key
    assert key == env.cache.key("introspection", SCOPE, TOKEN)  # every replica finds it
    assert key != env.cache.key("introspection", SCOPE, TOKEN + "x")
    assert key != env.cache.key("introspection", "https://other-idp/introspect\x00x", TOKEN)
    assert key != Env(b"z" * 32).cache.key("introspection", SCOPE, TOKEN)  # another fleet's key


def test_an_entry_round_trips_and_carries_its_expiry() -> None:
    env = Env()
    key = env.cache.key("introspection", SCOPE, TOKEN)
    claims = {"sub": "alice", "exp": int(NOW) + 60}
    run(env.cache.put(key, NOW + 60, claims))
    assert env.redis.ttl_ms[key] == 60_000
    assert TOKEN.encode() not in env.redis.data[key]
    entry = run(env.cache.get("introspection", key))
    assert entry is not None and entry.claims == claims and entry.expires_at == NOW + 60
    run(env.cache.put(key, NOW + 10, None))  # an inactive answer
    entry = run(env.cache.get("introspection", key))
    assert entry is not None and entry.claims is None
    env.now = NOW + 11  # past the expiry written in it, though Redis has not dropped it yet
    assert run(env.cache.get("introspection", key)) is None
    assert env.counts == ["shared:hit", "shared:hit", "shared:miss"]


def forged(env: Env, key: str, value: bytes) -> Any:
    env.redis.data[key] = value
    return run(env.cache.get("introspection", key))


def test_an_entry_that_does_not_verify_is_ignored_and_logged_without_its_content() -> None:
    env = Env()
    key = env.cache.key("introspection", SCOPE, TOKEN)
    body = json.dumps({"expiresAt": NOW + 60, "active": True, "claims": {"sub": "mallory"}})
    good = env.cache.seal(key, NOW + 60, {"sub": "alice"})
    mac, _, data = good.partition(b".")
    cases = [
        b"0" * 64 + b"." + body.encode(),  # written without the key
        mac + b"." + data.replace(b"alice", b"admin"),  # altered
        env.cache.seal(env.cache.key("introspection", SCOPE, "other"), NOW + 60, {"sub": "x"}),
        Env(b"z" * 32).cache.seal(key, NOW + 60, {"sub": "alice"}),  # another fleet's key
        b"not an entry",
        b"\xff" * 70,
    ]
    for value in cases:
        assert forged(env, key, value) is None
    rejected = env.events(ENTRY_REJECTED_EVENT)
    assert len(rejected) == len(cases)
    assert env.counts == ["shared:rejected"] * len(cases)
    text = json.dumps(rejected)
    assert "mallory" not in text and "admin" not in text and TOKEN not in text
    assert all(fields["kind"] == "introspection" for fields in rejected)


def test_a_verified_entry_must_still_be_consistent() -> None:
    """A MAC proves who wrote it; the fields must still say one thing (defence in depth)."""
    env = Env()
    key = env.cache.key("introspection", SCOPE, TOKEN)
    for body in (
        {"expiresAt": NOW + 60, "active": True, "claims": None},
        {"expiresAt": NOW + 60, "active": False, "claims": {"sub": "a"}},
        {"expiresAt": "later", "active": False, "claims": None},
        {"expiresAt": True, "active": False, "claims": None},
        ["not", "a", "mapping"],
    ):
        data = json.dumps(body).encode()
        value = env.cache._mac(key, data).encode() + b"." + data
        assert forged(env, key, value) is None
    assert env.counts == ["shared:rejected"] * 5


@pytest.mark.parametrize("mode", ["error", "hang"])
def test_redis_down_is_a_miss_logged_once_then_restored_once(mode: str) -> None:
    env = Env()
    key = env.cache.key("introspection", SCOPE, TOKEN)
    env.redis.mode = mode
    for _ in range(3):
        assert run(env.cache.get("introspection", key)) is None
        run(env.cache.put(key, NOW + 60, {"sub": "a"}))
        env.mono += 0.3
    assert len(env.events(UNAVAILABLE_EVENT)) == 1
    (line,) = env.events(UNAVAILABLE_EVENT)
    assert line["detail"] == ("timeout" if mode == "hang" else "ConnectionError")
    assert env.cache.readiness()["available"] is False
    assert env.counts == ["shared:error"] * 3
    env.redis.mode = "ok"
    env.mono += 0.1  # still within the second: skipped, not tried
    assert run(env.cache.get("introspection", key)) is None
    assert env.events(RESTORED_EVENT) == []
    env.mono += 1.0
    assert run(env.cache.get("introspection", key)) is None  # tried: answers (nothing there)
    assert len(env.events(RESTORED_EVENT)) == 1
    assert env.counts[-2:] == ["shared:error", "shared:miss"]
    assert env.cache.readiness()["available"] is True


def test_one_slow_call_is_a_miss_three_in_a_row_an_outage() -> None:
    """A call that runs out of time on a loaded machine is a miss; only three in a row make the
    server unavailable (and skipped for a second). A success in between starts the count anew."""
    env = Env()
    key = env.cache.key("introspection", SCOPE, TOKEN)
    for mode in ("hang", "hang", "ok", "hang", "hang"):
        env.redis.mode = mode
        assert run(env.cache.get("introspection", key)) is None
    assert env.events(UNAVAILABLE_EVENT) == [] and env.cache.readiness()["available"] is True
    assert run(env.cache.get("introspection", key)) is None  # the third in a row
    (line,) = env.events(UNAVAILABLE_EVENT)
    assert line["detail"] == "timeout" and env.cache.readiness()["available"] is False


def test_a_timed_out_call_takes_at_most_the_timeout() -> None:
    env = Env()
    env.redis.mode = "hang"

    async def timed() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await env.cache.get("introspection", "extauthz:v1:introspection:00")
        return loop.time() - started

    assert run(timed()) < 0.5


def test_display_uri_drops_userinfo() -> None:
    assert display_uri("rediss://user@redis.example:6380/0") == "rediss://redis.example:6380/0"
    assert display_uri("redis://127.0.0.1:6379") == "redis://127.0.0.1:6379"


def config(shared: dict[str, Any]) -> Any:
    return parse_config(
        {
            "server": {"sharedCache": shared},
            "deployments": [
                {
                    "name": "d",
                    "pathPrefix": "/",
                    "authentication": {
                        "type": "TOKEN_AUTHENTICATION",
                        "validationPolicy": {
                            "type": "REMOTE_INTROSPECTION",
                            "uri": "https://idp.example.com/introspect",
                            "clientDetails": {"clientId": "c", "clientSecretEnv": "S"},
                        },
                    },
                }
            ],
        },
        source="test",
    )


def test_config_resolves_the_settings() -> None:
    settings = config(
        {"uri": "rediss://r:6380/1", "signingKeyEnv": "K", "passwordFile": "/p", "caFile": "/ca"}
    ).server.shared_cache
    assert settings == SharedCacheSettings(
        "rediss://r:6380/1", None, "K", password_file="/p", timeout_seconds=0.05, ca_file="/ca"
    )


@pytest.mark.parametrize(
    ("shared", "why"),
    [
        ({"uri": "redis://:secret@r:6379", "signingKeyEnv": "K"}, "password in the uri"),
        ({"uri": "redis://u:secret@r:6379", "signingKeyEnv": "K"}, "password in the uri"),
        ({"uri": "http://r:6379", "signingKeyEnv": "K"}, "uri"),
        ({"uri": "redis://r"}, "signingKeyFile or signingKeyEnv"),
        ({"uri": "redis://r", "signingKeyEnv": "K", "signingKeyFile": "/k"}, "exactly one"),
        ({"uri": "redis://r", "signingKeyEnv": "K", "passwordEnv": "P", "passwordFile": "/p"}, "at most one"),
        ({"uri": "redis://r", "signingKeyEnv": "K", "caFile": "/ca"}, "rediss"),
        ({"uri": "redis://r", "signingKeyEnv": "K", "password": "inline"}, "password"),
        ({"uri": "redis://r", "signingKeyEnv": "K", "timeoutMilliseconds": 0}, "timeoutMilliseconds"),
    ],
)
def test_config_refuses(shared: dict[str, Any], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        config(shared)


def test_config_accepts_a_user_name_without_password() -> None:
    assert config({"uri": "redis://extauthz@r:6379", "signingKeyEnv": "K"}).server.shared_cache


def test_opening_refuses_a_short_or_missing_signing_key(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def noop(*_a: Any) -> None:
        pass

    short = tmp_path / "short"
    short.write_text("too-short\n")
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        open_shared_cache(SharedCacheSettings("redis://r", str(short), None), noop, noop)
    monkeypatch.delenv("EXTAUTHZ_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match="EXTAUTHZ_TEST_NO_SUCH_KEY is not set"):
        open_shared_cache(
            SharedCacheSettings("redis://r", None, "EXTAUTHZ_TEST_NO_SUCH_KEY"), noop, noop
        )
    with pytest.raises(ConfigError, match="cannot read"):
        open_shared_cache(SharedCacheSettings("redis://r", str(tmp_path / "none"), None), noop, noop)
    good = tmp_path / "key"
    good.write_text("a" * 64 + "\n")
    cache = open_shared_cache(SharedCacheSettings("redis://r:1", str(good), None), noop, noop)
    asyncio.run(cache.aclose())


# -- the introspection client in front of it ----------------------------------------------------


class FakeEndpoint:
    """An introspection endpoint answering ``answers[token]`` (inactive for any other)."""

    name, uri = "introspection_endpoint", "https://idp.example.com/introspect"
    budget = 5.0  # timeoutSeconds: how long a lease on asking it is held

    def __init__(self, answers: dict[str, dict[str, Any]]) -> None:
        self.answers = answers
        self.calls = 0

    async def fetch(self, read: Any, *, method: str, data: Any, headers: Any = None) -> Any:
        self.calls += 1
        body = self.answers.get(data["token"], {"active": False})
        return read(SimpleNamespace(data=body))


def introspection(env: Env, endpoint: FakeEndpoint, max_cache_seconds: float = 3600) -> Any:
    async def find() -> Any:
        return endpoint

    return IntrospectionClient(
        find,
        ClientDetails("extauthz", None, "S", "client_secret_basic"),
        ClientSecret("s3cret"),
        max_cache_seconds=max_cache_seconds,
        clock=lambda: env.now,
        shared_cache=env.cache,
        scope=SCOPE,
    )


def test_replicas_share_answers_and_keep_them_no_longer_than_their_own_limits() -> None:
    env = Env()
    active = {"active": True, "sub": "alice", "exp": int(NOW) + 600}
    idp = FakeEndpoint({TOKEN: active})
    first, second = introspection(env, idp), introspection(env, idp, max_cache_seconds=60)
    assert run(first.introspect(TOKEN)) == {"sub": "alice", "exp": int(NOW) + 600}
    assert run(second.introspect(TOKEN)) == {"sub": "alice", "exp": int(NOW) + 600}
    assert idp.calls == 1
    assert first.cached_until(TOKEN) == NOW + 600  # exp
    assert second.cached_until(TOKEN) == NOW + 60  # its own maxCacheDurationInHours
    assert run(second.introspect(TOKEN)) is not None  # the local cache, in front
    assert env.counts == ["shared:miss", "shared:hit"]
    # An inactive answer is shared, for the negative TTL.
    assert run(first.introspect("revoked")) is None
    assert run(second.introspect("revoked")) is None
    assert idp.calls == 2
    assert second.cached_until("revoked") == NOW + NEGATIVE_TTL_SECONDS


def test_a_rejected_or_unreachable_shared_cache_falls_back_to_the_idp() -> None:
    env = Env()
    idp = FakeEndpoint({})  # every token inactive
    client = introspection(env, idp)
    key = env.cache.key("introspection", SCOPE, TOKEN)
    body = json.dumps({"expiresAt": NOW + 60, "active": True, "claims": {"sub": "x"}}).encode()
    env.redis.data[key] = b"f" * 64 + b"." + body
    assert run(client.introspect(TOKEN)) is None  # the IdP's word, not the forged entry's
    assert idp.calls == 1
    env.redis.mode = "error"
    assert run(client.introspect("other")) is None
    assert idp.calls == 2
    assert env.counts == ["shared:rejected", "shared:error"]


def test_calls_beyond_the_pool_skip_the_cache_without_calling_it_unavailable() -> None:
    env = Env()
    env.cache = SharedCache(
        env.redis,
        KEY,
        timeout_seconds=1.0,
        display_uri="redis://127.0.0.1:6379",
        report=lambda level, event, fields: env.lines.append((level, event, fields)),
        count=lambda cache, result: env.counts.append(f"{cache}:{result}"),
        clock=lambda: env.now,
        max_calls=2,
    )
    gate = asyncio.Event()
    get = env.redis.get

    async def slow_get(key: str) -> bytes | None:
        await gate.wait()
        return await get(key)

    env.redis.get = slow_get  # type: ignore[method-assign]

    async def burst() -> list[Any]:
        calls = [asyncio.ensure_future(env.cache.get("introspection", f"k{i}")) for i in range(3)]
        await asyncio.sleep(0.01)
        assert calls[2].done()  # the third: skipped at once
        gate.set()
        return await asyncio.gather(*calls)

    assert run(burst()) == [None, None, None]
    assert sorted(env.counts) == ["shared:error", "shared:miss", "shared:miss"]
    assert env.lines == []  # not unavailable
    assert env.cache.readiness()["available"] is True


def test_a_shared_lookup_is_an_event_on_the_check_span_not_a_span() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from extauthz.metrics import Metrics

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    metrics = Metrics()
    with provider.get_tracer("test").start_as_current_span("check") as span:
        span.set_attribute("extauthz.cache", "miss")  # the local lookup's
        metrics.shared_cache("shared", "hit")
    (check,) = exporter.get_finished_spans()
    events = [(e.name, dict(e.attributes or {})) for e in check.events]
    assert events == [("cache", {"extauthz.cache": "hit", "extauthz.cache.name": "shared"})]
    assert check.attributes is not None and check.attributes["extauthz.cache"] == "miss"
    labels = {"cache": "shared", "result": "hit"}
    assert metrics.registry.get_sample_value("extauthz_cache_events_total", labels) == 1
