"""A rolling restart behind a real Envoy drops nothing.

Two extauthz replicas (``python -m extauthz serve``, each on its own fixed ports) sit behind one
Envoy whose extauthz cluster lists both (STATIC) with the health checks, outlier detection and
load-balancing settings of the shipped ``envoy/front-proxy.yaml``, read from that file. ``wrk``
sends a steady, bounded load (one thread, four connections, one request per connection every
10 ms), each request with its own ``x-request-id``; its Lua script records every id it sent and
the status of every answer (``always_set_request_id_in_response`` echoes the id).

* Each replica in turn gets SIGTERM, drains, exits and is started again (the next one is stopped
  once the new one is ready, as Kubernetes does): not one 503 from Envoy, every answer a 200, and
  every answered request id has its access line in one of the replicas' logs.
* With the IdP stopped, one of the two is restarted: it stays unready (gRPC health NOT_SERVING,
  so Envoy keeps it out, and /readyz 503) for its whole warm-start budget while the other,
  whose keys are cached, answers everything; only then does it report SERVING, with
  ``server.warmStartIncomplete``.

The Envoy runs ``--concurrency 1``; the checks take the shipped Envoy deadline (3 s).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import AUDIENCE, ISSUER, SigningKey, claims
from tests.integration.faulty_idp import FaultyIdp
from tests.integration.serverproc import ExtauthzProcess, free_port, http_json
from tests.policies import orders
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

from stack import find_envoy  # noqa: E402 (examples/ is not a package; needs the path above)

SHIPPED = REPO / "envoy" / "front-proxy.yaml"
# What the test's extauthz cluster takes from the shipped one: everything that decides where a
# check goes and when a replica is in or out; not its address (DNS there, STATIC here).
FLEET_KEYS = (
    "connect_timeout",
    "lb_policy",
    "typed_extension_protocol_options",
    "circuit_breakers",
    "health_checks",
    "outlier_detection",
    "common_lb_config",
    "ignore_health_on_host_removal",
)
DRAIN = 5.0  # server.drainSeconds: the default
GRACE = 10.0  # --grace-seconds: the default
# The policy's timeoutSeconds: a warm-start budget of 2 x 1.4 = 2.8 s (discovery: the document,
# then the JWKS), within the shipped Envoy deadline of 3 s.
TIMEOUT_SECONDS = 1.4
BUDGET = 2 * TIMEOUT_SECONDS
DELAY_MS = 10  # between two requests on one wrk connection: a bounded load

LUA = r"""
-- Every request gets its own x-request-id; each one sent and each answer's status are written
-- (one line each, line-buffered) to RR_OUT/wrk-<thread>.log.
local nonce = os.getenv("RR_NONCE")
local out = os.getenv("RR_OUT")
local token = os.getenv("RR_TOKEN")
local delay_ms = tonumber(os.getenv("RR_DELAY_MS"))
local count = 0
local threads = 0
local f

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  f = assert(io.open(string.format("%s/wrk-%d.log", out, tid), "w"))
  f:setvbuf("line")
end

function request()
  count = count + 1
  local rid = string.format("rr-%s-%d-%d", nonce, tid, count)
  f:write("S ", rid, "\n")
  return wrk.format("GET", "/orders/1", { ["x-request-id"] = rid, ["authorization"] = "Bearer " .. token })
end

function response(status, headers, body)
  f:write("R ", headers["x-request-id"] or "-", " ", status, "\n")
end

function delay()
  return delay_ms
