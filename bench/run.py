"""The bench: (a) the gRPC floor, (b) extauthz over gRPC, (c) Envoy jwt_authn, (d) extauthz over
the HTTP wire and (e) the HTTP floor, side by side.

    python -m bench.run [--quick | --smoke] [--workers N] [--scenarios 1,2,...] [--profile]

One Envoy (``--concurrency 1``) has a listener per backend; each route answers 200 itself, so
the only work behind a request is the authorization. One extauthz process serves (b) on its
gRPC port and (d) on its ``--http-listen`` port. ``wrk`` loads one listener at a time on
loopback. Around every run the harness reads ``/proc/<pid>/stat`` of the ext_authz server (and
its children: ``--workers``) and of Envoy, so CPU per check is (CPU seconds) / (checks).
Outputs go to ``bench/results/``: ``bench.json``, ``bench.md``, ``latency_vs_load.png``.
Every process started is stopped at the end (SIGTERM, then SIGKILL), also on Ctrl-C.

The scenarios are data (:func:`scenarios`, at the end of the runner): the tokens wrk sends,
extauthz's policy and deployments, the IdP's latency, the expected status, the backends, and
by name the steps a scenario takes beyond the common rounds. :func:`run_scenario` runs each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from bench import configs, report
from bench.keys import CLIENT_SECRET_ENV, BenchKeys, claims
from bench.loadgen import Load, WrkResult, start_wrk
from bench.procs import (
    RESULTS,
    ROOT,
    Proc,
    Processes,
    StartError,
    commit,
    cpu_split,
    die_with_parent,
    envoy_version,
    free_port_run,
    listening_sockets,
    machine,
    run_workdir,
    start_envoy,
    start_extauthz,
    usage,
)
from bench.signing import ProofKey
from examples.stack import accepts_tcp, free_ports, http_get
from extauthz.dpop import IAT_WINDOW_SECONDS, MAX_REMEMBERED_JTIS

IDP_LATENCY_MS = 5.0
# The hostile-path scenario: the innocent check on a few connections at a modest paced rate,
# quiet and then under a flood of the hostile paths on more connections, as fast as they go.
INNOCENT_CONNECTIONS = 4
INNOCENT_RATE = 400.0  # checks/s in all, before the latency's share of each connection's cycle
FLOOD_CONNECTIONS = 8
FLOOD_LEAD_SECONDS = 1.0  # the flood runs this long before the innocent check is measured
# Before the quiet run: the checks still queued in Envoy and extauthz when wrk stopped (16 hostile
# ones are up to 0.1 s of work) are answered first.
SETTLE_SECONDS = 0.5
HOSTILE_CPU_GOAL_US = 5_000.0
FLOOD_P99_GOAL = 2.0  # innocent check's p99 under the flood ÷ quiet
# The DPoP scenario. The Host bench.lua sends and the scheme Envoy sees: the proofs' htu.
DPOP_HTU = f"http://api.bench.example{configs.DPOP_PATH}"
# extauthz remembers each accepted proof's jti for 2 × (maxClockSkewInSeconds + 60 s), the
# bench policies' skew being 0, and at most MAX_REMEMBERED_JTIS of them per process; when full it
# refuses new proofs (fail closed). Each server of the scenario is sent at most this many proofs
# (all within that lifetime), so the memory is never what limits a point.
DPOP_JTI_LIFETIME_S = 2 * (0 + IAT_WINDOW_SECONDS)
DPOP_JTI_BUDGET = MAX_REMEMBERED_JTIS - 1_000
DPOP_PROOF_MARGIN = 1.3  # proofs made per point: the expected checks × this
DPOP_CPU_GOAL = 2.0  # HTTP wire: server CPU per DPoP check ÷ per cached bearer check


@dataclass(frozen=True)
class Profile:
    seconds: int  # per measured point
    warmup: int  # seconds of unmeasured load before each point (0: a few requests only)
    connections: int  # wrk connections of the main point of every scenario
    curve: tuple[int, ...]  # connections of the latency-vs-load curve (scenario 1)
    distinct: int  # distinct tokens of scenario 2
    deployments: int  # deployments of scenario 7
    flood: int  # distinct opaque tokens of the RSS flood (0: skip)
    flood_seconds: int  # time cap of the flood
    rounds: int = 1  # each scenario measures a, b, c, a, b, c... this many times (median)
    # The whole run's time budget: the flood, last, stops when it would overrun it (0: no budget)
    budget_seconds: int = 0


PROFILES = {
    # full: 3 rounds of 5 s per backend and scenario (a b c a b c a b c), medians of the three
    # (this machine's run-to-run spread is ±10 %); the flood then takes what is left of 13
    # minutes, so that installing and running stay within 15 (`make bench-flood`: all 200,000)
    "full": Profile(
        5, 1, 16, (1, 4, 16, 64), 10_000, 10_000, 200_000, 600, rounds=3, budget_seconds=780
    ),
    "quick": Profile(3, 1, 16, (1, 4, 16, 64), 10_000, 10_000, 20_000, 30),
    # smoke: 1,000 deployments, not 10,000: parsing a 3.7 MB YAML policy alone takes extauthz
    # 15-40 s on the 2-core machine
    "smoke": Profile(1, 0, 16, (1, 16), 1_000, 1_000, 2_000, 3),
}


@dataclass
class Tokens:
    """The tokens of one run (bench/keys.py): what a scenario's ``tokens`` names."""

    rs256: str
    es256: str
    expired: str
    distinct_file: str  # RS256 tokens that differ in ``sub``, one a line
    opaque: str = field(default_factory=lambda: f"opaque-warm-{uuid.uuid4().hex}")
    # The DPoP scenario's: an RS256 token bound (cnf.jkt) to this proof key
    proof_key: ProofKey | None = None
    dpop: str = ""

    def load(self, kind: str) -> Load:
        """What wrk sends for ``kind``: one token over and over (rs256, es256, expired, opaque),
        the distinct tokens in turn (distinct), or a new opaque token every time (unique)."""
        if kind == "distinct":
            return Load(mode="rotate", token_file=self.distinct_file)
        if kind == "unique":
            return Load(mode="unique")
        if kind == "dpop":  # the proofs are made for each point (dpop_rounds)
            return Load(mode="dpop", token=self.dpop)
        token = {
            "rs256": self.rs256,
            "es256": self.es256,
            "expired": self.expired,
            "opaque": self.opaque,
        }[kind]
        return Load(token=token)


# --- the stack ---------------------------------------------------------------------------------


@dataclass
class Stack:
    """The processes shared by every scenario, and where (b) listens."""

    procs: Processes
    workdir: Path
    keys: BenchKeys
    idp_url: str
    floor: Proc
    envoy: Proc
    envoy_admin: int
    listen: dict[str, int]  # backend -> Envoy listener port
    b_port: int  # first gRPC port of extauthz
    b_workers: int
    worker_ports: str
    keep_logs: bool
    floor_http: Proc | None = None  # (e); None: no HTTP backends in this run
    d_port: int | None = None  # extauthz's --http-listen port, for (d)

    @property
    def http(self) -> bool:
        """Whether this run has the HTTP wire's backends, (d) and (e): extauthz serves the HTTP
        wire with one worker only (docs/cli.md: not yet with ``--workers N``)."""
        return self.floor_http is not None and self.d_port is not None and self.b_workers == 1

    def url(self, backend: str, path: str = configs.TARGET_PATH) -> str:
        return f"http://127.0.0.1:{self.listen[backend]}{path}"

    def idp(self, path: str) -> dict[str, Any]:
        status, _, body = http_get(self.idp_url + path)
        if status != 200:
            raise RuntimeError(f"bench IdP {path}: {status}")
        result: dict[str, Any] = json.loads(body)
        return result


def _b_endpoints(port: int, workers: int, worker_ports: str) -> list[int]:
    """Envoy's endpoints for extauthz: one per worker on consecutive ports, or the one shared
    port (the kernel spreads Envoy's HTTP/2 connections to it over the workers)."""
    if worker_ports == "consecutive":
        return [port + i for i in range(workers)]
    return [port]


