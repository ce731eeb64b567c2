"""What Envoy asks extauthz, built one way for every test.

    check_request("/orders/42", token=token, request_id="rid-1")     # an ext_authz CheckRequest
    check_request("/x", headers={"X-Request-Id": "rid"}, host="h")   # headers sent as given
    check_request("/x", header_map=[...], raw_body=b"...")           # any other HttpRequest field
    check_input("/orders/42", token=token)                           # the engine's CheckInput

``headers`` go as given; ``request_id`` sends ``x-request-id`` (unless ``headers`` has one);
``token`` sends ``authorization: Bearer <token>`` (over an authorization header in ``headers``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from extauthz._pb.envoy.service.auth.v3 import attribute_context_pb2 as ac
from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from extauthz.engine import CheckInput

__all__ = ["check_input", "check_request", "request_headers"]

HOST = "api.example.com"


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


def check_request(
    path: str = "/",
    *,
    token: str | None = None,
    method: str = "GET",
    host: str = HOST,
    headers: Mapping[str, str] | None = None,
    request_id: str | None = None,
    context_extensions: Mapping[str, str] | None = None,
    **http: Any,
) -> ext.CheckRequest:
    """The CheckRequest for one HTTP request; ``http``: more ``HttpRequest`` fields."""
    return ext.CheckRequest(
        attributes=ac.AttributeContext(
            request=ac.AttributeContext.Request(
                http=ac.AttributeContext.HttpRequest(
                    method=method,
                    host=host,
                    path=path,
                    headers=request_headers(headers, token=token, request_id=request_id),
                    **http,
                )
            ),
            context_extensions=dict(context_extensions or {}),
        )
    )


def check_input(
    path: str = "/",
    *,
    token: str | None = None,
    method: str = "GET",
    host: str = HOST,
    headers: Mapping[str, str] | None = None,
    request_id: str | None = None,
    context_extensions: Mapping[str, str] | None = None,
) -> CheckInput:
    """The same request as the engine takes it (header names lower-cased, as Envoy sends them)."""
    sent = request_headers(headers, token=token, request_id=request_id)
    return CheckInput(
        method=method,
        host=host,
        raw_path=path,
        headers={name.lower(): value for name, value in sent.items()},
        context_extensions=dict(context_extensions or {}),
    )