end
"""


def text(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return ""


class Replica:
    """One extauthz replica: fixed ports, and one process per life (each with its own log)."""

    def __init__(self, name: str, config: dict[str, Any], workdir: Path) -> None:
        self.name, self.config, self.workdir = name, config, workdir
        first = self._process(1)
        self.port, self.admin_port = first.port, first.admin_port
        self.lives = [first]

    def _process(self, life: int) -> ExtauthzProcess:
        return ExtauthzProcess(self.config, self.workdir / f"{self.name}-{life}", grace_seconds=GRACE)

    @property
    def current(self) -> ExtauthzProcess:
        return self.lives[-1]

    def next_life(self) -> ExtauthzProcess:
        """A new process on the same ports (not started yet)."""
        proc = self._process(len(self.lives) + 1)
        proc.port, proc.admin_port = self.port, self.admin_port
        self.lives.append(proc)
        return proc

    def sigterm(self) -> None:
        proc = self.current.proc
        assert proc is not None and proc.poll() is None
        proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float) -> int:
        proc = self.current.proc
        assert proc is not None
        return proc.wait(timeout=timeout)

    def readyz(self) -> tuple[int, Any] | None:
        return http_json(f"http://127.0.0.1:{self.admin_port}/readyz")

    def ready(self) -> bool:
        answer = self.readyz()
        return answer is not None and answer[0] == 200

    def access_ids(self) -> set[str]:
        return {line["requestId"] for life in self.lives for line in life.events("access")}


class Envoy:
    """Envoy with one listener that asks extauthz (the two replicas) about every request and
    answers 200 itself when allowed."""

    def __init__(self, workdir: Path, replicas: list[Replica]) -> None:
        self.port, self.admin_port = free_port(), free_port()
        shipped = yaml.safe_load(SHIPPED.read_text())
        cluster = next(c for c in shipped["static_resources"]["clusters"] if c["name"] == "extauthz")
        self.cluster = {
            "name": "extauthz",
            "type": "STATIC",
            **{key: cluster[key] for key in FLEET_KEYS if key in cluster},
            "load_assignment": {
                "cluster_name": "extauthz",
                "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": r.port}}}}
                    for r in replicas
                ]}],
            },
        }
        self.path = workdir / "envoy.yaml"
        self.path.write_text(yaml.safe_dump(self._bootstrap(), sort_keys=False))
        self.log = workdir / "envoy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _bootstrap(self) -> dict[str, Any]:
        hcm = {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "ingress",
            "always_set_request_id_in_response": True,  # wrk's script reads the id back
            "route_config": {"virtual_hosts": [{
                "name": "all", "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}],
            }]},
            "http_filters": [
                {"name": "envoy.filters.http.ext_authz", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                    "transport_api_version": "V3",
                    "grpc_service": {"envoy_grpc": {"cluster_name": "extauthz"}, "timeout": "3s"},
                    "failure_mode_allow": False,
                    "status_on_error": {"code": "ServiceUnavailable"},
                }},
                {"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
            ],
        }
        listener = {
            "name": "ingress",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": self.port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
        }
        return {
            "static_resources": {"listeners": [listener], "clusters": [self.cluster]},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": self.admin_port}}},
        }  # fmt: skip

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [find_envoy(), "-c", str(self.path), "--base-id", str(self.admin_port),
                 "--concurrency", "1", "--log-level", "warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        proc = self.proc
        wait_until(
            lambda: proc.poll() is not None or text(f"http://127.0.0.1:{self.admin_port}/ready").strip() == "LIVE",
            timeout=30, what="Envoy LIVE",
        )  # fmt: skip
        assert proc.poll() is None, self.log.read_text()

    def healthy(self, replica: Replica) -> bool:
        """Envoy's view: the replica's host passes its health checks."""
        flags = f"extauthz::127.0.0.1:{replica.port}::health_flags::"
        lines = [ln for ln in text(f"http://127.0.0.1:{self.admin_port}/clusters").splitlines() if ln.startswith(flags)]
        return lines == [flags + "healthy"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Wrk:
    """wrk in the background, with the script above; what it sent and got, from its files."""

    url: str
    token: str
    seconds: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    sent: list[str] = field(default_factory=list)
    answers: dict[str, int] = field(default_factory=dict)

    def start(self) -> Wrk:
        self.workdir.mkdir(parents=True, exist_ok=True)
        script = self.workdir / "rolling.lua"
        script.write_text(LUA)
        env = {**os.environ, "RR_NONCE": uuid.uuid4().hex[:8], "RR_OUT": str(self.workdir),
               "RR_TOKEN": self.token, "RR_DELAY_MS": str(DELAY_MS)}  # fmt: skip
        with (self.workdir / "wrk.out").open("wb") as out:
            self.proc = subprocess.Popen(
                ["wrk", "-t1", "-c4", f"-d{self.seconds}s", "--timeout", "10s", "-s", str(script), self.url],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        return self

    def read(self) -> Wrk:
        sent, answers = [], {}
        for path in sorted(self.workdir.glob("wrk-*.log")):
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0] == "S":
                    sent.append(parts[1])
                elif len(parts) == 3 and parts[0] == "R":
                    answers[parts[1]] = int(parts[2])
        # wrk builds its first thread's first request once before connecting, to check the
        # script, and never sends it: that one is no request in flight.
        if sent and sent[0].endswith("-1-1") and sent[0] not in answers:
            sent.pop(0)
        self.sent, self.answers = sent, answers
        return self

    def answered(self) -> int:
        return len(self.read().answers)

    def interrupt(self) -> None:
        """Stop now, as Ctrl-C does: wrk ends with what it has."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)

    def wait(self, timeout: float) -> None:
        assert self.proc is not None
        self.proc.wait(timeout=timeout)


