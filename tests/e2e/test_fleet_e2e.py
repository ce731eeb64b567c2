"""A fleet behind one real Envoy: three ``extauthz serve`` replicas sharing introspection answers
through one real ``redis-server`` (``server.sharedCache``, docs/configuration.md).

examples/stack.py starts the echo upstream, the first replica and Envoy (``envoy/envoy.yaml``, the
gRPC wire); two more replicas are ``ExtauthzProcess``es with the same config file. Envoy's
``extauthz`` cluster lists all three (ROUND_ROBIN, the default, written out) and allows few
concurrent streams per HTTP/2 connection, so that the checks spread over the replicas and over
several connections to each. The IdP is ``FaultyIdp``, which counts its introspections; it also
serves the discovery document the stack waits for.

* 1,000 distinct opaque tokens, each checked three times in a row through Envoy by one of several
  concurrent clients: every replica answers some checks, every answer is right, and the IdP is
  asked exactly 1,000 times: a token one replica learnt is a shared hit on the others.
* Redis SIGKILLed under load, then started again on the same port: no 5xx and no wrong decision
  at the client against the IdP's own answer (active → 200, inactive → 401), each replica says
  ``cache.sharedUnavailable`` then ``cache.sharedRestored``, and shared hits come back within
  5 s of the restart.
* Entries written straight into Redis under a token's right key, one with a MAC made without
  the fleet's key and one copied from an active token's key, both for tokens the IdP says are
  inactive: never an allow, and ``cache.entryRejected`` is logged.
* A token every replica has cached, revoked at the IdP, evicted with ``POST /cache/evict`` on one
  replica's admin port: within a second every replica has dropped it (``cache.evicted``), and
  Envoy's next checks, on each replica in turn, are all denied.

No token, client secret, Redis password or signing key reaches any replica's log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from extauthz.shared_cache import SharedCache
from tests.conftest import claims
from tests.integration.faulty_idp import FaultyIdp
from tests.integration.serverproc import ExtauthzProcess
from tests.policies import orders
from tests.redis_server import RedisServer, fleet_keys, redis_binary
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

from stack import Ports, Stack  # noqa: E402 (examples/ is not a package; needs the path above)

CLIENT_ID = "extauthz"
INTROSPECT = "/introspect"
ORDER = "/orders/1"
TOKENS = 1_000
CHECKS_PER_TOKEN = 3  # in a row, each after the previous answer: one replica learns, the others hit
CLIENTS = 12  # concurrent client threads
MAX_STREAMS = 4  # per HTTP/2 connection from Envoy to a replica: more connections, more spread
# Generous for a loaded 2-core machine: a call that times out is a miss, and a second
# introspection would break the exact count; a killed Redis refuses at once anyway.
SHARED_TIMEOUT_MS = 500
RESUME_SECONDS = 5.0  # shared hits are back this soon after Redis is
EVICTION_SECONDS = 1.0  # an eviction on one replica is honoured by all within this
# secrets.token_urlsafe(32): what the test's tokens look like in any text.
TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{43}")


def envoy_replacements(ports: Ports, more: list[int]) -> dict[str, str]:
    """envoy/envoy.yaml's extauthz cluster as a fleet: ROUND_ROBIN, at most MAX_STREAMS streams
    per connection, and the replicas on ``more`` listed after the stack's own."""
    h2 = "http2_protocol_options: {}"
    cluster = (
        "      # ext_authz is gRPC, so this cluster speaks HTTP/2.\n"
        "      typed_extension_protocol_options:\n"
        "        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n"
        '          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n'
        "          explicit_http_config:\n"
        f"            {h2}\n"
    )
    endpoint = "socket_address: {{ address: 127.0.0.1, port_value: {} }}"
    endpoints = endpoint.format(ports.extauthz) + "".join(
        "\n              - endpoint:\n                  address:\n                    "
        + endpoint.format(port)
        for port in more
    )
    return {
        cluster: "      lb_policy: ROUND_ROBIN\n"
        + cluster.replace(
            h2, f"http2_protocol_options: {{ max_concurrent_streams: {MAX_STREAMS} }}"
        ),
        endpoint.format(ports.extauthz): endpoints,
    }


