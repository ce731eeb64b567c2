"""The shared cache (``server.sharedCache``) with a real redis-server: two ``extauthz serve``
replicas sharing one Redis and one IdP.

* N distinct opaque tokens, each checked on both replicas: the IdP is asked N times, not 2N.
* Entries written straight into Redis by someone without the signing key (a wrong MAC, active
  for a token the IdP says is inactive), or a genuine entry copied under another token's key:
  never an allow, and ``cache.entryRejected`` is logged.
* Redis killed mid-run: checks keep their right answers (local cache and IdP), one
  ``cache.sharedUnavailable`` line; restarted: ``cache.sharedRestored`` and shared hits again.

redis-server must be installed: see tests/redis_server.py, whose fixtures these tests use.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import claims
from tests.integration.faulty_idp import Fault, FaultyIdp
from tests.integration.serverproc import ExtauthzProcess
from tests.policies import orders
from tests.redis_server import (  # noqa: F401 (the redis_server and tls_redis_server fixtures)
    RedisServer,
    fleet_keys,
    redis_server_fixture,
    tls_redis_server_fixture,
)
from tests.waiting import wait_until

ORDER = "/orders/1"
CLIENT_ID = "extauthz"
INTROSPECT = "/introspect"


class Fleet:
    """Two replicas, one Redis, one IdP, and the fleet's signing key (what the test needs to
    find an entry's key, as an operator with the key could)."""

    def __init__(
        self,
        idp: FaultyIdp,
        redis_server: RedisServer,
        tmp_path: Path,
        ca_files: tuple[Path | None, Path | None] = (None, None),
    ) -> None:
        """``ca_files``: each replica's ``caFile`` (with a rediss:// server)."""
        self.idp, self.redis = idp, redis_server
        self.uri = idp.introspection(INTROSPECT)
        self.signing_key = secrets.token_hex(32)
        key_file = tmp_path / "signing-key"
        key_file.write_text(self.signing_key + "\n")
        secret_file = tmp_path / "client-secret"
        secret_file.write_text("s3cret\n")
        policy = {
            "type": "REMOTE_INTROSPECTION",
            "uri": self.uri,
            "clientDetails": {"clientId": CLIENT_ID, "clientSecretFile": str(secret_file)},
        }
        shared: dict[str, Any] = {
            "uri": redis_server.uri,
            "passwordEnv": "REDIS_PASSWORD",
            "signingKeyFile": str(key_file),
            # Generous for a loaded CI machine; the point here is sharing, not speed.
            "timeoutMilliseconds": 500,
        }
        env = {"REDIS_PASSWORD": redis_server.password}
        self.replicas = []
        for name, ca_file in zip(("a", "b"), ca_files, strict=True):
            with_ca = shared if ca_file is None else {**shared, "caFile": str(ca_file)}
            config = {"server": {"sharedCache": with_ca}, "deployments": [orders(policy)]}
            self.replicas.append(ExtauthzProcess(config, tmp_path / name, env=env))
        self.keys = fleet_keys(self.signing_key.encode())

    def redis_key(self, token: str) -> str:
        return self.keys.key("introspection", f"{self.uri}\x00{CLIENT_ID}", token)

    def introspections(self) -> int:
        return self.idp.count(INTROSPECT)

    def texts(self) -> str:
        return "".join(replica.text() for replica in self.replicas)


@pytest.fixture
def fleet(redis_server: RedisServer, tmp_path: Path) -> Iterator[Fleet]:
    with FaultyIdp(clients={CLIENT_ID: "s3cret"}, tls=False) as idp:
        f = Fleet(idp, redis_server, tmp_path)
        for replica in f.replicas:
            replica.start()
        try:
            yield f
        finally:
            for replica in f.replicas:
                replica.stop()
        # Nothing secret in any line: not a token, nor the Redis password, nor the signing key.
        text = f.texts()
        assert redis_server.password not in text
        assert f.signing_key not in text


def entries(redis_server: RedisServer) -> list[bytes]:
    """The keys of the answers in Redis (not the leases of the fleet's single flight)."""
    return [k for k in redis_server.client().keys("*") if not k.startswith(b"extauthz:v1:lease:")]


def events(replica: ExtauthzProcess, event: str, n: int) -> list[dict[str, Any]]:
    """The ``event`` lines, once there are ``n`` (lines are written every few milliseconds)."""

    def enough() -> list[dict[str, Any]] | None:
        lines = replica.events(event)
        return lines if len(lines) >= n else None

    found = wait_until(enough, timeout=5, what=f"{n} {event} line(s)")
    assert len(found) == n, found
    return found


