"""Scripted load-and-fault scenarios (``make chaos``): extauthz attacked by its own IdP.

    python -m bench.chaos [--quick] [--scenarios 1,2,3,4,5] [--keep-logs] [--out DIR]

Each scenario runs its own stack on loopback::

    harness client (every answer recorded) ─┐
    wrk flood (bench/loadgen.py, optional) ─┴► Envoy --concurrency 1 ──ext_authz gRPC──►
        python -m extauthz serve ──► bench/chaos_idp.py (bench/idp.py's IdP + fault controls)

The harness knows what every token it sends is (valid, expired, forged, signed by a key the IdP
has dropped, an opaque token the IdP issued or not) and what the IdP was doing at each moment,
so every answer is judged on its own (bench/chaos_report.py): false allows (must be 0), false
denials, other mismatches. Each scenario prints a summary table (requests sent, allowed, denied by
reason, false denials, false allows) and a table of figures (IdP calls, peak RSS of extauthz, and
what the scenario is about, with the bound each must meet). Results go to bench/results/chaos.md
and chaos.json; the exit status is 1 when any scenario fails.

1. **Key rotation** under steady load: the IdP publishes a new key in its JWKS, starts signing
   with it (6 s later: more than the 5 s unknown-kid re-fetch limit, as IdPs publish keys ahead),
   then drops the old key. Meanwhile expired, forged-kid and bad-signature tokens, and a wrk flood
   of forged kids. Zero false denials; JWKS fetches at most 1 + one per 5 s; the dropped key stops
   verifying within 5 s of the drop (the flood's unknown kids make extauthz re-fetch).
2. **IdP killed** (SIGKILL) mid-load, restarted later on the same port. Cached JWTs, new JWTs
   (keys cached; the JWKS cache is 7.2 s here, so it goes stale during the outage) and cached
   introspections keep being allowed; new opaque tokens and forged tokens are never allowed; new
   opaque tokens get 500 fast once the breaker opens (latency before/after); recovery is
   automatic within the breaker's cool-down (``server.circuitBreaker.coolDownSeconds`` 2-3 s).
3. **Slow IdP**: JWKS and introspection answer after 2× ``timeoutSeconds``; a wrk flood of new
   (unverifiable) opaque tokens on 32 connections. Latency of IdP-bound checks stays bounded by
   the timeout, the breaker opens, cached tokens stay fast, RSS and extauthz's TCP connections to
   the IdP (``/proc/<pid>/fd`` × ``/proc/net/tcp``) stay bounded; recovery after the IdP heals.
4. **SIGTERM** during load, with checks in flight (the IdP takes 800 ms to introspect): every
   check sent before SIGTERM gets the server's answer (none gets Envoy's ``status_on_error``
   503), the server exits 0 within ``--grace-seconds``; checks sent after SIGTERM are reported
   apart (answered while draining, or 503 from Envoy once the server is gone).
5. **Config reload** under load through a Kubernetes ConfigMap layout (``..vN/``, ``..data``
   symlink swapped with ``os.replace``, ``config.yaml -> ..data/config.yaml``): v1 → v2 → v3
   change the route's allowedScope. Every answer is judged against the policy in force at that
   moment (from the ``config.reloaded`` log lines' timestamps; a check spanning a reload may
   follow either policy, nothing else). Then a swap to an invalid file: ``config.reloadFailed``
   is logged and v3 keeps serving.

``--quick`` shortens every phase (about 1.5 minutes in all; the full run takes about 3). Every
process is started through bench/procs.py's ``Processes`` and stopped at the end of its
scenario, however it ends (SIGTERM, then SIGKILL); wrk gets ``PR_SET_PDEATHSIG`` too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import itertools
import json
import math
import os
import secrets
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from bench import chaos_report as rep
from bench import configs, loadgen
from bench.chaos_client import Load, Record, Stream, http_request, read_response, request_bytes
from bench.chaos_idp import SECRET_ENV, forged_opaque_token, opaque_token
from bench.chaos_proc import Sampler
from bench.keys import CLIENT_SECRET_ENV, BenchKeys, claims
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
)
from bench.signing import SigningKey
from examples.stack import accepts_tcp, free_ports

JWT_PATH = configs.TARGET_PATH  # /api/items: the REMOTE_JWKS deployment
OPAQUE_PATH = "/op/items"  # the REMOTE_INTROSPECTION deployment
UNKNOWN_KID_REFETCH_S = 5.0  # extauthz/idp/jwks.py: at most one re-fetch per 5 s per JWKS
MAX_OUTSTANDING_IDP_CALLS = 64  # extauthz/idp/http.py, README "Resilience"
RELOAD_POLL_S = 1.0  # extauthz/reload.py
NEW_OPAQUE = "new opaque token (issued by the IdP)"
FORGED_OPAQUE = "forged opaque token"


@dataclass(frozen=True)
class Profile:
    name: str
    rotation: tuple[float, float, float, float]  # publish new key, sign with it, drop old, end
    outage: tuple[float, float, float]  # kill, restart, end
    cool_down: float  # server.circuitBreaker.coolDownSeconds (scenarios 2, 3)
    slow: tuple[float, float, float]  # slow from, healed at, end
    slow_timeout: float  # timeoutSeconds of scenario 3 (the IdP answers after twice that)
    sigterm: tuple[float, float]  # SIGTERM at, load kept after the exit
    grace: float  # --grace-seconds of scenario 4
    reload: tuple[float, float, float, float]  # swap to v2, to v3, to an invalid file, end


# Each phase's times in seconds (from the start of the scenario's load): full, then quick.
_PHASES: dict[str, tuple[Any, Any]] = {
    "rotation": ((10, 16, 28, 40), (3, 9, 14, 20)),
    "outage": ((8, 22, 32), (3, 9, 14)),
    "cool_down": (3, 2),
    "slow": ((6, 24, 32), (3, 10, 14)),
    "slow_timeout": (1.0, 1.0),
    "sigterm": ((8, 3), (4, 2)),
    "grace": (5, 5),
    "reload": ((6, 12, 18, 24), (3, 6, 9, 12)),
}
PROFILES = {
    name: Profile(name, **{key: times[i] for key, times in _PHASES.items()})
    for i, name in enumerate(("full", "quick"))
}


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- the stack of one scenario -----------------------------------------------------------------


class Stack:
    """One scenario's processes on free loopback ports: the chaos IdP (serving ``jwks`` at
    first, with a fresh token secret), and extauthz and Envoy once the scenario starts them."""

    def __init__(
        self,
        procs: Processes,
        workdir: Path,
        keys: BenchKeys,
        jwks: dict[str, Any],
        jwks_max_age: int,
    ) -> None:
        self.procs, self.dir, self.keys = procs, workdir, keys
        self.secret = secrets.token_hex(16).encode()
        ports = free_ports(5)
        self.idp_port, self.grpc_port, self.admin_port, self.envoy_port, self.envoy_admin = ports
        self.jwks_file = workdir / "jwks.json"
        self.jwks_file.write_text(json.dumps(jwks), encoding="utf-8")
        self.jwks_max_age = jwks_max_age
        self.server_log = workdir / "extauthz.log"
        self.idp: Proc | None = None
        self.server: Proc | None = None
        self.envoy: Proc | None = None
        self.idp_count = 0
        self.wrk: list[loadgen.RunningWrk] = []

    @property
    def idp_url(self) -> str:
        return f"http://127.0.0.1:{self.idp_port}"

    def env(self) -> dict[str, str]:
        return {
            "PYTHONPATH": str(ROOT),
            SECRET_ENV: self.secret.decode(),
            CLIENT_SECRET_ENV: "chaos-client-secret",
        }

    # the IdP

    def start_idp(self) -> Proc:
        self.idp_count += 1
        self.idp = self.procs.start(
            f"idp-{self.idp_count}",
            [
                sys.executable,
                "-m",
                "bench.chaos_idp",
                "--port",
                str(self.idp_port),
                "--jwks",
                str(self.jwks_file),
                "--jwks-max-age",
                str(self.jwks_max_age),
            ],
            env=self.env(),
        )
        return self.idp

    async def wait_idp(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not accepts_tcp(self.idp_port):
            if self.idp is None or not self.idp.alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"chaos IdP not listening:\n{self.idp.tail() if self.idp else ''}"
                )
            await asyncio.sleep(0.02)

    def kill_idp(self) -> None:
        """SIGKILL: no goodbye, connections reset, the port refuses from now on."""
        assert self.idp is not None
        self.idp.popen.kill()
        self.idp.popen.wait(10)
        self.procs.stop(self.idp)
        self.idp = None

    async def idp_call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else b""
        resp = await http_request("127.0.0.1", self.idp_port, method, path, body=data)
        if resp.status != 200:
            raise RuntimeError(f"chaos IdP {path}: {resp.status}")
        return json.loads(resp.body)

    async def idp_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = await self.idp_call("GET", "/_chaos/stats")
        return stats

    # extauthz

    def start_server(self, config: Path, grace: float = 10.0) -> Proc:
        self.server = start_extauthz(
            self.procs,
            "extauthz",
            config,
            (self.grpc_port, self.admin_port),
            options=["--grace-seconds", f"{grace:g}"],
            env=self.env(),
            stdout=str(self.server_log),
            timeout=60,
        )
        return self.server

    async def metrics(self) -> dict[str, float]:
        """extauthz's Prometheus samples, ``name{labels}`` → value."""
        resp = await http_request("127.0.0.1", self.admin_port, "GET", "/metrics")
        out: dict[str, float] = {}
        for line in resp.body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    def server_latency_ms(self) -> dict[str, float]:
        """``latencyMs`` of every access line, by request id: the check as extauthz timed it,
        without the client's and Envoy's share (the machine is shared: the client's share is
        noise)."""
        return {
            str(line.get("requestId")): float(line.get("latencyMs", math.nan))
            for line in self.log_lines("access")
        }

    def log_lines(self, *events: str) -> list[dict[str, Any]]:
        """The server's JSON log lines with one of these events (all lines when none given)."""
        out: list[dict[str, Any]] = []
        try:
            text = self.server_log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return out
        needles = [f'"event":"{e}"' for e in events]
        for line in text.splitlines():
            if needles and not any(n in line for n in needles):
                continue
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict) and (not events or obj.get("event") in events):
                    obj["_t"] = ts(obj.get("ts", ""))
                    out.append(obj)
        return out

    # Envoy

    def start_envoy(self) -> Proc:
        boot = configs.envoy_bootstrap(
            self.envoy_admin, ext_authz={"extauthz": (self.envoy_port, [self.grpc_port])}
        )
        self.envoy = start_envoy(self.procs, self.dir, "envoy", boot, self.envoy_admin)
        return self.envoy

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.envoy_port}{path}"

    def load(self, streams: list[Stream]) -> Load:
        return Load("127.0.0.1", self.envoy_port, streams)

    async def one(self, path: str, token: str | None, *, retry_s: float = 0.0) -> str:
        """One request through Envoy on its own connection; its outcome (chaos_report.py).
        With ``retry_s``, repeated until allowed or that many seconds have passed (start-up)."""
        deadline = time.monotonic() + retry_s
        while True:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.envoy_port)
            try:
                writer.write(request_bytes(path, token, str(uuid.uuid4())))
                resp, _ = await asyncio.wait_for(read_response(reader), 15)
            finally:
                writer.close()
            got = rep.outcome(resp.status, resp.headers.get("x-extauthz-reason", ""))
            if got == rep.ALLOW or time.monotonic() >= deadline:
                return got
            await asyncio.sleep(0.2)

    def sampler(self) -> Sampler:
        """extauthz's RSS, CPU, file descriptors and connections to the IdP, sampled from now
        until ``await sampler.stop()``."""
        assert self.server is not None
        sampler = Sampler(self.server.pid, self.idp_port)
        sampler.start()
        return sampler

    def flood(
        self, path: str, load: loadgen.Load, *, connections: int, seconds: float
    ) -> asyncio.Future[loadgen.WrkResult]:
        """bench/loadgen.py's wrk and bench.lua, started now; await the future for the result."""
        running = loadgen.start_wrk(
            self.url(path),
            load,
            connections=connections,
            seconds=seconds,
            workdir=self.dir,
            log=self.dir / "logs" / "wrk.log",
        )
        self.wrk.append(running)
        return asyncio.ensure_future(running.finished())

    def stop_wrk(self) -> None:
        for running in self.wrk:
            running.close()
        self.wrk.clear()