@contextmanager
def stack(
    workdir: Path,
    keys: BenchKeys,
    *,
    workers: int,
    worker_ports: str,
    keep_logs: bool,
    max_streams: int = 0,
) -> Iterator[Stack]:
    with Processes(workdir / "logs") as procs:
        idp_port, floor_port, envoy_admin, la, lb, lc = free_ports(6)
        b_port = free_port_run(workers if worker_ports == "consecutive" else 1)
        # The HTTP wire's backends, where extauthz can serve it: one worker.
        http = workers == 1
        floor_http_port, d_port, ld, le = free_ports(4) if http else (0, 0, 0, 0)
        jwks = workdir / "jwks.json"
        jwks.write_text(json.dumps(keys.jwks), encoding="utf-8")
        env = {"PYTHONPATH": str(ROOT)}
        idp = procs.start(
            "idp",
            [
                sys.executable,
                "-m",
                "bench.idp",
                "--port",
                str(idp_port),
                "--jwks",
                str(jwks),
                "--latency-ms",
                "0",
            ],
            env=env,
        )
        idp.wait_until(lambda: accepts_tcp(idp_port), 20, "IdP listening")
        floor = procs.start(
            "floor",
            [sys.executable, "-m", "bench.floor_server", "--listen", f"127.0.0.1:{floor_port}"],
            env=env,
        )
        floor.wait_until(lambda: accepts_tcp(floor_port), 20, "floor listening")
        floor_http = None
        if http:
            floor_http = procs.start(
                "floor-http",
                [
                    sys.executable,
                    "-m",
                    "bench.floor_server",
                    "--wire",
                    "http",
                    "--listen",
                    f"127.0.0.1:{floor_http_port}",
                ],
                env=env,
            )
            floor_http.wait_until(lambda: accepts_tcp(floor_http_port), 20, "HTTP floor listening")
        boot = configs.envoy_bootstrap(
            envoy_admin,
            ext_authz={
                "floor": (la, [floor_port]),
                "extauthz": (lb, _b_endpoints(b_port, workers, worker_ports)),
            },
            ext_authz_http=(
                {"floor": (le, [floor_http_port]), "extauthz": (ld, [d_port])} if http else None
            ),
            jwt_authn=(lc, keys.jwks),
            max_streams=max_streams,
        )
        envoy = start_envoy(procs, workdir, "envoy", boot, envoy_admin)
        listen = {"a": la, "b": lb, "c": lc}
        if http:
            listen.update(d=ld, e=le)
        yield Stack(
            procs,
            workdir,
            keys,
            f"http://127.0.0.1:{idp_port}",
            floor,
            envoy,
            envoy_admin,
            listen,
            b_port,
            workers,
            worker_ports,
            keep_logs,
            floor_http,
            d_port if http else None,
        )


@contextmanager
def extauthz(
    st: Stack,
    policy: str,
    deployments: int = 1,
    workers: int | None = None,
    *,
    files: bool = False,
    http: bool = True,
    dpop: bool = False,
) -> Iterator[Proc]:
    """A fresh extauthz server for one scenario, on the stack's gRPC port(s) and, with ``http``
    where the stack has (d), on its HTTP wire port too (``--http-listen``: (b) and (d) are one
    process, one policy and one cache of answers); ``files`` adds the hostile paths' deployment
    to the policy, ``dpop`` the DPoP one."""
    workers = st.b_workers if workers is None else workers
    http = http and st.http and workers == 1
    extra = ("-files" if files else "") + ("-dpop" if dpop else "")
    cfg = st.workdir / f"extauthz-{policy}-{deployments}{extra}.yaml"
    if not cfg.exists():
        cfg.write_text(
            yaml.safe_dump(
                configs.extauthz_config(policy, st.idp_url, deployments, files=files, dpop=dpop),
                sort_keys=False,
            ),
            encoding="utf-8",
        )
    ports = (
        [st.b_port + i for i in range(workers)] if st.worker_ports == "consecutive" else [st.b_port]
    )
    # Every worker must listen before the first check: Envoy's HTTP/2 connections are made
    # once and kept, so connections opened while only some workers listen stay on those.
    per_port = workers if st.worker_ports == "shared" else 1
    options = ["--workers", str(workers)] if workers != 1 else []
    if http:
        options += ["--http-listen", f"127.0.0.1:{st.d_port}"]
        ports = [*ports, cast(int, st.d_port)]
    proc = start_extauthz(
        st.procs,
        f"extauthz-{policy}-{deployments}-w{workers}",
        cfg,
        (st.b_port, free_ports(1)[0]),
        options=options,
        env={"PYTHONPATH": str(ROOT), CLIENT_SECRET_ENV: "bench-secret"},
        stdout=None if st.keep_logs else os.devnull,
        timeout=180,
        listening=lambda: all(accepts_tcp(p) and listening_sockets(p) >= per_port for p in ports),
        what=f"ready on /readyz, with {per_port} listening socket(s) per port",
    )
    try:
        yield proc
    finally:
        st.procs.stop(proc)


# --- one measured point ------------------------------------------------------------------------


def preflight(
    url: str, load: Load, expect: int, timeout: float = 10, reason: str | None = None
) -> str | None:
    """A few single requests until the expected status (and ``x-extauthz-reason``, when given)
    comes back; None, or what went wrong. Mode paths sends ``url`` as it is, with load.token
    when it has one; mode rotate, the first token of its file."""
    if load.mode == "rotate" and load.token_file:
        token = Path(load.token_file).read_text(encoding="utf-8").split("\n", 1)[0]
    else:
        token = load.token if load.mode != "unique" else f"op-preflight-{uuid.uuid4().hex}"
    headers = {"Host": "api.bench.example"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    deadline = time.monotonic() + timeout
    status, hdrs = 0, dict[str, str]()
    while time.monotonic() < deadline:
        try:
            status, hdrs, _ = http_get(url, headers)
        except OSError:
            status = 0
        if status == expect and reason in (None, hdrs.get("x-extauthz-reason")):
            return None
        time.sleep(0.2)
    got = hdrs.get("x-extauthz-reason", "")
    want = f" {reason}" if reason else ""
    return f"expected HTTP {expect}{want}, got {status} {got}".strip()


@dataclass(frozen=True)
class Run:
    """What every scenario is measured with: the stack, the tokens, the profile and the command
    line; ``results`` takes what the run reports beyond its scenarios (the curve, profiles)."""

    st: Stack
    tokens: Tokens
    prof: Profile
    args: argparse.Namespace
    results: dict[str, Any]

    def measure(
        self,
        backend: str,
        load: Load,
        server: Proc | None,
        *,
        expect: int = 200,
        connections: int = 0,
        seconds: int = 0,
        warmup: int = 0,
        label: str | None = None,
        profile_to: Path | None = None,
        until: Callable[[], bool] | None = None,
        path: str = configs.TARGET_PATH,
    ) -> dict[str, Any]:
        """One wrk run against ``backend``'s listener (``path`` on it), with CPU, RSS and IdP
        calls around it.
        The server measured is the gRPC floor for (a), the HTTP floor for (e), ``server``
        (extauthz) for (b) and (d), none for (c); the floors answer 200 whatever ``expect``
        says. ``connections`` and ``seconds`` default to the profile's, after ``warmup`` seconds
        of unmeasured load."""
        st, threads = self.st, self.args.wrk_threads
        connections = connections or self.prof.connections
        seconds = seconds or self.prof.seconds
        expect = expect if backend not in FLOORS else 200
        server = {"a": st.floor, "b": server, "d": server, "e": st.floor_http}.get(backend)
        url = st.url(backend, path)

        def wrk(load: Load, seconds: int, until: Callable[[], bool] | None = None) -> WrkResult:
            return start_wrk(
                url,
                load,
                connections=connections,
                seconds=seconds,
                threads=threads,
                workdir=st.workdir,
            ).result(until)

        if warmup > 0:
            wrk(replace(load, stop_after=0), warmup)
        roots = [server.pid] if server is not None else []
        idp0 = st.idp("/_bench/stats")
        s0, e0, t0 = usage(roots), usage([st.envoy.pid]), time.monotonic()
        spy = _start_py_spy(roots[0], seconds, profile_to) if profile_to and roots else None
        res = wrk(load, seconds, until)
        s1, e1, t1 = usage(roots), usage([st.envoy.pid]), time.monotonic()
        idp1 = st.idp("/_bench/stats")
        if spy is not None:
            _finish_py_spy(spy)
        return point(
            backend,
            res,
            label=label or report.BACKENDS[backend],
            connections=connections,
            delay_ms=load.delay_ms,
            server_cpu_s=(s1.cpu_seconds - s0.cpu_seconds) if roots else None,
            envoy_cpu_s=e1.cpu_seconds - e0.cpu_seconds,
            wall_s=t1 - t0,
            rss_kb=s1.rss_kb if roots else None,
            processes=len(s1.pids) if roots else 0,
            cpu_per_process_s=cpu_split(s0, s1) if roots else None,
            idp_calls=(idp1["jwks"] + idp1["introspect"]) - (idp0["jwks"] + idp0["introspect"]),
            idp_distinct=idp1["distinct"] - idp0["distinct"],
            expect=expect,
        )


def point(
    backend: str,
    res: WrkResult,
    *,
    label: str,
    connections: int,
    delay_ms: float,
    server_cpu_s: float | None,
    envoy_cpu_s: float,
    wall_s: float,
    rss_kb: int | None,
    processes: int,
    idp_calls: int,
    cpu_per_process_s: list[float] | None = None,
    idp_distinct: int,
    expect: int,
) -> dict[str, Any]:
    """The figures of one run, as they go into bench.json."""
    n = res.requests

    def per(seconds: float) -> float | None:
        return seconds / n * 1e6 if n else None

    server_us = per(server_cpu_s) if server_cpu_s is not None else None
    envoy_us = per(envoy_cpu_s)
    wrong_status = res.errors.get("status", 0) if expect < 400 else n - res.errors.get("status", 0)
    return {
        "backend": backend,
        "label": label,
        "connections": connections,
        "delay_ms": delay_ms,
        "requests": n,
        "seconds": round(res.seconds, 3),
        "rate": res.rate,
        "p50_ms": res.latency_ms(50),
        "p99_ms": res.latency_ms(99),
        "p999_ms": res.latency_ms(99.9),
        "server_cpu_us": server_us,
        "envoy_cpu_us": envoy_us,
        "total_cpu_us": (server_us or 0.0) + envoy_us if envoy_us is not None else None,
        "server_cpu_cores": server_cpu_s / wall_s if server_cpu_s is not None else None,
        "envoy_cpu_cores": envoy_cpu_s / wall_s,
        "rss_mb": rss_kb / 1024 if rss_kb is not None else None,
        "processes": processes,
        "cpu_per_process_s": cpu_per_process_s,
        "idp_calls": idp_calls,
        "idp_distinct_tokens": idp_distinct,
        "expected_status": expect,
        "wrong_status": wrong_status,
        "errors": res.errors,
        "valid": n > 0 and wrong_status == 0 and res.socket_errors == 0,
    }


def _start_py_spy(pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return None
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--nonblocking",
            "--rate",
            "200",
            "--duration",
            str(seconds),
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,  # the harness is single-threaded
    )


def _finish_py_spy(spy: subprocess.Popen[bytes]) -> None:
    try:
        spy.wait(15)
    except subprocess.TimeoutExpired:
        spy.terminate()
        spy.wait(5)


# --- logging and counting ----------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _summary(p: Mapping[str, Any]) -> str:
    cpu = p["server_cpu_us"] if p["server_cpu_us"] is not None else p["envoy_cpu_us"]
    where = "envoy" if p["server_cpu_us"] is None and p["envoy_cpu_us"] is not None else "server"
    flag = "" if p["valid"] else f"  INVALID (wrong status {p['wrong_status']}, {p['errors']})"
    return (
        f"{p['backend']} {p['label']:<10} c={p['connections']:<3} {p['rate']:>8.0f}/s "
        f"p50 {p['p50_ms']:.2f} p99 {p['p99_ms']:.2f} ms  {where} CPU "
        f"{report.fmt(cpu)} µs/check{flag}"
    )


_FIRST_PASS_MAX_SECONDS = 60


def stalled(count: Callable[[], int], *, since: int, quiet: float = 1.0) -> Callable[[], bool]:
    """A predicate: true once ``count()`` has moved past ``since`` and then not moved for
    ``quiet`` seconds."""
    last = [since, time.monotonic()]

    def check() -> bool:
        now, value = time.monotonic(), count()
        if value != last[0]:
            last[0], last[1] = value, now
            return False
        return value > since and now - last[1] >= quiet

    return check


def checks_answered(server: Proc, **labels: str) -> int:
    """extauthz_checks_total from the server's /metrics, summed over the series that carry
    every one of ``labels`` (``deployment``, ``decision``, ``reason``; none: all of them)."""
    status, _, body = http_get(f"{server.admin_url}/metrics", timeout=2)
    if status != 200:
        return 0
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in body.decode().splitlines()
            if line.startswith("extauthz_checks_total{") and all(w in line for w in wanted)
        )
    )


