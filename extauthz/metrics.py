"""Prometheus series (docs/metrics.md)."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["IDP_OUTCOMES", "IDP_REFUSALS", "Metrics"]

# Sub-millisecond checks to multi-second IdP timeouts.
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


_MAX_PENDING = 10_000

# extauthz_idp_requests_total's `outcome` label: a fixed vocabulary (docs/metrics.md), never a
# class name or a raw status, so that what an IdP sends cannot mint series. One per attempt that
# went out (as the access line's idpCalls counts them), and one per call that ended before any.
IDP_OUTCOMES = frozenset(
    {
        "ok",  # a usable answer
        "timeout",  # no (whole) answer in time: connect, read or the check's deadline
        "connection_refused",
        "dns_failure",
        "tls_error",
        "1xx",  # a non-2xx answer, by status class (RFC 9110 §15)
        "3xx",
        "4xx",
        "5xx",
        "bad_status",  # a status outside 100-599
        "bad_response",  # an answer that is not what the endpoint must send
        "issuer_mismatch",  # a discovery document for another issuer
        "cancelled",  # the check was cancelled while the request was out
        # Calls that ended before any attempt went out:
        "circuit_open",
        "deadline_exceeded",
        "queue_timeout",
    }
)
# Calls refused at once, without going out or waiting: no duration to observe.
IDP_REFUSALS = frozenset({"circuit_open", "deadline_exceeded"})


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.checks = Counter(
            "extauthz_checks",
            "Checks answered",
            ["deployment", "decision", "reason", "wire"],
            registry=r,
        )
        self.check_duration = Histogram(
            "extauthz_check_duration_seconds",
            "Time to answer a check",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.idp_requests = Counter(
            "extauthz_idp_requests", "Identity-provider calls", ["endpoint", "outcome"], registry=r
        )
        self.idp_duration = Histogram(
            "extauthz_idp_request_duration_seconds",
            "Identity-provider call latency",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._children: dict[tuple[Any, ...], Any] = {}
        self.cache_events = Counter(
            "extauthz_cache_events", "Cache lookups", ["cache", "result"], registry=r
        )
        self.shared_cache_duration = Histogram(
            "extauthz_shared_cache_duration_seconds",
            "Time of each call to the shared cache (Redis), by operation",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.auth_server_checks = Counter(
            "extauthz_auth_server_checks",
            "Checks of DYNAMIC_AUTHENTICATION deployments, by the server that took the token",
            ["deployment", "server", "decision", "reason"],
            registry=r,
        )

        # Checks are tallied here and added to the series by flush() (every few milliseconds and
        # before each scrape): a check then costs a dict update, not a locked increment and a
        # histogram bucket search.
        self._check_counts: dict[tuple[str, str, str, str], int] = {}
        self._check_seconds: list[float] = []
        self._answers_reused = 0

    def answer_reused(self) -> None:
        """A check answered from the engine's answer cache."""
        self._answers_reused += 1

    def check(
        self, deployment: str, decision: str, reason: str, seconds: float, wire: str = "grpc"
    ) -> None:
        key = (deployment, decision, reason, wire)
        counts = self._check_counts
        counts[key] = counts.get(key, 0) + 1
        pending = self._check_seconds
        pending.append(seconds)
        if len(pending) >= _MAX_PENDING:  # nobody flushed (no server loop): stay bounded
            self.flush()

    def auth_server_check(self, deployment: str, server: str, decision: str, reason: str) -> None:
        self._child(self.auth_server_checks, deployment, server, decision, reason).inc()

    def flush(self) -> None:
        counts, self._check_counts = self._check_counts, {}
        seconds, self._check_seconds = self._check_seconds, []
        reused, self._answers_reused = self._answers_reused, 0
        if reused:
            self._child(self.cache_events, "answer", "hit").inc(reused)
        for labels, n in counts.items():
            self._child(self.checks, *labels).inc(n)
        observe = self.check_duration.observe
        for value in seconds:
            observe(value)

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once: labels() costs more than the increment."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # IdpObserver: how the IdP layer reports without knowing about Prometheus.
    def idp_call(self, endpoint: str, outcome: str, seconds: float) -> None:
        self._child(self.idp_requests, endpoint, outcome).inc()
        if outcome not in IDP_REFUSALS:
            self._child(self.idp_duration, endpoint).observe(seconds)

    def shared_cache_call(self, operation: str, seconds: float) -> None:
        """One call to the shared cache's Redis (``get``, ``set``, ``add``, ``delete``,
        ``publish``, ``lease``, ``poll``, ``release``), failed or not."""
        self._child(self.shared_cache_duration, operation).observe(seconds)

    def shared_cache(self, cache: str, result: str) -> None:
        """A shared-cache lookup: counted, and an event on the check's span (never a span of
        its own); the span's ``extauthz.cache`` attribute keeps telling how the check's own
        (local) lookup went (docs/traces.md)."""
        self._child(self.cache_events, cache, result).inc()
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event("cache", {"extauthz.cache": result, "extauthz.cache.name": cache})

    def cache(self, cache: str, result: str) -> None:
        self._child(self.cache_events, cache, result).inc()
        # docs/traces.md: cache results are recorded on the check's span, never as spans.
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event("cache", {"extauthz.cache": result, "extauthz.cache.name": cache})
            span.set_attribute("extauthz.cache", result)
