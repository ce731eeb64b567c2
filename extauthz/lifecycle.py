"""The process: start the listeners, serve the policy, reload it, stop cleanly.

:func:`run_server` owns what lives as long as the process: the gRPC server with its health
service, the admin listener, the config watcher and its atomic swap of the policy being served
(:class:`Runtime`), the log and metric flushing, and the signals. The gRPC wire itself (one
CheckRequest in, one CheckResponse out) is :mod:`extauthz.server`; worker processes are
:mod:`extauthz.workers`.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from . import tracing
from .admin import AdminServer
from .answers import AnswerCache
from .config import Config
from .engine import IDP_FAILED_EVENT, Engine, idp_log_fields
from .errors import IdpError
from .http_wire import HttpWire, serve_http
from .idp import Providers
from .logs import JsonLogger
from .metrics import Metrics
from .reload import ConfigWatcher
from .server import SERVICE_NAME, AuthorizationService, add_to_server
from .tls import add_check_port
from .workers import mark_ready

__all__ = ["Runtime", "log_config_warnings", "run_server"]


def log_config_warnings(logger: JsonLogger, config: Config) -> None:
    """What ``check-config`` prints as warnings, one ``config.warning`` line each."""
    for warning in config.warnings:
        logger.warning("config.warning", message=warning, config=config.source)


def _split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class Runtime:
    """The policy being served: config, IdP providers and engine, replaced whole on reload."""

    def __init__(self, config: Config, logger: JsonLogger, metrics: Metrics) -> None:
        def on_stale(exc: IdpError) -> None:
            # Cached keys keep serving; the failed refresh is still worth one line.
            logger.error(
                IDP_FAILED_EVENT,
                reason="idp_call_failed",
                message=exc.message,
                **dict(idp_log_fields(exc)),
            )

        self.config = config
        self.providers = Providers(config, on_stale=on_stale, observer=metrics)
        self.engine = Engine(config, self.providers.by_deployment)

    def readiness(self) -> dict[str, Any]:
        """What /readyz shows: the config and each IdP endpoint's last success, last error (what,
        when, why) and breaker (:meth:`IdpEndpoint.readiness`)."""
        return {
            "config": self.config.source,
            "deployments": len(self.config.deployments),
            "providers": [ep.readiness() for ep in self.providers.endpoints.values()],
        }


_FLUSH_SECONDS = 0.05


async def _flush_every(logger: JsonLogger, metrics: Metrics, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        logger.flush()
        metrics.flush()


# How long a replaced runtime's HTTP clients stay open for checks that started before the swap.
_RETIRE_AFTER_SECONDS = 60.0


async def run_server(
    config: Config,
    *,
    listen: str,
    admin_listen: str,
    logger: JsonLogger,
    grace_seconds: float = 10.0,
    reload_poll_seconds: float = 1.0,
    http_listen: str | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT, then drain in-flight checks within ``grace_seconds``."""
    tracing.configure()
    metrics = Metrics()
    runtime = Runtime(config, logger, metrics)
    service = AuthorizationService(AnswerCache(runtime.engine), logger, metrics)
    retired: set[asyncio.Task[None]] = set()

    def apply(new_config: Config) -> None:
        nonlocal runtime
        new_runtime = Runtime(new_config, logger, metrics)  # may raise ConfigError: keep the old
        old, runtime = runtime, new_runtime
        # One assignment: a check sees the old policy or the new one, never both. The answers
        # start again empty: they rested on the old policy.
        service.answers = AnswerCache(new_runtime.engine)
        logger.set_level(new_config.server.log_level)
        log_config_warnings(logger, new_config)

        async def retire() -> None:
            await asyncio.sleep(_RETIRE_AFTER_SECONDS)
            await old.providers.aclose()

        task = asyncio.ensure_future(retire())
        retired.add(task)
        task.add_done_callback(retired.discard)

    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    add_to_server(service, server)
    health_service = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    # Plain, or TLS/mTLS per server.tls; ConfigError (refuse to start) if its files are unusable.
    if add_check_port(server, listen, config.server.tls, logger) == 0:
        logger.error("server.listenFailed", message=f"Cannot listen on {listen}.")
        return 1
    await server.start()
    http_server = None
    if http_listen:  # the HTTP wire (docs/wires.md), over the same Serving as gRPC
        http_host, http_port = _split_hostport(http_listen)
        try:
            http_server = await serve_http(HttpWire(service.serving), http_host, http_port)
        except OSError as exc:
            message = f"Cannot listen on {http_listen}: {exc.strerror}."
            logger.error("server.listenFailed", message=message)
            await server.stop(0)
            return 1
    for name in ("", SERVICE_NAME):
        await health_service.set(name, health_pb2.HealthCheckResponse.SERVING)
    mark_ready()  # under `--workers N`, the supervisor's /readyz counts listening workers

    admin = AdminServer(
        metrics.registry, lambda: (True, runtime.readiness()), before_scrape=metrics.flush
    )
    if admin_listen:  # a worker under `--workers N` leaves the admin port to its supervisor
        host, port = _split_hostport(admin_listen)
        try:
            await admin.start(host, port)
        except OSError as exc:
            logger.error(
                "server.listenFailed", message=f"Cannot listen on {admin_listen}: {exc.strerror}."
            )
            await server.stop(0)
            return 1

    watcher = ConfigWatcher(config.source, apply, logger, poll_seconds=reload_poll_seconds)
    watcher.start()
    # Log lines are buffered and flushed every few milliseconds, not written one syscall each.
    logger.autoflush = False
    flusher = asyncio.ensure_future(_flush_every(logger, metrics, _FLUSH_SECONDS))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, watcher.poke)
    # Everything built so far lives as long as the process: keep it out of the cyclic GC's scans.
    gc.collect()
    gc.freeze()
    logger.info(
        "server.started",
        listen=listen,
        httpListen=http_listen,
        adminListen=admin_listen,
        deployments=len(config.deployments),
        config=config.source,
        eventLoop=type(loop).__module__.split(".")[0],  # "uvloop" or "asyncio"
    )
    log_config_warnings(logger, config)
    await stop.wait()
    logger.autoflush = True
    flusher.cancel()
    logger.info("server.stopping", graceSeconds=grace_seconds)
    await watcher.stop()
    await health_service.enter_graceful_shutdown()
    if http_server is not None:
        http_server.close()  # no new connections; the checks under way finish below
    await server.stop(grace_seconds)
    await admin.stop()
    for task in list(retired):
        task.cancel()
    await runtime.providers.aclose()
    metrics.flush()
    tracing.shutdown()
    logger.info("server.stopped")
    return 0
