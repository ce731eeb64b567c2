"""The fleet scenario: three extauthz replicas behind one Envoy, sharing introspection answers
through one real ``redis-server`` (``server.sharedCache``, docs/configuration.md).

    python -m bench.fleet [--quick] [--out DIR] [--redis-timeout-ms MS] [--keep-logs]

One Envoy (``--concurrency 1``), the bench IdP (bench/idp.py, introspection answering after
5 ms, counting its calls and the distinct tokens), one Redis on loopback with a password (found
and run as the tests run it: tests/redis_server.py), and six ``extauthz serve`` processes: three
with the shared cache (``s0``-``s2``) and three without (``l0``-``l2``), so that both fleets are
measured in one run on the same machine. Envoy has a listener for each fleet (its gRPC cluster
lists the three replicas, ROUND_ROBIN, at most 4 concurrent streams per HTTP/2 connection, so
the checks spread over every replica) and one for each replica it must reach alone. Every
listener answers 200 itself once the check allows (bench/envoy_templates).

It reports, in one run:

1. **IdP calls per distinct token**: N new opaque tokens, each sent three times (wrk rotating
   through them) to each fleet's listener. With the shared cache, a token one replica asked the
   IdP about is a shared hit on the others: the target is 1.00. Without it, each replica asks once
   (the figure is reported; at most 3.00).
2. **Server CPU per check, shared hit ÷ local hit**: M new tokens sent once to one replica (it
   asks the IdP and writes the answers to Redis), then once each to a second replica (each check
   a shared hit: the Redis GET, the MAC and the copy into its local cache), then once each again
   to that second replica (each a local hit: the engine's remembered answer). The second
   replica's CPU (/proc, read when Envoy has counted the pass's last answer) over the checks it
   answered, for each pass; the roles move round the fleet each round. Target ≤ 1.3×.
3. **p99 latency Redis adds to a miss**: new tokens only (each one a miss, the IdP answering in
   5 ms), paced to a light load, through one replica of each fleet at the same time (so that
   whatever else the machine does weighs on both alike): the same check with and without the
   shared cache's GET and SET on loopback. The difference of the p99s (the median over the
   rounds) is the figure; target ≤ 2 ms. The p99 of each Redis call as the replica timed it
   (``extauthz_shared_cache_duration_seconds``, to its bucket) is reported beside it.

Results: ``bench/results/fleet/fleet.md`` and ``fleet.json``. ``--quick`` runs every part with
a few hundred tokens and 1 s points (the bench test, bench/tests/test_fleet.py, runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import configs, report
from bench.keys import CLIENT_SECRET_ENV
from bench.loadgen import Load, WrkResult, start_wrk
from bench.procs import (
    RESULTS,
    ROOT,
    Proc,
    Processes,
    commit,
    envoy_version,
    machine,
    run_workdir,
    start_envoy,
    start_extauthz,
    usage,
)
from bench.run import log, pacing_delay
from examples.stack import accepts_tcp, free_ports, http_get
from tests.prometheus_text import sample_sum
from tests.redis_server import REDIS_MISSING, RedisServer, find_redis_server

SHARED = ("s0", "s1", "s2")
LOCAL = ("l0", "l1", "l2")
MAX_STREAMS = 4  # per HTTP/2 connection from Envoy to a replica: the checks spread over all
IDP_LATENCY_MS = 5.0
SENDS_PER_TOKEN = 3  # every replica of a fleet can see each token
# Each fleet's targets: (key, what, goal, met?).
TARGETS: tuple[tuple[str, str, str, Callable[[float], bool]], ...] = (
    ("calls_per_token_shared", "IdP calls per distinct token, shared cache", "1.00",
     lambda v: round(v, 2) == 1.0),
    ("calls_per_token_local", "IdP calls per distinct token, no shared cache", "report",
     lambda v: True),
    ("cpu_shared_vs_local", "server CPU per check, shared hit ÷ local hit", "≤ 1.3×",
     lambda v: v <= 1.3),
    ("p99_added_ms", "p99 added to a miss by Redis on loopback (shared − none)", "≤ 2 ms",
     lambda v: v <= 2.0),
)  # fmt: skip


@dataclass(frozen=True)
class Profile:
    tokens: int  # distinct tokens of part 1, each sent SENDS_PER_TOKEN times to each fleet
    cached: int  # tokens of each round of part 2
    rounds: int  # of part 2
    latency_rounds: int  # of part 3: a p99 of a few thousand checks moves by milliseconds
    seconds: int  # each point of part 3
    connections: int  # wrk connections of parts 1 and 2
    paced_rate: float  # checks/s of part 3, over its connections
    paced_connections: int


PROFILES = {
    # Part 1's token counts are 1 more than a multiple of 3: sent in turn through a
    # ROUND_ROBIN cluster of three, each token then reaches a different replica each time (with
    # a multiple of 3, each would go back to the same one).
    "full": Profile(3_001, 5_000, 3, 5, 10, 16, 150.0, 4),
    "quick": Profile(301, 300, 1, 1, 1, 16, 150.0, 4),
}


# --- the fleet ---------------------------------------------------------------------------------


def replica_config(idp_url: str, shared: Mapping[str, Any] | None) -> dict[str, Any]:
    """The bench's introspection policy, with ``server.sharedCache`` when ``shared`` is given;
    ``drainSeconds: 0``: nothing here needs a replica to drain."""
    config = configs.extauthz_config("introspection", idp_url)
    server = {**config["server"], "drainSeconds": 0}
    if shared is not None:
        server["sharedCache"] = dict(shared)
    return {**config, "server": server}


def shared_cache_settings(
    redis: RedisServer, signing_key_file: Path, timeout_ms: int | None = None
) -> dict[str, Any]:
    """``server.sharedCache`` for ``redis``: the password from the environment (REDIS_PASSWORD),
    and the default timeout (50 ms) as a deployment would run it, unless ``timeout_ms``."""
    settings: dict[str, Any] = {
        "uri": redis.uri,
        "passwordEnv": "REDIS_PASSWORD",
        "signingKeyFile": str(signing_key_file),
    }
    if timeout_ms is not None:
        settings["timeoutMilliseconds"] = timeout_ms
    return settings


def envoy_listeners(
    listen: Mapping[str, int], replica_ports: Mapping[str, int]
) -> dict[str, tuple[int, list[int]]]:
    """configs.envoy_bootstrap's ``ext_authz``: ``shared`` and ``local`` (each fleet's three
    replicas), and one listener per replica named in ``listen``."""
    out = {
        "shared": (listen["shared"], [replica_ports[r] for r in SHARED]),
        "local": (listen["local"], [replica_ports[r] for r in LOCAL]),
    }
    for name, port in listen.items():
        if name in replica_ports:
            out[name] = (port, [replica_ports[name]])
    return out


@dataclass
class Fleet:
    procs: Processes
    workdir: Path
    idp_url: str
    envoy: Proc
    envoy_admin: int
    listen: dict[str, int]  # listener name -> Envoy port
    replicas: dict[str, Proc]
    redis: RedisServer

    def url(self, listener: str) -> str:
        return f"http://127.0.0.1:{self.listen[listener]}{configs.TARGET_PATH}"

    def idp_stats(self) -> dict[str, int]:
        status, _, body = http_get(f"{self.idp_url}/_bench/stats")
        if status != 200:
            raise RuntimeError(f"bench IdP stats: {status}")
        stats: dict[str, int] = json.loads(body)
        return stats

    def envoy_answered(self, listener: str) -> int:
        """Requests Envoy has answered on ``listener`` (its connection manager's counter, read
        live: polling it costs the replicas nothing)."""
        stat = f"http.{listener}.downstream_rq_completed"
        status, _, body = http_get(
            f"http://127.0.0.1:{self.envoy_admin}/stats?filter=^{re.escape(stat)}$", timeout=2
        )
        found = re.search(rf"^{re.escape(stat)}: (\d+)$", body.decode(), re.MULTILINE)
        if status != 200 or found is None:
            raise RuntimeError(f"Envoy /stats: no {stat} ({status})")
        return int(found.group(1))

    def metric(self, names: Sequence[str], name: str, **labels: str) -> float:
        """``name`` summed over the replicas ``names`` and the series carrying ``labels``."""
        return sum(metric(self.replicas[r], name, **labels) for r in names)


def metric(proc: Proc, name: str, **labels: str) -> float:
    """A replica's ``name`` from /metrics, summed over the series that carry every one of
    ``labels``."""
    status, _, body = http_get(f"{proc.admin_url}/metrics", timeout=2)
    if status != 200:
        raise RuntimeError(f"{proc.name} /metrics: {status}")
    return sample_sum(body.decode(), name, **labels)


def buckets(proc: Proc, name: str, **labels: str) -> dict[float, float]:
    """A histogram's cumulative buckets (upper bound in seconds -> count) from /metrics, summed
    over the series that carry ``labels``; empty when the server has no such histogram."""
    status, _, body = http_get(f"{proc.admin_url}/metrics", timeout=2)
    out: dict[float, float] = {}
    for line in body.decode().splitlines() if status == 200 else ():
        m = re.match(rf"^{re.escape(name)}_bucket\{{(.*)\}} (\S+)$", line)
        if not m:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1)))
        if labels.items() <= found.items():
            le = float(found["le"])
            out[le] = out.get(le, 0.0) + float(m.group(2))
    return out


def bucket_quantile(
    before: Mapping[float, float], after: Mapping[float, float], q: float
) -> float | None:
    """The upper bound of the bucket holding the ``q`` quantile of what was observed between two
    readings of a histogram's cumulative buckets; None when nothing was."""
    deltas = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = deltas[-1][1] if deltas else 0.0
    if total <= 0:
        return None
    return next(le for le, count in deltas if count >= q * total)


