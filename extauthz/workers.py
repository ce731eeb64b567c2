"""``extauthz serve --workers N``: N server processes sharing one gRPC port.

Why processes: a Python process runs one check at a time, and the gRPC call itself is most of a
check's cost, so using more cores means more interpreters. Why one port (``SO_REUSEPORT``, which
grpc sets on its listening sockets): Envoy, Istio and a Kubernetes Service keep pointing at one
address, and the kernel spreads incoming *connections* across the workers. Envoy multiplexes
many checks over few HTTP/2 connections, so give the ext_authz cluster enough connections to
spread, e.g. ``http2_protocol_options: {max_concurrent_streams: 8}`` (Envoy opens another
connection whenever one carries that many streams); see the README. The supervisor reports ready
only once every worker listens, or the connections Envoy opens first would all stay on one.

This process is the supervisor: it validates the config, starts the workers, restarts one that
dies, forwards SIGTERM/SIGINT/SIGHUP, and serves the admin port itself, with /metrics summed over
the workers through prometheus_client's multiprocess mode.

It leaves as one server does (:mod:`extauthz.lifecycle`): at SIGTERM its /readyz answers 503 at
once, every worker gets the signal and reports NOT_SERVING while it keeps answering checks for
``server.drainSeconds``, then stops accepting and finishes what is in flight within
``--grace-seconds``; the supervisor waits for them (the admin port answering all along) and exits.
A worker tells the supervisor it is ready (and what its warm start could not fetch, and how long
it drains) in a file named by its pid: the supervisor is ready once every worker is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

from .admin import AdminServer
from .config import Config
from .logs import JsonLogger
from .shared_cache import Evictor, open_shared_cache, token_scopes

__all__ = ["READY_DIR_ENV", "mark_ready", "supervise"]

READY_DIR_ENV = "EXTAUTHZ_READY_DIR"


def mark_ready(state: dict[str, Any] | None = None) -> None:
    """In a worker: tell the supervisor this process serves (a file named by its pid, holding
    ``state`` as JSON: its warm start, its drainSeconds). Written whole under another name, then
    renamed: the supervisor never reads half of it."""
    ready_dir = os.environ.get(READY_DIR_ENV)
    if ready_dir:
        path = os.path.join(ready_dir, str(os.getpid()))
        with open(path + ".tmp", "w") as f:
            json.dump(state or {}, f, default=str)
        os.replace(path + ".tmp", path)


def _worker_state(ready_dir: str, pid: int) -> dict[str, Any] | None:
    """What the worker ``pid`` said when it got ready; None while it has not."""
    try:
        with open(os.path.join(ready_dir, str(pid))) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else {}


_RESTART_BACKOFF_SECONDS = 1.0


def _worker_argv(
    config_path: str,
    listen: str,
    grace_seconds: float,
    event_loop: str,
    http_listen: str | None = None,
) -> list[str]:
    # Every worker binds the HTTP wire's port too (SO_REUSEPORT): the kernel spreads Envoy's
    # connections over them as it does the gRPC port's.
    http = ["--http-listen", http_listen] if http_listen else []
    return [
        sys.executable,
        "-m",
        "extauthz",
        "serve",
        "--config",
        config_path,
        "--listen",
        listen,
        "--admin-listen",
        "",
        "--grace-seconds",
        str(grace_seconds),
        "--event-loop",
        event_loop,
        *http,
    ]


async def supervise(
    config: Config,
    *,
    workers: int,
    listen: str,
    admin_listen: str,
    logger: JsonLogger,
    grace_seconds: float,
    event_loop: str = "auto",
    http_listen: str | None = None,
) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="extauthz-metrics-")
    ready_dir = os.path.join(metrics_dir, "ready")
    os.mkdir(ready_dir)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir, READY_DIR_ENV: ready_dir}
    argv = _worker_argv(config.source, listen, grace_seconds, event_loop, http_listen)
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False  # SIGTERM received: /readyz 503 from then on

    def start_worker() -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, env=env)

    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]

    def states() -> list[dict[str, Any]]:
        alive = [p for p in procs if p.poll() is None]
        return [s for p in alive if (s := _worker_state(ready_dir, p.pid)) is not None]

    def readiness() -> tuple[bool, dict[str, Any]]:
        # Ready only when every worker serves (warm started): Envoy keeps the connections it
        # opens, so connections made while one worker is up would all stay on it. Never again
        # once draining.
        alive = [p for p in procs if p.poll() is None]
        ready = states()
        failed: dict[tuple[str, str], Any] = {}
        for state in ready:
            for entry in state.get("warmStart", {}).get("failed", []):
                failed.setdefault((entry.get("endpoint"), entry.get("uri")), entry)
        phase = "draining" if stopping else "serving" if len(ready) == workers else "starting"
        return phase == "serving", {
            "phase": phase,
            "config": config.source,
            "deployments": len(config.deployments),
            "workers": workers,
            "workersAlive": len(alive),
            "workersListening": len(ready),
            "warmStartFailed": list(failed.values()),
        }

    # POST /cache/evict: the workers' caches are theirs, reachable only through the shared
    # cache's eviction channel, to which each of them is subscribed.
    shared_cache = None
    if config.server.shared_cache is not None:
        shared_cache = open_shared_cache(
            config.server.shared_cache,
            lambda level, event, fields: logger.log(level, event, **fields),
            lambda _cache, _result: None,
            subscribe=False,
        )
        evictor = Evictor(lambda _digest: 0, shared_cache, lambda: token_scopes(config), logger)

    async def evict(digest: bytes) -> tuple[int, dict[str, Any]]:
        if shared_cache is None:
            return 501, {
                "error": "no_shared_cache",
                "message": "Under --workers, an eviction reaches the workers through"
                " server.sharedCache, and none is configured.",
                "shared": False,
            }
        return await evictor.evict(digest, "admin")

    admin = AdminServer(registry, readiness, evict=evict)
    host, _, port = admin_listen.rpartition(":")
    try:
        await admin.start(host.strip("[]") or "0.0.0.0", int(port))
    except OSError as exc:
        message = f"Cannot listen on {admin_listen}: {exc.strerror}."
        logger.error("server.listenFailed", message=message)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        return 1

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def forward_hup() -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGHUP)

    loop.add_signal_handler(signal.SIGHUP, forward_hup)
    procs.extend(start_worker() for _ in range(workers))
    logger.info("server.supervising", workers=workers, listen=listen, adminListen=admin_listen)

    async def watch() -> None:
        while not stopping:
            await asyncio.sleep(_RESTART_BACKOFF_SECONDS)
            for i, p in enumerate(procs):
                if p.poll() is not None and not stopping:
                    logger.error(
                        "server.workerExited",
                        message=f"Worker {p.pid} exited with {p.returncode}; starting another.",
                    )
                    procs[i] = start_worker()

    watcher = asyncio.ensure_future(watch())
    await stop.wait()
    stopping = True
    watcher.cancel()
    # The workers drain as long as the config they serve says (it may have been reloaded).
    drain = max(
        [float(s.get("drainSeconds", 0)) for s in states()],
        default=config.server.drain_seconds,
    )
    logger.info(
        "server.draining",
        message="Not ready; the workers report NOT_SERVING and answer checks meanwhile.",
        drainSeconds=drain,
    )
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    # Waited for on the event loop, so that /readyz goes on answering (503) meanwhile.
    exited = asyncio.ensure_future(asyncio.gather(*(_exit_of(p) for p in procs)))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(exited), drain)
    logger.info("server.stopping", graceSeconds=grace_seconds)
    try:
        # What a worker needs at most: its grace, then a few seconds to close and flush.
        codes = await asyncio.wait_for(asyncio.shield(exited), grace_seconds + 5)
    except TimeoutError:
        for p in procs:
            if p.poll() is None:
                p.kill()
        codes = await exited
    await admin.stop()
    if shared_cache is not None:
        await shared_cache.aclose()
    shutil.rmtree(metrics_dir, ignore_errors=True)
    logger.info("server.stopped")
    return 0 if all(c == 0 for c in codes) else 1


async def _exit_of(proc: subprocess.Popen[bytes]) -> int:
    """The exit status of ``proc``, once it has exited."""
    while (code := proc.poll()) is None:
        await asyncio.sleep(_EXIT_POLL_SECONDS)
    return code


_EXIT_POLL_SECONDS = 0.05  # how soon an exited worker is noticed
