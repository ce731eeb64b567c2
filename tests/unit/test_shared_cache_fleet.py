"""The pure parts of the shared cache's fleet features (key derivation from a token's SHA-256,
the eviction message's MAC, what a config's evictions delete, the eviction request), and the
records, evictions and local drops over an in-memory stand-in for the Redis client (the real
server: tests/integration/test_shared_cache_fleet.py)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest

from extauthz.cli import main
from extauthz.config import SharedCacheSettings, parse_config
from extauthz.decision import Reason
from extauthz.engine import Engine
from extauthz.logs import JsonLogger
from extauthz.shared_cache import (
    EVICT_CHANNEL,
    Evictor,
    EvictRefused,
    check_secrets,
    introspection_scope,
    jwt_scope,
    parse_evict_body,
    token_scopes,
)
from extauthz.verified import token_digest
from tests.check_requests import check_input
from tests.conftest import AUDIENCE, SigningKey, claims
from tests.fake_idp import JWKS, FakeIdp
from tests.policies import orders
from tests.redis_server import fleet_keys
from tests.unit.test_shared_cache import KEY, NOW, SCOPE, TOKEN, Env, FakeRedis, run

DIGEST = hashlib.sha256(TOKEN.encode()).digest()
ORDER_PATH = "/orders/1"


class FleetRedis(FakeRedis):
    """FakeRedis with SET NX, DEL and PUBLISH."""

    def __init__(self) -> None:
        super().__init__()
        self.published: list[tuple[str, bytes]] = []

    async def set(self, key: str, value: bytes, px: int, nx: bool = False) -> bool | None:  # type: ignore[override]
        await self._misbehave()
        if nx and key in self.data:
            return None
        self.data[key], self.ttl_ms[key] = value, px
        return True

    async def delete(self, *keys: str) -> int:
        await self._misbehave()
        return sum(self.data.pop(k, None) is not None for k in keys)

    async def publish(self, channel: str, message: bytes) -> int:
        await self._misbehave()
        self.published.append((channel, message))
        return 1


def fleet_env(key: bytes = KEY) -> Env:
    env = Env(key)
    env.redis = FleetRedis()
    env.cache._client = env.redis
    return env


def test_a_key_is_found_from_the_tokens_sha256_alone() -> None:
    env = Env()
    key = env.cache.key("introspection", SCOPE, TOKEN)
    assert key == env.cache.key_for_digest("introspection", SCOPE, DIGEST)
    assert token_digest(TOKEN) == DIGEST
    assert DIGEST.hex() not in key  # keyed: a plain hash is not the key either
    assert key != env.cache.key_for_digest("jwt", SCOPE, DIGEST)
    assert key != Env(b"z" * 32).cache.key_for_digest("introspection", SCOPE, DIGEST)


def test_the_eviction_message_verifies_only_under_the_fleets_key() -> None:
    env = Env()
    message = env.cache.eviction_message(DIGEST)
    assert message.startswith(DIGEST.hex().encode() + b".")
    assert env.cache.read_eviction(message) == DIGEST
    other = hashlib.sha256(b"other").digest()
    forged = [
        Env(b"z" * 32).cache.eviction_message(DIGEST),  # another fleet's key
        other.hex().encode() + message[64:],  # another token, the MAC of this one
        DIGEST.hex().encode() + b"." + b"0" * 64,
        DIGEST.hex().encode(),
        b"",
        b"zz" * 32 + message[64:],
    ]
    assert [env.cache.read_eviction(m) for m in forged] == [None] * len(forged)


def config(tmp_path: Path) -> Any:
    static = [{"kty": "RSA", "kid": "k", "n": "AQAB" * 64, "e": "AQAB"}]
    client = {"clientId": "x", "clientSecretEnv": "S"}
    deployments = [
        {"name": "i", "pathPrefix": "/i", "authentication": {"type": "TOKEN_AUTHENTICATION",
            "validationPolicy": {"type": "REMOTE_INTROSPECTION", "uri": "https://idp/introspect", "clientDetails": client}}},
        {"name": "d", "pathPrefix": "/d", "authentication": {"type": "TOKEN_AUTHENTICATION",
            "validationPolicy": {"type": "REMOTE_DISCOVERY", "uri": "https://idp/.well-known/openid-configuration", "clientDetails": client}}},
        {"name": "s", "pathPrefix": "/s", "authentication": {"type": "TOKEN_AUTHENTICATION",
            "validationPolicy": {"type": "STATIC_KEYS", "keys": static}}},
        {"name": "s2", "pathPrefix": "/s2", "authentication": {"type": "TOKEN_AUTHENTICATION",
            "validationPolicy": {"type": "STATIC_KEYS", "keys": static}}},
    ]  # fmt: skip
    return parse_config({"deployments": deployments})


def test_the_scopes_of_a_config_are_every_policys_once(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    scopes = token_scopes(cfg)
    sources = [d.auth.keys for d in cfg.deployments]
    assert scopes == [
        ("introspection", introspection_scope(sources[0])),
        ("introspection", introspection_scope(sources[1])),
        ("jwt", jwt_scope(sources[1])),
        ("jwt", jwt_scope(sources[2])),  # the same static keys twice: one scope
    ]
    assert introspection_scope(sources[0]) == "https://idp/introspect\x00x"
    assert (
        jwt_scope(sources[1]) == "REMOTE_DISCOVERY\x00https://idp/.well-known/openid-configuration"
    )
    assert jwt_scope(sources[2]).startswith("STATIC_KEYS\x00") and "AQAB" not in jwt_scope(
        sources[2]
    )


@pytest.mark.parametrize(
    "body",
    [b"", b"{}", b"[]", b"null", b'{"tokenSha256": "abc"}', b'{"tokenSha256": 1}',
     b'{"tokenSha256": "' + b"g" * 64 + b'"}', b'{"tokenSha256": "' + b"a" * 64 + b'", "x": 1}',
     b" " * 2000],
)  # fmt: skip
def test_a_bad_eviction_request_is_refused(body: bytes) -> None:
    with pytest.raises(EvictRefused):
        parse_evict_body(body)


def test_an_eviction_request_names_a_sha256() -> None:
    assert parse_evict_body(json.dumps({"tokenSha256": DIGEST.hex().upper()}).encode()) == DIGEST


def test_a_dpop_record_is_set_once_and_a_forged_one_is_overwritten() -> None:
    env = fleet_env()
    key = env.cache.key_for_digest("dpop", "", DIGEST)
    assert run(env.cache.add("dpop", key, NOW + 120)) is True
    assert env.redis.ttl_ms[key] == 120_000
    assert run(env.cache.add("dpop", key, NOW + 120)) is False  # recorded by a replica: replay
    env.redis.data[key] = b"0" * 64 + b'.{"expiresAt":1e12,"active":true,"claims":{}}'
    assert run(env.cache.add("dpop", key, NOW + 120)) is True  # not the fleet's: no record
    assert env.cache.unseal(key, env.redis.data[key]) is not None  # ours now
    assert [f["kind"] for f in env.events("cache.entryRejected")] == ["dpop"]
    env.redis.mode = "error"
    assert run(env.cache.add("dpop", key, NOW + 120)) is None  # cannot say: local memory decides


class Recorder:
    def __init__(self) -> None:
        self.dropped: list[bytes | None] = []

    def __call__(self, digest: bytes | None) -> int:
        self.dropped.append(digest)
        return 2


def evictor(env: Env | None) -> tuple[Evictor, Recorder, io.StringIO]:
    out, local = io.StringIO(), Recorder()
    scopes = [("introspection", SCOPE), ("jwt", "REMOTE_JWKS\x00https://idp/jwks")]
    cache = env.cache if env is not None else None
    return Evictor(local, cache, lambda: scopes, JsonLogger(out)), local, out


def logged(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_an_eviction_deletes_the_shared_entries_and_publishes_once_logged() -> None:
    env = fleet_env()
    key = env.cache.key("introspection", SCOPE, TOKEN)
    run(env.cache.put(key, NOW + 60, {"sub": "alice"}))
    dpop = env.cache.key_for_digest("dpop", "", DIGEST)
    run(env.cache.add("dpop", dpop, NOW + 60))
    ev, local, out = evictor(env)
    status, body = run(ev.evict(DIGEST, "admin"))
    assert (status, body) == (200, {"evicted": 3, "shared": True, "tokenSha256": DIGEST.hex()[:8]})
    assert key not in env.redis.data and dpop in env.redis.data  # never a DPoP record
    ((channel, message),) = env.redis.published
    assert channel == EVICT_CHANNEL and env.cache.read_eviction(message) == DIGEST
    run(ev.heard(DIGEST))  # its own message, back from the channel: dropped, not logged again
    assert local.dropped == [DIGEST, DIGEST]
    (line,) = logged(out)
    assert line["event"] == "cache.evicted" and line["source"] == "admin"
    assert line["tokenSha256"] == DIGEST.hex()[:8] and TOKEN not in out.getvalue()
    assert DIGEST.hex() not in out.getvalue()


def test_an_eviction_heard_from_another_replica_drops_and_deletes_its_own_scopes() -> None:
    env = fleet_env()
    key = env.cache.key("introspection", SCOPE, TOKEN)
    run(env.cache.put(key, NOW + 60, {"sub": "alice"}))
    ev, local, out = evictor(env)
    run(ev.heard(DIGEST))
    assert local.dropped == [DIGEST] and key not in env.redis.data
    (line,) = logged(out)
    assert line["source"] == "channel" and line["evicted"] == 2
    run(ev.heard(None))  # subscribed again after a gap: every local answer
    assert local.dropped == [DIGEST, None]
    assert logged(out)[-1]["tokenSha256"] == "*" and logged(out)[-1]["level"] == "WARNING"


def test_an_eviction_without_a_reachable_shared_cache_says_so() -> None:
    env = fleet_env()
    env.redis.mode = "error"
    ev, local, _ = evictor(env)
    status, body = run(ev.evict(DIGEST, "admin"))
    assert status == 503 and body["shared"] is False and body["error"] == "shared_cache_unavailable"
    assert local.dropped == [DIGEST]  # this replica's caches, at least
    ev, local, _ = evictor(None)
    status, body = run(ev.evict(DIGEST, "admin"))
    assert status == 200 and body["shared"] is False and body["evicted"] == 2
    assert "this replica only" in body["message"]


def test_check_config_reads_the_shared_cache_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    short = tmp_path / "short-key"
    short.write_text("too short\n")
    missing = tmp_path / "missing"
    settings = SharedCacheSettings("redis://r:6379/0", str(short), None, str(missing))
    errors = check_secrets(settings)
    assert errors[0].startswith("server.sharedCache.signingKeyFile: the signing key must hold")
    assert errors[1].startswith(f"server.sharedCache.passwordFile: cannot read {missing}")
    assert "too short" not in "".join(errors)
    good = tmp_path / "key"
    good.write_text("k" * 64)
    assert check_secrets(SharedCacheSettings("redis://r:6379/0", str(good), None)) == []

    path = tmp_path / "config.yaml"
    static = {
        "type": "STATIC_KEYS",
        "keys": [{"kty": "RSA", "kid": "k", "n": "AQAB" * 64, "e": "AQAB"}],
    }
    doc = {
        "server": {"sharedCache": {"uri": "redis://r:6379/0", "signingKeyFile": str(missing)}},
        "deployments": [{"name": "s", "pathPrefix": "/s", "authentication": {
            "type": "TOKEN_AUTHENTICATION", "validationPolicy": static}}],
    }  # fmt: skip
    path.write_text(json.dumps(doc))
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"server.sharedCache.signingKeyFile: cannot read {missing}" in err
    doc["server"]["sharedCache"]["signingKeyFile"] = str(good)  # type: ignore[index]
    path.write_text(json.dumps(doc))
    assert main(["check-config", str(path)]) == 0


def test_the_local_caches_drop_a_token() -> None:
    from extauthz.config import ClientDetails
    from extauthz.idp.introspection import ClientSecret, IntrospectionClient

    client = IntrospectionClient(
        lambda: None,  # type: ignore[arg-type,return-value]
        ClientDetails("c", None, "S", "client_secret_basic"),
        ClientSecret("s"),
        max_cache_seconds=60,
    )
    client._store(DIGEST, 1e12, b"{}")
    client._store(b"x" * 32, 1e12, b"{}")
    assert client.evict(DIGEST) == 1 and client.evict(DIGEST) == 0
    assert client.evict(None) == 1 and len(client) == 0


def test_a_jwt_is_looked_up_only_when_this_replica_has_no_key_for_it(
    rsa_key: SigningKey, rsa_key2: SigningKey
) -> None:
    """Replica A holds the token's key; replica B's JWKS (same URI, so the same scope) does
    not: B allows on A's entry, with every claim check run again. A token whose signature fails
    with a key B holds is denied even with a genuine-looking entry of the fleet's."""
    config = parse_config(
        {
            "deployments": [
                orders(
                    {
                        "type": "REMOTE_JWKS",
                        "uri": JWKS,
                        "additionalValidationPolicy": {"audiences": [AUDIENCE]},
                    }
                )
            ]
        }
    )
    redis = FleetRedis()

    def replica(jwks: list[dict[str, Any]], shared: bool = True) -> Engine:
        cache = fleet_keys(KEY, redis)
        providers = FakeIdp(jwks).providers(config)
        return Engine(config, providers.by_deployment, shared_cache=cache if shared else None)

    async def scenario() -> None:
        a, b = replica([rsa_key.public_jwk]), replica([rsa_key2.public_jwk])
        alone = replica([rsa_key2.public_jwk], shared=False)
        good = rsa_key.sign(claims())
        other_audience = rsa_key.sign(claims(aud="elsewhere"))
        for token in (good, other_audience):
            await a.check(check_input(ORDER_PATH, token=token))
        for _ in range(10):  # the background writes
            await asyncio.sleep(0)
        assert len(redis.data) == 2
        assert (await b.check(check_input(ORDER_PATH, token=good))).allowed
        denied = await b.check(check_input(ORDER_PATH, token=other_audience))
        assert denied.reason is Reason.AUDIENCE_MISMATCH
        assert not (await alone.check(check_input(ORDER_PATH, token=good))).allowed

        # rsa-2's kid, rsa-1's signature: B holds rsa-2, so the signature fails; an entry the
        # fleet's key sealed for this very token is never read.
        forged = rsa_key.sign(claims(sub="mallory"), kid=rsa_key2.kid)
        cache = fleet_keys(KEY, redis)
        scope = jwt_scope(config.deployments[0].auth.keys)
        await cache.put(cache.key("jwt", scope, forged), time.time() + 60, claims(sub="mallory"))
        assert (
            await b.check(check_input(ORDER_PATH, token=forged))
        ).reason is Reason.SIGNATURE_INVALID

    asyncio.run(scenario())