# --- the runner: every scenario the same way ---------------------------------------------------


Measure = Callable[["Run", "Scenario", Proc], dict[str, Any]]
Step = Callable[["Run", "Scenario", Proc, Load, dict[str, Any]], None]


def run_scenario(run: Run, sc: Scenario) -> dict[str, Any]:
    """The scenario's IdP latency and a fresh extauthz with its policy, then its ``measure``."""
    run.st.idp(f"/_bench/latency?ms={sc.idp_latency_ms:g}")
    files = bool(sc.hostile_paths)
    with extauthz(run.st, sc.policy, sc.deployments, files=files, dpop=sc.dpop) as server:
        return sc.measure(run, sc, server)


def backends_of(st: Stack, sc: Scenario) -> tuple[str, ...]:
    """The scenario's backends this stack has: without the HTTP wire's (d) and (e) when extauthz
    runs with several workers."""
    return tuple(b for b in sc.backends if b in st.listen)


def backend_rounds(run: Run, sc: Scenario, server: Proc) -> dict[str, Any]:
    """The scenario's backends side by side: its ``before`` steps, then (a), (b), (c), (e),
    (d), (a), (b)... for the profile's rounds (slow drifts of the machine hit all), the medians,
    then its ``after`` steps (and, with ``--profile``, a run of (b) under py-spy)."""
    load = run.tokens.load(sc.tokens)
    out: dict[str, Any] = {"id": sc.id, "title": sc.title, "points": {}, "extra_points": {}}
    backends = backends_of(run.st, sc)
    if backends != sc.backends:
        missing = ", ".join(f"({b})" for b in sc.backends if b not in backends)
        out["note"] = f"without {missing}: extauthz serves the HTTP wire with one worker only"
        run.results.setdefault("notes", []).append(f"scenario {sc.id}: {out['note']}")
    problems = {}
    for backend in backends:
        expect = sc.expect if backend not in FLOORS else 200
        problems[backend] = preflight(run.st.url(backend), load, expect)
        if problems[backend]:
            log(f"scenario {sc.id} ({backend}): preflight {problems[backend]}")
    for step in sc.before:
        step(run, sc, server, load, out)
    rounds: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
    for r in range(run.prof.rounds):
        for backend in backends:
            warmup = run.prof.warmup if r == 0 else 0
            p = run.measure(backend, load, server, expect=sc.expect, warmup=warmup)
            if problems[backend]:
                p["valid"], p["preflight"] = False, problems[backend]
            rounds[backend].append(p)
            log(f"scenario {sc.id}: {_summary(p)}")
    out["points"] = {b: combine_rounds(rounds[b]) for b in backends}
    for extra in out["extra_points"].values():
        extra["ratios"] = report.scenario_ratios({**out["points"], "b": extra})
    for step in sc.after:
        step(run, sc, server, load, out)
    if run.args.profile and sc.id in run.args.profile_scenarios:
        profile(run, sc, server, load)
    out["ratios"] = report.scenario_ratios(out["points"])
    if "d" in out["points"]:
        out["http_ratios"] = report.http_ratios(out["points"])
    out["wires"] = report.wire_ratios(out["points"])
    return out


def profile(run: Run, sc: Scenario, server: Proc, load: Load) -> None:
    """One more run of (b) under py-spy (not measured); its summary goes to the results."""
    path = results_dir(run.args) / f"profile-s{sc.id}.txt"
    run.measure("b", load, server, expect=sc.expect, profile_to=path)
    if path.exists():
        text = path.read_text(encoding="utf-8", errors="replace")
        run.results.setdefault("profiles", {})[f"scenario {sc.id}"] = report.profile_summary(text)


# --- the steps a scenario names ----------------------------------------------------------------


