"""Joining and leaving a fleet, through the real server process (``python -m extauthz serve``).

* Leaving: at SIGTERM gRPC health says NOT_SERVING and /readyz 503 at once, checks are still
  answered for ``server.drainSeconds``, then the port closes, checks in flight finish within the
  grace, and every line of every answered check is in the log when the process has exited 0.
  The same under ``--workers 2``.
* Warm start: SERVING only once the keys are fetched (the first check makes no IdP call); with
  the IdP down, SERVING after the warm-start budget, with ``server.warmStartIncomplete``.
* Warm reload: a valid new config keeps the cached keys, so a stopped IdP does not turn a reload
  into an outage.
* Secret rotation: a client secret file replaced as Kubernetes replaces it is used by the next
  introspection call; an empty replacement keeps the old secret and is reported once.
"""

from __future__ import annotations

import base64
import copy
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from tests.check_requests import check_request
from tests.configmap import ConfigMapVolume
from tests.conftest import AUDIENCE, ISSUER, SigningKey, claims
from tests.integration.faulty_idp import Fault, FaultyIdp
from tests.integration.serverproc import ExtauthzProcess, closed_port, http_json
from tests.policies import orders
from tests.waiting import wait_until

SERVICE = "envoy.service.auth.v3.Authorization"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DRAIN = 2.0  # server.drainSeconds in these tests: long enough to be seen, short for the suite
GRACE = 5.0  # --grace-seconds
ORDER = "/orders/1"


def jwks_policy(uri: str, **more: Any) -> dict[str, Any]:
    return {
        "type": "REMOTE_JWKS",
        "uri": uri,
        "additionalValidationPolicy": {"issuers": [ISSUER], "audiences": [AUDIENCE]},
        **more,
    }


def static_policy(key: SigningKey) -> dict[str, Any]:
    return {
        "type": "STATIC_KEYS",
        "keys": [key.public_jwk],
        "additionalValidationPolicy": {"issuers": [ISSUER]},
    }


def health(port: int, service: str = "") -> int:
    """The gRPC health status of ``service`` on ``port``."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service)
        return int(stub.Check(request, timeout=5).status)


def readyz(server: ExtauthzProcess) -> tuple[int, dict[str, Any]] | None:
    """The admin port's /readyz: status and body; None while nothing listens there."""
    return http_json(f"http://127.0.0.1:{server.admin_port}/readyz")


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def exited(server: ExtauthzProcess, timeout: float) -> int:
    proc = server.proc
    assert proc is not None
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"extauthz did not exit within {timeout} s:\n{server.text()}") from None


@dataclass
class Load:
    """Checks sent one after another on their own connection, from a thread, until the server
    stops answering: each request id with whether it was answered."""

    port: int
    token: str
    answered: list[str] = field(default_factory=list)
    refused: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = ext_grpc.AuthorizationStub(channel)  # type: ignore[no-untyped-call]
            while not self.stop.is_set():
                request_id = f"drain-{uuid.uuid4()}"
                request = check_request(ORDER, token=self.token, request_id=request_id)
                try:
                    response = stub.Check(request, timeout=5)
                except grpc.RpcError:
                    self.refused += 1
                    if self.refused > 20:
                        return  # the port has closed for good
                    continue
                assert response.status.code == 0, response
                self.answered.append(request_id)



def under_load(port: int, token: str) -> tuple[Load, threading.Thread]:
    """Checks sent without pause from a thread of their own, and that thread; returned once 20
    are answered."""
    load = Load(port, token)
    sender = threading.Thread(target=load.run, daemon=True)
    sender.start()
    wait_until(lambda: len(load.answered) >= 20, timeout=10, what="checks under load")
    return load, sender

def assert_every_answered_check_is_logged(server: ExtauthzProcess, request_ids: list[str]) -> None:
    access = {line["requestId"] for line in server.events("access")}
    missing = [rid for rid in request_ids if rid not in access]
    assert missing == [], f"{len(missing)} of {len(request_ids)} answered checks have no access line"


# -- leaving -------------------------------------------------------------------------------------


@pytest.fixture
def held_idp(rsa_key: SigningKey) -> Iterator[FaultyIdp]:
    """An IdP whose introspection endpoint answers only when the test releases it."""
    with FaultyIdp(clients={"extauthz": "s3cret"}, tls=False) as idp:
        idp.introspection("/slow/introspect", fault=Fault.hold())
        yield idp


