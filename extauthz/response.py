"""Decision → the wire's response (a CheckResponse, or HTTP/1.1 bytes), through the one table in
``decision.OUTCOMES`` (docs/decisions.md)."""

from __future__ import annotations

import json
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Generic, TypeVar

from google.protobuf import struct_pb2
from google.rpc import status_pb2

from ._pb.envoy.config.core.v3 import base_pb2
from ._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from ._pb.envoy.type.v3 import http_status_pb2
from .bounded import BoundedCache
from .config import ServerSettings
from .decision import OUTCOMES, Decision, http_status, www_authenticate

__all__ = [
    "HttpRenderer",
    "Renderer",
    "denial_body",
    "denial_headers",
    "http_status",
    "to_check_response",
    "www_authenticate",
]

# Set explicitly: Envoy's default for a HeaderValueOption is to append, which would let a
# client-sent copy of an identity header survive next to ours.
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_OK_STATUS = status_pb2.Status(code=0)


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE
    )


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def denial_headers(decision: Decision, request_id: str) -> list[tuple[str, str]]:
    """The headers of a denial, in order, as every wire sends them to the client."""
    assert decision.reason is not None
    headers = [
        ("content-type", "application/json"),
        ("x-request-id", request_id),
        ("x-extauthz-reason", decision.reason.value),
    ]
    challenge = www_authenticate(decision)
    if challenge is not None:
        headers.append(("www-authenticate", challenge))
    return headers


def denial_body(decision: Decision, request_id: str, settings: ServerSettings) -> str:
    """The JSON body of a denial (docs/decisions.md), byte for byte the same on every wire."""
    assert decision.reason is not None
    body: dict[str, str] = {
        "error": OUTCOMES[decision.reason].error,
        "reason": decision.reason.value,
        "request_id": request_id,
    }
    if settings.expose_detailed_errors and decision.message:
        body["error_description"] = decision.message
    return json.dumps(body, separators=(",", ":"))


def to_check_response(
    decision: Decision, request_id: str, settings: ServerSettings
) -> ext.CheckResponse:
    if decision.allowed:
        return ext.CheckResponse(
            status=_OK_STATUS,
            ok_response=ext.OkHttpResponse(
                headers=[_header(k, v) for k, v in decision.upstream_headers],
                headers_to_remove=list(decision.remove_headers),
            ),
            dynamic_metadata=_struct(dict(decision.metadata)),
        )
    assert decision.reason is not None
    outcome = OUTCOMES[decision.reason]
    headers = [_header(k, v) for k, v in denial_headers(decision, request_id)]
    return ext.CheckResponse(
        status=status_pb2.Status(code=outcome.grpc_code, message=decision.reason.value),
        denied_response=ext.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status(decision, settings)),  # type: ignore[arg-type]
            headers=headers,
            body=denial_body(decision, request_id, settings),
        ),
        dynamic_metadata=_struct(
            {
                "deployment": decision.deployment,
                "route": decision.route,
                "reason": decision.reason.value,
            }
        ),
    )


_MAX_TEMPLATES = 4_096
# A template keyed on a longer message (exposeDetailedErrors) is built every time, never kept.
_MAX_TEMPLATE_MESSAGE_CHARS = 512


T = TypeVar("T")


class _DenialTemplates(Generic[T]):
    """A renderer's denial templates: one per reason, deployment, route, required scope and
    (with exposeDetailedErrors) message, built once; a denial differs from the previous one
    with the same of these only by its request id."""

    def __init__(self, settings: ServerSettings) -> None:
        self._detailed = settings.expose_detailed_errors
        self._built: BoundedCache[tuple[object, ...], T] = BoundedCache(
            _MAX_TEMPLATES, _MAX_TEMPLATE_MESSAGE_CHARS
        )

    def get(self, decision: Decision, build: Callable[[Decision], T]) -> T:
        message = decision.message if self._detailed else ""
        key = (
            decision.reason,
            decision.deployment,
            decision.route,
            decision.required_scope,
            message,
        )
        template = self._built.get(key)
        if template is None:
            template = build(decision)
            self._built.put(key, template, len(message))
        return template


