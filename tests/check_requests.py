"""What Envoy asks extauthz, built one way for every test.

    check_request("/orders/42", token=token, request_id="rid-1")     # an ext_authz CheckRequest
    check_request("/x", headers={"X-Request-Id": "rid"}, host="h")   # headers sent as given
    check_request("/x", header_map=HeaderMap(...), raw_body=b"...")  # Envoy's raw header form
    check_input("/orders/42", token=token)                           # the engine's CheckInput
    ServicerContext(time_remaining=0.6)                               # the gRPC context, a deadline

``headers`` go as given; ``request_id`` sends ``x-request-id`` (unless ``headers`` has one);
``token`` sends ``authorization: Bearer <token>`` (over an authorization header in ``headers``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypedDict, Unpack

from extauthz._pb.envoy.config.core.v3 import base_pb2
from extauthz._pb.envoy.service.auth.v3 import attribute_context_pb2 as ac
from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from extauthz.engine import CheckInput

__all__ = ["Request", "ServicerContext", "check_input", "check_request", "request_headers"]

HOST = "api.example.com"


class Request(TypedDict, total=False):
    """One HTTP request as a test describes it; a missing field is the usual GET on HOST."""

    token: str | None
    method: str
    host: str
    headers: Mapping[str, str] | None
    request_id: str | None
    context_extensions: Mapping[str, str] | None


def request_headers(
    headers: Mapping[str, str] | None = None,
    *,
    token: str | None = None,
    request_id: str | None = None,
) -> dict[str, str]:
    """The request's headers: ``x-request-id``, then ``headers``, then the bearer token."""
    sent = {"x-request-id": request_id} if request_id is not None else {}
    sent.update(headers or {})
    if token is not None:
        sent["authorization"] = f"Bearer {token}"
    return sent


def _headers(request: Request) -> dict[str, str]:
    return request_headers(
        request.get("headers"), token=request.get("token"), request_id=request.get("request_id")
    )


def check_request(
    path: str = "/",
    *,
    header_map: base_pb2.HeaderMap | None = None,
    raw_body: bytes = b"",
    **request: Unpack[Request],
) -> ext.CheckRequest:
    """The CheckRequest for one HTTP request."""
    return ext.CheckRequest(
        attributes=ac.AttributeContext(
            request=ac.AttributeContext.Request(
                http=ac.AttributeContext.HttpRequest(
                    method=request.get("method", "GET"),
                    host=request.get("host", HOST),
                    path=path,
                    headers=_headers(request),
                    header_map=header_map,
                    raw_body=raw_body,
                )
            ),
            context_extensions=dict(request.get("context_extensions") or {}),
        )
    )


def check_input(path: str = "/", **request: Unpack[Request]) -> CheckInput:
    """The same request as the engine takes it (header names lower-cased, as Envoy sends them)."""
    return CheckInput(
        method=request.get("method", "GET"),
        host=request.get("host", HOST),
        raw_path=path,
        headers={name.lower(): value for name, value in _headers(request).items()},
        context_extensions=dict(request.get("context_extensions") or {}),
    )


class ServicerContext:
    """The parts of grpc.aio's ServicerContext the servicer reads, for calling it in-process:
    no metadata, a loopback peer, and no deadline unless ``time_remaining`` is given (what
    Envoy's ``grpc-timeout`` leaves, in seconds)."""

    def __init__(self, time_remaining: float | None = None) -> None:
        self._time_remaining = time_remaining

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def time_remaining(self) -> float | None:
        return self._time_remaining