def ts(text: str) -> float:
    """A log line's RFC 3339 ``ts`` as a Unix time (NaN when unparseable)."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return math.nan


@contextlib.contextmanager
def stack(
    workdir: Path, name: str, keys: BenchKeys, *, jwks: dict[str, Any], jwks_max_age: int = 30
) -> Iterator[Stack]:
    d = workdir / name
    d.mkdir(parents=True, exist_ok=True)
    with Processes(d / "logs") as procs:
        st = Stack(procs, d, keys, jwks, jwks_max_age)
        try:
            st.start_idp().wait_until(lambda: accepts_tcp(st.idp_port), 20, "IdP listening")
            yield st
        finally:
            st.stop_wrk()


# --- extauthz configs ----------------------------------------------------------------------------


def chaos_config(
    idp_url: str,
    *,
    opaque: bool = False,
    timeout: float | None = None,
    cool_down: float | None = None,
    jwks_cache_hours: float | None = None,
    scope: str | None = None,
) -> dict[str, Any]:
    """bench/configs.py's policies: deployment ``api`` (REMOTE_JWKS, /api) and with ``opaque``
    a deployment ``opaque`` (REMOTE_INTROSPECTION, /op), with the chaos settings."""
    cfg = configs.extauthz_config("jwt", idp_url)
    if opaque:
        op = configs.extauthz_config("introspection", idp_url)["deployments"][0]
        op["name"], op["pathPrefix"] = "opaque", "/op"
        cfg["deployments"].append(op)
    for d in cfg["deployments"]:
        policy = d["authentication"]["validationPolicy"]
        if timeout is not None:
            policy["timeoutSeconds"] = timeout
        if scope is not None:
            d["routes"][0]["authorization"]["allowedScope"] = [scope]
    if jwks_cache_hours is not None:
        cfg["deployments"][0]["authentication"]["validationPolicy"]["maxCacheDurationInHours"] = (
            jwks_cache_hours
        )
    if cool_down is not None:
        cfg["server"]["circuitBreaker"] = {"failureThreshold": 5, "coolDownSeconds": cool_down}
    return cfg


def write_yaml(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


class ConfigMapDir:
    """A ConfigMap volume as the kubelet lays it out and updates it::

    dir/..v1/config.yaml
    dir/..data -> ..v1                 (swapped atomically: ..data_tmp + os.replace)
    dir/config.yaml -> ..data/config.yaml
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.version = 0
        root.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Path:
        return self.root / "config.yaml"

    def publish(self, text: str) -> None:
        self.version += 1
        new = self.root / f"..v{self.version}"
        new.mkdir()
        (new / "config.yaml").write_text(text, encoding="utf-8")
        tmp = self.root / "..data_tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(new.name, tmp)
        os.replace(tmp, self.root / "..data")
        if not self.path.is_symlink():
            os.symlink("..data/config.yaml", self.path)
        old = self.root / f"..v{self.version - 1}"
        if old.exists():  # the kubelet removes the previous version after the swap
            shutil.rmtree(old)