CHECKS = "extauthz_checks_total"
CACHE = "extauthz_cache_events_total"
# Each call to Redis, timed by the replica, where the build has it.
SHARED_DURATION = "extauthz_shared_cache_duration_seconds"


@contextmanager
def fleet(workdir: Path, *, redis_timeout_ms: int | None) -> Iterator[Fleet]:
    """Redis, the IdP, the six replicas (their stdout, the JSON log lines, in ``workdir/logs``)
    and Envoy, stopped when the block ends."""
    binary = find_redis_server()
    if binary is None:
        raise SystemExit(f"bench.fleet: {REDIS_MISSING}")
    redis = RedisServer(binary, workdir).start()
    try:
        with Processes(workdir / "logs") as procs:
            idp_port, envoy_admin = free_ports(2)
            jwks = workdir / "jwks.json"
            jwks.write_text(json.dumps({"keys": []}), encoding="utf-8")
            env = {"PYTHONPATH": str(ROOT)}
            idp = procs.start(
                "idp",
                [sys.executable, "-m", "bench.idp", "--port", str(idp_port), "--jwks", str(jwks),
                 "--latency-ms", f"{IDP_LATENCY_MS:g}"],
                env=env,
            )  # fmt: skip
            idp.wait_until(lambda: accepts_tcp(idp_port), 20, "IdP listening")
            idp_url = f"http://127.0.0.1:{idp_port}"
            signing_key = workdir / "signing-key"
            signing_key.write_text(uuid.uuid4().hex + uuid.uuid4().hex + "\n", encoding="utf-8")
            signing_key.chmod(0o600)
            shared = workdir / "extauthz-shared.yaml"
            local = workdir / "extauthz-local.yaml"
            for path, settings in (
                (shared, shared_cache_settings(redis, signing_key, redis_timeout_ms)),
                (local, None),
            ):
                path.write_text(
                    yaml.safe_dump(replica_config(idp_url, settings), sort_keys=False),
                    encoding="utf-8",
                )
            replica_env = {
                **env,
                CLIENT_SECRET_ENV: "bench-secret",
                "REDIS_PASSWORD": redis.password,
            }
            replicas: dict[str, Proc] = {}
            names = (*SHARED, *LOCAL)
            ports = free_ports(2 * len(names))
            for i, name in enumerate(names):
                replicas[name] = start_extauthz(
                    procs,
                    f"extauthz-{name}",
                    shared if name in SHARED else local,
                    (ports[2 * i], ports[2 * i + 1]),
                    env=replica_env,
                    stdout=None,  # into its log: the shared cache's events are counted
                    timeout=120,
                )
            replica_ports = {name: ports[2 * i] for i, name in enumerate(names)}
            direct = (*SHARED, "l2")  # the replicas parts 2 and 3 load alone
            listen = dict(
                zip(("shared", "local", *direct), free_ports(2 + len(direct)), strict=True)
            )
            boot = configs.envoy_bootstrap(
                envoy_admin,
                ext_authz=envoy_listeners(listen, replica_ports),
                max_streams=MAX_STREAMS,
            )
            envoy = start_envoy(procs, workdir, "envoy", boot, envoy_admin)
            yield Fleet(procs, workdir, idp_url, envoy, envoy_admin, listen, replicas, redis)
    finally:
        redis.kill()