@dataclasses.dataclass
class Fleet:
    idp: FaultyIdp
    redis: RedisServer
    stack: Stack
    replicas: list[ExtauthzProcess]  # the stack's own first (a view on its log and admin port)
    keys: SharedCache  # only its key derivation: what an operator with the fleet's key can do
    scope: str
    http: httpx.Client
    secrets: list[str]

    def redis_key(self, token: str) -> str:
        return self.keys.key("introspection", self.scope, token)

    def introspections(self) -> int:
        return self.idp.count(INTROSPECT)

    def check(self, token: str) -> tuple[int, str]:
        """GET /orders/1 through Envoy: the status and x-extauthz-reason."""
        response = self.http.get(
            f"{self.stack.envoy_url}{ORDER}", headers={"authorization": f"Bearer {token}"}
        )
        return response.status_code, response.headers.get("x-extauthz-reason", "")

    def metric(self, name: str, **labels: str) -> list[float]:
        """Each replica's value."""
        return [replica.metric(name, **labels) for replica in self.replicas]

    def shared_hits(self) -> float:
        return sum(self.metric("extauthz_cache_events_total", cache="shared", result="hit"))

    def events(self, event: str) -> list[list[dict[str, Any]]]:
        return [replica.events(event) for replica in self.replicas]

    def texts(self) -> str:
        return "".join(replica.text() for replica in self.replicas) + "".join(
            path.read_text(errors="replace") for path in self.stack.log_dir.glob("extauthz*.log")
        )


def stack_replica(stack: Stack, config: Path, workdir: Path) -> ExtauthzProcess:
    """The stack's extauthz, read as an ExtauthzProcess reads its own (the stack stops it)."""
    view = ExtauthzProcess(None, workdir, config_file=config)
    view.port, view.admin_port = stack.ports.extauthz, stack.ports.extauthz_admin
    view.log_path = stack.extauthz_log
    return view


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("fleet")
    redis_server = RedisServer(redis_binary(), workdir).start()
    client_secret = secrets.token_urlsafe(16)
    idp = FaultyIdp(clients={CLIENT_ID: client_secret}, tls=False).start()
    idp.jwks("/jwks")
    idp.discovery("/.well-known/openid-configuration", jwks="/jwks")  # what the stack waits for
    uri = idp.introspection(INTROSPECT)
    signing_key = secrets.token_hex(32)
    (workdir / "signing-key").write_text(signing_key + "\n")
    (workdir / "client-secret").write_text(client_secret + "\n")
    policy = {
        "type": "REMOTE_INTROSPECTION",
        "uri": uri,
        "clientDetails": {
            "clientId": CLIENT_ID,
            "clientSecretFile": str(workdir / "client-secret"),
        },
    }
    server = {
        "drainSeconds": 0,
        "sharedCache": {
            "uri": redis_server.uri,
            "passwordEnv": "REDIS_PASSWORD",
            "signingKeyFile": str(workdir / "signing-key"),
            "timeoutMilliseconds": SHARED_TIMEOUT_MS,
        },
    }
    config = workdir / "extauthz.yaml"
    config.write_text(yaml.safe_dump({"server": server, "deployments": [orders(policy)]}))
    env = {"REDIS_PASSWORD": redis_server.password}
    others = [
        ExtauthzProcess(None, workdir / name, config_file=config, env=env) for name in ("b", "c")
    ]
    ports = dataclasses.replace(Ports.free(), idp=int(idp.url.rsplit(":", 1)[1]))
    stack = Stack(
        config_path=config,
        ports=ports,
        workdir=workdir / "stack",
        env={**os.environ, **env},
        listen_address="127.0.0.1",
        start_idp=False,
        envoy_replacements=envoy_replacements(ports, [other.port for other in others]),
    )
    http = httpx.Client(timeout=10.0, limits=httpx.Limits(max_connections=CLIENTS))
    try:
        for other in others:
            other.start()
        stack.start()
        fleet = Fleet(
            idp,
            redis_server,
            stack,
            [stack_replica(stack, config, workdir / "a"), *others],
            fleet_keys(signing_key.encode()),
            f"{uri}\x00{CLIENT_ID}",
            http,
            [signing_key, client_secret, redis_server.password],
        )
        # Every replica answers before the test: Envoy asks each in turn.
        for _ in range(2 * len(fleet.replicas)):
            assert fleet.check("not-a-token") == (401, "token_inactive")
        yield fleet
    finally:
        http.close()
        stack.stop()
        for other in others:
            other.stop()
        idp.stop()
        redis_server.kill()
    text = fleet.texts()
    for secret in fleet.secrets:
        assert secret not in text


