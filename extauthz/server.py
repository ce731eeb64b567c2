"""The gRPC edge: CheckRequest in, CheckResponse out, one access-log line per check.

Nothing here decides anything: the request is lifted into a :class:`~extauthz.engine.CheckInput`,
the answer cache (:mod:`extauthz.answers`, around the engine) returns a Decision,
``response.to_check_response`` renders it. The RPC never fails for a
bad token or an IdP failure; even a bug in extauthz becomes a fail-closed ``internal_error`` denial.
"""

from __future__ import annotations

import asyncio
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc
from opentelemetry.trace import Span, SpanKind, StatusCode

from . import tracing
from ._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from ._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from .answers import Answer, AnswerCache
from .config import ServerSettings
from .decision import Decision, Reason, deny
from .engine import IDP_FAILED_EVENT, CheckInput, Engine
from .errors import IdpError
from .idp.http import CheckCalls, check_deadline, check_idp_calls
from .logs import JsonLogger, current_request_id, current_trace_id
from .metrics import Metrics
from .response import Renderer, http_status, to_check_response
from .routing import Selection

__all__ = ["SERVICE_NAME", "AuthorizationService", "add_to_server", "lift_request"]

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
CHECK_SPAN_NAME = f"{SERVICE_NAME}/Check"
_RPC_ATTRIBUTES = {"rpc.system": "grpc", "rpc.service": SERVICE_NAME, "rpc.method": "Check"}
_MAX_REQUEST_ID = 128
# Answered if rendering a decision itself fails: a denial with nothing taken from the request.
_FALLBACK_DENIAL = to_check_response(
    deny(Reason.INTERNAL_ERROR, ""), "unavailable", ServerSettings()
)

_new_tuple = tuple.__new__
# Of Envoy's deadline, what is kept for answering: a tenth, within these bounds.
_MIN_ANSWER_MARGIN = 0.05
_MAX_ANSWER_MARGIN = 0.25
_NO_CALLS = CheckCalls()  # never written: only a fresh check's own calls are

# What the Check handler answers on the wire: a CheckResponse, or one already serialized (an allow
# the engine answers again is serialized once and kept with the answer; 171 bytes instead of a
# 1.6 KB message object).
Wire = ext.CheckResponse | bytes


def _serialize(response: Wire) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


def add_to_server(service: AuthorizationService, server: grpc.aio.Server) -> None:
    """Register ``service.check_wire`` as ``Authorization/Check``: the generated registration,
    with a serializer that passes pre-serialized responses through."""
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            service.check_wire,
            request_deserializer=ext.CheckRequest.FromString,
            response_serializer=_serialize,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _request_id(headers: Mapping[str, str]) -> str:
    rid = headers.get("x-request-id", "")
    if 0 < len(rid) <= _MAX_REQUEST_ID and rid.isprintable() and '"' not in rid:
        return rid
    return str(uuid.uuid4())


class _Headers(Mapping[str, str]):
    """A CheckRequest's headers by lower-case name, read straight from the protobuf map: Envoy
    lower-cases header names itself. Another client's mixed-case names are folded the first
    time a name is not found as given (a lower-case copy of a name wins over a mixed-case one)."""

    __slots__ = ("_folded", "_raw")

    def __init__(self, raw: Mapping[str, str]) -> None:
        self._raw = raw
        self._folded: dict[str, str] | None = None

    def _fold(self) -> dict[str, str]:
        if self._folded is None:
            folded: dict[str, str] = {}
            for k, v in self._raw.items():
                folded.setdefault(k.lower(), v)
            folded.update((k, v) for k, v in self._raw.items() if k.islower())
            self._folded = folded
        return self._folded

    def get(self, key: str, default: Any = None) -> Any:
        value = self._raw.get(key)
        return value if value is not None else self._fold().get(key, default)

    def __getitem__(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fold())

    def __len__(self) -> int:
        return len(self._fold())


def lift_request(request: ext.CheckRequest) -> tuple[CheckInput, str]:
    """The fields the engine needs, and the request id, from a CheckRequest (possibly empty)."""
    attrs = request.attributes
    http = attrs.request.http
    raw_headers = http.headers
    headers: Mapping[str, str] = _Headers(raw_headers)
    if not raw_headers and http.header_map.headers:
        # Envoy sends header_map instead when encode_raw_headers is on; repeats join with ",".
        joined: dict[str, str] = {}
        for h in http.header_map.headers:
            value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
            key = h.key.lower()
            joined[key] = f"{joined[key]},{value}" if key in joined else value
        headers = joined
    host = http.host or headers.get(":authority", "") or headers.get("host", "")
    method = http.method or headers.get(":method", "")
    raw_path = http.path or headers.get(":path", "/")
    # The tuple built directly: a named tuple's constructor is one more Python call per check.
    lifted = _new_tuple(CheckInput, (method, host, raw_path, headers, attrs.context_extensions))
    return lifted, _request_id(headers)