# --- the three parts ---------------------------------------------------------------------------


def token_file(workdir: Path, name: str, n: int) -> str:
    """``n`` new opaque tokens, one a line (the bench IdP says every token is active)."""
    nonce = uuid.uuid4().hex[:10]
    path = workdir / f"tokens-{name}.txt"
    path.write_text("".join(f"fleet-{nonce}-{i}\n" for i in range(n)), encoding="utf-8")
    return str(path)


@dataclass
class Pass:
    """One wrk run that sends a known number of requests: what wrk saw, and the replicas' CPU up
    to Envoy's last answer (not to wrk's exit, which comes later: its threads stop sending after
    their share, wrk itself only once stopped)."""

    result: WrkResult
    answered: int  # by Envoy on the listener
    seconds: float  # from the start to the last answer
    cpu_s: dict[str, float]  # each replica's CPU seconds over the same span


def send_each(
    fl: Fleet,
    listener: str,
    tokens: str,
    n: int,
    *,
    times: int,
    replicas: Sequence[str],
    connections: int,
) -> Pass:
    """Each of the ``n`` tokens of the file ``tokens`` sent ``times`` times in turn (one wrk
    thread rotating through them, so that a token comes back only after all the others). Envoy's
    count of answered requests is polled every 50 ms, and the replicas' CPU read each time it
    moved: the run ends when all are answered, or when none was for a second."""
    expected = n * times
    answered0 = fl.envoy_answered(listener)
    start = time.monotonic()
    cpu0 = {r: usage([fl.replicas[r].pid]).cpu_seconds for r in replicas}
    running = start_wrk(
        fl.url(listener),
        Load(mode="rotate", token_file=tokens, stop_after=expected),
        connections=connections,
        seconds=600,
        workdir=fl.workdir,
    )
    last, last_at, cpu1 = answered0, start, dict(cpu0)
    while running.running():
        answered, now = fl.envoy_answered(listener), time.monotonic()
        if answered != last:
            last, last_at = answered, now
            cpu1 = {r: usage([fl.replicas[r].pid]).cpu_seconds for r in replicas}
        if answered - answered0 >= expected or (answered > answered0 and now - last_at > 1.0):
            running.stop()
            break
        time.sleep(0.05)
    return Pass(
        running.result(),
        last - answered0,
        last_at - start,
        {r: cpu1[r] - cpu0[r] for r in replicas},
    )