# --- timeline and the wrk flood -----------------------------------------------------------------


class Timeline:
    def __init__(self) -> None:
        self.t0 = time.time()
        self.events: list[tuple[float, str]] = []

    def mark(self, name: str) -> float:
        t = time.time()
        self.events.append((t, name))
        log(f"  t+{t - self.t0:5.1f}s {name}")
        return t

    async def until(self, offset: float) -> None:
        delay = self.t0 + offset - time.time()
        if delay > 0:
            await asyncio.sleep(delay)

    def relative(self) -> list[tuple[float, str]]:
        return [(t - self.t0, e) for t, e in self.events]


def flood_row(kind: str, res: loadgen.WrkResult) -> rep.Row:
    return rep.wrk_row(kind, res.requests, res.errors.get("status", 0), res.socket_errors, False)


def flood_figure(res: loadgen.WrkResult) -> rep.Figure:
    return rep.info(
        "wrk flood",
        f"{res.requests:,} requests, {res.rate:,.0f}/s, p50 {res.latency_ms(50):.1f} ms, "
        f"p99 {res.latency_ms(99):.1f} ms, max {res.latency_ms(100):.0f} ms, "
        f"socket errors {res.socket_errors}",
    )


def cycle(items: Sequence[str]) -> Callable[[], str]:
    it = itertools.cycle(items)
    return lambda: next(it)


def idp_calls_figure(stats: Sequence[dict[str, Any]], note: str = "") -> rep.Figure:
    jwks = sum(int(s.get("jwks", 0)) for s in stats)
    intro = sum(int(s.get("introspect", 0)) for s in stats)
    return rep.info(
        "IdP calls (received by the IdP)",
        f"{jwks + intro:,} (JWKS {jwks:,}, introspection {intro:,}){note}",
    )


def rss_figure(sampler: Sampler, bound_mb: float | None = None) -> rep.Figure:
    peak = sampler.peak_rss_mb()
    first = sampler.samples[0].rss_kb / 1024 if sampler.samples else math.nan
    value = f"{peak:.0f} MB (at start {first:.0f} MB)"
    if bound_mb is None:
        return rep.info("peak RSS of extauthz", value)
    return rep.check("peak RSS of extauthz", value, peak <= bound_mb, f"≤ {bound_mb:.0f} MB")


def server_idp_outcomes(metrics: dict[str, float]) -> str:
    """extauthz_idp_requests_total by endpoint and outcome, from /metrics."""
    parts = []
    for name, value in sorted(metrics.items()):
        if name.startswith("extauthz_idp_requests_total{") and value:
            labels = dict(
                kv.split("=", 1) for kv in name[name.index("{") + 1 : -1].split(",") if "=" in kv
            )
            parts.append(
                f"{labels.get('endpoint', '?').strip(chr(34))} "
                f"{labels.get('outcome', '?').strip(chr(34))} {int(value):,}"
            )
    return ", ".join(parts) or "none"


def metric(metrics: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        v for k, v in metrics.items() if k.startswith(name + "{") and all(w in k for w in want)
    )


def latencies(records: Sequence[Record]) -> list[float]:
    return [r.t_recv - r.t_send for r in records]


async def warm_cache(st: Stack, *, opaque: bool = True) -> tuple[list[str], list[str]]:
    """50 valid JWTs and (with ``opaque``) 50 opaque tokens the IdP issued, each checked once
    through Envoy and allowed: extauthz has the keys, the verified tokens and the introspections
    cached from then on."""
    jwts = [st.keys.rs256(f"cached-{i}") for i in range(50)]
    ops = [opaque_token(st.secret) for _ in range(50)] if opaque else []
    await st.one(JWT_PATH, jwts[0], retry_s=10)
    for path, tokens, what in ((JWT_PATH, jwts, "JWT"), (OPAQUE_PATH, ops, "opaque token")):
        for tok in tokens:
            if (got := await st.one(path, tok)) != rep.ALLOW:
                raise RuntimeError(f"preflight: a valid {what} got {got}")
    return jwts, ops


def forged_kids(attacker: Any, n: int) -> list[str]:
    """``n`` tokens signed by ``attacker`` under kids nobody published."""
    return [
        SigningKey(f"forged-{uuid.uuid4().hex[:12]}", "RS256", attacker).sign(claims("mallory"))
        for _ in range(n)
    ]


def opaque_streams(
    st: Stack,
    cached: Sequence[str],
    *,
    cached_rate: float,
    new: tuple[int, float],
    forged_rate: float,
) -> list[Stream]:
    """The opaque tokens of the IdP-outage scenarios: ones extauthz has cached (2 connections),
    new ones the IdP issued (``new``: connections, rate) and forged ones (1 connection)."""
    co = cycle(cached)
    connections, rate = new
    return [
        Stream("cached-opaque", 2, lambda: ("cached opaque token", OPAQUE_PATH, co()), cached_rate),
        Stream(
            "new-opaque",
            connections,
            lambda: (NEW_OPAQUE, OPAQUE_PATH, opaque_token(st.secret)),
            rate,
        ),
        Stream(
            "forged-opaque",
            1,
            lambda: (FORGED_OPAQUE, OPAQUE_PATH, forged_opaque_token()),
            forged_rate,
        ),
    ]


def first_allowed(records: Sequence[Record], kind: str, *, after: float) -> float:
    """When the first ``kind`` check sent after ``after`` was answered with an allow (inf:
    never)."""
    return min(
        (
            r.t_recv
            for r in records
            if r.kind == kind and r.t_send > after and rep.record_outcome(r) == rep.ALLOW
        ),
        default=math.inf,
    )


def idp_outage_expect(
    rec: Record, *, up_until: float, down: tuple[float, float], recovered: float
) -> rep.Expect:
    """What an opaque token gets around an IdP outage (killed, or slower than the timeout).
    Forged: never allowed. Issued: allowed while the IdP is up (answered before ``up_until``),
    refused ``idp_call_failed`` while it is down (sent after ``down[0]``, answered before
    ``down[1]``: nobody can verify it), allowed again once sent 0.5 s after the first allowed
    one since (``recovered``), either in between."""
    if rec.kind == FORGED_OPAQUE:
        return rep.deny("token_inactive", "idp_call_failed")
    if rec.t_recv < up_until:
        return rep.allow()
    if rec.t_send > down[0] and rec.t_recv < down[1]:
        return rep.deny("idp_call_failed")
    if rec.t_send > recovered + 0.5:
        return rep.allow()
    return rep.either(rep.ALLOW, "idp_call_failed")


# --- scenario 1: key rotation ----------------------------------------------------------------