@dataclass
class Fleet:
    idp: FaultyIdp
    replicas: list[Replica]
    envoy: Envoy
    token: str


@pytest.fixture
def fleet(tmp_path: Path, rsa_key: SigningKey) -> Iterator[Fleet]:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (`make wrk`)")
    idp = FaultyIdp(keys=[rsa_key.public_jwk], tls=False).start()
    idp.jwks("/jwks")
    discovery = idp.discovery("/.well-known/openid-configuration", jwks="/jwks", issuer=ISSUER)
    policy = {
        "type": "REMOTE_DISCOVERY",
        "uri": discovery,
        "timeoutSeconds": TIMEOUT_SECONDS,
        "additionalValidationPolicy": {"issuers": [ISSUER], "audiences": [AUDIENCE]},
    }
    config = {"server": {"drainSeconds": DRAIN}, "deployments": [orders(policy)]}
    replicas = [Replica(name, config, tmp_path) for name in ("a", "b")]
    envoy = Envoy(tmp_path, replicas)
    try:
        for replica in replicas:
            replica.current.start()
        envoy.start()
        wait_until(lambda: all(envoy.healthy(r) for r in replicas), timeout=15, what="both replicas healthy in Envoy")
        yield Fleet(idp, replicas, envoy, rsa_key.sign(claims(exp=int(time.time()) + 600)))
    finally:
        for replica in replicas:  # all at once: each drains for DRAIN seconds
            proc = replica.current.proc
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for replica in replicas:
            replica.current.stop(timeout=DRAIN + GRACE + 5)
        envoy.stop()
        idp.stop()


def logged_ids(replicas: list[Replica], answered: dict[str, int]) -> set[str]:
    """Every request id in the replicas' access lines, once those of ``answered`` are all there
    or a few seconds have passed (a running replica writes its lines every 50 ms)."""

    def logged() -> set[str]:
        return set().union(*(r.access_ids() for r in replicas))

    def complete() -> set[str] | None:
        ids = logged()
        return ids if answered.keys() <= ids else None

    try:
        return wait_until(complete, timeout=5, what="every answered check's access line")
    except AssertionError:
        return logged()  # what is missing is reported by the caller


def restart(replica: Replica) -> float:
    """SIGTERM, the drain, the exit, a new process on the same ports; when it was started."""
    replica.sigterm()
    assert replica.wait_exit(timeout=DRAIN + GRACE + 5) == 0, replica.current.text()
    events = [line["event"] for line in replica.current.lines()]
    assert events[-1] == "server.stopped" and "server.draining" in events, events[-5:]
    new = replica.next_life()
    started = time.monotonic()
    new.start()
    return started


def test_a_rolling_restart_under_load_drops_nothing(fleet: Fleet, tmp_path: Path) -> None:
    """Under wrk's steady load, each replica in turn drains, exits and comes back (the second
    one stopped once the first is ready again): no 503, every answer a 200, and every answered
    request id has its access line in one replica's log."""
    a, b = fleet.replicas
    load = Wrk(f"http://127.0.0.1:{fleet.envoy.port}/", fleet.token, seconds=20, workdir=tmp_path / "wrk").start()
    wait_until(lambda: load.answered() >= 100, timeout=10, what="wrk's first answers")
    began = time.monotonic()
    for replica in (a, b):
        restart(replica)
        assert replica.ready()
    restarted_by = time.monotonic() - began
    load.wait(timeout=40)
    load.read()

    statuses: dict[int, int] = {}
    for status in load.answers.values():
        statuses[status] = statuses.get(status, 0) + 1
    logged = logged_ids(fleet.replicas, load.answers)
    lost = [rid for rid in load.answers if rid not in logged]
    in_flight = [rid for rid in load.sent if rid not in load.answers]  # when wrk stopped
    report = {
        "sent": len(load.sent),
        "answered": len(load.answers),
        "statuses": statuses,
        "lostAccessLines": len(lost),
        "inFlightAtWrkStop": len(in_flight),
        "inFlightLogged": sum(1 for rid in in_flight if rid in logged),
        "restartsDoneAfterSeconds": round(restarted_by, 1),
        "perLife": {life.log_path.parent.name: len(life.events("access")) for r in fleet.replicas for life in r.lives},
    }
    (tmp_path / "rolling-restart.json").write_text(json.dumps(report, indent=2))
    print("rolling restart:", json.dumps(report))
    assert restarted_by < 20, report  # both restarts happened while wrk was sending
    assert len(load.answers) > 500, report
    assert statuses.get(503, 0) == 0, report
    assert set(statuses) == {200}, report
    assert lost == [], report
    assert len(in_flight) <= 4, report  # at most one per connection, cut by wrk's own end
    # Both lives of both replicas answered checks: the load did go through each of them.
    assert all(count > 0 for count in report["perLife"].values()), report


