"""The process: start the listeners, serve the policy, reload it, stop cleanly.

:func:`run_server` owns what lives as long as the process: the gRPC server with its health
service, the admin listener, the config watcher and its atomic swap of the policy being served
(:class:`Runtime`), the log and metric flushing, the signals, and with a shared cache the
subscription to the fleet's evictions (:class:`~extauthz.shared_cache.Evictor`). The gRPC
wire itself (one CheckRequest in, one CheckResponse out) is :mod:`extauthz.server`; worker
processes are :mod:`extauthz.workers`.

A life in three phases, as gRPC health and /readyz report it:

* ``starting``: the ports are open (a probe gets NOT_SERVING, not a refused connection) while the
  warm start fetches every JWKS and discovery document, for at most the warm-start budget
  (:func:`~extauthz.idp.warm_start_budget`). An IdP that cannot be reached within it does not
  keep the replica out for good: it reports SERVING anyway, logs ``server.warmStartIncomplete``,
  and its checks answer ``idp_call_failed`` until the IdP is back.
* ``serving``: SERVING, ready.
* ``draining``, from SIGTERM or SIGINT: NOT_SERVING and /readyz 503 at once, while checks are
  still answered for ``server.drainSeconds``, so that Envoy's health checks take the replica out
  of rotation before it stops listening; then no new connection, checks in flight finish within
  ``--grace-seconds``, every buffered log line is written, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
from typing import Any, Literal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from . import tracing
from .admin import AdminServer
from .answers import AnswerCache
from .config import Config
from .engine import IDP_FAILED_EVENT, Engine, idp_log_fields
from .errors import IdpError
from .http_wire import HttpWire, serve_http
from .idp import Providers, warm_start_budget
from .logs import JsonLogger
from .metrics import Metrics
from .reload import ConfigWatcher
from .server import SERVICE_NAME, AuthorizationService, add_to_server
from .shared_cache import Evictor, SharedCache, open_shared_cache, token_scopes
from .tls import add_check_port, http_ssl_context, warn_if_tls_changed
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
    """The policy being served: config, IdP providers and engine, replaced on reload. The new
    one takes over the IdP providers of ``previous`` whose settings did not change (their keys,
    documents, introspection answers, breakers and connections), so a reload costs no refetch."""

    def __init__(
        self,
        config: Config,
        logger: JsonLogger,
        metrics: Metrics,
        previous: Runtime | None = None,
        shared_cache: SharedCache | None = None,
    ) -> None:
        def on_stale(exc: IdpError) -> None:
            # Cached keys keep serving; the failed refresh is still worth one line.
            logger.error(
                IDP_FAILED_EVENT,
                reason="idp_call_failed",
                message=exc.message,
                **dict(idp_log_fields(exc)),
            )

        def report(level: str, event: str, fields: dict[str, Any]) -> None:
            logger.log(level, event, **fields)  # a rotated client secret file: its path, never it

        self.config = config
        self.providers: Providers = Providers(
            config,
            on_stale=on_stale,
            observer=metrics,
            previous=previous.providers if previous is not None else None,
            report=report,
            shared_cache=shared_cache,
        )
        self.shared_cache = shared_cache
        self.engine = Engine(config, self.providers.by_deployment, shared_cache=shared_cache)

    def readiness(self) -> dict[str, Any]:
        """What /readyz shows: the config and each IdP endpoint's last success, last error (what,
        when, why) and breaker (:meth:`IdpEndpoint.readiness`)."""
        detail = {
            "config": self.config.source,
            "deployments": len(self.config.deployments),
            "providers": [ep.readiness() for ep in self.providers.endpoints.values()],
        }
        if self.shared_cache is not None:
            # Shown, never a reason to be unready: without it, checks still have the IdP.
            detail["sharedCache"] = self.shared_cache.readiness()
        return detail


_FLUSH_SECONDS = 0.05


async def _flush_every(logger: JsonLogger, metrics: Metrics, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        logger.flush()
        metrics.flush()


# How long a replaced runtime's HTTP clients stay open for checks that started before the swap.
_RETIRE_AFTER_SECONDS = 60.0

Phase = Literal["starting", "serving", "draining"]


class _Life:
    """Where the process is (``phase``) and what its warm start did, as /readyz shows them."""

    def __init__(self, budget: float) -> None:
        self.phase: Phase = "starting"
        self.warm_start: dict[str, Any] = {
            "budgetSeconds": budget,
            "seconds": None,  # how long it took, once done
            "complete": None,  # every document fetched
            "failed": [],  # what could not be had: endpoint, uri, message, detail
        }

    def readiness(self, runtime: Runtime) -> tuple[bool, dict[str, Any]]:
        detail = {"phase": self.phase, **runtime.readiness(), "warmStart": self.warm_start}
        return self.phase == "serving", detail

    def worker_state(self, runtime: Runtime) -> dict[str, Any]:
        """What a worker tells its supervisor (``--workers N``): its warm start, and how long it
        drains (the config it serves may have been reloaded since the supervisor read it)."""
        return {"warmStart": self.warm_start, "drainSeconds": runtime.config.server.drain_seconds}


async def _warm_start(runtime: Runtime, budget: float, stop: asyncio.Event) -> list[Any] | None:
    """The documents the warm start could not fetch within ``budget``; None when SIGTERM came
    first (the warm start is then abandoned)."""
    warm = asyncio.ensure_future(runtime.providers.warm_up(budget))
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((warm, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not warm.done():
            warm.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await warm
    return None if warm.cancelled() else warm.result()


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
    shared_cache = None
    if config.server.shared_cache is not None:
        # Made once, for the life of the process (a reloaded sharedCache applies at the next
        # start); ConfigError when its password or signing key cannot be read.
        shared_cache = open_shared_cache(
            config.server.shared_cache,
            lambda level, event, fields: logger.log(level, event, **fields),
            metrics.shared_cache,
            metrics.shared_cache_call,
        )
    runtime = Runtime(config, logger, metrics, shared_cache=shared_cache)
    service = AuthorizationService(AnswerCache(runtime.engine), logger, metrics)
    retired: set[asyncio.Task[None]] = set()
    life = _Life(warm_start_budget(config))

    def apply(new_config: Config) -> None:
        nonlocal runtime
        # May raise ConfigError (a new client secret file unreadable): the old one keeps serving.
        new_runtime = Runtime(
            new_config, logger, metrics, previous=runtime, shared_cache=shared_cache
        )
        old, runtime = runtime, new_runtime
        # One assignment: a check sees the old policy or the new one, never both. The answers
        # start again empty: they rested on the old policy.
        service.answers = AnswerCache(new_runtime.engine)
        logger.set_level(new_config.server.log_level)
        log_config_warnings(logger, new_config)
        warn_if_tls_changed(logger, old.config, new_config)  # the listener's files: at restart
        if new_config.server.shared_cache != config.server.shared_cache:
            # The shared cache was made at start and serves on: say so, rather than let the
            # operator believe the new settings are in use.
            logger.warning(
                "config.sharedCacheNeedsRestart",
                message="server.sharedCache changed: the shared cache keeps the settings it was"
                " started with until the next start.",
                config=new_config.source,
            )

        if life.phase == "serving":
            mark_ready(life.worker_state(new_runtime))  # its drainSeconds may have changed

        async def retire() -> None:
            await asyncio.sleep(_RETIRE_AFTER_SECONDS)
            await old.providers.aclose(keep=new_runtime.providers)  # what it took over stays

        task = asyncio.ensure_future(retire())
        retired.add(task)
        task.add_done_callback(retired.discard)

    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    add_to_server(service, server)
    health_service = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    # NOT_SERVING until the warm start is done: a health check finds the port open and the
    # server not ready yet, rather than an unknown service.
    for name in ("", SERVICE_NAME):
        await health_service.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    # Plain, or TLS/mTLS per server.tls; ConfigError (refuse to start) if its files are unusable.
    if add_check_port(server, listen, config.server.tls, logger) == 0:
        logger.error("server.listenFailed", message=f"Cannot listen on {listen}.")
        return 1
    await server.start()
    http_server = None
    if http_listen:  # the HTTP wire (docs/wires.md), over the same Serving as gRPC
        http_host, http_port = _split_hostport(http_listen)
        try:
            tls = None if config.server.tls is None else http_ssl_context(config.server.tls, logger)
            http_server = await serve_http(HttpWire(service.serving), http_host, http_port, tls)
        except OSError as exc:
            message = f"Cannot listen on {http_listen}: {exc.strerror}."
            logger.error("server.listenFailed", message=message)
            await server.stop(0)
            return 1

    def drop_local(digest: bytes | None) -> int:
        """Drop a token (every token, for None) from the caches of the policy being served."""
        dropped = service.answers.evict(digest) + runtime.engine.evict(digest)
        providers = runtime.providers.by_deployment.values()
        clients = {id(p.introspection): p.introspection for p in providers}  # shared by several
        return dropped + sum(c.evict(digest) for c in clients.values() if c is not None)

    evictor = Evictor(drop_local, shared_cache, lambda: token_scopes(runtime.config), logger)
    listener = None
    if shared_cache is not None:  # evictions from the other replicas (and the CLI)
        listener = asyncio.ensure_future(shared_cache.subscribe(evictor.heard))
    admin = AdminServer(
        metrics.registry,
        lambda: life.readiness(runtime),
        before_scrape=metrics.flush,
        evict=lambda digest: evictor.evict(digest, "admin"),
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

    # Made now, started once serving: a change written during the warm start is applied then.
    watcher = ConfigWatcher(config.source, apply, logger, poll_seconds=reload_poll_seconds)
    # Log lines are buffered and flushed every few milliseconds, not written one syscall each.
    logger.autoflush = False
    flusher = asyncio.ensure_future(_flush_every(logger, metrics, _FLUSH_SECONDS))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, watcher.poke)

    started = time.monotonic()
    budget = life.warm_start["budgetSeconds"]
    failed = await _warm_start(runtime, budget, stop)
    if failed is not None:
        await _serve(life, runtime, health_service, failed, time.monotonic() - started, logger)
        watcher.start()
        # Everything built so far lives as long as the process: out of the cyclic GC's scans.
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

    # Leaving: out of rotation at once, still answering while Envoy notices.
    life.phase = "draining"  # /readyz 503
    await health_service.enter_graceful_shutdown()  # NOT_SERVING for "" and the service, for good
    await watcher.stop()
    drain = runtime.config.server.drain_seconds
    logger.info(
        "server.draining",
        message="NOT_SERVING; checks are still answered until Envoy's health checks have seen it.",
        drainSeconds=drain,
    )
    await asyncio.sleep(drain)  # a timed phase: Envoy's health checks run on their interval
    logger.info("server.stopping", graceSeconds=grace_seconds)
    if http_server is not None:
        http_server.close()  # no new connections; the checks under way finish below
    await server.stop(grace_seconds)
    if listener is not None:
        listener.cancel()
    await _lines_of_cut_checks(exclude={flusher, *retired})
    await admin.stop()
    for task in list(retired):
        task.cancel()
    await runtime.providers.aclose()
    if shared_cache is not None:
        await shared_cache.aclose()
    flusher.cancel()
    metrics.flush()
    tracing.shutdown()
    logger.info("server.stopped")
    # One last write of every buffered line (the last checks' and these) before the process
    # exits: nothing is left in the buffer nor in stdout's.
    logger.flush()
    logger.autoflush = True
    return 0


async def _serve(
    life: _Life,
    runtime: Runtime,
    health_service: health.aio.HealthServicer,
    failed: list[Any],
    seconds: float,
    logger: JsonLogger,
) -> None:
    """The warm start is over: say what it could not fetch, then report SERVING."""
    life.warm_start.update(seconds=round(seconds, 3), complete=not failed, failed=failed)
    if failed:
        logger.warning(
            "server.warmStartIncomplete",
            message=f"{len(failed)} identity-provider document(s) could not be fetched within the"
            f" warm start's {life.warm_start['budgetSeconds']:g} s; serving anyway, and checks"
            " that need them answer idp_call_failed until the IdP answers.",
            budgetSeconds=life.warm_start["budgetSeconds"],
            seconds=life.warm_start["seconds"],
            failed=failed,
        )
    for name in ("", SERVICE_NAME):
        await health_service.set(name, health_pb2.HealthCheckResponse.SERVING)
    life.phase = "serving"
    # Under `--workers N`, the supervisor's /readyz counts the workers that got here.
    mark_ready(life.worker_state(runtime))


# After grpc's grace, the checks still running are cancelled; their handlers log the cancelled
# check (server.checkCancelled and the access line) as they unwind, a few loop turns later.
_CUT_CHECKS_SECONDS = 1.0


async def _lines_of_cut_checks(exclude: set[asyncio.Task[None]]) -> None:
    """Wait, a bounded time, for the tasks still running but this process's own (``exclude``):
    the handlers of checks cut at the end of the grace write their lines as they end."""
    me = asyncio.current_task()
    others = [t for t in asyncio.all_tasks() if t is not me and t not in exclude]
    if others:
        await asyncio.wait(others, timeout=_CUT_CHECKS_SECONDS)