async def s1_rotation(st: Stack, prof: Profile, res: rep.ScenarioResult) -> None:
    publish, sign_new, drop, end = prof.rotation
    old = st.keys.rsa
    new = SigningKey("rotated-2", "RS256", rsa.generate_private_key(65537, 2048))
    attacker = rsa.generate_private_key(65537, 2048)
    lifetime_ago = time.time() - 4 * 3600  # claims() lasts 3 h: expired an hour ago

    def pool(key: SigningKey, n: int, prefix: str, now: float | None = None) -> list[str]:
        return [key.sign(claims(f"{prefix}-{i}", now=now)) for i in range(n)]

    old_valid, new_valid = pool(old, 200, "old"), pool(new, 200, "new")
    old_expired = pool(old, 30, "old-exp", lifetime_ago)
    new_expired = pool(new, 30, "new-exp", lifetime_ago)
    forged_kid = forged_kids(attacker, 200)
    bad_sig_old = pool(SigningKey(old.kid, "RS256", attacker), 30, "mallory")
    bad_sig_new = pool(SigningKey(new.kid, "RS256", attacker), 30, "mallory")
    flood_file = st.dir / "forged-kids.txt"
    flood_file.write_text("\n".join(forged_kid) + "\n", encoding="utf-8")

    cfg = write_yaml(st.dir / "config.yaml", chaos_config(st.idp_url))
    st.start_server(cfg)
    st.start_envoy()
    if (got := await st.one(JWT_PATH, old_valid[0], retry_s=10)) != rep.ALLOW:
        raise RuntimeError(f"preflight: a valid token got {got}")

    phase = {"now": "old"}
    old_pick, new_pick = cycle(old_valid), cycle(new_valid)
    n = itertools.count()

    def valid() -> tuple[str, str, str | None]:
        i = next(n)
        if phase["now"] == "old" or (phase["now"] == "both" and i % 2 == 0):
            return "valid, old key", JWT_PATH, old_pick()
        if phase["now"] == "both" or i % 4:
            return "valid, new key", JWT_PATH, new_pick()
        return "old key, after the IdP dropped it", JWT_PATH, old_pick()

    exp_old, exp_new, bad_old, bad_new = map(
        cycle, (old_expired, new_expired, bad_sig_old, bad_sig_new)
    )
    forged = cycle(forged_kid)
    kinds = itertools.cycle(("expired", "forged", "badsig"))

    def invalid() -> tuple[str, str, str | None]:
        k = next(kinds)
        current_old = phase["now"] == "old"
        if k == "expired":
            return "expired", JWT_PATH, (exp_old() if current_old else exp_new())
        if k == "forged":
            return "unknown kid (attacker's key)", JWT_PATH, forged()
        return (
            "known kid, attacker's signature",
            JWT_PATH,
            (bad_old() if current_old else bad_new()),
        )

    streams = [Stream("valid", 6, valid, rate=450), Stream("invalid", 3, invalid, rate=150)]
    tl = Timeline()
    sampler = st.sampler()
    flood = st.flood(
        JWT_PATH,
        loadgen.Load(mode="rotate", token_file=str(flood_file), delay_ms=2),
        connections=2,
        seconds=end,
    )
    async with st.load(streams) as load:
        tl.mark("load starts (old key signs)")
        await tl.until(publish)
        await st.idp_call("POST", "/_chaos/jwks", {"keys": [old.public_jwk, new.public_jwk]})
        t_publish = tl.mark("new key published in the JWKS")
        await tl.until(sign_new)
        phase["now"] = "both"
        t_sign = tl.mark("new key signs (old tokens still in use)")
        await tl.until(drop)
        await st.idp_call("POST", "/_chaos/jwks", {"keys": [new.public_jwk]})
        t_drop = tl.mark("old key dropped from the JWKS")
        phase["now"] = "new"
        await tl.until(end)
    wrk = await flood
    t_end = tl.mark("load stops")
    stats = await st.idp_stats()
    await sampler.stop()

    fetches = [(float(t), kids) for t, kids in stats["jwks_fetches"]]
    after_drop = [t for t, kids in fetches if t > t_drop and old.kid not in kids]
    f_drop = after_drop[0] if after_drop else math.inf

    def expect(rec: Record) -> rep.Expect:
        if rec.kind in ("valid, old key", "valid, new key"):
            return rep.allow()
        if rec.kind == "old key, after the IdP dropped it":
            if rec.t_recv < f_drop:
                return rep.allow()  # extauthz has not seen the new JWKS yet: the key is good
            if rec.t_send > f_drop + 0.05:
                return rep.deny("key_not_found")
            return rep.either(rep.ALLOW, "key_not_found")
        if rec.kind == "expired":
            return rep.deny("token_expired")
        if rec.kind == "unknown kid (attacker's key)":
            return rep.deny("key_not_found")
        return rep.deny("signature_invalid")

    res.rows = rep.tally(load.records, expect, tl.t0)
    res.rows.append(flood_row("unknown kid, wrk flood (rotating 200 forged kids)", wrk))
    res.timeline = tl.relative()
    first = fetches[0][0] if fetches else tl.t0
    bound = 1 + math.ceil((t_end - first) / UNKNOWN_KID_REFETCH_S)
    forged_sent = sum(r.kind.startswith("unknown kid") for r in load.records) + wrk.requests
    fetch_times = ", ".join(f"t{t - tl.t0:+.1f}" for t, _ in fetches)
    new_ok = [r for r in load.records if r.kind == "valid, new key"]
    res.figures = [
        rep.check(
            "JWKS fetches (IdP calls)",
            f"{len(fetches)} for {forged_sent:,} tokens with unknown kids ({fetch_times})",
            len(fetches) <= bound,
            f"≤ {bound} (1 + one per {UNKNOWN_KID_REFETCH_S:g} s)",
        ),
        rep.check(
            "new key: published, then signing",
            f"published t+{t_publish - tl.t0:.1f}s, signs from t+{t_sign - tl.t0:.1f}s; "
            f"{sum(rep.record_outcome(r) == rep.ALLOW for r in new_ok):,} of {len(new_ok):,} "
            "new-key tokens allowed",
            bool(new_ok) and all(rep.record_outcome(r) == rep.ALLOW for r in new_ok),
            "all allowed",
        ),
        rep.check(
            "old key refused after the drop",
            (
                f"from t+{f_drop - tl.t0:.1f}s, {f_drop - t_drop:.1f} s after the drop "
                "(first JWKS fetch without it)"
                if after_drop
                else "never (no JWKS fetch after the drop)"
            ),
            f_drop - t_drop <= UNKNOWN_KID_REFETCH_S + 0.5,
            f"≤ {UNKNOWN_KID_REFETCH_S + 0.5:g} s after the drop",
        ),
        flood_figure(wrk),
        rep.info(
            "latency of valid tokens",
            rep.latency_summary(latencies([r for r in load.records if r.kind.startswith("valid")])),
        ),
        idp_calls_figure([stats]),
        rss_figure(sampler),
    ]


# --- scenario 2: the IdP killed --------------------------------------------------------------


