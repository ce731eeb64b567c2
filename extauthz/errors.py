"""Exceptions: only for "we could not decide". A bad token is a Denial value, never an exception.

    ExtauthzError
     ├── ConfigError              the config file cannot be used (every error with its YAML path)
     └── IdpError                 an identity-provider call failed → 500 idp_call_failed
          ├── IdpUnreachable      DNS, connect, TLS or timeout
          │    ├── QueueTimeout   the time ran out queued for a slot: ours, not the IdP's
          │    └── DeadlinePassed the check's deadline had passed: nothing was sent
          ├── IdpBadStatus        a non-2xx answer
          ├── IdpBadResponse      not JSON, or not the JSON shape the endpoint must answer
          └── CircuitOpen         too many recent failures: failing fast

httpx exceptions are translated into these in exactly one place, ``idp/http.py``. Each IdpError
carries its execution-log message (docs/logs.md), which names the endpoint and its URI but never
a token, a secret or a response body; :meth:`IdpError.log_fields` adds what the message cannot
say (the ``detail`` of a timeout or an unusable answer, the cause behind an open circuit), and
:attr:`IdpError.error_type` is the outcome the metric counts it under (docs/metrics.md).
"""

from __future__ import annotations

from .tracing import url_without_userinfo

__all__ = [
    "CHECK_DEADLINE",
    "CONNECT_TIMEOUT",
    "QUEUED",
    "READ_TIMEOUT",
    "CircuitOpen",
    "DeadlinePassed",
    "ExtauthzError",
    "IdpBadResponse",
    "IdpBadStatus",
    "IdpError",
    "IdpUnreachable",
    "QueueTimeout",
]

# The `detail` of a TIMEOUT: which bound ran out, and in which phase of the call.
CONNECT_TIMEOUT = "connect timeout"  # no connection (TCP and TLS) within the time
READ_TIMEOUT = "read timeout"  # connected, but the request and its answer did not finish in time
QUEUED = "queued for a connection slot"  # the endpoint's outstanding-call cap made it wait
CHECK_DEADLINE = "the check's deadline"  # the check had less time left than timeoutSeconds


class ExtauthzError(Exception):
    """Base of everything extauthz raises on purpose."""