def first_pass(run: Run, sc: Scenario, server: Proc, load: Load, out: dict[str, Any]) -> None:
    """Before the rounds: (b) gets one pass over every token of the rotation, measured on its
    own (the first sight of each token: a parse and a verify); the rounds then measure the
    rotation with each token seen before."""
    answered = checks_answered(server)
    first = run.measure(
        "b",
        replace(load, stop_after=-(-run.prof.distinct // run.args.wrk_threads)),
        server,
        expect=sc.expect,
        seconds=_FIRST_PASS_MAX_SECONDS,
        label="first sight of each token",
        # wrk's threads stop sending after their share, but wrk itself runs out its duration:
        # stop it once the server has answered no new check for a second.
        until=stalled(lambda: checks_answered(server), since=answered),
    )
    out["extra_points"]["b first sight"] = first
    log(f"scenario {sc.id}: {_summary(first)}")


def latency_curve(run: Run, sc: Scenario, server: Proc, load: Load, out: dict[str, Any]) -> None:
    """The run's latency-vs-load curve: the scenario at each connection count of the profile,
    for each backend (the main point's figures where the count is the main point's)."""
    pts = []
    for conns in run.prof.curve:
        for backend in backends_of(run.st, sc):
            if conns == run.prof.connections and backend in out["points"]:
                pts.append(dict(out["points"][backend]))
                continue
            warmup = min(run.prof.warmup, 1)
            p = run.measure(
                backend, load, server, expect=sc.expect, connections=conns, warmup=warmup
            )
            pts.append(p)
            log(f"curve: {_summary(p)}")
    run.results["curve"] = pts


def saturation_fractions(
    run: Run, sc: Scenario, server: Proc, load: Load, out: dict[str, Any]
) -> None:
    """(b) paced to ½ of the saturation rate just measured (the target) and to ⅒ (the latency
    with next to no queueing)."""
    for name, fraction in (("½", 0.5), ("⅒", 0.1)):
        out["extra_points"][f"b@{name}sat"] = paced_to_saturation(
            run, sc, server, load, out["points"]["b"], fraction, name
        )


def paced_to_saturation(
    run: Run,
    sc: Scenario,
    server: Proc,
    load: Load,
    sat: Mapping[str, Any],
    fraction: float,
    name: str,
) -> dict[str, Any]:
    """(b) paced at about ``fraction`` of the saturation rate ``sat``: each of the connections
    waits ``delay`` between requests so that connections / (delay + latency) is that rate. The
    latency at that load is not the saturated one, so a 2 s calibration run at a first guess
    measures it (wrk is closed-loop; the achieved rate is reported)."""
    connections = run.prof.connections
    target = sat["rate"] * fraction
    first = 0.85 * pacing_delay(connections, target, 0.0)
    calibration = start_wrk(
        run.st.url("b"),
        replace(load, delay_ms=round(first, 1)),
        connections=connections,
        seconds=2,
        threads=run.args.wrk_threads,
        workdir=run.st.workdir,
    ).result()
    delay = pacing_delay(connections, target, calibration.latency_ms(50))
    p = run.measure(
        "b",
        replace(load, delay_ms=round(delay, 1)),
        server,
        expect=sc.expect,
        label=f"extauthz, paced to {name} saturation",
    )
    p["target_rate"] = target
    log(f"scenario {sc.id} at {name} saturation (target {target:.0f}/s): {_summary(p)}")
    return p


_MEDIAN_FIELDS = (
    "rate",
    "p50_ms",
    "p99_ms",
    "p999_ms",
    "server_cpu_us",
    "envoy_cpu_us",
    "total_cpu_us",
    "server_cpu_cores",
    "envoy_cpu_cores",
)
# Each round's value of these is kept too (round_<field>; round_rates for rate): the spread.
_ROUND_FIELDS = ("p99_ms", "server_cpu_us", "envoy_cpu_us", "total_cpu_us")
_SUM_FIELDS = ("requests", "seconds", "idp_calls", "idp_distinct_tokens", "wrong_status")


def combine_rounds(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One point from the rounds of the same backend: the median of each rate, latency and CPU
    figure, the sum of the counts, the last RSS; valid only if every round was. Each round's
    rate is kept in ``round_rates``, its latency and CPU figures in ``round_<field>``."""
    if len(points) == 1:
        return dict(points[0])
    out = dict(points[-1])
    for key in _MEDIAN_FIELDS:
        values = [p[key] for p in points if p.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    for key in _SUM_FIELDS:
        out[key] = sum(p.get(key) or 0 for p in points)
    out["valid"] = all(p.get("valid", True) for p in points)
    out["round_rates"] = [round(p["rate"], 1) for p in points]
    for key in _ROUND_FIELDS:
        out[f"round_{key}"] = [p.get(key) for p in points]
    return out


def pacing_delay(connections: int, rate: float, latency_ms: float) -> float:
    """The delay (ms) before each request on each of ``connections`` closed-loop connections
    that makes them send ``rate`` requests/s in all when a request takes ``latency_ms``."""
    if rate <= 0 or not math.isfinite(latency_ms):
        return 0.0
    return max(0.0, 1000.0 * connections / rate - latency_ms)


def _path_file(workdir: Path, name: str, paths: Sequence[str]) -> str:
    path = workdir / f"paths-{name.replace(' ', '-')}.txt"
    path.write_text("\n".join(paths) + "\n", encoding="utf-8")
    return str(path)


# --- the hostile paths -------------------------------------------------------------------------


def hostile_rounds(run: Run, sc: Scenario, server: Proc) -> dict[str, Any]:
    """Each hostile path on its own, (a) then (b), for its CPU per check; then the innocent
    check (the scenario's ``tokens``, paced) quiet, under a flood of all the hostile paths, and
    under a flood of innocent checks on as many connections (the queueing any flood causes).
    Each round measures all of it, so the quiet and the flooded innocent check are side by side;
    the figures are the medians of the rounds. (b)'s answers to a hostile path are counted in
    extauthz's metrics too: a point where fewer denials were counted than wrk got answers did
    not measure extauthz and is marked invalid."""
    st, paths = run.st, sc.hostile_paths
    load = run.tokens.load(sc.tokens)
    innocent = replace(load, delay_ms=pacing_delay(INNOCENT_CONNECTIONS, INNOCENT_RATE, 0.0))
    alone = {
        hp.key: Load(mode="paths", path_file=_path_file(st.workdir, hp.key, [hp.path]))
        for hp in paths
    }
    denied = {"deployment": configs.FILES_DEPLOYMENT, "decision": "deny"}
    every_path = Load(
        mode="paths", path_file=_path_file(st.workdir, "flood", [p.path for p in paths])
    )
    floods = {
        "hostile flood": Flood(every_path, expect=paths[0].status, counted=denied),
        "innocent flood": Flood(load, expect=sc.expect),
    }
    rounds: dict[str, list[dict[str, Any]]] = {}
    problems: dict[str, str | None] = {}
    for hp in paths:
        for backend in ("a", "b"):
            reason = hp.reason if backend == "b" else None
            why = preflight(
                st.url(backend, hp.path),
                alone[hp.key],
                hp.status if backend == "b" else 200,
                reason=reason,
            )
            problems[f"{backend} {hp.key}"] = why
            if why:
                log(f"scenario {sc.id} ({backend} {hp.key}): preflight {why}")
    why = preflight(st.url("b"), innocent, sc.expect)
    for name in ("quiet", *floods):
        problems[f"b innocent, {name}"] = why
    for r in range(run.prof.rounds):
        warmup = run.prof.warmup if r == 0 else 0
        for hp in paths:
            for backend in ("a", "b"):
                counted = Counted(server, {**denied, "reason": hp.reason})
                p = run.measure(
                    backend,
                    alone[hp.key],
                    server,
                    expect=hp.status,
                    warmup=warmup,
                    label=f"{report.BACKENDS[backend]}, {hp.title}",
                )
                if backend == "b":
                    counted.check(p)
                rounds.setdefault(f"{backend} {hp.key}", []).append(p)
                log(f"scenario {sc.id}: {_summary(p)}")
        time.sleep(SETTLE_SECONDS)
        quiet = run.measure(
            "b",
            innocent,
            server,
            expect=sc.expect,
            connections=INNOCENT_CONNECTIONS,
            warmup=warmup,
            label="extauthz, innocent check, quiet",
        )
        rounds.setdefault("b innocent, quiet", []).append(quiet)
        log(f"scenario {sc.id}: {_summary(quiet)}")
        for name, flood in floods.items():
            under, flooding = under_flood(run, server, innocent, flood, name)
            rounds.setdefault(f"b innocent, {name}", []).append(under)
            rounds.setdefault(f"b {name}", []).append(flooding)
            log(f"scenario {sc.id}: {_summary(under)}")
            log(f"scenario {sc.id}: {_summary(flooding)}")
    points = {}
    for key, pts in rounds.items():
        points[key] = combine_rounds(pts)
        if "extauthz_denials" in pts[0]:  # counted in every round, like the requests
            points[key]["extauthz_denials"] = sum(p["extauthz_denials"] for p in pts)
        if problems.get(key):
            points[key]["valid"], points[key]["preflight"] = False, problems[key]
    for hp in paths:
        b = points[f"b {hp.key}"]
        b["ratios"] = report.scenario_ratios({"a": points[f"a {hp.key}"], "b": b})
    return {
        "id": sc.id,
        "title": sc.title,
        "points": points,
        "ratios": {},
        "hostile": hostile_summary(paths, list(floods), points),
    }


class Counted:
    """The denials extauthz counts (extauthz_checks_total with ``labels``) from now on: a point
    whose wrk got more answers than extauthz counted did not measure extauthz."""

    def __init__(self, server: Proc, labels: Mapping[str, str]) -> None:
        self.server, self.labels = server, dict(labels)
        self.before = checks_answered(server, **self.labels)

    def check(self, p: dict[str, Any]) -> None:
        """Record the denials counted since in ``p`` (``extauthz_denials``); too few: invalid."""
        p["extauthz_denials"] = checks_answered(self.server, **self.labels) - self.before
        if p["extauthz_denials"] < p["requests"]:
            p["valid"] = False


@dataclass(frozen=True)
class Flood:
    """What a flood sends, on FLOOD_CONNECTIONS connections as fast as it is answered; with
    ``counted``, the labels of extauthz_checks_total that count its answers."""

    load: Load
    expect: int
    counted: Mapping[str, str] | None = None


def under_flood(
    run: Run, server: Proc, innocent: Load, flood: Flood, name: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The innocent check measured while a flood runs against the same extauthz (through the
    same Envoy listener): the flood starts FLOOD_LEAD_SECONDS before the innocent check's run
    and is stopped after it. Both points share the server's CPU, so the innocent one has no CPU
    per check, and the flood's is the server's CPU over the flood ÷ the flood's checks (the
    innocent checks' CPU included)."""
    st, roots = run.st, [server.pid]
    counted = Counted(server, flood.counted) if flood.counted else None
    s0, e0, t0 = usage(roots), usage([st.envoy.pid]), time.monotonic()
    running = start_wrk(
        st.url("b"),
        flood.load,
        connections=FLOOD_CONNECTIONS,
        seconds=run.prof.seconds + FLOOD_LEAD_SECONDS + 10,  # stopped once the innocent run ends
        threads=run.args.wrk_threads,
        workdir=st.workdir,
    )
    try:
        time.sleep(FLOOD_LEAD_SECONDS)
        under = run.measure(
            "b",
            innocent,
            server,
            connections=INNOCENT_CONNECTIONS,
            label=f"extauthz, innocent check under the {name}",
        )
    finally:
        running.stop()
        res = running.result()
    s1, e1, t1 = usage(roots), usage([st.envoy.pid]), time.monotonic()
    for key in ("server_cpu_us", "envoy_cpu_us", "total_cpu_us"):
        under[key] = None
    flooding = point(
        "b",
        res,
        label=f"extauthz, the {name} ({FLOOD_CONNECTIONS} connections)",
        connections=FLOOD_CONNECTIONS,
        delay_ms=0.0,
        server_cpu_s=s1.cpu_seconds - s0.cpu_seconds,
        envoy_cpu_s=e1.cpu_seconds - e0.cpu_seconds,
        wall_s=t1 - t0,
        rss_kb=s1.rss_kb,
        processes=len(s1.pids),
        cpu_per_process_s=cpu_split(s0, s1),
        idp_calls=0,
        idp_distinct=0,
        expect=flood.expect,
    )
    if counted is not None:
        counted.check(flooding)
    return under, flooding


def hostile_summary(
    paths: Sequence[configs.HostilePath],
    floods: Sequence[str],
    points: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """What the hostile-path scenario's targets read: the CPU per check of each path for (b)
    and (a); the innocent check's latency quiet and under each flood, with each round's, and
    each flood's p99 ÷ the quiet p99 (the medians', and each round's)."""

    def rounds_of(p: Mapping[str, Any], key: str) -> list[Any]:
        return list(p.get(f"round_{key}", [p.get(key)]))

    out: dict[str, Any] = {"paths": [], "innocent": {}, "floods": {}}
    for hp in paths:
        a, b = points.get(f"a {hp.key}"), points.get(f"b {hp.key}")
        if a and b:
            out["paths"].append(
                {
                    "key": hp.key,
                    "title": hp.title,
                    "chars": len(hp.path),
                    "expect": f"{hp.status} {hp.reason}",
                    "server_cpu_us": b["server_cpu_us"],
                    "round_server_cpu_us": rounds_of(b, "server_cpu_us"),
                    "floor_server_cpu_us": a["server_cpu_us"],
                    "envoy_cpu_us": b["envoy_cpu_us"],
                    "rate": b["rate"],
                    "valid": b["valid"],
                }
            )
    quiet = points.get("b innocent, quiet")
    for name in ("quiet", *floods):
        p = points.get(f"b innocent, {name}")
        if p is None:
            continue
        entry = {
            "connections": p["connections"],
            "delay_ms": p["delay_ms"],
            "rate": p["rate"],
            "p50_ms": p["p50_ms"],
            "p99_ms": p["p99_ms"],
            "round_p99_ms": rounds_of(p, "p99_ms"),
            "valid": p["valid"],
        }
        if quiet is not None and name != "quiet":
            entry["p99_ratio"] = report.ratio(p["p99_ms"], quiet["p99_ms"])
            entry["round_p99_ratios"] = [
                report.ratio(f, q)
                for q, f in zip(rounds_of(quiet, "p99_ms"), entry["round_p99_ms"], strict=True)
            ]
        out["innocent"][name] = entry
        flood = points.get(f"b {name}")
        if flood is not None:
            out["floods"][name] = {
                "connections": flood["connections"],
                "rate": flood["rate"],
                "server_cpu_cores": flood["server_cpu_cores"],
                "envoy_cpu_cores": flood["envoy_cpu_cores"],
                "valid": flood["valid"],
            }
    return out


# --- DPoP (scenario 9) -------------------------------------------------------------------------


def dpop_proofs_needed(rate: float, seconds: float) -> int:
    """Proofs for ``seconds`` of load at up to ``rate`` checks/s, with a margin: wrk sends each
    once and stops its thread when they run out."""
    if seconds <= 0 or rate <= 0:
        return 0
    return math.ceil(rate * seconds * DPOP_PROOF_MARGIN) + 200


def dpop_proof_counts(rate: float, warmup: float, seconds: float) -> tuple[int, int]:
    """(warm-up, measured) proofs for one point, within what one server may remember
    (DPOP_JTI_BUDGET, less one for the preflight): the measured run first."""
    measured = min(dpop_proofs_needed(rate, seconds), DPOP_JTI_BUDGET - 1)
    warm = min(dpop_proofs_needed(rate, warmup), DPOP_JTI_BUDGET - 1 - measured)
    return warm, measured


def dpop_preflight(url: str, tokens: Tokens) -> str | None:
    """One DPoP request with its own proof: None when it is allowed, or what came back."""
    assert tokens.proof_key is not None
    (proof,) = tokens.proof_key.proofs(tokens.dpop, "GET", DPOP_HTU, 1, iat=int(time.time()))
    headers = {
        "Host": "api.bench.example",
        "Authorization": f"DPoP {tokens.dpop}",
        "DPoP": proof,
    }
    try:
        status, hdrs, _ = http_get(url, headers)
    except OSError as exc:
        return f"expected HTTP 200, got {exc}"
    if status == 200:
        return None
    return f"expected HTTP 200, got {status} {hdrs.get('x-extauthz-reason', '')}".strip()


def _proof_file(run: Run, name: str, n: int) -> str:
    assert run.tokens.proof_key is not None
    proofs = run.tokens.proof_key.proofs(run.tokens.dpop, "GET", DPOP_HTU, n, iat=int(time.time()))
    path = run.st.workdir / f"proofs-{name}.txt"
    path.write_text("\n".join(proofs) + "\n", encoding="utf-8")
    return str(path)


def judge_dpop_point(
    p: dict[str, Any],
    *,
    proofs: int,
    connections: int,
    allowed: tuple[int, int],
    denied: int,
    preflight_problem: str | None,
) -> None:
    """Record on a DPoP point what its server counted (``allowed``: the DPoP allows before and
    after the run) and mark it invalid when it did not measure what it says: a DPoP denial (a
    replay, the jti memory full), a failed preflight, or a run that used up its ``proofs``."""
    before, after = allowed
    p["proofs"] = proofs
    p["dpop_allowed"] = after - before
    p["dpop_denied"] = denied
    # Every proof this server accepted is still remembered: a block is shorter than a jti's
    # lifetime in the memory.
    p["jtis_remembered"] = after
    # Out of proofs, a thread stops with its connections' last requests unanswered.
    if p["requests"] + connections >= proofs:
        p["valid"], p["proofs_ran_out"] = False, True
    if denied:
        p["valid"] = False
    if preflight_problem:
        p["valid"], p["preflight"] = False, preflight_problem


def dpop_block(
    run: Run, sc: Scenario, server: Proc, backend: str, dpop_rate: float | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """On one fresh server and one wire: scenario 1's request (the cached bearer check), then
    the DPoP one, a new proof per request, each after the profile's warm-up (the DPoP one's with
    proofs of its own). The proofs are made just before (``iat`` now), as many as the bearer
    point's rate (or the last DPoP point's, with a margin) says the runs can send; a run that
    used them all is marked invalid, as is one where extauthz denied a DPoP check (a replay, or
    the jti memory full): :func:`judge_dpop_point`."""
    st, prof = run.st, run.prof
    warmup = prof.warmup
    bearer_load = run.tokens.load("rs256")
    why = preflight(st.url(backend), bearer_load, 200)
    bearer = run.measure(
        backend, bearer_load, server, warmup=warmup, label="extauthz, cached bearer (scenario 1's)"
    )
    if why:
        bearer["valid"], bearer["preflight"] = False, why
    log(f"scenario {sc.id}: {_summary(bearer)}")
    rate = bearer["rate"] if dpop_rate is None else min(bearer["rate"], 1.5 * dpop_rate)
    n_warm, n_measured = dpop_proof_counts(rate, warmup, prof.seconds)
    url = st.url(backend, configs.DPOP_PATH)
    why = dpop_preflight(url, run.tokens)
    allowed0 = checks_answered(server, deployment=configs.DPOP_DEPLOYMENT, decision="allow")
    denied0 = checks_answered(server, deployment=configs.DPOP_DEPLOYMENT, decision="deny")
    t = time.monotonic()
    load = replace(run.tokens.load("dpop"), proof_file=_proof_file(run, backend, n_measured))
    warm_load = replace(run.tokens.load("dpop"), proof_file=_proof_file(run, "warm", n_warm))
    made = time.monotonic() - t
    if n_warm:
        start_wrk(
            url,
            warm_load,
            connections=prof.connections,
            seconds=warmup,
            threads=run.args.wrk_threads,
            workdir=st.workdir,
        ).result()
    p = run.measure(
        backend,
        load,
        server,
        path=configs.DPOP_PATH,
        label="extauthz, DPoP: a new proof per request",
    )
    allowed = checks_answered(server, deployment=configs.DPOP_DEPLOYMENT, decision="allow")
    denied = checks_answered(server, deployment=configs.DPOP_DEPLOYMENT, decision="deny")
    judge_dpop_point(
        p,
        proofs=n_measured,
        connections=prof.connections,
        allowed=(allowed0, allowed),
        denied=denied - denied0,
        preflight_problem=why,
    )
    log(
        f"scenario {sc.id}: {_summary(p)}; {n_warm:,} + {n_measured:,} proofs (made in "
        f"{made:.1f} s), {p['jtis_remembered']:,} jtis remembered, "
        f"{p['dpop_denied']:,} DPoP denials"
    )
    return bearer, p


def dpop_rounds(run: Run, sc: Scenario, server: Proc) -> dict[str, Any]:
    """For each round and wire, a server of its own (the first is ``server``): the cached bearer
    check, then the DPoP check with a new proof per request (:func:`dpop_block`). A fresh
    server per block keeps the proofs any one has remembered below its bound; the medians of the
    rounds, and the DPoP check's CPU ÷ the bearer check's on each wire (:func:`dpop_summary`)."""
    st = run.st
    wires = backends_of(st, sc)
    rounds: dict[str, list[dict[str, Any]]] = {}
    dpop_rate: dict[str, float] = {}
    current = server
    with ExitStack() as fresh:
        for r in range(run.prof.rounds):
            for i, backend in enumerate(wires):
                if r or i:
                    st.procs.stop(current)
                    current = fresh.enter_context(
                        extauthz(st, sc.policy, sc.deployments, dpop=True)
                    )
                bearer, p = dpop_block(run, sc, current, backend, dpop_rate.get(backend))
                dpop_rate[backend] = p["rate"]
                rounds.setdefault(f"{backend} bearer", []).append(bearer)
                rounds.setdefault(backend, []).append(p)
    points = {}
    for key, pts in rounds.items():
        points[key] = combine_rounds(pts)
        if "jtis_remembered" in pts[0]:
            points[key]["jtis_remembered"] = max(q["jtis_remembered"] for q in pts)
            points[key]["dpop_denied"] = sum(q["dpop_denied"] for q in pts)
            points[key]["proofs_ran_out"] = any(q.get("proofs_ran_out") for q in pts)
    for backend in wires:
        points[backend]["ratios"] = report.dpop_ratios(points[backend], points[f"{backend} bearer"])
    return {
        "id": sc.id,
        "title": sc.title,
        "points": points,
        "extra_points": {},
        "ratios": {},
        "dpop": report.dpop_summary(points, wires, MAX_REMEMBERED_JTIS, DPOP_JTI_LIFETIME_S),
    }


@contextmanager
def _stack_for_workers(st: Stack, workers: int, args: argparse.Namespace) -> Iterator[Stack]:
    """The stack to reach ``workers`` extauthz processes: on one shared port, the main Envoy
    (its cluster has one endpoint whatever the count); on consecutive ports, an Envoy of its
    own with one endpoint per worker."""
    if args.worker_ports == "shared":
        yield replace(st, b_workers=workers)
        return
    admin, lb = free_ports(2)
    b_port = free_port_run(workers)
    boot = configs.envoy_bootstrap(
        admin,
        ext_authz={"extauthz": (lb, _b_endpoints(b_port, workers, "consecutive"))},
        max_streams=args.max_concurrent_streams,
    )
    envoy = start_envoy(st.procs, st.workdir, f"envoy-w{workers}", boot, admin)
    try:
        yield replace(
            st,
            envoy=envoy,
            envoy_admin=admin,
            listen={**st.listen, "b": lb},
            b_port=b_port,
            b_workers=workers,
        )
    finally:
        st.procs.stop(envoy)


def workers_scaling(run: Run, sc: Scenario) -> dict[str, Any]:
    """Scenario ``sc`` (the first) with 1 and with 2 extauthz workers, alternating (1, 2, 1, 2,
    ...: the profile's rounds), a fresh server for each point."""
    load = run.tokens.load(sc.tokens)
    counts = (1, 2)
    rounds: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    out: dict[str, Any] = {"counts": list(counts)}
    try:
        for _ in range(run.prof.rounds):
            for n in counts:
                with (
                    _stack_for_workers(run.st, n, run.args) as st,
                    extauthz(st, sc.policy, sc.deployments, workers=n, http=False) as server,
                ):
                    problem = preflight(st.url("b"), load, sc.expect)
                    p = replace(run, st=st).measure(
                        "b",
                        load,
                        server,
                        expect=sc.expect,
                        warmup=run.prof.warmup,
                        label=f"extauthz, {n} worker{'s' if n > 1 else ''}",
                    )
                    if problem:
                        p["valid"], p["preflight"] = False, problem
                    rounds[n].append(p)
                    log(f"workers={n}: {_summary(p)}  CPU split {p['cpu_per_process_s']}")
    except StartError as exc:
        lines = str(exc).splitlines()
        out["skipped"] = f"{lines[0]} {lines[-1]}" if len(lines) > 1 else lines[0]
        log(f"workers scaling skipped: {out['skipped']}")
    out["points"] = {str(n): combine_rounds(rounds[n]) for n in counts if rounds[n]}
    return out


def flood(run: Run, seconds: int) -> dict[str, Any]:
    """``prof.flood`` distinct opaque tokens (IdP without latency) into a fresh extauthz, for at
    most ``seconds``; RSS throughout, against the default cache bounds."""
    st, target = run.st, run.prof.flood
    st.idp("/_bench/latency?ms=0")
    # No per-thread stop_after: wrk's threads stop when asked for one more request than their
    # share, cutting the answers in flight, so the IdP might never see the last tokens and the
    # flood would idle to its time cap. New tokens flow until the IdP has seen them all.
    load = run.tokens.load("unique")
    base = int(st.idp("/_bench/stats")["distinct"])
    with extauthz(st, "introspection", http=False) as server:
        rss0 = usage([server.pid]).rss_kb / 1024
        samples: list[tuple[int, float]] = []  # (tokens introspected, RSS MB), every second
        last = [0.0]  # when the last sample was taken

        def done() -> bool:
            tokens = int(st.idp("/_bench/stats")["distinct"]) - base
            if not samples or time.monotonic() - last[0] >= 1.0:
                last[0] = time.monotonic()
                samples.append((tokens, usage([server.pid]).rss_kb / 1024))
            return tokens >= target

        p = run.measure(
            "b", load, server, seconds=seconds, label="extauthz, token flood", until=done
        )
    p["rss_before_mb"] = rss0
    p["tokens_target"] = target
    if samples[-1] != (p["idp_distinct_tokens"], p["rss_mb"]):
        samples.append((p["idp_distinct_tokens"], p["rss_mb"]))
    p["rss_samples"] = samples
    p["rss_peak_mb"] = max(mb for _, mb in samples)
    p["rss_projected_mb"] = project_rss(rss0, p["rss_mb"], p["idp_distinct_tokens"], target)
    p["rss_projected_peaks_mb"] = project_rss_peaks(samples, target)
    log(
        f"flood: {p['idp_distinct_tokens']:,} tokens in {p['seconds']:.0f} s, RSS {rss0:.0f} → "
        f"{p['rss_mb']:.0f} MB, peak {p['rss_peak_mb']:.0f} MB (peaks projected to "
        f"{target:,} tokens: {report.fmt(p['rss_projected_peaks_mb'])} MB), "
        f"IdP calls {p['idp_calls']:,}"
    )
    return p


# --- the scenarios -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One scenario as data, run by :func:`run_scenario` like every other: what wrk sends, what
    extauthz is configured with, what comes back, and the steps (functions of this module) it
    takes beyond the common rounds."""

    id: str
    title: str
    # What wrk sends, a kind of Tokens.load: rs256, es256, expired, opaque, distinct or unique
    tokens: str
    policy: str  # extauthz's policy (bench/configs.py): jwt | introspection
    expect: int = 200  # HTTP status through Envoy for (b), (c) and (d); the floors allow all
    # In the order measured: (a) and (b); (c) where Envoy jwt_authn can verify the tokens; (e)
    # and (d) where nothing the scenario needs is gRPC's alone (docs/wires.md: mTLS client
    # certificates, dynamic metadata, TLS on the listener); none of 1-7 needs those
    backends: tuple[str, ...] = ("a", "b")
    deployments: int = 1  # in extauthz's policy (the target one near the end)
    idp_latency_ms: float = 0.0  # the bench IdP's introspection delay
    # Paths sent without a token to the `files` deployment, added to the policy
    hostile_paths: tuple[configs.HostilePath, ...] = ()
    measure: Measure = backend_rounds  # the points: backend_rounds | hostile_rounds | dpop_rounds
    before: tuple[Step, ...] = ()  # steps before the rounds: first_pass
    after: tuple[Step, ...] = ()  # steps after them: latency_curve, saturation_fractions
    dpop: bool = False  # the policy has the DPoP deployment too (configs.dpop_deployment)

    @property
    def with_c(self) -> bool:
        return "c" in self.backends

    @property
    def with_http(self) -> bool:
        return "d" in self.backends


FLOORS = ("a", "e")  # do-nothing servers: they allow every request
HTTP_SCENARIOS = ("1", "2", "3", "4", "5", "6", "7")  # the HTTP checks/s target's scenarios
HTTP = ("e", "d")  # the HTTP wire: its floor, then extauthz
ABC = ("a", "b", "c")
ALL = (*ABC, *HTTP)  # both wires and jwt_authn
GRPC_HTTP = ("a", "b", *HTTP)  # both wires, where jwt_authn cannot verify the token


def scenarios(profile: Profile) -> list[Scenario]:
    return [
        Scenario(
            "1",
            "JWT RS256, warm JWKS, same token",
            "rs256",
            "jwt",
            backends=ALL,
            after=(latency_curve,),
        ),
        Scenario(
            "2",
            f"JWT RS256, {profile.distinct:,} distinct tokens",
            "distinct",
            "jwt",
            backends=ALL,
            before=(first_pass,),
        ),
        Scenario("3", "JWT ES256, same token", "es256", "jwt", backends=ALL),
        Scenario(
            "4",
            "opaque token, warm introspection cache",
            "opaque",
            "introspection",
            backends=GRPC_HTTP,
        ),
        Scenario(
            "5",
            f"opaque tokens, each new, IdP {IDP_LATENCY_MS:g} ms",
            "unique",
            "introspection",
            backends=GRPC_HTTP,
            idp_latency_ms=IDP_LATENCY_MS,
            after=(saturation_fractions,),
        ),
        Scenario("6", "denials (expired RS256 token)", "expired", "jwt", expect=401, backends=ALL),
        Scenario(
            "7",
            f"{profile.deployments:,} deployments, RS256 same token",
            "rs256",
            "jwt",
            backends=GRPC_HTTP,
            deployments=profile.deployments,
        ),
        # gRPC only: the hostile paths measure route selection, the same code on both wires,
        # under a flood through one listener; the wires are compared by scenarios 1-7.
        Scenario(
            "8",
            "hostile paths; the innocent check (scenario 1's) under their flood",
            "rs256",
            "jwt",
            hostile_paths=configs.HOSTILE_PATHS,
            measure=hostile_rounds,
        ),
        # Not in the default run (its 3 rounds would take the RSS flood's share of the budget):
        # --scenarios 9. Each wire's DPoP check against the cached bearer check on one server.
        Scenario(
            "9",
            "DPoP: a cached RS256 token bound to a proof key, a new ES256 proof per request",
            "dpop",
            "jwt",
            backends=("b", "d"),
            measure=dpop_rounds,
            dpop=True,
        ),
    ]


def flood_seconds(prof: Profile, elapsed: float) -> int:
    """The flood's time cap: the profile's, cut so that the run ends within its budget (the
    flood runs last; 20 s are kept for stopping and writing the outputs)."""
    if not prof.budget_seconds:
        return prof.flood_seconds
    return max(30, min(prof.flood_seconds, int(prof.budget_seconds - elapsed - 20)))


def project_rss(before_mb: float, after_mb: float, tokens: int, target: int) -> float | None:
    """RSS after ``target`` tokens, extrapolated linearly from ``tokens`` when the flood's time
    cap stopped it short (an upper bound: the cache stops growing at its entry bound)."""
    if tokens >= target:
        return after_mb
    if tokens <= 0:
        return None
    return before_mb + (after_mb - before_mb) * target / tokens


def project_rss_peaks(
    samples: Sequence[tuple[int, float]], target: int, windows: int = 4
) -> float | None:
    """The peak RSS to expect by ``target`` tokens, from the flood's second half, when the flood
    stopped short. By then every cache is at its entry bound and RSS is a sawtooth (a bounded
    cache is cleared when full), so the trend is taken from the peak of each of ``windows``
    equal token windows, not from the last sample: the peak so far, plus the peaks' growth per
    token (least squares, never negative) over the tokens still to come."""
    if not samples:
        return None
    tokens = samples[-1][0]
    peak = max(mb for _, mb in samples)
    if tokens >= target:
        return peak
    start, width = tokens / 2, tokens / 2 / windows
    peaks: list[tuple[float, float]] = []
    for w in range(windows):
        lo, hi = start + w * width, start + (w + 1) * width
        inside = [mb for n, mb in samples if lo <= n <= hi]
        if inside:
            peaks.append(((lo + hi) / 2, max(inside)))
    if len(peaks) < 2:
        return None
    slope = statistics.linear_regression([n for n, _ in peaks], [mb for _, mb in peaks]).slope
    return peak + max(0.0, slope) * (target - tokens)


# Targets on a ratio of report.WIRE_RATIOS: (scenario, ratio, row label, goal, met?), in the
# order the report lists them.
WireTarget = tuple[str, str, str, str, Callable[[float], bool]]
GRPC_WIRE_TARGETS: tuple[WireTarget, ...] = (
    ("1", "grpc_cpu_vs_floor",
     "CPU per allowed check, scenario 1 (cached JWT), gRPC ÷ floor, both on uvloop", "≤ 1.25×",
     lambda v: v <= 1.25),
    ("2", "grpc_cpu_vs_floor", "CPU per allowed check, scenario 2, ÷ floor", "≤ 1.30×",
     lambda v: v <= 1.30),
    ("4", "grpc_cpu_vs_floor", "CPU per allowed check, scenario 4, ÷ floor", "≤ 1.15×",
     lambda v: v <= 1.15),
)  # fmt: skip
HTTP_WIRE_TARGETS: tuple[WireTarget, ...] = (
    ("1", "http_total_cpu_vs_c",
     "HTTP wire, scenario 1 (cached JWT): total CPU (Envoy + extauthz) ÷ jwt_authn's", "≤ 1.5×",
     lambda v: v <= 1.5),
    ("1", "http_cpu_vs_floor", "HTTP wire, scenario 1 (cached JWT): server CPU ÷ the HTTP floor's",
     "≤ 3×", lambda v: v <= 3.0),
    ("1", "http_rate_vs_c", "HTTP wire, scenario 1 (cached JWT): checks/s ÷ jwt_authn's", "≥ 0.8×",
     lambda v: v >= 0.8),
)  # fmt: skip


def targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each performance target with the value this run measured."""
    sc = {s["id"]: s for s in results["scenarios"]}
    out: list[dict[str, Any]] = []

    def add(
        name: str,
        value: float | None,
        goal: str,
        ok: Callable[[float], bool],
        unit: str = "×",
        rounds: Sequence[float | None] = (),
    ) -> None:
        measured = (
            "–"
            if value is None
            else (f"{value:.2f}{unit}" if unit == "×" else f"{value:,.1f} {unit}")
        )
        if value is not None and len(rounds) > 1:  # each round's ratio: the spread
            measured += f" ({' / '.join(report.fmt(v, 2) for v in rounds)})"
        out.append(
            {
                "name": name,
                "measured": measured,
                "value": value,
                "rounds": list(rounds),
                "goal": goal,
                "met": None if value is None else bool(ok(value)),
            }
        )

    def r(sid: str, key: str) -> float | None:
        value: float | None = sc.get(sid, {}).get("ratios", {}).get(key)
        return value

    def w(sid: str, name: str) -> tuple[float | None, list[float | None]]:
        """A ratio of report.WIRE_RATIOS in scenario ``sid``, and each round's."""
        got = sc.get(sid, {}).get("wires", {}).get(name, {})
        return got.get("value"), list(got.get("rounds", []))

    for sid, name, label, goal, met in GRPC_WIRE_TARGETS:
        value, rounds = w(sid, name)
        add(label, value, goal, met, rounds=rounds)
    first = sc.get("2", {}).get("extra_points", {}).get("b first sight")
    if first:
        add(
            "CPU per check, scenario 2, first sight of each token (a parse and a verify), ÷ floor",
            first.get("ratios", {}).get("cpu_vs_a"),
            "report",
            lambda v: True,
        )
    add("checks/s, scenario 1, ÷ floor", r("1", "rate_vs_a"), "≥ 0.9×", lambda v: v >= 0.9)
    add("checks/s, scenario 4, ÷ floor", r("4", "rate_vs_a"), "≥ 0.9×", lambda v: v >= 0.9)
    add(
        "checks/s, scenario 1, ÷ Envoy jwt_authn",
        r("1", "rate_vs_c"),
        "≥ 0.3× (aim)",
        lambda v: v >= 0.3,
    )
    # The HTTP wire (d), against Envoy's jwt_authn (c), its floor (e) and the gRPC wire (b).
    for sid, name, label, goal, met in HTTP_WIRE_TARGETS:
        value, rounds = w(sid, name)
        add(label, value, goal, met, rounds=rounds)
    for s in results["scenarios"]:
        if s["id"] in HTTP_SCENARIOS and "http_rate_vs_grpc" in s.get("wires", {}):
            value, rounds = w(s["id"], "http_rate_vs_grpc")
            add(
                f"HTTP wire, scenario {s['id']}: checks/s ÷ the gRPC wire's",
                value,
                "≥ 2.5×",
                lambda v: v >= 2.5,
                rounds=rounds,
            )
    workers = results.get("workers_scaling", {}).get("points", {})
    if "1" in workers and "2" in workers:
        add(
            "checks/s, scenario 1, 2 workers ÷ 1 worker",
            report.ratio(workers["2"]["rate"], workers["1"]["rate"]),
            "report (scaling)",
            lambda v: True,
        )
    s5 = sc.get("5", {})
    b5 = s5.get("points", {}).get("b")
    if b5:
        per = report.ratio(float(b5["idp_calls"]), float(b5["idp_distinct_tokens"]))
        add("scenario 5: IdP calls per distinct token", per, "exactly 1", lambda v: v == 1.0)
    half = s5.get("extra_points", {}).get("b@½sat")
    if half:
        add(
            f"scenario 5: p99 at ½ saturation ({half['rate']:,.0f}/s)",
            half["p99_ms"],
            f"≤ {IDP_LATENCY_MS + 5:g} ms",
            lambda v: v <= IDP_LATENCY_MS + 5,
            unit="ms",
        )
    p1 = sc.get("1", {}).get("points", {})
    p7 = sc.get("7", {}).get("points", {})
    if p1.get("a") and p1.get("b") and p7.get("a") and p7.get("b"):
        # Scenarios 1 and 7 run minutes apart, and this machine drifts by more than 5 % in that
        # time; each one's (b) ÷ (a) was measured side by side, so their quotient is the
        # drift-free comparison. The raw quotient is reported next to it.
        add(
            "CPU per check ÷ floor, scenario 7 ÷ scenario 1 (one deployment)",
            report.ratio(
                report.ratio(p7["b"]["server_cpu_us"], p7["a"]["server_cpu_us"]),
                report.ratio(p1["b"]["server_cpu_us"], p1["a"]["server_cpu_us"]),
            ),
            "≤ 1.05×",
            lambda v: v <= 1.05,
        )
        add(
            "CPU per check, scenario 7 ÷ scenario 1, raw (minutes apart)",
            report.ratio(p7["b"]["server_cpu_us"], p1["b"]["server_cpu_us"]),
            "report",
            lambda v: True,
        )
    hostile = sc.get("8", {}).get("hostile", {})
    for path in hostile.get("paths", []):
        add(
            f"hostile path CPU per check: {path['title']} ({path['expect']})",
            path["server_cpu_us"],
            f"< {HOSTILE_CPU_GOAL_US:,.0f} µs",
            lambda v: v < HOSTILE_CPU_GOAL_US,
            unit="µs",
        )
    flooded = hostile.get("innocent", {}).get("hostile flood", {})
    quiet = hostile.get("innocent", {}).get("quiet", {})
    if flooded.get("p99_ratio") is not None:
        add(
            f"innocent p99 under hostile flood ÷ quiet ({report.fmt(flooded['p99_ms'], 2)} ms "
            f"÷ {report.fmt(quiet.get('p99_ms'), 2)} ms)",
            flooded["p99_ratio"],
            f"≤ {FLOOD_P99_GOAL:g}×",
            lambda v: v <= FLOOD_P99_GOAL,
        )
    reference = hostile.get("innocent", {}).get("innocent flood", {})
    if reference.get("p99_ratio") is not None:
        add(
            f"innocent p99 under a flood of innocent checks ÷ quiet "
            f"({report.fmt(reference['p99_ms'], 2)} ms; the queueing of any "
            f"{FLOOD_CONNECTIONS}-connection flood)",
            reference["p99_ratio"],
            "report",
            lambda v: True,
        )
    for wire in sc.get("9", {}).get("dpop", {}).get("wires", []):
        http = wire["backend"] == "d"
        add(
            f"DPoP, {wire['wire']} wire: server CPU per check with a new proof ÷ the cached "
            "bearer check's (scenario 1's request, same server)",
            wire["cpu_ratio"]["value"],
            f"≤ {DPOP_CPU_GOAL:g}×" if http else "report",
            (lambda v: v <= DPOP_CPU_GOAL) if http else (lambda v: True),
            rounds=wire["cpu_ratio"]["rounds"],
        )
    fl = results.get("flood")
    if fl:
        n, goal = fl["idp_distinct_tokens"], fl["tokens_target"]
        add(
            f"peak RSS during a flood of {n:,} distinct opaque tokens",
            fl.get("rss_peak_mb", fl["rss_mb"]),
            "< 150 MB",
            lambda v: v < 150,
            unit="MB",
        )
        if n < goal:
            add(
                f"peak RSS projected to {goal:,} tokens from the peaks of the flood's second half "
                "(stopped short by its time cap)",
                fl.get("rss_projected_peaks_mb"),
                "< 150 MB",
                lambda v: v < 150,
                unit="MB",
            )
            add(
                f"RSS projected linearly to {goal:,} tokens (upper bound: ignores cache bounds)",
                fl["rss_projected_mb"],
                "report",
                lambda v: True,
                unit="MB",
            )
    return out


def results_dir(args: argparse.Namespace) -> Path:
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_outputs(results: dict[str, Any], out: Path) -> list[Path]:
    results["targets"] = targets(results)
    results["chart_file"] = "latency_vs_load.png"
    paths = [out / "bench.json", out / "bench.md"]
    if results.get("curve"):
        chart = out / results["chart_file"]
        meta = results["meta"]
        report.chart(
            results["curve"],
            chart,
            f"Scenario 1 (RS256, same token) through Envoy --concurrency 1 · "
            f"{meta['date'][:10]} · {meta['machine'].split(',')[0]}",
        )
        paths.append(chart)
    paths[0].write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
    paths[1].write_text(report.markdown(results), encoding="utf-8")
    return paths


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--quick",
        action="store_const",
        dest="profile_name",
        const="quick",
        help="3 s points (about 3 minutes)",
    )
    g.add_argument(
        "--smoke",
        action="store_const",
        dest="profile_name",
        const="smoke",
        help="1 s points, every scenario briefly: keeps the harness working",
    )
    p.set_defaults(profile_name="full")
    p.add_argument("--scenarios", default="1,2,3,4,5,6,7,8", help="comma-separated ids")
    p.add_argument("--seconds", type=int, help="override the profile's seconds per point")
    p.add_argument("--rounds", type=int, help="override the profile's rounds per scenario")
    p.add_argument("--connections", type=int, help="override the main point's wrk connections")
    p.add_argument("--workers", type=int, default=1, help="extauthz serve --workers N for (b)")
    p.add_argument(
        "--worker-ports",
        choices=("shared", "consecutive"),
        default="shared",
        help="how extauthz workers listen: one SO_REUSEPORT port (Envoy gets N "
        "endpoints on it, one HTTP/2 connection each) or N consecutive ports",
    )
    p.add_argument(
        "--max-concurrent-streams",
        type=int,
        default=4,
        help="http2 max_concurrent_streams of Envoy's ext_authz clusters (0: Envoy's default); "
        "beyond it Envoy opens another connection, which SO_REUSEPORT may give another worker",
    )
    p.add_argument(
        "--no-workers-scaling", action="store_true", help="skip the 1-vs-2 workers comparison"
    )
    p.add_argument("--no-flood", action="store_true", help="skip the RSS flood")
    p.add_argument("--flood", type=int, help="override the profile's flood tokens")
    p.add_argument(
        "--flood-seconds",
        type=int,
        help="override the flood's time cap (and lift the profile's time budget)",
    )
    p.add_argument("--wrk-threads", type=int, default=1)
    p.add_argument(
        "--profile",
        action="store_true",
        help="one extra (b) run per profiled scenario under py-spy (not measured)",
    )
    p.add_argument("--profile-scenarios", default="1,2,4,5")
    p.add_argument("--out", default=str(RESULTS), help="where the outputs go")
    p.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep extauthz's stdout (its JSON logs) and the work directory",
    )
    args = p.parse_args(argv)
    args.profile_scenarios = set(args.profile_scenarios.split(","))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prof = PROFILES[args.profile_name]
    if args.seconds:
        prof = replace(prof, seconds=args.seconds)
    if args.connections:
        prof = replace(prof, connections=args.connections)
    if args.rounds:
        prof = replace(prof, rounds=args.rounds)
    if args.flood is not None:
        prof = replace(prof, flood=args.flood)
    if args.flood_seconds:
        prof = replace(prof, flood_seconds=args.flood_seconds, budget_seconds=0)
    wanted = set(args.scenarios.split(","))
    started = time.monotonic()
    workdir = run_workdir(RESULTS, "run-")
    log(f"profile {args.profile_name}: {prof}; work dir {workdir}")

    keys = BenchKeys.generate()
    t = time.monotonic()
    distinct_file = workdir / "distinct-tokens.txt"
    distinct_file.write_text("\n".join(keys.distinct_rs256(prof.distinct)) + "\n", encoding="utf-8")
    proof_key = ProofKey(ec.generate_private_key(ec.SECP256R1()))
    bound = keys.rsa.sign({**claims("user-dpop"), "cnf": {"jkt": proof_key.jkt}})
    tokens = Tokens(
        keys.rs256(),
        keys.es256(),
        keys.expired_rs256(),
        str(distinct_file),
        proof_key=proof_key,
        dpop=bound,
    )
    log(f"signed {prof.distinct:,} RS256 tokens in {time.monotonic() - t:.1f} s")

    results: dict[str, Any] = {
        "meta": {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "profile": args.profile_name,
            "settings": prof.__dict__,
            "seconds": prof.seconds,
            "rounds": prof.rounds,
            "connections": prof.connections,
            "wrk_threads": args.wrk_threads,
            "workers": args.workers,
            "worker_ports": args.worker_ports,
            "max_concurrent_streams": args.max_concurrent_streams,
            "commit": commit(),
            "envoy": envoy_version(),
        },
        "scenarios": [],
        "notes": [],
    }
    try:
        with stack(
            workdir,
            keys,
            workers=args.workers,
            worker_ports=args.worker_ports,
            keep_logs=args.keep_logs,
            max_streams=args.max_concurrent_streams,
        ) as st:
            run = Run(st, tokens, prof, args, results)
            catalogue = scenarios(prof)
            for sc in catalogue:
                if sc.id in wanted:
                    log(f"scenario {sc.id}: {sc.title}")
                    try:
                        results["scenarios"].append(run_scenario(run, sc))
                    except StartError as exc:
                        log(f"scenario {sc.id} skipped: {exc}")
                        results["scenarios"].append(
                            {
                                "id": sc.id,
                                "title": sc.title,
                                "points": {},
                                "skipped": str(exc).splitlines()[0],
                            }
                        )
            if not args.no_workers_scaling and "1" in wanted:
                first = next(sc for sc in catalogue if sc.id == "1")
                results["workers_scaling"] = workers_scaling(run, first)
                w = results["workers_scaling"]
                s1 = next((s for s in results["scenarios"] if s["id"] == "1"), None)
                if s1 is not None and s1["points"]:
                    for n, wp in w["points"].items():
                        wp = dict(wp)
                        wp["ratios"] = report.scenario_ratios({**s1["points"], "b": wp})
                        s1["extra_points"][f"b {n}w"] = wp
                if w.get("skipped"):
                    results["notes"].append(f"workers scaling skipped: {w['skipped']}")
            if prof.flood and not args.no_flood:
                seconds = flood_seconds(prof, time.monotonic() - started)
                results["flood"] = flood(run, seconds)
    except (KeyboardInterrupt, SystemExit):
        log("interrupted: every process started has been stopped")
        raise
    finally:
        results["meta"]["elapsed_s"] = time.monotonic() - started
        if results["scenarios"] or results.get("flood"):
            paths = write_outputs(results, results_dir(args))
            log(
                "wrote "
                + ", ".join(
                    str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in paths
                )
            )
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(report.results_table(results["scenarios"]))
    print()
    print(report.targets_table(results.get("targets", [])))
    log(f"done in {time.monotonic() - started:.0f} s")
    invalid = [p for s in results["scenarios"] for p in s["points"].values() if not p["valid"]]
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