async def s2_idp_killed(st: Stack, prof: Profile, res: rep.ScenarioResult) -> None:
    kill, restart, end = prof.outage
    cool = prof.cool_down
    keys = st.keys
    cfg = chaos_config(st.idp_url, opaque=True, cool_down=cool, jwks_cache_hours=0.002)
    st.start_server(write_yaml(st.dir / "config.yaml", cfg))
    st.start_envoy()
    cached_jwt, cached_op = await warm_cache(st)
    attacker = rsa.generate_private_key(65537, 2048)
    forged_kid = forged_kids(attacker, 50)
    bad_sig = [
        SigningKey(keys.rsa.kid, "RS256", attacker).sign(claims("mallory")) for _ in range(20)
    ]
    cj = cycle(cached_jwt)
    fk, bs = cycle(forged_kid), cycle(bad_sig)
    forged_turn = itertools.count()

    def forged_jwt() -> tuple[str, str, str | None]:
        if next(forged_turn) % 2:
            return "forged JWT: unknown kid", JWT_PATH, fk()
        return "forged JWT: known kid, bad signature", JWT_PATH, bs()

    streams = [
        Stream("cached-jwt", 2, lambda: ("cached JWT", JWT_PATH, cj()), rate=120),
        Stream(
            "new-jwt",
            2,
            lambda: ("new JWT (ES256, never seen)", JWT_PATH, keys.es256(uuid.uuid4().hex)),
            rate=60,
        ),
        Stream("forged-jwt", 1, forged_jwt, rate=40),
        *opaque_streams(st, cached_op, cached_rate=120, new=(4, 100), forged_rate=40),
    ]
    tl = Timeline()
    sampler = st.sampler()
    stats = []
    async with st.load(streams) as load:
        tl.mark("load starts")
        await tl.until(kill)
        stats.append(await st.idp_stats())
        k0 = tl.mark("IdP killed (SIGKILL)")
        st.kill_idp()
        k1 = time.time()
        await tl.until(restart)
        r0 = time.time()
        st.start_idp()
        await st.wait_idp()
        tl.mark("IdP restarted on the same port")
        await tl.until(end)
    tl.mark("load stops")
    stats.append(await st.idp_stats())
    metrics = await st.metrics()
    await sampler.stop()

    new_kind = NEW_OPAQUE
    rec_t = first_allowed(load.records, new_kind, after=k1)

    def expect(rec: Record) -> rep.Expect:
        if rec.kind in (new_kind, FORGED_OPAQUE):  # nobody can verify them while the IdP is down
            return idp_outage_expect(rec, up_until=k0, down=(k1, r0), recovered=rec_t)
        if rec.kind == "forged JWT: unknown kid":
            return rep.deny("key_not_found")
        if rec.kind == "forged JWT: known kid, bad signature":
            return rep.deny("signature_invalid")
        return rep.allow()  # cached JWT, new JWT (cached keys), cached opaque token

    res.rows = rep.tally(load.records, expect, tl.t0)
    res.timeline = tl.relative()

    failed_lines = st.log_lines("authentication.idpCallFailed")
    failed = {line.get("requestId"): str(line.get("message", "")) for line in failed_lines}
    server_ms = st.server_latency_ms()
    new_recs = [r for r in load.records if r.kind == new_kind]
    up = [r for r in new_recs if r.t_recv < k0]
    connect = [r for r in new_recs if failed.get(r.request_id, "").startswith("Unable to connect")]
    circuit = [r for r in new_recs if failed.get(r.request_id, "").startswith("Circuit open")]
    after = [r for r in new_recs if r.t_send > rec_t + 0.5]
    intro_failures = [
        line for line in failed_lines if line.get("endpoint") == "introspection_endpoint"
    ]
    opened = [
        line["_t"] for line in intro_failures if str(line["message"]).startswith("Circuit open")
    ]
    first_open = min(opened) if opened else math.inf
    before_open = sum(
        1
        for line in intro_failures
        if k0 <= line["_t"] <= first_open and not str(line["message"]).startswith("Circuit")
    )

    def both(recs: list[Record]) -> str:
        ms = [server_ms[r.request_id] for r in recs if r.request_id in server_ms]
        return (
            f"client {rep.latency_summary(latencies(recs))}; extauthz p50 "
            f"{rep.fmt_ms(rep.percentile(ms, 50))}, p99 {rep.fmt_ms(rep.percentile(ms, 99))}"
        )

    circuit_ms = [server_ms[r.request_id] for r in circuit if r.request_id in server_ms]
    circuit_p99 = rep.percentile(circuit_ms, 99)
    res.figures = [
        rep.info("new opaque tokens, IdP up (allowed)", both(up)),
        rep.info(
            "new opaque tokens, IdP down, breaker closed (connection refused, 500)",
            both(connect),
        ),
        rep.check(
            "new opaque tokens, breaker open (500 idp_call_failed, 'Circuit open')",
            both(circuit),
            bool(circuit_ms) and circuit_p99 <= 50,
            "extauthz p99 ≤ 50 ms",
        ),
        rep.info(
            "breaker opened",
            (
                f"{first_open - k1:.2f} s after the kill, after {before_open} failed "
                "introspection calls (failureThreshold 5; calls in flight at the kill fail too)"
                if opened
                else "never"
            ),
        ),
        rep.check(
            "recovery: first new opaque token allowed after the restart",
            f"{rec_t - r0:.2f} s after the IdP was back (cool-down {cool:g} s)"
            if math.isfinite(rec_t)
            else "never",
            rec_t - r0 <= cool + 1.5,
            f"≤ cool-down + 1.5 s = {cool + 1.5:g} s",
        ),
        rep.info("new opaque tokens after recovery", both(after)),
        rep.info(
            "JWKS served stale during the outage (cache events)",
            f"{int(metric(metrics, 'extauthz_cache_events_total', cache='jwks', result='stale')):,}"
            " checks (JWKS cache 7.2 s, maxStaleDurationInHours 1)",
        ),
        rep.info("extauthz's IdP calls by outcome (/metrics)", server_idp_outcomes(metrics)),
        idp_calls_figure(stats, " across both IdP processes"),
        rep.info(
            "RSS of extauthz along the outage",
            " → ".join(
                f"{name} {rss:.0f} MB"
                for name, rss in (
                    ("before the kill", sampler.peak_rss_mb(0, k0)),
                    ("during the outage", sampler.peak_rss_mb(k1, r0)),
                    ("after the restart", sampler.peak_rss_mb(r0)),
                )
            ),
        ),
        rss_figure(sampler),
    ]


# --- scenario 3: the IdP answers slowly --------------------------------------------------------


# More IdP-bound checks at once than extauthz has outstanding-call slots (64) and pooled
# connections (32) once the IdP is slow: the harness's 100 connections (one new token a second
# each, staggered, so they arrive one after the other) and a wrk flood of 40 connections pausing
# 500 ms between requests. While the IdP is fast all this is about 180 new tokens/s: well within
# what one extauthz process serves on the 2-core machine, so the scenario measures the slow IdP,
# not an overloaded server.
NEW_OPAQUE_CONNECTIONS = 100
FLOOD_CONNECTIONS = 40
FLOOD_DELAY_MS = 500