class IdpError(ExtauthzError):
    """An identity-provider call failed; ``message`` is the execution-log sentence and
    ``detail`` what the sentence leaves out (never anything the IdP sent verbatim)."""

    endpoint: str  # "jwks_uri" | "discovery" | "introspection_endpoint"
    uri: str
    # Whether it says the IdP failed: the circuit breaker counts it. Not when the queue, the
    # check's deadline or the configuration is what failed.
    idp_at_fault = True

    def __init__(self, endpoint: str, uri: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.uri = uri
        self.message = message
        self.detail = detail

    @property
    def error_type(self) -> str:
        """The metric's ``outcome`` for it: one word of a fixed vocabulary (docs/metrics.md),
        never a class name."""
        return "bad_response"

    @property
    def cause(self) -> str:
        """What happened, in a few words: what an open circuit names as its ``lastCause``."""
        return self.message

    def log_fields(self) -> tuple[tuple[str, str], ...]:
        """The fields its execution-log line carries beside the message: ``endpoint``, ``uri``
        and, when there is one, ``detail``. A URI is configuration or named by a discovery
        document, no secret; a discovered one could still hold ``user:password@`` (RFC 3986
        §3.2.1), which no message or field shows."""
        fields = (("endpoint", self.endpoint), ("uri", url_without_userinfo(self.uri)))
        return (*fields, ("detail", self.detail)) if self.detail else fields


class IdpUnreachable(IdpError):
    def __init__(
        self,
        endpoint: str,
        uri: str,
        kind: str,
        *,
        before_request: bool = False,
        detail: str = "",
    ) -> None:
        super().__init__(
            endpoint,
            uri,
            f"Unable to connect to the {endpoint} uri: {url_without_userinfo(uri)}, {kind}. Make "
            "sure that the URI is accessible from the network of the authorization service.",
            detail,
        )
        self.kind = kind  # TIMEOUT | CONNECTION_REFUSED | DNS_FAILURE | TLS_ERROR
        self.before_request = before_request  # nothing reached the IdP: safe to retry

    @property
    def error_type(self) -> str:
        return self.kind.lower()  # timeout | connection_refused | dns_failure | tls_error

    @property
    def cause(self) -> str:
        return f"{self.kind} ({self.detail})" if self.detail else self.kind


class QueueTimeout(IdpUnreachable):
    """The timeout ran out while the call waited for one of the endpoint's outstanding-call
    slots, or after so long a wait that the IdP had less than its timeout to answer. The check
    fails closed with the same TIMEOUT message, but the breaker does not count it: the queue is
    ours, and a flood of junk tokens must not open the circuit for every other check.

    ``sent``: the call got its slot late and its request went out, so the metric counts that
    attempt as the ``timeout`` it was; otherwise nothing was sent (``queue_timeout``)."""

    idp_at_fault = False

    def __init__(self, endpoint: str, uri: str, *, sent: bool = False) -> None:
        super().__init__(endpoint, uri, "TIMEOUT", detail=QUEUED)
        self.sent = sent

    @property
    def error_type(self) -> str:
        return "timeout" if self.sent else "queue_timeout"


class DeadlinePassed(IdpUnreachable):
    """The check had no time left when the call was to start, so nothing was sent: it fails
    closed with the TIMEOUT message at once, and says nothing about the IdP (the breaker and
    /readyz do not count it)."""

    idp_at_fault = False

    def __init__(self, endpoint: str, uri: str) -> None:
        super().__init__(endpoint, uri, "TIMEOUT", before_request=True, detail=CHECK_DEADLINE)

    @property
    def error_type(self) -> str:
        return "deadline_exceeded"


class IdpBadStatus(IdpError):
    def __init__(self, endpoint: str, uri: str, status: int, phrase: str) -> None:
        super().__init__(
            endpoint,
            uri,
            f"Unexpected response from the {endpoint} uri: {url_without_userinfo(uri)}, "
            f"received ({status}, {phrase}).",
        )
        self.status = status
        self.phrase = phrase  # the standard phrase of the status (RFC 9110 §15), never the IdP's

    @property
    def error_type(self) -> str:
        # The status class, not the status: a fixed, small set of label values (a hostile IdP
        # cannot mint new series), and 4xx (our request or credentials) apart from 5xx (the IdP).
        return f"{self.status // 100}xx" if 100 <= self.status <= 599 else "bad_status"

    @property
    def cause(self) -> str:
        return f"({self.status}, {self.phrase})"


class IdpBadResponse(IdpError):
    def __init__(self, endpoint: str, uri: str, detail: str = "") -> None:
        # `detail`, for operators: what was wrong with the answer, never the answer itself.
        super().__init__(endpoint, uri, "Unable to parse response from Identity Provider", detail)

    @property
    def cause(self) -> str:
        return f"unusable response ({self.detail})" if self.detail else "unusable response"


class CircuitOpen(IdpError):
    """Failing fast; ``last_cause`` is the :attr:`~IdpError.cause` of the failure that opened
    the circuit (or reopened it after a failed probe), empty when the endpoint saw none."""

    def __init__(self, endpoint: str, uri: str, until_rfc3339: str, last_cause: str = "") -> None:
        super().__init__(
            endpoint,
            uri,
            f"Circuit open for the {endpoint} uri: {url_without_userinfo(uri)}; failing fast "
            f"until {until_rfc3339}.",
        )
        self.last_cause = last_cause

    @property
    def error_type(self) -> str:
        return "circuit_open"

    @property
    def cause(self) -> str:
        return "circuit open"

    def log_fields(self) -> tuple[tuple[str, str], ...]:
        fields = super().log_fields()
        return (*fields, ("lastCause", self.last_cause)) if self.last_cause else fields