def calls_per_token(fl: Fleet, prof: Profile, fleet_name: str) -> dict[str, Any]:
    """Part 1 for one fleet: IdP calls per distinct token when each is sent three times."""
    names = SHARED if fleet_name == "shared" else LOCAL
    before = fl.idp_stats()
    checks0 = [fl.metric([r], CHECKS) for r in names]
    results = ("hit", "miss", "error")
    shared0 = {res: fl.metric(names, CACHE, cache="shared", result=res) for res in results}
    tokens = token_file(fl.workdir, f"calls-{fleet_name}", prof.tokens)
    sent = send_each(
        fl,
        fleet_name,
        tokens,
        prof.tokens,
        times=SENDS_PER_TOKEN,
        replicas=names,
        connections=prof.connections,
    )
    after = fl.idp_stats()
    calls = after["introspect"] - before["introspect"]
    distinct = after["distinct"] - before["distinct"]
    checks = [fl.metric([r], CHECKS) - c for r, c in zip(names, checks0, strict=True)]
    return {
        "fleet": fleet_name,
        "tokens": prof.tokens,
        "answered": sent.answered,
        "non_200": sent.result.errors.get("status", 0),
        "socket_errors": sent.result.socket_errors,
        "checks_per_replica": checks,
        "shared": {
            k: fl.metric(names, CACHE, cache="shared", result=k) - v for k, v in shared0.items()
        },
        "idp_calls": calls,
        "idp_distinct_tokens": distinct,
        "calls_per_token": report.ratio(float(calls), float(distinct)),
    }


# What answered a check: extauthz_cache_events_total's (cache, result) pairs.
CACHE_EVENTS = (
    ("shared", "hit"),
    ("shared", "miss"),
    ("shared", "error"),
    ("answer", "hit"),  # the engine's remembered answer: the cheapest local hit
    ("introspection", "hit"),  # the local introspection cache
)