@dataclasses.dataclass
class Load:
    """CLIENTS threads, each taking the next (token, active) and checking it CHECKS_PER_TOKEN
    times in a row through Envoy; every answer judged against the IdP's (active → 200, inactive
    → 401 token_inactive)."""

    fleet: Fleet
    tokens: Iterator[tuple[str, bool]]
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    statuses: Counter[int] = dataclasses.field(default_factory=Counter)
    wrong: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    sent: list[str] = dataclasses.field(default_factory=list)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = dataclasses.field(default_factory=list)

    def start(self) -> Load:
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]
        for thread in self._threads:
            thread.start()
        return self

    def answered(self) -> int:
        with self._lock:
            return sum(self.statuses.values()) + len(self.errors)

    def finish(self, timeout: float = 60.0) -> Load:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout)
            assert not thread.is_alive(), "a client thread did not finish"
        return self

    def _next(self) -> tuple[str, bool] | None:
        with self._lock:
            return next(self.tokens, None)

    def _client(self) -> None:
        while not self.stop.is_set() and (item := self._next()) is not None:
            token, active = item
            with self._lock:
                self.sent.append(token)
            for _ in range(CHECKS_PER_TOKEN):
                try:
                    status, reason = self.fleet.check(token)
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.errors.append(type(exc).__name__)
                    continue
                expected = (200, "") if active else (401, "token_inactive")
                with self._lock:
                    self.statuses[status] += 1
                    if status >= 500:
                        self.errors.append(f"{status} {reason}")
                    elif (status, reason) != expected:
                        self.wrong.append(
                            f"{'active' if active else 'inactive'}: {status} {reason}"
                        )


def tokens_of(fleet: Fleet, prefix: str, *, inactive_every: int = 0) -> Iterator[tuple[str, bool]]:
    """New tokens without end: active ones the IdP issued, and every ``inactive_every``-th one
    a token it never issued."""
    i = 0
    while True:
        i += 1
        if inactive_every and i % inactive_every == 0:
            yield secrets.token_urlsafe(32), False
        else:
            yield fleet.idp.issue(claims(sub=f"{prefix}-{i}")), True


def every_replica(fleet: Fleet, event: str) -> list[list[dict[str, Any]]] | None:
    """Each replica's ``event`` lines, once every replica has written one."""
    found = fleet.events(event)
    return found if all(found) else None


def per_replica(after: Iterable[float], before: Iterable[float]) -> list[float]:
    return [a - b for a, b in zip(after, before, strict=True)]


def test_n_tokens_through_envoy_cost_n_introspections(fleet: Fleet) -> None:
    checks0 = fleet.metric("extauthz_checks_total")
    hits0 = fleet.metric("extauthz_cache_events_total", cache="shared", result="hit")
    calls0 = fleet.introspections()
    tokens = [(fleet.idp.issue(claims(sub=f"user-{i}")), True) for i in range(TOKENS)]
    started = time.monotonic()
    load = Load(fleet, iter(tokens)).start()
    wait_until(lambda: load.answered() >= TOKENS * CHECKS_PER_TOKEN, timeout=60, what="the load")
    load.finish()
    seconds = time.monotonic() - started
    checks = per_replica(fleet.metric("extauthz_checks_total"), checks0)
    hits = per_replica(
        fleet.metric("extauthz_cache_events_total", cache="shared", result="hit"), hits0
    )
    print(
        f"\n{TOKENS} tokens x {CHECKS_PER_TOKEN} in {seconds:.1f} s: checks per replica {checks},"
        f" shared hits per replica {hits}, IdP introspections {fleet.introspections() - calls0}"
    )
    assert load.errors == [] and load.wrong == []
    assert load.statuses == {200: TOKENS * CHECKS_PER_TOKEN}
    assert sum(checks) == TOKENS * CHECKS_PER_TOKEN
    assert all(n > 0 for n in checks), checks  # Envoy spread the checks over all three
    assert all(n > 0 for n in hits), hits  # and each learnt from the others
    assert fleet.introspections() - calls0 == TOKENS


def test_redis_killed_under_load_then_back(fleet: Fleet) -> None:
    load = Load(fleet, tokens_of(fleet, "chaos", inactive_every=5)).start()
    try:
        wait_until(lambda: load.answered() >= 300, timeout=30, what="300 answers before the kill")
        hits_before = fleet.shared_hits()
        assert hits_before > 0
        fleet.redis.kill()
        during = load.answered()
        wait_until(
            lambda: load.answered() >= during + 300, timeout=30, what="300 answers without Redis"
        )
        unavailable = wait_until(
            lambda: every_replica(fleet, "cache.sharedUnavailable"),
            timeout=5,
            what="cache.sharedUnavailable from every replica",
        )
        for lines in unavailable:
            assert len(lines) == 1, lines  # said once, however many checks went on without it
            assert lines[0]["uri"] == fleet.redis.uri
        fleet.redis.start()  # the same port and password, empty
        restarted = time.monotonic()
        hits_at_restart = fleet.shared_hits()
        wait_until(
            lambda: fleet.shared_hits() > hits_at_restart,
            timeout=RESUME_SECONDS,
            what=f"a shared hit within {RESUME_SECONDS:g} s of Redis's restart",
        )
        resumed = time.monotonic() - restarted
        after = load.answered()
        wait_until(lambda: load.answered() >= after + 300, timeout=30, what="300 answers after")
    finally:
        load.finish()
    print(
        f"\nRedis killed and restarted under load: {load.answered()} answers {dict(load.statuses)},"
        f" shared hits again {resumed:.2f} s after the restart"
    )
    assert load.errors == [], load.errors[:10]
    assert load.wrong == [], load.wrong[:10]
    assert set(load.statuses) == {200, 401}
    for name in ("cache.sharedUnavailable", "cache.sharedRestored"):
        per = wait_until(lambda name=name: every_replica(fleet, name), timeout=5, what=name)
        assert [len(lines) for lines in per] == [1, 1, 1], per


