"""Exceptions: only for "we could not decide". A bad token is a Denial value, never an exception.

    ExtauthzError
     ├── ConfigError            the config file cannot be used (every error with its YAML path)
     └── IdpError               an identity-provider call failed → 500 idp_call_failed
          ├── IdpUnreachable    DNS, connect, TLS or timeout
          │    └── QueueTimeout the time ran out queued for a slot: ours, not the IdP's
          ├── IdpBadStatus      a non-2xx answer
          ├── IdpBadResponse    not JSON, or not the JSON shape the endpoint must answer
          └── CircuitOpen       too many recent failures: failing fast (issue: resilience)

httpx exceptions are translated into these in exactly one place, ``idp/http.py``. Each IdpError
carries the contract's execution-log message (docs/logs.md), which names the endpoint and its
URI but never a token, a secret or a response body.
"""

from __future__ import annotations

__all__ = [
    "CircuitOpen",
    "ExtauthzError",
    "IdpBadResponse",
    "IdpBadStatus",
    "IdpError",
    "IdpUnreachable",
    "QueueTimeout",
]


class ExtauthzError(Exception):
    """Base of everything extauthz raises on purpose."""


class IdpError(ExtauthzError):
    """An identity-provider call failed; ``message`` is the execution-log sentence."""

    endpoint: str  # "jwks_uri" | "discovery" | "introspection_endpoint"
    uri: str

    def __init__(self, endpoint: str, uri: str, message: str) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.uri = uri
        self.message = message

    @property
    def error_type(self) -> str:
        """A short, stable classification for metrics and spans."""
        return type(self).__name__

    def log_fields(self) -> tuple[tuple[str, str], ...]:
        """The fields its execution-log line carries beside the message: ``endpoint``, and for
        an unusable answer what was wrong with it (never the body itself)."""
        detail: str = getattr(self, "detail", "")
        return (
            (("endpoint", self.endpoint), ("detail", detail))
            if detail
            else (("endpoint", self.endpoint),)
        )


class IdpUnreachable(IdpError):
    def __init__(self, endpoint: str, uri: str, kind: str, *, before_request: bool = False) -> None:
        super().__init__(
            endpoint,
            uri,
            f"Unable to connect to the {endpoint} uri: {uri}, {kind}. Make sure that the URI is "
            "accessible from the network of the authorization service.",
        )
        self.kind = kind  # TIMEOUT | CONNECTION_REFUSED | DNS_FAILURE | TLS_ERROR
        self.before_request = before_request  # nothing reached the IdP: safe to retry

    @property
    def error_type(self) -> str:
        return self.kind


class QueueTimeout(IdpUnreachable):
    """The timeout ran out while the call waited for one of the endpoint's outstanding-call
    slots, or after so long a wait that the IdP had less than its timeout to answer. The check
    fails closed with the same TIMEOUT message, but the breaker does not count it: the queue is
    ours, and a flood of junk tokens must not open the circuit for every other check."""

    def __init__(self, endpoint: str, uri: str) -> None:
        super().__init__(endpoint, uri, "TIMEOUT")

    @property
    def error_type(self) -> str:
        return "queue_timeout"


class IdpBadStatus(IdpError):
    def __init__(self, endpoint: str, uri: str, status: int, phrase: str) -> None:
        super().__init__(
            endpoint,
            uri,
            f"Unexpected response from the {endpoint} uri: {uri}, received ({status}, {phrase}).",
        )
        self.status = status

    @property
    def error_type(self) -> str:
        return str(self.status)


class IdpBadResponse(IdpError):
    def __init__(self, endpoint: str, uri: str, detail: str = "") -> None:
        super().__init__(endpoint, uri, "Unable to parse response from Identity Provider")
        self.detail = detail  # for operators: what was wrong with the shape, never the body


class CircuitOpen(IdpError):
    def __init__(self, endpoint: str, uri: str, until_rfc3339: str) -> None:
        super().__init__(
            endpoint,
            uri,
            f"Circuit open for the {endpoint} uri: {uri}; failing fast until {until_rfc3339}.",
        )