def test_sigterm_drains_then_stops_and_every_line_is_written(
    tmp_path: Path, rsa_key: SigningKey, held_idp: FaultyIdp
) -> None:
    """SIGTERM: NOT_SERVING ("" and the service) and /readyz 503 at once; checks still answered
    for drainSeconds; then the port closes; checks that were waiting on the IdP when it closed
    finish within the grace; exit 0, and every answered check has its access line."""
    (tmp_path / "secret").write_text("s3cret\n")
    slow = {
        "type": "REMOTE_INTROSPECTION",
        "uri": f"{held_idp.url}/slow/introspect",
        "clientDetails": {"clientId": "extauthz", "clientSecretFile": str(tmp_path / "secret")},
    }
    config = {
        "server": {"drainSeconds": DRAIN},
        "deployments": [orders(static_policy(rsa_key)), orders(slow, name="slow", pathPrefix="/slow")],
    }
    token = rsa_key.sign(claims())
    with ExtauthzProcess(config, tmp_path / "server", grace_seconds=GRACE) as server:
        assert health(server.port) == health(server.port, SERVICE) == SERVING
        assert (readyz(server) or (0, {}))[0] == 200
        load, sender = under_load(server.port, token)

        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_until(lambda: health(server.port) == NOT_SERVING, timeout=1, what="NOT_SERVING at once")
        assert health(server.port, SERVICE) == NOT_SERVING
        status, body = readyz(server) or (0, {})
        assert (status, body["ready"], body["phase"]) == (503, False, "draining")
        draining = time.monotonic() - signalled
        assert draining < DRAIN / 2, draining

        # Still answering: Envoy's health checks have not seen it yet.
        answered_while_draining = len(load.answered)
        assert server.check(token, path=ORDER).allowed
        wait_until(lambda: len(load.answered) > answered_while_draining + 10, timeout=5,
                   what="checks answered during the drain")
        # Checks waiting on the IdP when the drain ends: answered within the grace.
        waiting = server.check_many([(held_idp.issue(claims(sub="late")), "/slow/1")] * 3)
        wait_until(lambda: server.events("server.stopping"), timeout=DRAIN + 5, what="server.stopping")
        wait_until(lambda: not accepts(server.port), timeout=5, what="the port to close")
        closed = time.monotonic() - signalled
        assert closed >= DRAIN * 0.9, closed  # not before the drain was over
        held_idp.release()
        results = [(rid, future.result(timeout=GRACE + 5)) for rid, future in waiting]
        assert all(response.status.code == 0 for _, response in results), results

        assert exited(server, DRAIN + GRACE + 5) == 0
        load.stop.set()
        sender.join(timeout=10)

    events = [line["event"] for line in server.lines()]
    phases = [events.index(e) for e in ("server.draining", "server.stopping", "server.stopped")]
    assert phases == sorted(phases) and events[-1] == "server.stopped", events[-8:]
    (drain_line,) = server.events("server.draining")
    assert drain_line["drainSeconds"] == DRAIN
    answered = load.answered + [rid for rid, _ in results]
    assert len(load.answered) > 40
    assert_every_answered_check_is_logged(server, answered)
    # The checks answered during the grace wrote their lines before the last one.
    for rid, _ in results:
        (access,) = server.lines_for(rid, "access")
        assert access["decision"] == "allow" and access["deployment"] == "slow"


def test_workers_leave_the_same_way(tmp_path: Path, rsa_key: SigningKey) -> None:
    """``--workers 2``: at SIGTERM the supervisor's /readyz is 503 at once and both workers
    report NOT_SERVING, checks on the shared port are still answered for drainSeconds, then the
    port closes and every process exits 0, with every answered check in the log."""
    config = {"server": {"drainSeconds": DRAIN}, "deployments": [orders(static_policy(rsa_key))]}
    token = rsa_key.sign(claims())
    with ExtauthzProcess(config, tmp_path / "server", workers=2, grace_seconds=GRACE) as server:
        wait_until(lambda: (r := readyz(server)) is not None and r[0] == 200, timeout=15,
                   what="the supervisor ready")
        load, sender = under_load(server.port, token)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_until(lambda: (r := readyz(server)) is not None and r[0] == 503, timeout=1,
                   what="the supervisor's /readyz 503 at once")
        _, body = readyz(server) or (0, {})
        assert body["phase"] == "draining" and body["ready"] is False, body

        def both_not_serving() -> bool:
            # Each new connection lands on one worker or the other (SO_REUSEPORT).
            return all(health(server.port) == NOT_SERVING for _ in range(10))

        wait_until(both_not_serving, timeout=2, what="NOT_SERVING from both workers")
        before = len(load.answered)
        wait_until(lambda: len(load.answered) > before + 10, timeout=5, what="checks answered while draining")
        wait_until(lambda: not accepts(server.port), timeout=DRAIN + 5, what="the port to close")
        assert time.monotonic() - signalled >= DRAIN * 0.9
        assert exited(server, DRAIN + GRACE + 10) == 0
        load.stop.set()
        sender.join(timeout=10)
    draining = server.events("server.draining")
    assert len(draining) == 3 and all(line["drainSeconds"] == DRAIN for line in draining)  # all three
    assert len(server.events("server.stopped")) == 3
    assert server.lines()[-1]["event"] == "server.stopped"
    assert_every_answered_check_is_logged(server, load.answered)