def test_forged_and_copied_entries_are_never_an_allow(fleet: Fleet) -> None:
    r = fleet.redis.client()
    rejected0 = sum(len(lines) for lines in fleet.events("cache.entryRejected"))
    forged = json.dumps(
        {"expiresAt": time.time() + 300, "active": True, "claims": claims(sub="mallory")}
    ).encode()
    # Written by someone without the fleet's key: the right key name, a MAC that is not.
    never_issued = secrets.token_urlsafe(32)
    r.set(fleet.redis_key(never_issued), secrets.token_hex(32).encode() + b"." + forged, px=300_000)
    # A genuine active entry, copied under the key of a token the IdP says is inactive.
    good = fleet.idp.issue(claims(sub="copied-from"))
    assert fleet.check(good) == (200, "")
    genuine = wait_until(lambda: r.get(fleet.redis_key(good)), timeout=5, what="the good entry")
    revoked = fleet.idp.issue(claims(sub="revoked"))
    fleet.idp.revoke(revoked)
    r.set(fleet.redis_key(revoked), genuine, px=300_000)

    for token in (never_issued, revoked):
        for _ in range(CHECKS_PER_TOKEN):  # on every replica in turn
            assert fleet.check(token) == (401, "token_inactive")

    # Each forgery is rejected where it is read (the replica that rejects it asks the IdP and
    # writes the real, inactive, answer over it, which the others then find).
    def rejected() -> list[dict[str, Any]] | None:
        found = [line for per in fleet.events("cache.entryRejected") for line in per]
        return found if len(found) >= rejected0 + 2 else None

    lines = wait_until(rejected, timeout=5, what="a cache.entryRejected line for each forgery")
    assert "mallory" not in json.dumps(lines)


def test_an_eviction_on_one_replica_is_honoured_by_all_within_a_second(fleet: Fleet) -> None:
    token = fleet.idp.issue(claims(sub="to-evict"))
    calls = fleet.introspections()
    for _ in range(2 * len(fleet.replicas)):  # every replica twice: each one has it cached
        assert fleet.check(token) == (200, "")
    assert fleet.introspections() == calls + 1
    fleet.idp.revoke(token)
    for _ in range(len(fleet.replicas)):
        assert fleet.check(token) == (200, "")  # still cached everywhere
    digest = hashlib.sha256(token.encode()).hexdigest()
    heard0 = [len(lines) for lines in fleet.events("cache.evicted")]
    first = fleet.replicas[0]
    request = urllib.request.Request(
        f"http://127.0.0.1:{first.admin_port}/cache/evict",
        data=json.dumps({"tokenSha256": digest}).encode(),
        method="POST",
    )
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert answer.status == 200
        assert json.loads(answer.read())["shared"] is True

    def everyone_dropped_it() -> bool:
        heard = [len(lines) for lines in fleet.events("cache.evicted")]
        return all(n > n0 for n, n0 in zip(heard, heard0, strict=True))

    wait_until(
        everyone_dropped_it,
        timeout=EVICTION_SECONDS,
        what=f"cache.evicted on all three replicas within {EVICTION_SECONDS:g} s",
    )
    honoured = time.monotonic() - started
    for _ in range(2 * len(fleet.replicas)):  # each replica in turn, twice
        assert fleet.check(token) == (401, "token_inactive")
    # One replica asked the IdP again; the others read its (inactive) answer from Redis.
    assert fleet.introspections() == calls + 2
    print(f"\neviction honoured by all three replicas {honoured:.2f} s after POST /cache/evict")


def test_no_token_in_any_log(fleet: Fleet) -> None:
    """Every token-shaped string in the replicas' logs is none of the tokens the fleet saw (the
    IdP's issued ones, the ones it never issued, the forged ones)."""
    issued = set(fleet.idp._tokens)  # the test's own IdP: every token it issued
    seen = {r.form.get("token", "") for r in fleet.idp.requests(INTROSPECT)}
    found = set(TOKEN_SHAPE.findall(fleet.texts()))
    assert len(issued | seen) > TOKENS
    assert not found & (issued | seen)