def test_a_replica_restarted_while_the_idp_is_down_waits_its_budget(fleet: Fleet, tmp_path: Path) -> None:
    """The IdP stops. Replica a is restarted: its warm start cannot fetch the keys, so for its
    whole budget (2 x timeoutSeconds = 2.8 s) it reports NOT_SERVING and /readyz 503, and Envoy
    keeps it out while b, whose keys are cached, answers every request with a 200. Then it
    reports SERVING anyway and logs server.warmStartIncomplete; its own checks answer
    idp_call_failed until the IdP is back (the documented choice), b's are still allowed."""
    a, b = fleet.replicas
    fleet.idp.stop()
    load = Wrk(f"http://127.0.0.1:{fleet.envoy.port}/", fleet.token, seconds=60, workdir=tmp_path / "wrk").start()
    wait_until(lambda: load.answered() >= 100, timeout=10, what="wrk's first answers")

    a.sigterm()
    assert a.wait_exit(timeout=DRAIN + GRACE + 5) == 0
    new = a.next_life()
    spawned = time.monotonic()
    starting = threading.Thread(target=new.start, daemon=True)
    starting.start()
    seen_starting: list[float] = []
    kept_out: list[bool] = []

    def ready() -> bool:
        answer = a.readyz()
        if answer is not None and answer[0] == 503 and answer[1]["phase"] == "starting":
            seen_starting.append(time.monotonic() - spawned)
            kept_out.append(not fleet.envoy.healthy(a))
        return answer is not None and answer[0] == 200

    wait_until(ready, timeout=BUDGET + 30, what="the restarted replica ready")
    ready_after = time.monotonic() - spawned
    load.interrupt()  # from here on Envoy may route to a, which has no keys: that is not measured
    load.wait(timeout=10)
    starting.join(timeout=10)
    load.read()

    (incomplete,) = new.events("server.warmStartIncomplete")
    assert incomplete["budgetSeconds"] == BUDGET and incomplete["seconds"] >= BUDGET * 0.95, incomplete
    assert [f["endpoint"] for f in incomplete["failed"]] == ["discovery"], incomplete
    assert ready_after >= BUDGET, ready_after
    assert seen_starting and kept_out and all(kept_out), (seen_starting, kept_out)
    status, body = a.readyz() or (0, {})
    assert body["warmStart"]["complete"] is False

    statuses: dict[int, int] = {}
    for status in load.answers.values():
        statuses[status] = statuses.get(status, 0) + 1
    logged = logged_ids(fleet.replicas, load.answers)
    logged_b = b.access_ids()
    # A request answered otherwise than 200 could only be one Envoy sent to the new a in the
    # moment between its SERVING and wrk's stop: idp_call_failed (500), never a 503.
    not_ok = {rid: s for rid, s in load.answers.items() if s != 200}
    for rid in not_ok:
        (line,) = new.lines_for(rid, "access")
        assert line["reason"] == "idp_call_failed", line
    report = {
        "sent": len(load.sent),
        "answered": len(load.answers),
        "statuses": statuses,
        "answeredByB": sum(1 for rid in load.answers if rid in logged_b),
        "lostAccessLines": sum(1 for rid in load.answers if rid not in logged),
        "restartedReadyAfterSeconds": round(ready_after, 2),
        "warmStartSeconds": incomplete["seconds"],
        "startingSeenAt": [round(s, 2) for s in (seen_starting[0], seen_starting[-1])],
    }
    (tmp_path / "idp-down-restart.json").write_text(json.dumps(report, indent=2))
    print("restart with the IdP down:", json.dumps(report))
    assert statuses.get(503, 0) == 0, report
    assert report["lostAccessLines"] == 0, report
    # Envoy kept the new a out until it reported SERVING: it answered no check before.
    events = [line["event"] for line in new.lines()]
    assert "access" not in events[: events.index("server.started")], events

    direct_a = new.check(fleet.token, path="/orders/1")
    assert not direct_a.allowed and direct_a.http_status == 500
    assert new.line(direct_a.request_id, "access")["reason"] == "idp_call_failed"
    assert b.current.check(fleet.token, path="/orders/1").allowed
