"""Decisions are values: the engine returns one, the server layer turns it into a CheckResponse.

The table :data:`OUTCOMES` is docs/decisions.md in code: for every reason code the gRPC status,
the HTTP status, the OAuth ``error`` code and the RFC 6750 challenge style. Nothing else decides
those.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import ServerSettings

__all__ = [
    "OUTCOMES",
    "Challenge",
    "Decision",
    "Denial",
    "Outcome",
    "Reason",
    "allow",
    "deny",
    "dry_run",
    "http_status",
    "www_authenticate",
]


class Reason(StrEnum):
    TOKEN_MISSING = "token_missing"
    TOKEN_MALFORMED = "token_malformed"
    SIGNATURE_INVALID = "signature_invalid"
    KEY_NOT_FOUND = "key_not_found"
    ALGORITHM_NOT_ALLOWED = "algorithm_not_allowed"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_NOT_YET_VALID = "token_not_yet_valid"
    ISSUER_MISMATCH = "issuer_mismatch"
    AUDIENCE_MISMATCH = "audience_mismatch"
    CLAIM_MISSING = "claim_missing"
    CLAIM_VALUE_MISMATCH = "claim_value_mismatch"
    TOKEN_INACTIVE = "token_inactive"
    INSUFFICIENT_SCOPE = "insufficient_scope"
    NO_MATCHING_POLICY = "no_matching_policy"
    REQUEST_AMBIGUOUS = "request_ambiguous"
    IDP_CALL_FAILED = "idp_call_failed"
    # RFC 9449 §7.1: a DPoP proof that is missing, malformed, fails a check or was seen before.
    DPOP_PROOF_INVALID = "dpop_proof_invalid"
    # RFC 9449 §6 and RFC 8705 §3: the token's cnf is absent or names another key/certificate.
    TOKEN_BINDING_MISMATCH = "token_binding_mismatch"
    # Not in the contract's table: a bug or an unexpected input in extauthz itself. Fail closed.
    INTERNAL_ERROR = "internal_error"


class Challenge(Enum):
    NONE = 0  # no www-authenticate header
    REALM_ONLY = 1  # RFC 6750 §3.1: no error code when no credentials were sent
    INVALID_TOKEN = 2
    INSUFFICIENT_SCOPE = 3
    DPOP = 4  # RFC 9449 §7.1: the DPoP scheme with error="invalid_dpop_proof" and algs


@dataclass(frozen=True, slots=True)
class Outcome:
    grpc_code: int  # google.rpc.Code
    http_status: int
    error: str  # OAuth error code in the body
    challenge: Challenge


_OK, _INVALID_ARGUMENT, _UNAUTHENTICATED, _PERMISSION_DENIED, _UNAVAILABLE, _INTERNAL = (
    0, 3, 16, 7, 14, 13
)  # fmt: skip

_BAD_TOKEN = Outcome(_UNAUTHENTICATED, 401, "invalid_token", Challenge.INVALID_TOKEN)

OUTCOMES: dict[Reason, Outcome] = {
    Reason.TOKEN_MISSING: Outcome(_UNAUTHENTICATED, 401, "invalid_token", Challenge.REALM_ONLY),
    **{
        r: _BAD_TOKEN
        for r in (
            Reason.TOKEN_MALFORMED,
            Reason.SIGNATURE_INVALID,
            Reason.KEY_NOT_FOUND,
            Reason.ALGORITHM_NOT_ALLOWED,
            Reason.TOKEN_EXPIRED,
            Reason.TOKEN_NOT_YET_VALID,
            Reason.ISSUER_MISMATCH,
            Reason.AUDIENCE_MISMATCH,
            Reason.CLAIM_MISSING,
            Reason.CLAIM_VALUE_MISMATCH,
            Reason.TOKEN_INACTIVE,
            Reason.TOKEN_BINDING_MISMATCH,
        )
    },
    Reason.DPOP_PROOF_INVALID: Outcome(_UNAUTHENTICATED, 401, "invalid_dpop_proof", Challenge.DPOP),
    Reason.INSUFFICIENT_SCOPE: Outcome(
        _PERMISSION_DENIED, 403, "insufficient_scope", Challenge.INSUFFICIENT_SCOPE
    ),
    Reason.NO_MATCHING_POLICY: Outcome(_PERMISSION_DENIED, 403, "access_denied", Challenge.NONE),
    # A path or authority not in normal form: which policy applies would be a guess (RFC 6749
    # §5.2's invalid_request: the request is malformed, not the credentials).
    Reason.REQUEST_AMBIGUOUS: Outcome(_INVALID_ARGUMENT, 400, "invalid_request", Challenge.NONE),
    # The HTTP status is replaced by server.denyStatusOnIdpFailure (500 or 503).
    Reason.IDP_CALL_FAILED: Outcome(_UNAVAILABLE, 500, "server_error", Challenge.NONE),
    Reason.INTERNAL_ERROR: Outcome(_INTERNAL, 500, "server_error", Challenge.NONE),
}


@dataclass(frozen=True, slots=True)
class Denial:
    """Why one check of the pure core failed: a reason code and the execution-log sentence."""

    reason: Reason
    message: str


@dataclass(frozen=True, slots=True)
class Decision:
    """What to answer, and what to say about it in the logs.

    ``message`` is the execution-log sentence (never containing a token or secret); ``event`` the
    execution-log event name, or ``""`` when the decision needs no execution-log line.
    """

    allowed: bool
    reason: Reason | None = None
    deployment: str = ""
    route: str = ""
    event: str = ""
    message: str = ""
    log_fields: tuple[tuple[str, Any], ...] = ()
    upstream_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    metadata: tuple[tuple[str, Any], ...] = ()  # Envoy dynamic metadata on allow, as pairs
    required_scope: tuple[str, ...] = ()
    # For a DPoP challenge: the proof algorithms the policy accepts (RFC 9449 §7.1 algs).
    dpop_algs: tuple[str, ...] = ()
    # enforcement: DRY_RUN: allowed, though ``reason`` says why it would have been denied.
    dry_run: bool = False
    # DYNAMIC_AUTHENTICATION: the server that verified (or refused) the token, by its name.
    auth_server: str = ""


def allow(
    deployment: str,
    route: str,
    *,
    upstream_headers: tuple[tuple[str, str], ...] = (),
    remove_headers: tuple[str, ...] = (),
    metadata: Mapping[str, Any] | None = None,
    auth_server: str = "",
) -> Decision:
    pairs = tuple(metadata.items()) if metadata else ()
    return Decision(
        True,
        None,
        deployment,
        route,
        upstream_headers=upstream_headers,
        remove_headers=remove_headers,
        metadata=pairs,
        auth_server=auth_server,
    )


def deny(
    reason: Reason,
    message: str,
    *,
    deployment: str = "",
    route: str = "",
    event: str = "",
    required_scope: tuple[str, ...] = (),
    log_fields: tuple[tuple[str, Any], ...] = (),
    dpop_algs: tuple[str, ...] = (),
    auth_server: str = "",
) -> Decision:
    return Decision(
        False,
        reason,
        deployment,
        route,
        event,
        message,
        log_fields,
        required_scope=required_scope,
        dpop_algs=dpop_algs,
        auth_server=auth_server,
    )


def www_authenticate(decision: Decision) -> str | None:
    """RFC 6750 §3 challenge for a denial, or None when the outcome has none."""
    assert decision.reason is not None
    challenge = OUTCOMES[decision.reason].challenge
    if challenge is Challenge.NONE:
        return None
    if challenge is Challenge.DPOP:
        # RFC 9449 §7.1: the DPoP scheme, and the proof algorithms the server accepts.
        algs = " ".join(decision.dpop_algs)
        return f'DPoP realm="{decision.deployment}", error="invalid_dpop_proof", algs="{algs}"'
    if challenge is Challenge.REALM_ONLY and decision.dpop_algs:
        # RFC 9449 §7.1: a resource that takes DPoP-bound tokens only says so when none came.
        return f'DPoP realm="{decision.deployment}", algs="{" ".join(decision.dpop_algs)}"'
    realm = f'Bearer realm="{decision.deployment}"'
    if challenge is Challenge.REALM_ONLY:
        # RFC 6750 §3.1: no error code when the request carried no credentials.
        return realm
    if challenge is Challenge.INSUFFICIENT_SCOPE:
        scope = " ".join(decision.required_scope)
        return f'{realm}, error="insufficient_scope", scope="{scope}"'
    return f'{realm}, error="invalid_token"'


def http_status(decision: Decision, settings: ServerSettings) -> int:
    """The HTTP status of a denial; an IdP failure's is the operator's choice (500 or 503)."""
    assert decision.reason is not None
    if decision.reason is Reason.IDP_CALL_FAILED:
        return settings.deny_status_on_idp_failure
    return OUTCOMES[decision.reason].http_status


def dry_run(denial: Decision, remove_headers: tuple[str, ...]) -> Decision:
    """A denial of a ``DRY_RUN`` deployment as what is answered: an allow that keeps the
    denial's reason, execution line and fields for the logs, sets no identity header (removing
    any client-sent copy: none was vouched for), and tells Envoy's metadata it was a dry run."""
    return Decision(
        True,
        denial.reason,
        denial.deployment,
        denial.route,
        denial.event,
        denial.message,
        denial.log_fields,
        remove_headers=remove_headers,
        metadata=(("deployment", denial.deployment), ("route", denial.route), ("dryRun", True)),
        dry_run=True,
        auth_server=denial.auth_server,
    )