async def s3_slow_idp(st: Stack, prof: Profile, res: rep.ScenarioResult) -> None:
    slow_at, heal_at, end = prof.slow
    timeout, cool = prof.slow_timeout, prof.cool_down
    slow_ms = 2 * timeout * 1000
    cfg = chaos_config(st.idp_url, opaque=True, timeout=timeout, cool_down=cool)
    st.start_server(write_yaml(st.dir / "config.yaml", cfg))
    st.start_envoy()
    cached_jwt, cached_op = await warm_cache(st)
    cj = cycle(cached_jwt)
    new_kind = NEW_OPAQUE
    streams = [
        Stream("cached-jwt", 3, lambda: ("cached JWT", JWT_PATH, cj()), rate=200),
        # 100 connections, one new token a second each, staggered: arrivals spread evenly, so
        # when the IdP turns slow about 100 calls wait on it, arriving one after the other
        *opaque_streams(
            st,
            cached_op,
            cached_rate=150,
            new=(NEW_OPAQUE_CONNECTIONS, NEW_OPAQUE_CONNECTIONS),
            forged_rate=30,
        ),
    ]
    tl = Timeline()
    sampler = st.sampler()
    flood = st.flood(
        OPAQUE_PATH,
        loadgen.Load(mode="unique", delay_ms=FLOOD_DELAY_MS),
        connections=FLOOD_CONNECTIONS,
        seconds=end,
    )
    async with st.load(streams) as load:
        tl.mark("load starts")
        await tl.until(slow_at)
        s0 = time.time()
        await st.idp_call("GET", f"/_chaos/slow?ms={slow_ms:g}")
        s1 = tl.mark(f"IdP answers after {slow_ms / 1000:g} s (timeoutSeconds {timeout:g})")
        await tl.until(heal_at)
        h0 = time.time()
        await st.idp_call("GET", "/_chaos/slow?ms=0")
        tl.mark("IdP healed")
        await tl.until(end)
    wrk = await flood
    t_end = tl.mark("load stops")
    await asyncio.sleep(0.5)
    sampler.sample()
    stats = await st.idp_stats()
    metrics = await st.metrics()
    await sampler.stop()

    rec_t = first_allowed(load.records, new_kind, after=h0)

    def expect(rec: Record) -> rep.Expect:
        if rec.kind in (new_kind, FORGED_OPAQUE):  # the IdP cannot answer within the timeout
            return idp_outage_expect(rec, up_until=s0, down=(s1, h0), recovered=rec_t)
        return rep.allow()

    res.rows = rep.tally(load.records, expect, tl.t0)
    res.rows.append(
        flood_row(
            f"new unverifiable opaque tokens, wrk flood ({FLOOD_CONNECTIONS} connections)", wrk
        )
    )
    res.timeline = tl.relative()

    slow_new = [r for r in load.records if r.kind == new_kind and r.t_send > s1 and r.t_recv < h0]
    slow_cached = [r for r in load.records if r.kind == "cached JWT" and s1 < r.t_send < h0]
    access = [
        line
        for line in st.log_lines("access")
        if line.get("deployment") == "opaque" and s1 < line["_t"] < h0
    ]
    server_ms = [float(line.get("latencyMs", 0)) for line in access]
    # A check Envoy gave up on (its ext_authz timeout, 2 s here) may be cancelled in extauthz
    # before it logs: the harness's own /op requests (their ids are known) without an access line.
    logged_ids = {str(line.get("requestId")) for line in st.log_lines("access")}
    op_recs = [r for r in load.records if r.kind != "cached JWT"]
    unlogged = [r for r in op_recs if r.request_id not in logged_ids]
    limit_ms = (timeout + 0.5) * 1000
    over = sorted(ms for ms in server_ms if ms > limit_ms)
    circuit = [
        line
        for line in st.log_lines("authentication.idpCallFailed")
        if str(line.get("message", "")).startswith("Circuit open") and s1 < line["_t"] < h0
    ]
    before = [s for s in sampler.samples if s.t < s0]
    during = [s for s in sampler.samples if s0 <= s.t <= h0]
    base_rss = max((s.rss_kb for s in before), default=0) / 1024
    peak_rss = max((s.rss_kb for s in during), default=0) / 1024
    end_rss = sampler.samples[-1].rss_kb / 1024 if sampler.samples else math.nan
    max_conn = max((s.idp_connections for s in during), default=0)
    cores = [
        (b.cpu_s - a.cpu_s) / (b.t - a.t) if b.t > a.t else 0.0
        for a, b in zip(sampler.samples, sampler.samples[1:], strict=False)
    ]
    times = [b.t for b in sampler.samples[1:]]
    cpu_before = rep.percentile([c for c, t in zip(cores, times, strict=False) if t < s0], 50)
    cpu_slow = rep.percentile([c for c, t in zip(cores, times, strict=False) if s0 <= t <= h0], 50)
    cpu_max = max(cores, default=math.nan)
    end_conn = sampler.samples[-1].idp_connections if sampler.samples else 0
    res.figures = [
        rep.check(
            "IdP-bound checks (/op) while the IdP is slow, as extauthz timed them (latencyMs)",
            (
                f"n={len(server_ms):,}, p50 {rep.fmt_ms(rep.percentile(server_ms, 50))}, "
                f"p99 {rep.fmt_ms(rep.percentile(server_ms, 99))}, "
                f"max {rep.fmt_ms(max(server_ms))}; over the bound: {len(over)}"
                + (f" ({rep.fmt_ms(over[0])} to {rep.fmt_ms(over[-1])})" if over else "")
            )
            if server_ms
            else "n=0",
            bool(server_ms) and not over,
            f"max ≤ timeoutSeconds + 0.5 s = {limit_ms / 1000:g} s",
        ),
        rep.info(
            "new opaque tokens while the IdP is slow, as the client saw them",
            rep.latency_summary(latencies(slow_new)),
        ),
        rep.info(
            "the client's /op checks with no access-log line (cancelled by Envoy's 2 s timeout)",
            f"{len(unlogged):,} of {len(op_recs):,}"
            + (
                " (" + ", ".join(rep.record_outcome(r) for r in unlogged[:5]) + ")"
                if unlogged
                else ""
            ),
        ),
        rep.check(
            "breaker opened while slow",
            f"{len(circuit):,} checks failed fast with 'Circuit open'",
            len(circuit) > 0,
            "> 0",
        ),
        rep.info(
            "cached JWTs while the IdP is slow (never wait on it; all must be allowed: table)",
            rep.latency_summary(latencies(slow_cached)),
        ),
        rep.info(
            "CPU of extauthz (cores, 0.25 s samples)",
            f"median {cpu_before:.2f} before, {cpu_slow:.2f} while slow; max {cpu_max:.2f}",
        ),
        rep.check(
            "extauthz TCP connections to the IdP (/proc)",
            f"max {max_conn} while slow, {end_conn} at the end; max fds "
            f"{sampler.max_fds()}; the IdP saw at most {stats['max_open_connections']}",
            max_conn <= MAX_OUTSTANDING_IDP_CALLS,
            f"≤ {MAX_OUTSTANDING_IDP_CALLS} (outstanding-call cap)",
        ),
        rep.check(
            "RSS of extauthz",
            f"{base_rss:.0f} MB before, peak {peak_rss:.0f} MB while slow, {end_rss:.0f} MB at "
            "the end",
            peak_rss - base_rss <= 25,
            "growth ≤ 25 MB",
        ),
        rep.check(
            "recovery: first new opaque token allowed after the IdP healed",
            f"{rec_t - h0:.2f} s" if math.isfinite(rec_t) else "never",
            rec_t - h0 <= cool + timeout + 1.5,
            f"≤ cool-down + timeout + 1.5 s = {cool + timeout + 1.5:g} s",
        ),
        flood_figure(wrk),
        rep.info("extauthz's IdP calls by outcome (/metrics)", server_idp_outcomes(metrics)),
        idp_calls_figure([stats]),
        rss_figure(sampler),
    ]
    res.notes.append(
        f"RSS and connections sampled every {sampler.interval:g} s ({len(sampler.samples)} samples "
        f"over {t_end - tl.t0:.0f} s)."
    )


# --- scenario 4: SIGTERM under load ---------------------------------------------------------------


