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
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from .admin import AdminServer
from .config import Config
from .logs import JsonLogger

__all__ = ["READY_DIR_ENV", "mark_ready", "supervise"]

READY_DIR_ENV = "EXTAUTHZ_READY_DIR"


def mark_ready() -> None:
    """In a worker: tell the supervisor this process listens (a file named by its pid)."""
    ready_dir = os.environ.get(READY_DIR_ENV)
    if ready_dir:
        with open(os.path.join(ready_dir, str(os.getpid())), "w"):
            pass


_RESTART_BACKOFF_SECONDS = 1.0


def _worker_argv(config_path: str, listen: str, grace_seconds: float, event_loop: str) -> list[str]:
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
) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="extauthz-metrics-")
    ready_dir = os.path.join(metrics_dir, "ready")
    os.mkdir(ready_dir)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir, READY_DIR_ENV: ready_dir}
    argv = _worker_argv(config.source, listen, grace_seconds, event_loop)
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False

    def start_worker() -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, env=env)

    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]

    def readiness() -> tuple[bool, dict[str, Any]]:
        # Ready only when every worker listens: Envoy keeps the connections it opens, so
        # connections made while one worker is up would all stay on it.
        alive = [p for p in procs if p.poll() is None]
        listening = sum(1 for p in alive if os.path.exists(os.path.join(ready_dir, str(p.pid))))
        return listening == workers, {
            "config": config.source,
            "deployments": len(config.deployments),
            "workers": workers,
            "workersAlive": len(alive),
            "workersListening": listening,
        }

    admin = AdminServer(registry, readiness)
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
    logger.info("server.stopping", graceSeconds=grace_seconds)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds + 5
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    await admin.stop()
    shutil.rmtree(metrics_dir, ignore_errors=True)
    logger.info("server.stopped")
    return 0 if all(c == 0 for c in codes) else 1