# -- warm start ----------------------------------------------------------------------------------


def test_warm_start_serves_once_the_keys_are_fetched(tmp_path: Path, rsa_key: SigningKey) -> None:
    """While the JWKS (and the one a discovery document names) is being fetched, the port is open
    but gRPC health says NOT_SERVING and /readyz 503 ``starting``; once fetched, SERVING, and the
    first checks make no IdP call."""
    with FaultyIdp(keys=[rsa_key.public_jwk], tls=False) as idp:
        jwks = idp.jwks("/a/jwks", fault=Fault.hold())
        discovery = idp.discovery("/b/.well-known/openid-configuration", jwks="/b/jwks", issuer=ISSUER)
        idp.jwks("/b/jwks")
        config = {
            "server": {"drainSeconds": 0},
            "deployments": [
                orders(jwks_policy(jwks)),
                orders(jwks_policy(discovery, type="REMOTE_DISCOVERY"), name="b", pathPrefix="/b"),
            ],
        }
        server = ExtauthzProcess(config, tmp_path / "server")
        starting = threading.Thread(target=server.start, daemon=True)
        starting.start()
        try:
            wait_until(lambda: idp.count("/a/jwks") == 1, timeout=30, what="the warm start asking for the JWKS")
            status, body = wait_until(lambda: readyz(server), timeout=5, what="the admin port")
            assert (status, body["ready"], body["phase"]) == (503, False, "starting"), body
            assert body["warmStart"]["complete"] is None
            assert health(server.port) == health(server.port, SERVICE) == NOT_SERVING
            assert server.events("server.started") == []
        finally:
            idp.release()
            idp.set_fault("/a/jwks", None)
        starting.join(timeout=30)
        assert server.channel is not None, server.text()
        try:
            status, body = readyz(server) or (0, {})
            assert (status, body["phase"]) == (200, "serving")
            warm = body["warmStart"]
            assert warm["complete"] is True and warm["failed"] == [] and warm["seconds"] >= 0
            assert all(p["lastSuccess"] is not None for p in body["providers"]), body["providers"]
            assert health(server.port) == health(server.port, SERVICE) == SERVING
            for path in ("/orders/1", "/b/1"):
                checked = server.check(rsa_key.sign(claims()), path=path)
                assert checked.allowed, checked.response
                assert server.line(checked.request_id, "access")["idpCalls"] == 0
            fetched = [idp.count(p) for p in ("/a/jwks", "/b/.well-known/openid-configuration", "/b/jwks")]
            assert fetched == [1, 1, 1]
            assert server.events("server.warmStartIncomplete") == []
        finally:
            server.stop()


def test_warm_start_with_the_idp_down_serves_after_the_budget(tmp_path: Path, rsa_key: SigningKey) -> None:
    """An IdP that refuses connections: the warm start tries again and again, and once its budget
    (the worst case of the policy's calls, 2 x timeoutSeconds for discovery) has passed it
    reports SERVING anyway, naming what it could not fetch. The retries did not open the
    breaker: the first check tries the IdP itself and says what happened."""
    uri = f"http://127.0.0.1:{closed_port()}/.well-known/openid-configuration"
    policy = jwks_policy(uri, type="REMOTE_DISCOVERY", timeoutSeconds=1)
    config = {"server": {"drainSeconds": 0}, "deployments": [orders(policy)]}
    budget = 2.0  # 2 x timeoutSeconds
    with ExtauthzProcess(config, tmp_path / "server") as server:
        (incomplete,) = server.events("server.warmStartIncomplete")
        assert incomplete["budgetSeconds"] == budget and incomplete["seconds"] >= budget * 0.95
        (failed,) = incomplete["failed"]
        assert (failed["endpoint"], failed["uri"]) == ("discovery", uri)
        assert failed["message"].endswith("CONNECTION_REFUSED. Make sure that the URI is accessible "
                                          "from the network of the authorization service.")
        events = [line["event"] for line in server.lines()]
        assert events.index("server.warmStartIncomplete") < events.index("server.started")
        status, body = readyz(server) or (0, {})
        assert (status, body["phase"]) == (200, "serving")
        assert body["warmStart"]["complete"] is False and body["warmStart"]["failed"] == [failed]
        (provider,) = body["providers"]
        assert provider["breaker"] == "closed" and provider["lastError"]["outcome"] == "connection_refused"
        assert health(server.port) == SERVING

        checked = server.check(rsa_key.sign(claims()), path=ORDER)
        assert not checked.allowed and checked.http_status == 500
        line = server.line(checked.request_id, "authentication.idpCallFailed")
        assert line["message"] == failed["message"]  # refused, not failing fast on an open circuit


