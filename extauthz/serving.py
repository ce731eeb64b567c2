"""What every wire shares once it has read a request: the answer (given again, or decided by the
engine within the caller's deadline), the access and execution lines, the counts and the span.

A wire (:mod:`extauthz.server` for gRPC, :mod:`extauthz.http_wire` for Envoy's HTTP protocol)
only reads a request into a :class:`~extauthz.engine.CheckInput` and writes a
:class:`~extauthz.decision.Decision` out; everything between is here, once, so that the two
wires cannot decide, log or count differently.
"""

from __future__ import annotations

import asyncio
import time
import traceback
import uuid
from collections.abc import Callable, Mapping

from opentelemetry.trace import Span, StatusCode

from .answers import Answer, AnswerCache
from .decision import Decision, Reason, deny
from .engine import IDP_FAILED_EVENT, CheckInput
from .errors import IdpError
from .idp.http import CheckCalls, check_deadline, check_idp_calls
from .logs import JsonLogger, current_request_id
from .metrics import Metrics
from .routing import Selection

__all__ = ["NO_CALLS", "Serving", "internal_error", "new_request_id", "request_id_of"]

NO_CALLS = CheckCalls()  # an answer given again calls no IdP; never written
# Of the caller's deadline, what is kept for answering: a tenth, within these bounds.
_MIN_ANSWER_MARGIN = 0.05
_MAX_ANSWER_MARGIN = 0.25


