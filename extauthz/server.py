"""The gRPC wire: CheckRequest in, CheckResponse out.

Nothing here decides, logs or counts: the request is lifted into a
:class:`~extauthz.engine.CheckInput`, :class:`~extauthz.serving.Serving` answers it (what every
wire shares), and :class:`~extauthz.response.Renderer` writes the Decision as a CheckResponse.
The RPC never fails for a bad token or an IdP failure; even a bug in extauthz becomes a
fail-closed ``internal_error`` denial.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

import grpc
from opentelemetry.trace import Span, SpanKind

from . import tracing
from ._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from ._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from .answers import Answer, AnswerCache
from .config import ServerSettings
from .decision import Decision, Reason, deny
from .engine import CheckInput, Engine
from .idp.http import CheckCalls
from .logs import JsonLogger, current_trace_id
from .metrics import Metrics
from .response import Renderer, http_status, to_check_response
from .serving import NO_CALLS, Serving, internal_error, new_request_id, request_id_of

__all__ = ["SERVICE_NAME", "AuthorizationService", "add_to_server", "lift_request"]

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
CHECK_SPAN_NAME = f"{SERVICE_NAME}/Check"
_RPC_ATTRIBUTES = {"rpc.system": "grpc", "rpc.service": SERVICE_NAME, "rpc.method": "Check"}
# Answered if rendering a decision itself fails: a denial with nothing taken from the request.
_FALLBACK_DENIAL = to_check_response(
    deny(Reason.INTERNAL_ERROR, ""), "unavailable", ServerSettings()
)

_new_tuple = tuple.__new__
WIRE = "grpc"  # the wire label of the metrics

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
    # For sender-constrained tokens: the scheme (RFC 9449 §4.3 htu) and the client certificate
    # Envoy saw (RFC 8705 §3; sent with include_peer_certificate: true), URL-encoded PEM.
    # Read as Envoy sent them: a header fallback costs every check and only a DPoP proof's htu
    # needs it (the engine looks there then).
    scheme = http.scheme
    certificate = attrs.source.certificate
    # The tuple built directly: a named tuple's constructor is one more Python call per check.
    lifted = _new_tuple(
        CheckInput,
        (method, host, raw_path, headers, attrs.context_extensions, scheme, certificate, None),
    )
    return lifted, request_id_of(headers)


class AuthorizationService(ext_grpc.AuthorizationServicer):
    """The gRPC wire: each CheckRequest lifted into a CheckInput, answered through
    :class:`~extauthz.serving.Serving` (a remembered answer, else the engine) and rendered as a
    CheckResponse. One path for every check; with tracing on, every check is decided afresh so
    that its span shows it."""

    def __init__(
        self, answers: AnswerCache | Engine | Serving, logger: JsonLogger, metrics: Metrics
    ) -> None:
        if isinstance(answers, Serving):
            self.serving = answers
        else:
            cache = answers if isinstance(answers, AnswerCache) else AnswerCache(answers)
            self.serving = Serving(cache, logger, metrics)
        self._renderer = Renderer(self.serving.answers.config.server)

    @property
    def answers(self) -> AnswerCache:
        return self.serving.answers

    @answers.setter
    def answers(self, answers: AnswerCache) -> None:
        """A reloaded policy: one assignment, so a check sees the old answers or the new."""
        self.serving.answers = answers

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
        serving = self.serving
        calls = NO_CALLS
        request_id = path = method = ""
        answer: Answer | None = None
        try:
            inp, request_id = lift_request(request)
            path, method = inp.path, inp.method
            answer = serving.again(inp, path) if span is None else None
            if answer is not None:
                decision = answer.decision
            else:
                calls = CheckCalls()
                # Envoy's deadline (grpc-timeout): the IdP calls of the check stay within it.
                remaining = context.time_remaining() if context is not None else None
                decision = await serving.decide(inp, request_id, started, remaining, calls, WIRE)
        except Exception as exc:  # noqa: BLE001 (reading the request failed: fail closed)
            decision = internal_error(exc)
            request_id = request_id or new_request_id()
            answer = None
        response: Wire | None
        try:
            if answer is not None and decision.allowed:
                # An allow has no request id in it: rendered once, the same bytes every time.
                response = answer.wire
                if response is None:
                    rendered = self._render(decision, request_id, serving.answers.config.server)
                    response = answer.wire = rendered.SerializeToString()
                status = 200
            else:
                settings = serving.answers.config.server
                response = self._render(decision, request_id, settings)
                status = 200 if decision.allowed else http_status(decision, settings)
            elapsed = time.perf_counter() - started
            reused = answer is not None
            serving.record(
                decision, method, path, request_id, elapsed, calls.count, status, WIRE, reused
            )
        except Exception as exc:  # noqa: BLE001 (the RPC itself must never fail: fail closed)
            response, status = _FALLBACK_DENIAL, 500
            decision = serving.answer_failed(exc, request_id, decision.deployment)
        if span is not None:
            serving.annotate(span, decision, method, path, request_id, status)
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

    def _render(
        self, decision: Decision, request_id: str, settings: ServerSettings
    ) -> ext.CheckResponse:
        if self._renderer.settings is not settings:  # a reloaded config
            self._renderer = Renderer(settings)
        return self._renderer.render(decision, request_id)