# -- warm reload ---------------------------------------------------------------------------------


def test_a_reload_keeps_the_cached_keys_while_the_idp_is_down(tmp_path: Path, rsa_key: SigningKey) -> None:
    """The IdP stops; a valid new config (a route more, another deployment) is applied, and a
    token signed by the cached key is still allowed, without an IdP call: the JWKS provider
    whose settings did not change was taken over with its keys and its breaker's history."""
    idp = FaultyIdp(keys=[rsa_key.public_jwk], tls=False).start()
    try:
        jwks = idp.jwks("/jwks")
        config = {"server": {"drainSeconds": 0}, "deployments": [orders(jwks_policy(jwks))]}
        volume = ConfigMapVolume(tmp_path / "cm")
        volume.write(yaml.safe_dump(config))
        with ExtauthzProcess(None, tmp_path / "server", config_file=volume.path) as server:
            assert server.check(rsa_key.sign(claims()), path=ORDER).allowed
            (before,) = (readyz(server) or (0, {}))[1]["providers"]
            idp.stop()

            new = copy.deepcopy(config)
            new["deployments"][0]["routes"] = [{"name": "read", "path": "/{id}", "methods": ["GET"]}]
            new["deployments"].append(orders(static_policy(rsa_key), name="static", pathPrefix="/static"))
            volume.write(yaml.safe_dump(new))
            wait_until(lambda: server.events("config.reloaded"), timeout=15, what="config.reloaded")

            checked = server.check(rsa_key.sign(claims(sub="after-reload")), path=ORDER)
            assert checked.allowed, checked.response
            access = server.line(checked.request_id, "access")
            assert (access["route"], access["idpCalls"]) == ("read", 0)
            (after,) = (readyz(server) or (0, {}))[1]["providers"]
            assert after == before  # the same endpoint: its last success carried over
            assert server.events("authentication.idpCallFailed") == []
    finally:
        idp.stop()


# -- secret rotation -----------------------------------------------------------------------------


def basic_secret(authorization: str) -> str:
    user, _, password = base64.b64decode(authorization.split(" ", 1)[1]).decode().partition(":")
    assert unquote_plus(user) == "extauthz"
    return unquote_plus(password)


def test_a_rotated_client_secret_file_is_used_by_the_next_introspection(tmp_path: Path) -> None:
    """The secret file is a Kubernetes Secret volume's (a ``..data`` symlink swapped): after the
    swap the very next introspection call sends the new secret, without a restart or reload;
    a new file that is empty keeps the new secret in use and is reported once. No secret is
    ever logged."""
    first, second = f"first-{uuid.uuid4()}", f"second-{uuid.uuid4()}"
    with FaultyIdp(clients={"extauthz": first}, tls=False) as idp:
        uri = idp.introspection("/introspect")
        volume = ConfigMapVolume(tmp_path / "secrets", key="client-secret")
        volume.write(first + "\n")
        policy = {
            "type": "REMOTE_INTROSPECTION",
            "uri": uri,
            "clientDetails": {"clientId": "extauthz", "clientSecretFile": str(volume.path)},
        }
        config = {"server": {"drainSeconds": 0}, "deployments": [orders(policy)]}
        with ExtauthzProcess(config, tmp_path / "server") as server:
            assert server.check(idp.issue(claims()), path=ORDER).allowed
            assert basic_secret(idp.requests("/introspect")[-1].headers["authorization"]) == first

            idp.clients["extauthz"] = second  # the IdP has rotated: the old secret is refused
            volume.write(second + "\n")
            checked = server.check(idp.issue(claims()), path=ORDER)
            assert checked.allowed, checked.response
            assert basic_secret(idp.requests("/introspect")[-1].headers["authorization"]) == second
            (reloaded,) = wait_until(lambda: server.events("idp.secretReloaded"), timeout=5,
                                     what="idp.secretReloaded")
            assert reloaded["clientSecretFile"] == str(volume.path)

            volume.write("\n")  # a broken rotation: nothing usable in the file
            for _ in range(2):
                assert server.check(idp.issue(claims()), path=ORDER).allowed
                assert basic_secret(idp.requests("/introspect")[-1].headers["authorization"]) == second
            (failed,) = wait_until(lambda: server.events("idp.secretReloadFailed"), timeout=5,
                                   what="idp.secretReloadFailed")
            assert failed["level"] == "ERROR" and failed["clientSecretFile"] == str(volume.path)
            assert "is empty" in failed["message"]
            assert server.events("config.reloaded") == []  # no reload was needed
        text = server.text()
        assert first not in text and second not in text