class AuthorizationService(ext_grpc.AuthorizationServicer):
    """The gRPC wire: each CheckRequest lifted into a CheckInput, answered by the answer cache
    (a remembered answer, else the engine), rendered, logged and counted. One path for every
    check; with tracing on, every check is decided afresh so that its span shows it."""

    def __init__(self, answers: AnswerCache | Engine, logger: JsonLogger, metrics: Metrics) -> None:
        self.answers = answers if isinstance(answers, AnswerCache) else AnswerCache(answers)
        self._log = logger
        self._metrics = metrics
        self._renderer = Renderer(self.answers.config.server)
        self._deadline_seen_by: AnswerCache | None = None  # warned about its timeouts once

    async def Check(  # noqa: N802 (gRPC method name)
        self, request: ext.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ext.CheckResponse:
        """The CheckResponse as a message (what :meth:`check_wire` answers, parsed if needed)."""
        response = await self.check_wire(request, context)
        if isinstance(response, bytes):
            return ext.CheckResponse.FromString(response)
        return response

    async def check_wire(
        self,
        request: ext.CheckRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        span: Span | None = None,
    ) -> Wire:
        """The gRPC handler: the response to one CheckRequest, never an RPC error. With tracing
        on, the check runs inside its span (``span``), decided afresh so that the span shows it;
        the untraced check runs here directly, without a second coroutine."""
        if span is None and tracing.enabled():
            return await self._traced(request, context)
        started = time.perf_counter()
        calls = _NO_CALLS  # an answer given again calls no IdP
        request_id = path = ""
        inp: CheckInput | None = None
        answer: Answer | None = None
        answers = self.answers
        try:
            inp, request_id = lift_request(request)
            path = inp.path
            answer = answers.reuse(inp, path) if span is None else None
            if answer is not None:
                self._metrics.answer_reused()
                decision = answer.decision
            else:
                calls = CheckCalls()
                check_idp_calls.set(calls)
                current_request_id.set(request_id)
                remaining = context.time_remaining() if context is not None else None
                if remaining is not None:
                    self._bound_by_envoy(remaining)
                decision = await answers.check(inp)
        except asyncio.CancelledError:
            # Envoy gave up (its ext_authz timeout) and answered with its status_on_error: the
            # check still gets its lines and its count, so that the request id can be found and
            # the cause seen.
            self._cancelled(inp, request_id, time.perf_counter() - started, calls)
            raise
        except Exception as exc:  # noqa: BLE001 (fail closed on any bug; never an RPC error)
            frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
            where = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else "?"
            # The exception text is not logged: it could quote request data.
            decision = deny(
                Reason.INTERNAL_ERROR,
                f"Internal error {type(exc).__name__} at {where}; the request was denied.",
                event="server.internalError",
            )
            request_id = request_id or str(uuid.uuid4())
            answer = None
        response: Wire | None
        try:
            if answer is not None and decision.allowed:
                # An allow has no request id in it: rendered once, the same bytes every time.
                response = answer.wire
                if response is None:
                    rendered = self._render(decision, request_id, answers.config.server)
                    response = answer.wire = rendered.SerializeToString()
                status = 200
            else:
                settings = answers.config.server
                response = self._render(decision, request_id, settings)
                status = 200 if decision.allowed else http_status(decision, settings)
            method = inp.method if inp else ""
            elapsed = time.perf_counter() - started
            reused = answer is not None
            self._record(decision, method, path, request_id, elapsed, calls.count, status, reused)
        except Exception as exc:  # noqa: BLE001 (the RPC itself must never fail: fail closed)
            response, status = _FALLBACK_DENIAL, 500
            decision = deny(Reason.INTERNAL_ERROR, "", deployment=decision.deployment)
            self._log.error(
                "server.internalError",
                message=f"Internal error {type(exc).__name__} while answering; denied.",
                requestId=request_id or None,
            )
        if span is not None:
            reason = decision.reason.value if decision.reason else "none"
            span.set_attributes(
                {
                    "extauthz.deployment": decision.deployment,
                    "extauthz.route": decision.route,
                    "extauthz.decision": "allow" if decision.allowed else "deny",
                    "extauthz.reason": reason,
                    "extauthz.request_id": request_id,
                    "http.request.method": inp.method if inp else "",
                    "url.path": path,
                    "http.response.status_code": status,
                }
            )
            if decision.reason in (Reason.IDP_CALL_FAILED, Reason.INTERNAL_ERROR):
                span.set_status(StatusCode.ERROR, reason)
        return response

    async def _traced(
        self, request: ext.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Wire:
        try:
            headers = request.attributes.request.http.headers
            parent = tracing.extract_parent(context.invocation_metadata(), headers)
        except Exception:  # noqa: BLE001 (a malformed trace context must not fail the check)
            parent = None
        with tracing.tracer().start_as_current_span(
            CHECK_SPAN_NAME, context=parent, kind=SpanKind.SERVER, attributes=_RPC_ATTRIBUTES
        ) as span:
            current_trace_id.set(format(span.get_span_context().trace_id, "032x"))
            return await self.check_wire(request, context, span)

    def _cancelled(
        self, inp: CheckInput | None, request_id: str, elapsed: float, calls: CheckCalls
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
        if waiting is not None and calls is not _NO_CALLS:
            calls.when_abandoned = self._abandoned_call_logger(request_id, time.monotonic())
        elapsed_ms = int(elapsed * 1_000_000) / 1000
        self._log.warning(
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
        self._log.access(
            request_id,
            deployment,
            route,
            method,
            path,
            0,
            "deny",
            "cancelled",
            elapsed_ms,
            calls.count,
        )
        self._metrics.check(deployment, "deny", "cancelled", elapsed)

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
                self._log.warning(
                    IDP_FAILED_EVENT,
                    requestId=request_id,
                    reason="idp_call_failed",
                    message=error.message,
                    abandoned=True,
                    afterCancelMs=after_ms,
                    **dict(error.log_fields()),
                )
                return
            self._log.info(
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

    def _bound_by_envoy(self, remaining: float) -> None:
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
        for deployment in answers.config.deployments:
            source = deployment.auth.keys
            worst = source.worst_case_seconds
            if worst > remaining:
                calls = (
                    "a discovery document, then the keys or introspection"
                    if source.type == "REMOTE_DISCOVERY"
                    else "one call"
                )
                self._log.warning(
                    "config.timeoutTooLong",
                    message=(
                        f"Envoy gives a check {remaining:.1f} s, but the identity-provider calls of"
                        f" deployment '{deployment.name}' may take {worst:g} s ({source.type}:"
                        f" {calls}, timeoutSeconds {source.timeout_seconds:g} each); extauthz"
                        " cuts them short and answers idp_call_failed in time. Lower"
                        " timeoutSeconds or raise Envoy's ext_authz timeout."
                    ),
                    deployment=deployment.name,
                    envoyTimeoutSeconds=round(remaining, 1),
                    worstCaseSeconds=worst,
                )

    def _render(
        self, decision: Decision, request_id: str, settings: ServerSettings
    ) -> ext.CheckResponse:
        if self._renderer.settings is not settings:  # a reloaded config
            self._renderer = Renderer(settings)
        return self._renderer.render(decision, request_id)

    def _record(
        self,
        decision: Decision,
        method: str,
        path: str,
        request_id: str,
        elapsed: float,
        idp_calls: int,
        status: int,
        reused: bool = False,
    ) -> None:
        reason = decision.reason.value if decision.reason else "none"
        if decision.event:
            fields = dict(decision.log_fields)
            if reused and "now" in fields:
                # A remembered denial (an expired token's) is given again later than it was
                # made: its line says when this check ran, compared with the same exp.
                fields["now"] = self.answers.engine.clock()
            self._log.log(
                "WARNING" if decision.reason is not Reason.INTERNAL_ERROR else "ERROR",
                decision.event,
                requestId=request_id,
                reason=reason,
                message=decision.message,
                deployment=decision.deployment or None,
                route=decision.route or None,
                **fields,
            )
        self._log.access(
            request_id,
            decision.deployment,
            decision.route,
            method,
            path,
            status,
            "allow" if decision.allowed else "deny",
            reason,
            int(elapsed * 1_000_000) / 1000,  # ms to the microsecond: round() costs 4x more
            idp_calls,
        )
        self._metrics.check(
            decision.deployment, "allow" if decision.allowed else "deny", reason, elapsed
        )