def test_n_tokens_on_two_replicas_cost_n_introspections(fleet: Fleet) -> None:
    a, b = fleet.replicas
    tokens = [fleet.idp.issue(claims(sub=f"user-{i}")) for i in range(8)]
    for token in tokens:
        assert a.check(token, path=ORDER).allowed
    for token in tokens:
        checked = b.check(token, path=ORDER)
        assert checked.allowed
        assert b.line(checked.request_id, "access")["idpCalls"] == 0
    assert fleet.introspections() == len(tokens)
    assert a.metric("extauthz_cache_events_total", cache="shared", result="miss") == len(tokens)
    assert b.metric("extauthz_cache_events_total", cache="shared", result="hit") == len(tokens)
    # What Redis holds: HMAC'd keys, never a token.
    stored = entries(fleet.redis)
    assert sorted(k.decode() for k in stored) == sorted(fleet.redis_key(t) for t in tokens)
    values = b"".join(fleet.redis.client().get(k) or b"" for k in stored)
    assert not any(t.encode() in values for t in tokens)
    # An inactive answer is shared too: the second replica does not ask again.
    unknown = secrets.token_urlsafe(32)
    assert not a.check(unknown, path=ORDER).allowed
    assert not b.check(unknown, path=ORDER).allowed
    assert fleet.introspections() == len(tokens) + 1
    status, body = a.admin("readyz")
    assert status == 200
    assert json.loads(body)["sharedCache"]["available"] is True


def test_one_idp_call_for_a_token_met_by_both_replicas_at_once(fleet: Fleet) -> None:
    """The single flight holds across the fleet: while the IdP holds the first replica's
    introspection, the second waits for its answer in Redis instead of asking too."""
    a, b = fleet.replicas
    token = fleet.idp.issue(claims(sub="both-at-once"))
    fleet.idp.set_fault(INTROSPECT, Fault.hold())
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(a.check, token, path=ORDER)
        wait_until(lambda: fleet.introspections() == 1, timeout=5, what="the first introspection")
        second = pool.submit(b.check, token, path=ORDER)
        time.sleep(0.5)  # the second replica is waiting now, not asking
        assert fleet.introspections() == 1
        fleet.idp.release()
        assert first.result().allowed and second.result().allowed
    assert fleet.introspections() == 1
    assert b.line(second.result().request_id, "access")["idpCalls"] == 0
    # The lease is given back once the answer is there.
    wait_until(lambda: not fleet.redis.client().keys("extauthz:v1:lease:*"), timeout=5, what="no lease")


def test_a_failed_lease_holder_lets_the_others_ask_at_once(fleet: Fleet) -> None:
    """The replica holding the lease gets no answer (the IdP goes away in the middle of its
    call): it gives the lease back, and the waiting replica asks the IdP itself at once, long
    before the lease (5 s, the policy's timeoutSeconds) would have run out."""
    a, b = fleet.replicas
    token = fleet.idp.issue(claims(sub="holder-fails"))
    fleet.idp.set_fault(INTROSPECT, Fault.hold())
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(a.check, token, path=ORDER)
        wait_until(lambda: fleet.introspections() == 1, timeout=5, what="the first introspection")
        second = pool.submit(b.check, token, path=ORDER)
        time.sleep(0.3)  # waiting on the lease
        stopped = time.monotonic()
        fleet.idp.stop()
        assert not first.result().allowed
        waited = second.result()
    assert not waited.allowed and time.monotonic() - stopped < 2.0
    failure = b.line(waited.request_id, "authentication.idpCallFailed")
    assert failure["endpoint"] == "introspection_endpoint"  # it asked the IdP itself


def test_forged_and_copied_entries_are_never_an_allow(fleet: Fleet) -> None:
    a, b = fleet.replicas
    r = fleet.redis.client()
    later = time.time() + 300
    forged_body = json.dumps(
        {"expiresAt": later, "active": True, "claims": claims(sub="mallory")}
    ).encode()

    # 1. Written without the signing key: active, for a token the IdP says is inactive.
    inactive = secrets.token_urlsafe(32)
    r.set(fleet.redis_key(inactive), b"0" * 64 + b"." + forged_body, px=300_000)
    checked = a.check(inactive, path=ORDER)
    assert not checked.allowed and checked.http_status == 401
    events(a, "cache.entryRejected", 1)

    # 2. A genuine entry (an active token's, written by replica a) copied under the key of a
    # token the IdP says is inactive.
    good = fleet.idp.issue(claims())
    assert a.check(good, path=ORDER).allowed
    genuine = wait_until(lambda: r.get(fleet.redis_key(good)), timeout=5, what="the entry")
    revoked = secrets.token_urlsafe(32)
    r.set(fleet.redis_key(revoked), genuine, px=300_000)
    checked = b.check(revoked, path=ORDER)
    assert not checked.allowed and checked.http_status == 401
    events(b, "cache.entryRejected", 1)
    assert b.metric("extauthz_cache_events_total", cache="shared", result="rejected") == 1

    # 3. A genuine entry altered.
    altered_token = fleet.idp.issue(claims(scope="orders.read"))
    assert a.check(altered_token, path=ORDER).allowed
    genuine = wait_until(lambda: r.get(fleet.redis_key(altered_token)), timeout=5, what="entry")
    fleet.idp.revoke(altered_token)
    r.set(fleet.redis_key(altered_token), genuine.replace(b"orders.read", b"orders.admin"))
    assert not b.check(altered_token, path=ORDER).allowed  # asked the IdP: revoked
    # Read once, or twice if replica a's lease was still there (b waited on it, and read again).
    wait_until(lambda: len(b.events("cache.entryRejected")) >= 2, timeout=5, what="rejections")

    rejected = json.dumps([*a.events("cache.entryRejected"), *b.events("cache.entryRejected")])
    assert "mallory" not in rejected and "orders.admin" not in rejected
    for token in (inactive, good, revoked, altered_token):
        assert token not in fleet.texts()