def pass_on(fl: Fleet, replica: str, tokens: str, n: int, connections: int) -> dict[str, Any]:
    """The ``n`` tokens sent once each to ``replica`` alone: its CPU per check, and what its
    caches did."""
    proc = fl.replicas[replica]

    def events() -> dict[str, float]:
        return {f"{c} {r}": metric(proc, CACHE, cache=c, result=r) for c, r in CACHE_EVENTS}

    before, idp0 = events(), fl.idp_stats()
    sent = send_each(fl, replica, tokens, n, times=1, replicas=[replica], connections=connections)
    after, idp1 = events(), fl.idp_stats()
    checks = sent.answered
    return {
        "replica": replica,
        "checks": checks,
        "non_200": sent.result.errors.get("status", 0),
        "socket_errors": sent.result.socket_errors,
        "rate": checks / sent.seconds if sent.seconds > 0 else None,
        "cpu_us": sent.cpu_s[replica] / checks * 1e6 if checks else None,
        "cache": {k: after[k] - before[k] for k in before},
        "idp_calls": idp1["introspect"] - idp0["introspect"],
    }


def cpu_round(fl: Fleet, prof: Profile, k: int) -> dict[str, Any]:
    """Part 2, round ``k``: one replica learns the tokens from the IdP, the next one answers them
    first from Redis (shared hits), then from its own caches (local hits)."""
    primer, measured = SHARED[k % 3], SHARED[(k + 1) % 3]
    tokens = token_file(fl.workdir, f"cpu-{k}", prof.cached)
    prime = pass_on(fl, primer, tokens, prof.cached, prof.connections)
    shared = pass_on(fl, measured, tokens, prof.cached, prof.connections)
    local = pass_on(fl, measured, tokens, prof.cached, prof.connections)
    return {
        "primer": prime,
        "shared_hits": shared,
        "local_hits": local,
        "ratio": report.ratio(shared["cpu_us"], local["cpu_us"]),
    }


def paced_misses(fl: Fleet, prof: Profile, delay_ms: float) -> dict[str, Any]:
    """New tokens only, each a miss, paced, through s2 (shared cache) and l2 (none) at the same
    time, so that whatever else the machine does weighs on both alike: the latency wrk saw, each
    replica's CPU and how long s2's Redis calls took as it timed them."""
    listeners = {"shared": "s2", "none": "l2"}
    procs = {kind: fl.replicas[name] for kind, name in listeners.items()}
    calls0 = {op: buckets(procs["shared"], SHARED_DURATION, operation=op) for op in ("get", "set")}
    checks0 = {kind: metric(proc, CHECKS) for kind, proc in procs.items()}
    cpu0 = {kind: usage([proc.pid]).cpu_seconds for kind, proc in procs.items()}
    running = {
        kind: start_wrk(
            fl.url(name),
            Load(mode="unique", delay_ms=delay_ms),
            connections=prof.paced_connections,
            seconds=prof.seconds,
            workdir=fl.workdir,
        )
        for kind, name in listeners.items()
    }
    results = {kind: run.result() for kind, run in running.items()}
    out: dict[str, Any] = {}
    for kind, res in results.items():
        proc = procs[kind]
        checks = metric(proc, CHECKS) - checks0[kind]
        cpu = usage([proc.pid]).cpu_seconds - cpu0[kind]
        out[kind] = {
            "replica": listeners[kind],
            "requests": res.requests,
            "non_200": res.errors.get("status", 0),
            "socket_errors": res.socket_errors,
            "rate": res.rate,
            "p50_ms": res.latency_ms(50),
            "p99_ms": res.latency_ms(99),
            "cpu_us": cpu / checks * 1e6 if checks else None,
        }
    # The bucket (its upper bound, ms) of the p99 of each Redis call; None: none timed.
    redis_p99: dict[str, float | None] = {}
    for op, before in calls0.items():
        q = bucket_quantile(before, buckets(procs["shared"], SHARED_DURATION, operation=op), 0.99)
        redis_p99[op] = None if q is None else q * 1000
    out["shared"]["redis_p99_bucket_ms"] = redis_p99
    return out


def miss_latency(fl: Fleet, prof: Profile) -> dict[str, Any]:
    """Part 3: paced misses with and without the shared cache, side by side, each round."""
    delay = pacing_delay(prof.paced_connections, prof.paced_rate, IDP_LATENCY_MS + 2)
    rounds = []
    for _ in range(prof.latency_rounds):
        pair = paced_misses(fl, prof, delay)
        shared, local = pair["shared"], pair["none"]
        pair["p99_added_ms"] = shared["p99_ms"] - local["p99_ms"]
        pair["p50_added_ms"] = shared["p50_ms"] - local["p50_ms"]
        rounds.append(pair)
        log(
            f"misses: p99 {shared['p99_ms']:.2f} ms with the shared cache, {local['p99_ms']:.2f}"
            f" without ({shared['rate']:.0f}/s, {local['rate']:.0f}/s)"
        )
    return {
        "delay_ms": delay,
        "rounds": rounds,
        "p99_added_ms": statistics.median(r["p99_added_ms"] for r in rounds),
        "p50_added_ms": statistics.median(r["p50_added_ms"] for r in rounds),
    }