async def s4_sigterm(st: Stack, prof: Profile, res: rep.ScenarioResult) -> None:
    sigterm_at, after = prof.sigterm
    grace = prof.grace
    cfg = chaos_config(st.idp_url, opaque=True)
    server = st.start_server(write_yaml(st.dir / "config.yaml", cfg), grace=grace)
    st.start_envoy()
    cached_jwt, _ = await warm_cache(st, opaque=False)
    expired = [st.keys.expired_rs256() for _ in range(5)]
    await st.idp_call("GET", "/_chaos/slow?ms=800")
    cj, ex = cycle(cached_jwt), cycle(expired)
    new_kind = "new opaque token (IdP takes 800 ms)"
    streams = [
        Stream("cached-jwt", 4, lambda: ("cached JWT", JWT_PATH, cj()), rate=300),
        # 32 connections, each sending every 0.8 s, staggered: about 32 checks always in flight
        Stream("new-opaque", 32, lambda: (new_kind, OPAQUE_PATH, opaque_token(st.secret)), rate=40),
        Stream("expired", 1, lambda: ("expired JWT", JWT_PATH, ex()), rate=50),
    ]
    tl = Timeline()
    sampler = st.sampler()
    exit_code: int | None = None
    async with st.load(streams) as load:
        tl.mark("load starts")
        await tl.until(sigterm_at)
        stats0 = await st.idp_stats()
        metrics = await st.metrics()
        t_sig = tl.mark("SIGTERM to extauthz")
        server.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace + 10
        while server.popen.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        exit_code = server.popen.poll()
        t_exit = tl.mark(f"extauthz exited ({exit_code})")
        await asyncio.sleep(after)
    tl.mark("load stops")
    await sampler.stop()
    stats = await st.idp_stats()

    border = 0.05  # sent this close before SIGTERM: may reach the server after it stops accepting

    def real(rec: Record) -> str:
        return "token_expired" if rec.kind == "expired JWT" else rep.ALLOW

    def expect(rec: Record) -> rep.Expect:
        if rec.t_send < t_sig - border:
            return rep.either(real(rec))
        return rep.either(real(rec), rep.ENVOY_ERROR)

    res.rows = rep.tally(load.records, expect, tl.t0)
    res.timeline = tl.relative()

    def answered(recs: list[Record]) -> int:
        return sum(rep.record_outcome(r) == real(r) for r in recs)

    def split(recs: list[Record]) -> str:
        n503 = sum(rep.record_outcome(r) == rep.ENVOY_ERROR for r in recs)
        other = len(recs) - answered(recs) - n503
        return f"{len(recs):,}: {answered(recs):,} answered by extauthz, {n503:,} Envoy 503" + (
            f", {other:,} other" if other else ""
        )

    inflight = [r for r in load.records if r.t_send < t_sig - border and r.t_recv > t_sig]
    borderline = [r for r in load.records if t_sig - border <= r.t_send < t_sig]
    draining = [r for r in load.records if t_sig <= r.t_send < t_exit]
    gone = [r for r in load.records if r.t_send >= t_exit]
    access = {
        line.get("requestId") for line in st.log_lines("access") if line.get("_t", 0) >= t_sig - 1
    }
    inflight_answered = [r for r in inflight if rep.record_outcome(r) == real(r)]
    logged = sum(r.request_id in access for r in inflight_answered)
    lifecycle = [line.get("event") for line in st.log_lines("server.stopping", "server.stopped")]
    last_answer = max((r.t_recv for r in inflight), default=t_sig)
    if draining and not answered(draining):
        res.notes.append(
            'extauthz stops accepting new checks the moment SIGTERM arrives (README: "stops '
            'accepting, lets in-flight checks finish"): every check sent after SIGTERM got '
            "Envoy's 503, also while the server was still draining. Behind a Service, that is the "
            "window until the endpoint is removed; a preStop delay covers it."
        )
    res.figures = [
        rep.check("exit status", str(exit_code), exit_code == 0, "0"),
        rep.check(
            "SIGTERM → exit",
            f"{t_exit - t_sig:.2f} s",
            exit_code is not None and t_exit - t_sig <= grace,
            f"≤ --grace-seconds {grace:g}",
        ),
        rep.check(
            "in flight at SIGTERM (sent ≥ 50 ms before, answered after)",
            split(inflight) + f"; the last answer came {last_answer - t_sig:.2f} s after SIGTERM",
            bool(inflight) and len(inflight_answered) == len(inflight),
            "all answered by extauthz",
        ),
        rep.check(
            "their access-log lines (the server logged each answer it gave)",
            f"{logged:,} of {len(inflight_answered):,}",
            logged == len(inflight_answered),
            "all",
        ),
        rep.info("sent < 50 ms before SIGTERM", split(borderline)),
        rep.info("sent after SIGTERM, before the exit", split(draining)),
        rep.info("sent after the exit (Envoy's status_on_error)", split(gone)),
        rep.check(
            "life-cycle log lines",
            ", ".join(str(e) for e in lifecycle) or "none",
            lifecycle == ["server.stopping", "server.stopped"],
            "server.stopping, server.stopped",
        ),
        rep.info(
            "extauthz's IdP calls by outcome before SIGTERM (/metrics)",
            server_idp_outcomes(metrics),
        ),
        idp_calls_figure(
            [stats],
            f" ({stats['introspect'] - stats0['introspect']:,} introspections after SIGTERM)",
        ),
        rss_figure(sampler),
    ]


# --- scenario 5: config reload under load --------------------------------------------------------


RELOAD_SCOPES = ("items.read", "items.write", "items.admin")