def test_redis_down_then_back(fleet: Fleet, redis_server: RedisServer) -> None:
    a, b = fleet.replicas
    before = fleet.idp.issue(claims())
    assert a.check(before, path=ORDER).allowed
    assert b.check(before, path=ORDER).allowed  # a shared hit
    assert fleet.introspections() == 1

    redis_server.kill()
    revoked = secrets.token_urlsafe(32)
    for i in range(6):
        token = fleet.idp.issue(claims(sub=f"during-{i}"))
        assert a.check(token, path=ORDER).allowed  # the IdP answers for the shared cache
        assert b.check(token, path=ORDER).allowed
        assert not a.check(revoked, path=ORDER).allowed
        assert a.check(before, path=ORDER).allowed  # the local cache
    for replica in (a, b):
        (line,) = events(replica, "cache.sharedUnavailable", 1)
        assert line["uri"] == redis_server.uri
        assert replica.events("cache.sharedRestored") == []
        status, body = replica.admin("readyz")
        assert status == 200  # never a reason to be unready
        assert json.loads(body)["sharedCache"]["available"] is False
    assert a.metric("extauthz_cache_events_total", cache="shared", result="error") >= 1

    redis_server.start()  # same port and password, empty

    def restored(replica: ExtauthzProcess) -> bool:
        assert replica.check(fleet.idp.issue(claims()), path=ORDER).allowed
        return bool(replica.events("cache.sharedRestored"))

    for replica in (a, b):
        wait_until(lambda: restored(replica), timeout=15, what="cache.sharedRestored")
    calls = fleet.introspections()
    tokens = [fleet.idp.issue(claims(sub=f"after-{i}")) for i in range(4)]
    for token in tokens:
        assert a.check(token, path=ORDER).allowed
        assert b.check(token, path=ORDER).allowed
    assert fleet.introspections() == calls + len(tokens)  # shared hits again
    for replica in (a, b):
        events(replica, "cache.sharedUnavailable", 1)
        events(replica, "cache.sharedRestored", 1)


def test_a_reloaded_shared_cache_change_needs_a_restart(fleet: Fleet) -> None:
    """The shared cache is made at start: a reload that changes it says so, and the one in
    service goes on sharing."""
    a, b = fleet.replicas
    config = yaml.safe_load(a.config_path.read_text())
    config["server"]["sharedCache"]["timeoutMilliseconds"] = 400
    a.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    (line,) = events(a, "config.sharedCacheNeedsRestart", 1)
    assert line["config"] == str(a.config_path)
    events(a, "config.reloaded", 1)
    token = fleet.idp.issue(claims())
    assert a.check(token, path=ORDER).allowed
    assert b.check(token, path=ORDER).allowed
    assert fleet.introspections() == 1


def test_rediss_with_ca_file(tls_redis_server: RedisServer, tmp_path: Path) -> None:
    """rediss://: a replica trusting the server's CA (caFile) shares; one that does not
    (the public roots) cannot reach the cache, says so once, and still answers every check
    right through the IdP."""
    assert tls_redis_server.cert is not None
    with FaultyIdp(clients={CLIENT_ID: "s3cret"}, tls=False) as idp:
        fleet = Fleet(idp, tls_redis_server, tmp_path, ca_files=(tls_redis_server.cert, None))
        trusting, untrusting = fleet.replicas
        with trusting, untrusting:
            tokens = [idp.issue(claims(sub=f"tls-{i}")) for i in range(3)]
            for token in tokens:
                assert trusting.check(token, path=ORDER).allowed
            assert fleet.introspections() == len(tokens)
            assert len(entries(tls_redis_server)) == len(tokens)
            for token in tokens:
                assert untrusting.check(token, path=ORDER).allowed
            assert not untrusting.check(secrets.token_urlsafe(32), path=ORDER).allowed
            (line,) = events(untrusting, "cache.sharedUnavailable", 1)
            assert line["uri"] == tls_redis_server.uri
            assert line["detail"] != "timeout", line  # refused: the certificate, not slowness
            assert fleet.introspections() == 2 * len(tokens) + 1
            assert trusting.events("cache.sharedUnavailable") == []