class Renderer:
    """Renders decisions for one config's settings, building each denial's fixed parts once.

    A denial differs from the previous one with the same reason, deployment and route only by its
    request id, so the response is copied from a template (a C-level copy) and gets the
    ``x-request-id`` header and the body's ``request_id`` filled in.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self._templates: _DenialTemplates[tuple[ext.CheckResponse, str, str]] = _DenialTemplates(
            settings
        )

    def render(self, decision: Decision, request_id: str) -> ext.CheckResponse:
        if decision.allowed:
            return to_check_response(decision, request_id, self.settings)
        fixed, body_head, body_tail = self._templates.get(decision, self._template)
        response = ext.CheckResponse()
        response.CopyFrom(fixed)
        denied = response.denied_response
        denied.headers.append(_header("x-request-id", request_id))
        denied.body = f"{body_head}{_json_string(request_id)}{body_tail}"
        return response

    def _template(self, decision: Decision) -> tuple[ext.CheckResponse, str, str]:
        marker = "\x00request-id\x00"
        full = to_check_response(decision, marker, self.settings)
        denied = full.denied_response
        kept = [h for h in denied.headers if h.header.key != "x-request-id"]
        del denied.headers[:]
        denied.headers.extend(kept)
        head, _, tail = denied.body.partition(_json_string(marker))
        denied.body = ""
        return full, head, tail


_json_string = json.encoder.encode_basestring_ascii  # as json.dumps writes strings


# -- the HTTP wire: the same decisions as an HTTP/1.1 response to Envoy's http_service ----------

# Envoy's http_service copies the headers of a 200 that its allowed_upstream_headers name onto the
# upstream request (overwriting), and removes the ones this header lists.
HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"


def _status_line(status: int) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.1 {status} {phrase}\r\n"


def http_allow(decision: Decision) -> bytes:
    """An allow on the HTTP wire: 200, the identity headers, and the client-sent copies of the
    ones that cannot be set removed (``x-envoy-auth-headers-to-remove``); no request id in it,
    so the same bytes answer every check of a remembered answer."""
    lines = [_status_line(200)]
    lines.extend(f"{k}: {v}\r\n" for k, v in decision.upstream_headers)
    if decision.remove_headers:
        lines.append(f"{HEADERS_TO_REMOVE}: {', '.join(decision.remove_headers)}\r\n")
    lines.append("content-length: 0\r\n\r\n")
    return "".join(lines).encode()


class HttpRenderer:
    """Decisions as HTTP/1.1 responses for one config's settings: the status, headers and body
    :func:`to_check_response` gives Envoy on the gRPC wire, so that the client sees the same
    bytes whichever wire Envoy used. A denial's fixed parts are built once per reason,
    deployment and route; only the request id is filled in."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self._templates: _DenialTemplates[tuple[str, str, str, str]] = _DenialTemplates(settings)

    def render(self, decision: Decision, request_id: str, *, head_only: bool = False) -> bytes:
        """The response; ``head_only`` for a HEAD request (RFC 9110 §9.3.2: no body)."""
        if decision.allowed:
            return http_allow(decision)
        template = self._templates.get(decision, self._template)
        before_id, after_id, body_head, body_tail = template
        body = f"{body_head}{_json_string(request_id)}{body_tail}".encode()
        head = f"{before_id}{request_id}{after_id}content-length: {len(body)}\r\n\r\n".encode()
        return head if head_only else head + body

    def _template(self, decision: Decision) -> tuple[str, str, str, str]:
        marker = "\x00request-id\x00"
        lines = [_status_line(http_status(decision, self.settings))]
        # x-request-id last, as the gRPC wire's Renderer appends it to its template.
        headers = [(k, v) for k, v in denial_headers(decision, marker) if k != "x-request-id"]
        lines.extend(f"{k}: {v}\r\n" for k, v in headers)
        before_id, after_id = "".join(lines) + "x-request-id: ", "\r\n"
        body = denial_body(decision, marker, self.settings)
        body_head, _, body_tail = body.partition(_json_string(marker))
        return before_id, after_id, body_head, body_tail