def invalid_variant(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with a typo in a key (``allowedScopes``): check-config refuses it."""
    bad = copy.deepcopy(config)
    auth = bad["deployments"][0]["routes"][0]["authorization"]
    auth["allowedScopes"] = auth.pop("allowedScope")
    return bad


def policies_in_force(
    in_force: Sequence[tuple[float, str]], t_from: float, t_to: float
) -> set[str]:
    """The policies that served at some moment of [t_from, t_to], given when each started
    (``in_force``: (start, name) in time order; the first starts at -inf). A check sent at
    t_from and answered at t_to was decided by one of them."""
    out = set()
    for i, (start, version) in enumerate(in_force):
        stop = in_force[i + 1][0] if i + 1 < len(in_force) else math.inf
        if start <= t_to and t_from < stop:
            out.add(version)
    return out


def scope_of(config: dict[str, Any]) -> str:
    """The allowedScope of the one route of deployment ``api``."""
    scope: str = config["deployments"][0]["routes"][0]["authorization"]["allowedScope"][0]
    return scope


async def s5_reload(st: Stack, prof: Profile, res: rep.ScenarioResult) -> None:
    swap2, swap3, swap_bad, end = prof.reload
    cm = ConfigMapDir(st.dir / "configmap")
    versions = {
        f"v{i + 1}": chaos_config(st.idp_url, scope=scope) for i, scope in enumerate(RELOAD_SCOPES)
    }
    invalid = invalid_variant(versions["v3"])
    cm.publish(yaml.safe_dump(versions["v1"], sort_keys=False))
    st.start_server(cm.path)
    st.start_envoy()

    keys = st.keys
    tokens: dict[str, list[str]] = {}
    for scope in RELOAD_SCOPES:
        tokens[f"scope {scope}"] = [
            keys.rsa.sign({**claims(f"{scope}-{i}"), "scope": scope}) for i in range(20)
        ]
    tokens["all three scopes"] = [
        keys.rsa.sign({**claims(f"all-{i}"), "scope": " ".join(RELOAD_SCOPES)}) for i in range(20)
    ]
    tokens["expired"] = [keys.expired_rs256() for _ in range(5)]
    picks = {k: cycle(v) for k, v in tokens.items()}
    kinds = itertools.cycle([*tokens, "no token"])

    def pick() -> tuple[str, str, str | None]:
        k = next(kinds)
        return k, JWT_PATH, (picks[k]() if k != "no token" else None)

    def answer(kind: str, version: str) -> str:
        if kind == "expired":
            return "token_expired"
        if kind == "no token":
            return "token_missing"
        needed = scope_of(versions[version])
        has = kind == "all three scopes" or kind == f"scope {needed}"
        return rep.ALLOW if has else "insufficient_scope"

    if (got := await st.one(JWT_PATH, tokens["scope items.read"][0], retry_s=10)) != rep.ALLOW:
        raise RuntimeError(f"preflight: v1 should allow items.read, got {got}")

    tl = Timeline()
    sampler = st.sampler()
    swaps: list[tuple[str, float]] = []
    async with st.load([Stream("scoped", 8, pick, rate=600)]) as load:
        tl.mark("load starts (v1: items.read)")
        for at, version in ((swap2, "v2"), (swap3, "v3")):
            await tl.until(at)
            scope = scope_of(versions[version])
            swaps.append((version, tl.mark(f"..data swapped to {version} ({scope})")))
            cm.publish(yaml.safe_dump(versions[version], sort_keys=False))
        await tl.until(swap_bad)
        t_bad = tl.mark("..data swapped to an invalid file")
        cm.publish(yaml.safe_dump(invalid, sort_keys=False))
        await tl.until(end)
    tl.mark("load stops")
    await asyncio.sleep(0.2)
    await sampler.stop()
    stats = await st.idp_stats()

    reloaded = sorted(line["_t"] for line in st.log_lines("config.reloaded"))
    failed = st.log_lines("config.reloadFailed")
    eps = 0.002  # the log's ts has millisecond precision
    in_force: list[tuple[float, str]] = [(-math.inf, "v1")]
    for (version, _), t in zip(swaps, reloaded, strict=False):
        in_force.append((t, version))

    straddling: list[Record] = []

    def expect(rec: Record) -> rep.Expect:
        pols = policies_in_force(in_force, rec.t_send - eps, rec.t_recv + eps)
        if len(pols) > 1:
            straddling.append(rec)
        return rep.either(*(answer(rec.kind, p) for p in pols))

    res.rows = rep.tally(load.records, expect, tl.t0)
    res.timeline = tl.relative()
    spanning = {r.request_id for r in straddling}
    others = [r for r in load.records if r.request_id not in spanning]
    delays = [t - swapped for (_, swapped), t in zip(swaps, reloaded, strict=False)]
    fail_t = [line["_t"] for line in failed if line["_t"] > t_bad]
    after_bad = [r for r in load.records if r.t_send > t_bad]
    errors = failed[0].get("errors") if failed else None
    res.figures = [
        rep.check(
            "reloads (config.reloaded log lines)",
            f"{len(reloaded)}: "
            + ", ".join(
                f"{v} {d:.2f} s after its swap" for (v, _), d in zip(swaps, delays, strict=False)
            ),
            len(reloaded) == 2 and all(d <= RELOAD_POLL_S + 1.0 for d in delays),
            f"2, each ≤ {RELOAD_POLL_S + 1:g} s after its swap (1 s polling)",
        ),
        rep.info(
            "checks spanning a reload (either policy accepted)",
            f"{rep.latency_summary(latencies(straddling))} (all others: "
            f"{rep.latency_summary(latencies(others))})",
        ),
        rep.check(
            "swap to an invalid file",
            (
                f"config.reloadFailed {fail_t[0] - t_bad:.2f} s later "
                f"({json.dumps(errors)[:160]}); "
                f"{len(after_bad):,} checks after it, judged against v3"
                if fail_t
                else "no config.reloadFailed line"
            ),
            bool(fail_t) and fail_t[0] - t_bad <= RELOAD_POLL_S + 1.0 and len(reloaded) == 2,
            "config.reloadFailed logged, v3 keeps serving",
        ),
        rep.info(
            "JWKS fetches (each new policy starts with empty caches)",
            f"{stats['jwks']} (1 at start + 1 per reload expected)",
        ),
        idp_calls_figure([stats]),
        rss_figure(sampler),
    ]


# --- the run ------------------------------------------------------------------------------------


SCENARIOS: dict[str, tuple[str, Callable[..., Any]]] = {
    "1": ("IdP rotates its signing key during steady load", s1_rotation),
    "2": ("IdP killed mid-load, then back", s2_idp_killed),
    "3": ("IdP answers slowly (2× timeoutSeconds)", s3_slow_idp),
    "4": ("SIGTERM during load", s4_sigterm),
    "5": ("config reload under load (ConfigMap symlink swap)", s5_reload),
}


def run_scenario(sid: str, workdir: Path, keys: BenchKeys, prof: Profile) -> rep.ScenarioResult:
    title, fn = SCENARIOS[sid]
    res = rep.ScenarioResult(sid, title)
    log(f"scenario {sid}: {title}")
    started = time.monotonic()
    try:
        with stack(workdir, f"s{sid}", keys, jwks=keys.jwks) as st:
            asyncio.run(fn(st, prof, res))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 (reported in the table; the other scenarios run)
        res.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        log(f"scenario {sid} failed to run: {res.error}")
    res.seconds = time.monotonic() - started
    print()
    print(rep.scenario_markdown(res), flush=True)
    return res


def short_version(version: str) -> str:
    """Envoy's release (1.40.0) out of <sha>/1.40.0/Clean/RELEASE/BoringSSL."""
    parts = version.split("/")
    return parts[1] if len(parts) > 1 else version


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="shorter phases (about 1.5 minutes)")
    p.add_argument("--scenarios", default="1,2,3,4,5", help="comma-separated ids")
    p.add_argument("--out", default=str(RESULTS), help="where chaos.md and chaos.json go")
    p.add_argument("--keep-logs", action="store_true", help="keep the work directory and logs")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prof = PROFILES["quick" if args.quick else "full"]
    wanted = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in wanted if s not in SCENARIOS]
    if unknown:
        print(f"unknown scenarios: {', '.join(unknown)}", file=sys.stderr)
        return 2
    loadgen.wrk_binary()  # fails early, with the apt-get hint, when wrk is missing
    started = time.monotonic()
    workdir = run_workdir(RESULTS, "chaos-")
    log(f"profile {prof.name}; work dir {workdir}")
    keys = BenchKeys.generate()
    meta: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "profile": prof.name,
        "settings": prof.__dict__,
        "commit": commit(),
        "envoy": short_version(envoy_version()),
        "load_average_at_start": os.getloadavg()[0],
    }
    results: list[rep.ScenarioResult] = []
    try:
        for sid in wanted:
            results.append(run_scenario(sid, workdir, keys, prof))
    except (KeyboardInterrupt, SystemExit):
        log("interrupted: every process started has been stopped")
        raise
    finally:
        meta["elapsed_s"] = time.monotonic() - started
        meta["load_average_at_end"] = os.getloadavg()[0]
        if results:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "chaos.md").write_text(rep.markdown(results, meta), encoding="utf-8")
            (out / "chaos.json").write_text(
                json.dumps(
                    {"meta": meta, "scenarios": [r.as_dict() for r in results]},
                    indent=1,
                    default=str,
                )
                + "\n",
                encoding="utf-8",
            )
            log(f"wrote {out / 'chaos.md'} and {out / 'chaos.json'}")
        if args.keep_logs:
            log(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    passed = sum(r.passed for r in results)
    log(f"{passed} of {len(results)} scenarios passed in {time.monotonic() - started:.0f} s")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