# --- the run -----------------------------------------------------------------------------------


def figures(results: Mapping[str, Any]) -> dict[str, float | None]:
    """The targets' values from a run's results."""
    cpu = [r["ratio"] for r in results["cpu"]["rounds"] if r["ratio"] is not None]
    return {
        "calls_per_token_shared": results["calls"]["shared"]["calls_per_token"],
        "calls_per_token_local": results["calls"]["local"]["calls_per_token"],
        "cpu_shared_vs_local": statistics.median(cpu) if cpu else None,
        "p99_added_ms": results["latency"]["p99_added_ms"],
    }


def targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    values = figures(results)
    out = []
    for key, what, goal, ok in TARGETS:
        value = values[key]
        out.append(
            {"key": key, "target": what, "goal": goal, "value": value,
             "met": None if value is None else ok(value)}
        )  # fmt: skip
    return out


# The exit status of a run that measured, but whose figures are not to be trusted (1 stays a
# crash's).
PROBLEMS_EXIT = 3
# A pass whose checks were not all answered the way it measures is still a fair figure when
# no more than this share went another way (a Redis call past its timeout on a loaded machine).
STRAY_SHARE = 0.01


def problems(results: Mapping[str, Any]) -> list[str]:
    """What makes the run's figures untrustworthy: a check that was not allowed, a socket error,
    an IdP call per token too many, a pass in which more than STRAY_SHARE of the checks were not
    answered the way it measures."""
    out = []
    for name, part in results["calls"].items():
        if part["non_200"] or part["socket_errors"]:
            out.append(
                f"calls, {name} fleet: {part['non_200']} non-200,"
                f" {part['socket_errors']} socket errors"
            )
    for k, r in enumerate(results["cpu"]["rounds"]):
        for kind in ("shared_hits", "local_hits"):
            p = r[kind]
            hits = local_hits(p) if kind == "local_hits" else p["cache"]["shared hit"]
            stray = p["checks"] - hits
            if p["non_200"] or p["socket_errors"] or stray > STRAY_SHARE * p["checks"]:
                out.append(
                    f"cpu round {k + 1}, {kind}: {p['checks']} checks, {hits:.0f} of them"
                    f" {kind.replace('_', ' ')}, {p['idp_calls']} IdP calls,"
                    f" {p['non_200']} non-200, {p['socket_errors']} socket errors"
                )
    for k, r in enumerate(results["latency"]["rounds"]):
        for kind in ("shared", "none"):
            if r[kind]["non_200"] or r[kind]["socket_errors"]:
                out.append(
                    f"latency round {k + 1}, {kind}: {r[kind]['non_200']} non-200,"
                    f" {r[kind]['socket_errors']} socket errors"
                )
    return out


def notes(results: Mapping[str, Any]) -> list[str]:
    """What the run saw that the figures carry without being spoilt by it: shared-cache calls
    that failed (past timeoutMilliseconds: the check went on to the IdP, as it must), and checks
    of a pass answered another way."""
    out = []
    for name, part in results["calls"].items():
        if part["shared"]["error"]:
            out.append(
                f"calls, {name} fleet: {part['shared']['error']:.0f} shared-cache calls failed"
                f" (IdP calls per token {part['calls_per_token']:.4f})"
            )
    for name, seen in results.get("shared_cache_events", {}).items():
        if seen["unavailable"]:
            out.append(
                f"{name}: the shared cache went unavailable {seen['unavailable']} time(s)"
                f" ({', '.join(seen['details'])}); each time, it is tried again a second later,"
                " and the checks of that second skip it"
            )
    for k, r in enumerate(results["cpu"]["rounds"]):
        for kind in ("shared_hits", "local_hits"):
            p = r[kind]
            hits = local_hits(p) if kind == "local_hits" else p["cache"]["shared hit"]
            if hits != p["checks"]:
                out.append(
                    f"cpu round {k + 1}, {kind}: {p['checks'] - hits:.0f} of {p['checks']} checks"
                    f" answered another way ({p['idp_calls']} IdP calls,"
                    f" {p['cache']['shared error']:.0f} shared-cache calls failed)"
                )
    return out


