"""The shared cache's fleet features with a real redis-server and three ``extauthz serve``
replicas (one module-wide fleet, so that the replicas start once):

* verified JWTs: replica B, which never could fetch the JWKS (the IdP is down for it), allows a
  token replica A verified, runs every claim check on what it reads back, and never allows on
  an entry that is forged, altered or copied under another token's key;
* DPoP: a proof accepted by one replica is a replay on another (``dpop_proof_invalid``);
* eviction: a token cached on all three, ``POST /cache/evict`` on one, and within a second every
  replica has dropped it: revoked at the IdP, it is then denied on all, for one more IdP call;
  ``extauthz evict`` does the same from the command line, and exits 1 when Redis is gone.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from extauthz.config import parse_config
from extauthz.dpop import access_token_hash, jwk_thumbprint
from extauthz.shared_cache import SharedCache, jwt_scope
from tests.check_requests import check_request
from tests.conftest import AUDIENCE, ISSUER, SigningKey, claims
from tests.integration.faulty_idp import Fault, FaultyIdp
from tests.integration.serverproc import ExtauthzProcess, run_extauthz
from tests.redis_server import RedisServer, fleet_keys, redis_binary
from tests.waiting import wait_until

CLIENT_ID = "extauthz"
ORDER, JWT_PATH, DPOP_PATH = "/orders/1", "/jwt/1", "/dpop/1"
HOST = "api.example.com"
PROOF_KEY = ec.generate_private_key(ec.SECP256R1())
PROOF_JWK: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(PROOF_KEY.public_key()))


@dataclass
class Fleet:
    idp: FaultyIdp
    redis: RedisServer
    replicas: list[ExtauthzProcess]
    keys: SharedCache  # the fleet's signing key, as an operator holding it can find entries
    jwks_source: Any  # the JWT deployment's KeySource, for its entries' scope
    signer: SigningKey
    signing_key: str

    def jwt_key(self, token: str) -> str:
        return self.keys.key("jwt", jwt_scope(self.jwks_source), token)

    def evict(self, replica: ExtauthzProcess, body: bytes) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{replica.admin_port}/cache/evict", data=body, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                return int(answer.status), json.loads(answer.read())
        except urllib.error.HTTPError as refused:
            return int(refused.code), json.loads(refused.read())


def events(
    replica: ExtauthzProcess, event: str, n: int, timeout: float = 5
) -> list[dict[str, Any]]:
    def enough() -> list[dict[str, Any]] | None:
        lines = replica.events(event)
        return lines if len(lines) >= n else None

    found = wait_until(enough, timeout=timeout, what=f"{n} {event} line(s)")
    assert len(found) == n, found
    return found


@pytest.fixture(scope="module")
def fleet(rsa_key: SigningKey, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("fleet")
    redis_server = RedisServer(redis_binary(), workdir).start()
    idp = FaultyIdp(keys=[rsa_key.public_jwk], clients={CLIENT_ID: "s3cret"}, tls=False)
    with idp:
        introspect = idp.introspection("/introspect")
        jwks = idp.jwks("/jwks")
        signing_key = secrets.token_hex(32)
        (workdir / "signing-key").write_text(signing_key + "\n")
        (workdir / "client-secret").write_text("s3cret\n")
        checks = {"issuers": [ISSUER], "audiences": [AUDIENCE]}
        deployments = [
            {
                "name": "orders",
                "pathPrefix": "/orders",
                "authentication": {
                    "type": "TOKEN_AUTHENTICATION",
                    "validationPolicy": {
                        "type": "REMOTE_INTROSPECTION",
                        "uri": introspect,
                        "clientDetails": {
                            "clientId": CLIENT_ID,
                            "clientSecretFile": str(workdir / "client-secret"),
                        },
                    },
                },
            },
            {
                "name": "jwt",
                "pathPrefix": "/jwt",
                "authentication": {
                    "type": "TOKEN_AUTHENTICATION",
                    # timeoutSeconds 1: the warm start of a replica whose IdP is down is short.
                    "validationPolicy": {
                        "type": "REMOTE_JWKS",
                        "uri": jwks,
                        "timeoutSeconds": 1,
                        "additionalValidationPolicy": checks,
                    },
                },
            },
            {
                "name": "dpop",
                "pathPrefix": "/dpop",
                "hosts": [HOST],
                "authentication": {
                    "type": "TOKEN_AUTHENTICATION",
                    "senderConstraint": "DPOP",
                    "validationPolicy": {
                        "type": "STATIC_KEYS",
                        "keys": [rsa_key.public_jwk],
                        "additionalValidationPolicy": checks,
                    },
                },
            },
        ]
        config = {
            "server": {
                "sharedCache": {
                    "uri": redis_server.uri,
                    "passwordEnv": "REDIS_PASSWORD",
                    "signingKeyFile": str(workdir / "signing-key"),
                    "timeoutMilliseconds": 500,  # generous for a loaded CI machine
                }
            },
            "deployments": deployments,
        }
        env = {"REDIS_PASSWORD": redis_server.password}
        replicas = [ExtauthzProcess(config, workdir / name, env=env) for name in "abc"]
        a, b, c = replicas
        source = parse_config({"deployments": [deployments[1]]}).deployments[0].auth.keys
        keys = fleet_keys(signing_key.encode())
        try:
            # B and C start while the JWKS cannot be fetched; A once it can.
            idp.set_fault("/jwks", Fault.status_code(503))
            b.start()
            c.start()
            idp.set_fault("/jwks", None)
            a.start()
            yield Fleet(idp, redis_server, replicas, keys, source, rsa_key, signing_key)
        finally:
            for replica in replicas:
                replica.stop()
            redis_server.kill()
        text = "".join(replica.text() for replica in replicas)
        assert redis_server.password not in text
        assert signing_key not in text


def test_a_jwt_verified_by_one_replica_is_allowed_by_one_that_cannot_reach_the_idp(
    fleet: Fleet,
) -> None:
    a, b, _ = fleet.replicas
    r = fleet.redis.client()
    good = fleet.signer.sign(claims(sub="shared-jwt"))
    wrong_audience = fleet.signer.sign(claims(aud="someone-else"))
    altered = fleet.signer.sign(claims(sub="altered"))
    assert a.check(good, path=JWT_PATH).allowed
    assert a.check(altered, path=JWT_PATH).allowed
    assert (
        a.check(wrong_audience, path=JWT_PATH).headers["x-extauthz-reason"] == "audience_mismatch"
    )
    # Written in the background, after A's answer: even the token A denied (its signature holds).
    for token in (good, altered, wrong_audience):
        wait_until(lambda t=token: r.get(fleet.jwt_key(t)), timeout=5, what="the jwt entry")
    fleet.idp.set_fault("/jwks", Fault.status_code(503))
    try:
        assert b.check(good, path=JWT_PATH).allowed
        # Every claim check runs on what is read back: the audience is still wrong.
        denied = b.check(wrong_audience, path=JWT_PATH)
        assert not denied.allowed and denied.http_status == 401
        assert denied.headers["x-extauthz-reason"] == "audience_mismatch"

        # Entries B must not take: forged without the key, altered, copied under another key.
        genuine = r.get(fleet.jwt_key(good))
        assert genuine is not None
        forged_token = fleet.signer.sign(claims(sub="mallory"))  # verified by nobody
        body = json.dumps(
            {"expiresAt": time.time() + 60, "active": True, "claims": claims(sub="mallory")}
        )
        r.set(fleet.jwt_key(forged_token), b"0" * 64 + b"." + body.encode(), px=60_000)
        assert not b.check(forged_token, path=JWT_PATH).allowed
        copied = fleet.signer.sign(claims(sub="copied"))
        r.set(fleet.jwt_key(copied), genuine, px=60_000)
        assert not b.check(copied, path=JWT_PATH).allowed
        mac, _, data = r.get(fleet.jwt_key(altered)).partition(b".")
        r.set(
            fleet.jwt_key(altered), mac + b"." + data.replace(b'"altered"', b'"admin"'), px=60_000
        )
        assert not b.check(altered, path=JWT_PATH).allowed
        rejected = events(b, "cache.entryRejected", 3)
        assert {line["kind"] for line in rejected} == {"jwt"}
        assert "mallory" not in json.dumps(rejected)
    finally:
        fleet.idp.set_fault("/jwks", None)
    assert b.metric("extauthz_cache_events_total", cache="shared", result="hit") >= 2
    assert a.metric("extauthz_shared_cache_duration_seconds_count", operation="set") >= 2


def dpop_check(replica: ExtauthzProcess, token: str, proof: str) -> Any:
    headers = {"authorization": f"DPoP {token}", "dpop": proof}
    request = check_request(DPOP_PATH, host=HOST, headers=headers, request_id=f"it-{uuid.uuid4()}")
    request.attributes.request.http.scheme = "https"
    return replica.stub.Check(request, timeout=20)


def test_a_dpop_proof_accepted_by_one_replica_is_a_replay_on_another(fleet: Fleet) -> None:
    a, b, c = fleet.replicas
    token = fleet.signer.sign(claims(cnf={"jkt": jwk_thumbprint(PROOF_JWK)}))
    header = {"typ": "dpop+jwt", "jwk": PROOF_JWK}

    def proof() -> str:
        body = {
            "htm": "GET",
            "htu": f"https://{HOST}{DPOP_PATH}",
            "iat": int(time.time()),
            "jti": str(uuid.uuid4()),
            "ath": access_token_hash(token),
        }
        return jwt.encode(body, PROOF_KEY, algorithm="ES256", headers=header)

    once = proof()
    assert dpop_check(a, token, once).status.code == 0
    for replica in (b, c, a):
        again = dpop_check(replica, token, once)
        assert again.status.code != 0
        assert again.denied_response.headers  # the DPoP challenge
    for replica in (b, c):

        def failure_lines(r: ExtauthzProcess = replica) -> list[dict[str, Any]]:
            return [
                x
                for x in r.lines()
                if x.get("reason") == "dpop_proof_invalid" and x.get("event") != "access"
            ]

        (line,) = wait_until(failure_lines, timeout=5, what="the replay's failure line")
        assert line["message"] == "The DPoP proof's 'jti' was seen before: a replayed proof.", line
    # A new proof for each request is what a client sends: each replica accepts its own.
    for replica in (a, b, c):
        assert dpop_check(replica, token, proof()).status.code == 0
    assert a.metric("extauthz_shared_cache_duration_seconds_count", operation="add") >= 2


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def test_an_eviction_reaches_every_replica_within_a_second(fleet: Fleet) -> None:
    a, b, c = fleet.replicas
    token = fleet.idp.issue(claims(sub="to-evict"))
    calls = fleet.idp.count("/introspect")
    for replica in (a, b, c, a, b, c):
        assert replica.check(token, path=ORDER).allowed
    assert fleet.idp.count("/introspect") == calls + 1  # one IdP call, then shared and local hits
    fleet.idp.revoke(token)
    for replica in (a, b, c):
        assert replica.check(token, path=ORDER).allowed  # still cached everywhere

    heard_before = [len(r.events("cache.evicted")) for r in (b, c)]
    started = time.monotonic()
    status, body = fleet.evict(a, json.dumps({"tokenSha256": sha256(token)}).encode())
    assert status == 200, body
    assert body["shared"] is True and body["tokenSha256"] == sha256(token)[:8]
    assert body["evicted"] >= 3  # A's answer and introspection entry, and the shared entry

    def everyone_heard() -> bool:
        return all(
            len(r.events("cache.evicted")) > n for r, n in zip((b, c), heard_before, strict=True)
        )

    wait_until(everyone_heard, timeout=1.0, what="cache.evicted on every replica")
    assert time.monotonic() - started < 1.0
    for replica in (a, b, c):
        checked = replica.check(token, path=ORDER)
        assert not checked.allowed and checked.http_status == 401
    # The first asked the IdP; the others read its (inactive) answer from the shared cache.
    assert fleet.idp.count("/introspect") == calls + 2
    (own,) = [x for x in a.events("cache.evicted") if x["tokenSha256"] == sha256(token)[:8]]
    assert own["source"] == "admin" and own["sharedDeleted"] == 1
    for replica in (b, c):
        (heard,) = [
            x for x in replica.events("cache.evicted") if x["tokenSha256"] == sha256(token)[:8]
        ]
        assert heard["source"] == "channel" and heard["evicted"] >= 1
    assert a.metric("extauthz_shared_cache_duration_seconds_count", operation="publish") >= 1
    assert token not in "".join(r.text() for r in (a, b, c))


def test_evict_refuses_a_bad_body_and_a_forged_message_evicts_nothing(fleet: Fleet) -> None:
    a, b, _ = fleet.replicas
    for body in (b"", b"{}", b'{"tokenSha256": "abc"}', b"not json", b'{"token": "x"}'):
        status, answer = fleet.evict(a, body)
        assert status == 400, (body, answer)
    status, answer = fleet.evict(a, b'{"tokenSha256": "' + b"a" * 2000 + b'"}')
    assert status == 413
    token = fleet.idp.issue(claims(sub="kept"))
    assert b.check(token, path=ORDER).allowed
    calls = fleet.idp.count("/introspect")
    fleet.redis.client().publish("extauthz:v1:evict", sha256(token) + "." + "0" * 64)

    def rejected() -> list[dict[str, Any]]:
        return [x for x in b.events("cache.entryRejected") if x["kind"] == "eviction"]

    (line,) = wait_until(rejected, timeout=5, what="the forged eviction rejected")
    assert "MAC" in line["message"]
    assert b.check(token, path=ORDER).allowed
    assert fleet.idp.count("/introspect") == calls  # still cached: nothing was evicted


def test_the_evict_command(fleet: Fleet, tmp_path: Path) -> None:
    a, b, c = fleet.replicas
    token = fleet.idp.issue(claims(sub="cli"))
    for replica in (a, b, c):
        assert replica.check(token, path=ORDER).allowed
    fleet.idp.revoke(token)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    done = run_extauthz(
        "evict",
        "--config",
        str(a.config_path),
        "--token-file",
        str(token_file),
        env={"REDIS_PASSWORD": fleet.redis.password},
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer == {"evicted": 1, "shared": True, "tokenSha256": sha256(token)[:8]}
    assert token not in done.stdout + done.stderr

    def denied_everywhere() -> bool:
        return all(not r.check(token, path=ORDER).allowed for r in (a, b, c))

    wait_until(denied_everywhere, timeout=2, what="the token denied on every replica")
    by_hash = run_extauthz(
        "evict",
        "--config",
        str(a.config_path),
        "--token-sha256",
        sha256(token),
        env={"REDIS_PASSWORD": fleet.redis.password},
    )
    assert by_hash.returncode == 0, by_hash.stderr
    bad = run_extauthz(
        "evict",
        "--config",
        str(a.config_path),
        "--token-sha256",
        "xyz",
        env={"REDIS_PASSWORD": fleet.redis.password},
    )
    assert bad.returncode == 2 and "64 hex" in bad.stderr
    no_password = run_extauthz(
        "evict", "--config", str(a.config_path), "--token-sha256", sha256(token)
    )
    assert no_password.returncode == 2 and "REDIS_PASSWORD" in no_password.stderr


def test_without_a_shared_cache_an_eviction_is_this_replicas_alone(
    fleet: Fleet, tmp_path: Path
) -> None:
    config = yaml.safe_load(fleet.replicas[0].config_path.read_text())
    del config["server"]["sharedCache"]
    with ExtauthzProcess(config, tmp_path) as alone:
        token = fleet.idp.issue(claims(sub="alone"))
        assert alone.check(token, path=ORDER).allowed
        fleet.idp.revoke(token)
        assert alone.check(token, path=ORDER).allowed  # cached
        status, body = fleet.evict(alone, json.dumps({"tokenSha256": sha256(token)}).encode())
        assert status == 200 and body["shared"] is False and body["evicted"] == 2, body
        assert "this replica only" in body["message"]
        assert not alone.check(token, path=ORDER).allowed  # asked the IdP again: revoked
        (line,) = events(alone, "cache.evicted", 1)
        assert line["source"] == "admin" and "sharedDeleted" not in line


def test_under_workers_the_supervisor_evicts_through_the_shared_cache(
    fleet: Fleet, tmp_path: Path
) -> None:
    """``--workers 2``: the supervisor's admin port holds no cache of its own; its eviction
    reaches both workers through the channel."""
    a = fleet.replicas[0]
    env = {"REDIS_PASSWORD": fleet.redis.password}
    with ExtauthzProcess(None, tmp_path, config_file=a.config_path, workers=2, env=env) as server:
        token = fleet.idp.issue(claims(sub="workers"))
        assert server.check(token, path=ORDER).allowed
        fleet.idp.revoke(token)
        assert server.check(token, path=ORDER).allowed  # cached by the worker that answered
        status, body = fleet.evict(server, json.dumps({"tokenSha256": sha256(token)}).encode())
        assert status == 200 and body["shared"] is True, body
        heard = events(server, "cache.evicted", 3, timeout=2)  # the supervisor's, each worker's
        assert sorted(line["source"] for line in heard) == ["admin", "channel", "channel"]
        assert not server.check(token, path=ORDER).allowed


def test_the_evict_command_exits_1_without_redis(fleet: Fleet) -> None:
    """Last in the module: it stops the fleet's Redis."""
    a = fleet.replicas[0]
    fleet.redis.kill()
    down = run_extauthz(
        "evict",
        "--config",
        str(a.config_path),
        "--token-sha256",
        "ab" * 32,
        env={"REDIS_PASSWORD": fleet.redis.password},
    )
    assert down.returncode == 1, down.stderr
    assert json.loads(down.stdout)["error"] == "shared_cache_unavailable"
    status, body = fleet.evict(a, json.dumps({"tokenSha256": "cd" * 32}).encode())
    assert status == 503 and body["shared"] is False
    # The replicas cannot hear evictions meanwhile, and say so once.
    (line,) = events(a, "cache.evictionsUnheard", 1)
    assert line["channel"] == "extauthz:v1:evict"
    readyz = json.loads(a.admin("readyz")[1])
    assert readyz["ready"] is True and readyz["sharedCache"]["evictionsSubscribed"] is False