class Serving:
    """The answers (replaced whole on reload), the logger and the metrics every wire uses."""

    def __init__(self, answers: AnswerCache, logger: JsonLogger, metrics: Metrics) -> None:
        self.answers = answers
        self.log = logger
        self.metrics = metrics
        self._deadline_seen_by: AnswerCache | None = None  # warned about its timeouts once

    def again(self, inp: CheckInput, path: str) -> Answer | None:
        """The answer an earlier check gave this credential on this route, if it still holds
        (counted as a cache hit); None: :meth:`decide` must run."""
        answer = self.answers.reuse(inp, path)
        if answer is not None:
            self.metrics.answer_reused()
        return answer

    async def decide(
        self,
        inp: CheckInput,
        request_id: str,
        started: float,
        remaining: float | None,
        calls: CheckCalls,
        wire: str,
    ) -> Decision:
        """The engine's decision (remembered by the answer cache), its IdP calls counted in
        ``calls`` and bounded by ``remaining`` seconds (the caller's deadline, None: none). Never
        raises but CancelledError (the caller gave up: logged and counted here first); any other
        exception is a fail-closed ``internal_error`` denial."""
        check_idp_calls.set(calls)
        current_request_id.set(request_id)
        try:
            if remaining is not None:
                self._bound_by_caller(remaining)
            return await self.answers.check(inp)
        except asyncio.CancelledError:
            # Envoy gave up (its ext_authz timeout) and answered with its status_on_error: the
            # check still gets its lines and its count, so that the request id can be found and
            # the cause seen.
            self._cancelled(inp, request_id, time.perf_counter() - started, calls, wire)
            raise
        except Exception as exc:  # noqa: BLE001 (fail closed on any bug; never a wire error)
            return internal_error(exc)

    def record(
        self,
        decision: Decision,
        method: str,
        path: str,
        request_id: str,
        elapsed: float,
        idp_calls: int,
        status: int,
        wire: str,
        reused: bool = False,
    ) -> None:
        """The check's execution line (a denial's), its access line and its counts."""
        reason = decision.reason.value if decision.reason else "none"
        if decision.event:
            fields = dict(decision.log_fields)
            if reused and "now" in fields:
                # A remembered denial (an expired token's) is given again later than it was
                # made: its line says when this check ran, compared with the same exp.
                fields["now"] = self.answers.engine.clock()
            self.log.log(
                "WARNING" if decision.reason is not Reason.INTERNAL_ERROR else "ERROR",
                decision.event,
                requestId=request_id,
                reason=reason,
                message=decision.message,
                deployment=decision.deployment or None,
                route=decision.route or None,
                authServer=decision.auth_server or None,
                **fields,
            )
        verdict = "allow" if decision.allowed else "deny"
        dry_run = decision.dry_run
        self.log.access(
            request_id,
            decision.deployment,
            decision.route,
            method,
            path,
            status,
            verdict,
            reason,
            int(elapsed * 1_000_000) / 1000,  # ms to the microsecond: round() costs 4x more
            idp_calls,
            dry_run,
            decision.auth_server,
        )
        outcome = "dry_run_deny" if dry_run else verdict
        self.metrics.check(decision.deployment, outcome, reason, elapsed, wire)
        if decision.auth_server:
            self.metrics.auth_server_check(
                decision.deployment, decision.auth_server, outcome, reason
            )

    @staticmethod
    def annotate(
        span: Span, decision: Decision, method: str, path: str, request_id: str, status: int
    ) -> None:
        """The check span's attributes (docs/traces.md), the same on every wire."""
        reason = decision.reason.value if decision.reason else "none"
        span.set_attributes(
            {
                "extauthz.deployment": decision.deployment,
                "extauthz.route": decision.route,
                "extauthz.decision": "allow" if decision.allowed else "deny",
                "extauthz.reason": reason,
                "extauthz.request_id": request_id,
                "http.request.method": method,
                "url.path": path,
                "http.response.status_code": status,
            }
        )
        if decision.auth_server:
            span.set_attribute("extauthz.auth_server", decision.auth_server)
        if decision.dry_run:
            span.set_attribute("extauthz.dry_run", True)  # allowed; reason is the would-be denial
        elif decision.reason in (Reason.IDP_CALL_FAILED, Reason.INTERNAL_ERROR):
            span.set_status(StatusCode.ERROR, reason)

    def answer_failed(self, exc: BaseException, request_id: str, deployment: str) -> Decision:
        """Writing the answer itself failed: logged; the wire sends its fixed denial."""
        self.log.error(
            "server.internalError",
            message=f"Internal error {type(exc).__name__} while answering; denied.",
            requestId=request_id or None,
        )
        return deny(Reason.INTERNAL_ERROR, "", deployment=deployment)

    def _cancelled(
        self,
        inp: CheckInput | None,
        request_id: str,
        elapsed: float,
        calls: CheckCalls,
        wire: str,
    ) -> None:
        """The lines and the count of a check Envoy cancelled: its deployment and route, the
        IdP call it was waiting for, and how long it had run; and, once that call ends (it goes
        on: other checks may share it), a line with its outcome."""
        deployment = route = ""
        if inp is not None:
            try:
                selection = self.answers.engine.select(inp)
            except Exception:  # noqa: BLE001 (the lines matter more than the names in them)
                selection = None
            if isinstance(selection, Selection):
                deployment, route = selection.deployment.name, selection.route_name
        method, path = (inp.method, inp.path) if inp is not None else ("", "")
        waiting = calls.in_flight
        if waiting is not None and calls is not NO_CALLS:
            calls.when_abandoned = self._abandoned_call_logger(request_id, time.monotonic())
        elapsed_ms = int(elapsed * 1_000_000) / 1000
        self.log.warning(
            "server.checkCancelled",
            requestId=request_id or None,
            reason="cancelled",
            message=(
                f"Envoy cancelled the check after {elapsed_ms:g} ms"
                + (f", waiting for the {waiting[0]} uri: {waiting[1]}." if waiting else ".")
            ),
            deployment=deployment or None,
            route=route or None,
            endpoint=waiting[0] if waiting else None,
            uri=waiting[1] if waiting else None,
            elapsedMs=elapsed_ms,
        )
        self.log.access(
            request_id, deployment, route, method, path, 0, "deny", "cancelled", elapsed_ms,
            calls.count,
        )  # fmt: skip
        self.metrics.check(deployment, "deny", "cancelled", elapsed, wire)

    def _abandoned_call_logger(
        self, request_id: str, cancelled_at: float
    ) -> Callable[[str, str, str, IdpError | None], None]:
        """What logs the outcome of the IdP call a cancelled check was waiting for: a failure
        as the ``authentication.idpCallFailed`` line the check would have written (marked
        ``abandoned``), an answer as ``server.abandonedCallEnded``; both say how long after the
        cancellation it came, which is what Envoy's timeout would have needed."""

        def log(endpoint: str, uri: str, outcome: str, error: IdpError | None) -> None:
            after_ms = int((time.monotonic() - cancelled_at) * 1_000_000) / 1000
            if error is not None:
                self.log.warning(
                    IDP_FAILED_EVENT,
                    requestId=request_id,
                    reason="idp_call_failed",
                    message=error.message,
                    abandoned=True,
                    afterCancelMs=after_ms,
                    **dict(error.log_fields()),
                )
                return
            self.log.info(
                "server.abandonedCallEnded",
                requestId=request_id,
                message=(
                    f"The {endpoint} uri: {uri} answered ({outcome}) {after_ms:g} ms after Envoy"
                    " cancelled the check that was waiting for it."
                ),
                endpoint=endpoint,
                uri=uri,
                outcome=outcome,
                afterCancelMs=after_ms,
            )

        return log

    def _bound_by_caller(self, remaining: float) -> None:
        """Envoy's deadline for this check (gRPC ``grpc-timeout``, ``remaining`` seconds from
        now) bounds its IdP calls, so that extauthz answers ``idp_call_failed`` itself before
        Envoy gives up and answers a bare ``status_on_error``. Once per config, a policy whose
        IdP calls may take longer than that is worth a warning."""
        margin = min(_MAX_ANSWER_MARGIN, max(_MIN_ANSWER_MARGIN, remaining * 0.1))
        check_deadline.set(time.monotonic() + remaining - margin)
        answers = self.answers
        if self._deadline_seen_by is answers:
            return
        self._deadline_seen_by = answers
        for deployment in (p for d in answers.config.deployments for p in d.policies):
            source = deployment.auth.keys
            worst = source.worst_case_seconds
            if worst > remaining:
                calls = (
                    "a discovery document, then the keys or introspection"
                    if source.type == "REMOTE_DISCOVERY"
                    else "one call"
                )
                self.log.warning(
                    "config.timeoutTooLong",
                    message=(
                        f"Envoy gives a check {remaining:.1f} s, but the identity-provider calls of"
                        f" deployment '{deployment.label}' may take {worst:g} s ({source.type}:"
                        f" {calls}, timeoutSeconds {source.timeout_seconds:g} each); extauthz"
                        " cuts them short and answers idp_call_failed in time. Lower"
                        " timeoutSeconds or raise Envoy's ext_authz timeout."
                    ),
                    deployment=deployment.name,
                    envoyTimeoutSeconds=round(remaining, 1),
                    worstCaseSeconds=worst,
                )


def internal_error(exc: BaseException) -> Decision:
    """A bug met while deciding, as the fail-closed denial: where it happened, never the
    exception's text (it could quote request data)."""
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else "?"
    return deny(
        Reason.INTERNAL_ERROR,
        f"Internal error {type(exc).__name__} at {where}; the request was denied.",
        event="server.internalError",
    )


def new_request_id() -> str:
    return str(uuid.uuid4())


_MAX_REQUEST_ID = 128


def request_id_of(headers: Mapping[str, str]) -> str:
    """The request's ``x-request-id`` when it is a sane one to log and send back (printable,
    no quote, at most 128 characters), else a new UUID."""
    rid = headers.get("x-request-id", "")
    if 0 < len(rid) <= _MAX_REQUEST_ID and rid.isprintable() and '"' not in rid:
        return rid
    return str(uuid.uuid4())