def local_hits(p: Mapping[str, Any]) -> float:
    """A pass's checks answered from the replica's own caches."""
    return float(p["cache"]["answer hit"] + p["cache"]["introspection hit"])


def markdown(results: Mapping[str, Any]) -> str:
    fmt = report.fmt
    lines = [
        "# extauthz bench: the fleet (three replicas, one Redis, one Envoy)",
        "",
        f"{results['started']}, profile `{results['profile']}`, {results['elapsed_s']:.0f} s;"
        f" {results['machine']}; Envoy {results['envoy']}; redis-server {results['redis']};"
        f" commit {results['commit']}. The shared cache's timeoutMilliseconds:"
        f" {results.get('redis_timeout_ms') or 'the default (50)'}. The machine's load average"
        f" (1 min) {results.get('load_average_before', [0.0])[0]:.1f} before the run and"
        f" {results.get('load_average_after', [0.0])[0]:.1f} after it: on 2 cores, above 2 means"
        " others were running too, and the latencies show it.",
        "",
        "| target | goal | measured | met |",
        "|---|---|---|---|",
    ]
    for t in results["targets"]:
        value = "–" if t["value"] is None else f"{t['value']:.2f}"
        met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
        lines.append(f"| {t['target']} | {t['goal']} | {value} | {met} |")
    if results["problems"]:
        lines += ["", "**Problems** (the figures above are not to be trusted):", ""]
        lines += [f"- {p}" for p in results["problems"]]
    if results.get("notes"):
        lines += ["", "Notes:", ""]
        lines += [f"- {n}" for n in results["notes"]]
    lines += ["", "## 1. IdP calls per distinct token", ""]
    lines += [
        f"{results['profile_settings']['tokens']:,} new opaque tokens, each sent"
        f" {SENDS_PER_TOKEN} times (wrk rotating through them,"
        f" {results['profile_settings']['connections']} connections) to the fleet's listener;"
        " the IdP answers after"
        f" {IDP_LATENCY_MS:g} ms.",
        "",
        "| fleet | answered | checks per replica | shared hits | IdP calls | distinct tokens"
        " | calls per token |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, p in results["calls"].items():
        per = " / ".join(fmt(float(c)) for c in p["checks_per_replica"])
        lines.append(
            f"| {name} | {fmt(p['answered'])} | {per} | {fmt(float(p['shared']['hit']))} |"
            f" {fmt(p['idp_calls'])} | {fmt(p['idp_distinct_tokens'])} |"
            f" {'–' if p['calls_per_token'] is None else format(p['calls_per_token'], '.2f')} |"
        )
    lines += ["", "## 2. Server CPU per check: shared hit against local hit", ""]
    lines += [
        f"Each round: {results['profile_settings']['cached']:,} new tokens sent once to one replica"
        " (it asks the IdP and writes Redis), then once to the next replica (shared hits), then"
        " once more to that one (local hits: the engine's remembered answer, as a token the"
        " replica has seen is answered); its CPU over the checks it answered.",
        "",
        "| round | replica | shared hit µs/check | local hit µs/check | ratio"
        " | checks/s shared, local |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for k, r in enumerate(results["cpu"]["rounds"]):
        s, loc = r["shared_hits"], r["local_hits"]
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        lines.append(
            f"| {k + 1} | {s['replica']} | {fmt(s['cpu_us'], 1)} | {fmt(loc['cpu_us'], 1)} |"
            f" {ratio} | {fmt(s['rate'])}, {fmt(loc['rate'])} |"
        )
    lat = results["latency"]
    lines += ["", "## 3. Latency Redis adds to a miss", ""]
    lines += [
        f"New tokens only (each a miss; the IdP answers after {IDP_LATENCY_MS:g} ms), paced to"
        f" about {results['profile_settings']['paced_rate']:g} checks/s on"
        f" {results['profile_settings']['paced_connections']} connections"
        f" ({lat['delay_ms']:.1f} ms between requests), through s2 (shared cache: a GET, then"
        " the IdP, then a SET) and l2 (no shared cache) at the same time, so that whatever else"
        " the machine does weighs on both alike; the latency as wrk measured it through Envoy.",
        "",
        "| round | p50 shared | p50 none | p99 shared | p99 none | p99 added"
        " | CPU µs/check shared, none |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for k, r in enumerate(lat["rounds"]):
        s, n = r["shared"], r["none"]
        lines.append(
            f"| {k + 1} | {s['p50_ms']:.2f} ms | {n['p50_ms']:.2f} ms | {s['p99_ms']:.2f} ms |"
            f" {n['p99_ms']:.2f} ms | {r['p99_added_ms']:+.2f} ms |"
            f" {fmt(s['cpu_us'], 0)}, {fmt(n['cpu_us'], 0)} |"
        )
    lines += [
        "",
        f"Median over the rounds: p99 {lat['p99_added_ms']:+.2f} ms,"
        f" p50 {lat['p50_added_ms']:+.2f} ms.",
    ]
    timed = [r["shared"]["redis_p99_bucket_ms"] for r in lat["rounds"]]
    if any(v is not None for t in timed for v in t.values()):
        per_round = "; ".join(
            ", ".join(f"{op} ≤ {fmt(v, 2)} ms" for op, v in t.items()) for t in timed
        )
        lines += [
            "",
            f"The p99 of each Redis call as s2 timed it ({SHARED_DURATION}, the upper bound"
            f" of its bucket), per round: {per_round}.",
        ]
    lines.append("")
    return "\n".join(lines)


def shared_cache_events(log: Path) -> dict[str, Any]:
    """How often a replica's log says the shared cache went away and came back, with the
    ``detail`` of each going (``timeout``, or the error's class)."""
    out: dict[str, Any] = {"unavailable": 0, "restored": 0, "details": []}
    with log.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if "cache.shared" not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "cache.sharedUnavailable":
                out["unavailable"] += 1
                out["details"].append(record.get("detail", ""))
            elif record.get("event") == "cache.sharedRestored":
                out["restored"] += 1
    return out


def redis_version(binary: str | None) -> str:
    if binary is None:
        return "–"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    found = re.search(r"v=(\S+)", out.stdout)
    return found.group(1) if found else out.stdout.strip()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few hundred tokens, 1 s points")
    p.add_argument("--out", type=Path, default=RESULTS / "fleet", help="where fleet.md/json go")
    p.add_argument(
        "--redis-timeout-ms",
        type=int,
        help="server.sharedCache.timeoutMilliseconds (default: extauthz's, 50)",
    )
    p.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the work dir (the replicas' logs, configs, token files) under bench/results/tmp",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    name = "quick" if args.quick else "full"
    prof = PROFILES[name]
    workdir = run_workdir(RESULTS, "fleet-")
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S %Z"), time.monotonic()
    results: dict[str, Any] = {
        "started": started,
        "profile": name,
        "profile_settings": asdict(prof),
        "machine": machine(),
        "commit": commit(),
        "envoy": envoy_version(),
        "redis": redis_version(find_redis_server()),
    }
    results["redis_timeout_ms"] = args.redis_timeout_ms
    results["load_average_before"] = os.getloadavg()
    with fleet(workdir, redis_timeout_ms=args.redis_timeout_ms) as fl:
        log(f"fleet up: replicas {', '.join(fl.replicas)}, Envoy listeners {', '.join(fl.listen)}")
        results["calls"] = {}
        for fleet_name in ("shared", "local"):
            part = calls_per_token(fl, prof, fleet_name)
            results["calls"][fleet_name] = part
            log(
                f"calls, {fleet_name} fleet: {part['calls_per_token']} IdP calls per token"
                f" (checks per replica: {part['checks_per_replica']})"
            )
        rounds = []
        for k in range(prof.rounds):
            r = cpu_round(fl, prof, k)
            rounds.append(r)
            log(
                f"cpu round {k + 1}: shared hit {report.fmt(r['shared_hits']['cpu_us'], 1)} µs,"
                f" local hit {report.fmt(r['local_hits']['cpu_us'], 1)} µs"
            )
        results["cpu"] = {"rounds": rounds}
        results["latency"] = miss_latency(fl, prof)
        logs = {name: proc.log for name, proc in fl.replicas.items() if name in SHARED}
    results["shared_cache_events"] = {name: shared_cache_events(log) for name, log in logs.items()}
    results["elapsed_s"] = time.monotonic() - t0
    results["load_average_after"] = os.getloadavg()
    results["targets"] = targets(results)
    results["problems"] = problems(results)
    results["notes"] = notes(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (args.out / "fleet.md").write_text(markdown(results), encoding="utf-8")
    if not args.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    for t in results["targets"]:
        log(f"{t['target']}: {t['value']} (goal {t['goal']})")
    log(f"wrote {args.out / 'fleet.md'} and fleet.json in {results['elapsed_s']:.0f} s")
    return PROBLEMS_EXIT if results["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
