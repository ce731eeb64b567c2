"""Finding the token in a request: ``tokenHeader`` + ``tokenAuthScheme``, or ``tokenQueryParam``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from .config import AuthPolicy
from .decision import Denial, Reason

__all__ = ["extract_token", "missing_token", "sent_as_dpop"]

# RFC 6750 §2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MAX_TOKEN_BYTES = 16 * 1024


def extract_token(
    policy: AuthPolicy, headers: Mapping[str, str], raw_path: str
) -> str | Denial | None:
    """The token, a Denial when one is present but unusable, or None when there is none."""
    if policy.token_query_param is not None:
        query = raw_path.split("?", 1)[1] if "?" in raw_path else ""
        values = [
            v for k, v in parse_qsl(query, keep_blank_values=True) if k == policy.token_query_param
        ]
        if not values:
            return None
        if len(values) > 1:
            return Denial(Reason.TOKEN_MALFORMED, "More than one token was sent in the query.")
        return _check_shape(values[0])

    assert policy.token_header is not None
    value = headers.get(policy.token_header)
    if value is None:
        return None
    value = value.strip()
    scheme = policy.token_auth_scheme
    if scheme is None:
        return _check_shape(value) if value else None
    prefix, _, rest = value.partition(" ")
    if prefix.lower() == "dpop" and "DPOP" in policy.sender_constraint:
        # RFC 9449 §7.1: Authorization: DPoP <token>, with a proof in the DPoP header.
        return _check_shape(rest.strip())
    if prefix.lower() != scheme.lower():
        # Another scheme (Basic, DPoP, ...) is not a credential for this policy: RFC 6750 §3.1
        # treats that like a request without a token.
        return None
    return _check_shape(rest.strip())


def sent_as_dpop(policy: AuthPolicy, headers: Mapping[str, str]) -> bool:
    """Whether the token came with the DPoP scheme (RFC 9449 §7.1) under a policy accepting it."""
    if "DPOP" not in policy.sender_constraint or policy.token_header is None:
        return False
    value = headers.get(policy.token_header, "").strip()
    return value.partition(" ")[0].lower() == "dpop"


def _check_shape(token: str) -> str | Denial:
    if not token:
        return Denial(Reason.TOKEN_MALFORMED, "The token is empty.")
    if len(token) > MAX_TOKEN_BYTES:
        return Denial(Reason.TOKEN_MALFORMED, f"The token is longer than {MAX_TOKEN_BYTES} bytes.")
    if not _B64TOKEN.fullmatch(token):
        return Denial(
            Reason.TOKEN_MALFORMED, "The token contains characters a bearer token cannot hold."
        )
    return token


# Authorization schemes a message may name (the IANA HTTP Authentication Scheme Registry, and
# the usual unregistered ones). Any other first word is not quoted: it could be the credential.
_KNOWN_SCHEMES = {
    s.lower(): s
    for s in (
        "Basic", "Bearer", "Digest", "DPoP", "GNAP", "HOBA", "Mutual", "Negotiate", "NTLM",
        "OAuth", "PrivateToken", "SCRAM-SHA-1", "SCRAM-SHA-256", "vapid", "AWS4-HMAC-SHA256",
        "Token", "JWT", "ApiKey", "Api-Key", "Hawk", "MAC", "PoP", "Key",
    )
}  # fmt: skip
# Headers that clients put credentials in, named when the configured one is absent.
_CREDENTIAL_HEADERS = (
    "authorization", "proxy-authorization", "x-access-token", "x-auth-token", "x-api-key",
    "x-api-token", "x-token", "x-id-token", "x-jwt", "x-jwt-assertion", "dpop",
    "x-forwarded-access-token", "x-amzn-oidc-accesstoken",
)  # fmt: skip
_QUERY_CREDENTIALS = ("access_token", "token", "id_token", "api_key")  # RFC 6750 §2.3 and others


def missing_token(
    policy: AuthPolicy, headers: Mapping[str, str], raw_path: str
) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """Why :func:`extract_token` found no token, as the ``token_missing`` message and its log
    fields: what the request carried instead, by scheme and header or parameter name only
    (never a value: it is likely a credential)."""
    if policy.token_query_param is not None:
        where = f"query parameter '{policy.token_query_param}'"
    else:
        where = f"'{policy.token_header}' header"
    message = f"No token was found in the {where}."
    value = headers.get(policy.token_header) if policy.token_header is not None else None
    scheme = policy.token_auth_scheme
    if value is not None and not value.strip():
        return f"{message[:-1]}: it is empty.", ()
    if value is not None and scheme is not None:
        first, space, _ = value.strip().partition(" ")
        named = _KNOWN_SCHEMES.get(first.lower()) if space else None
        if named is not None:
            found = f"it carries a '{named}' credential, not '{scheme}'"
            return f"{message[:-1]}: {found}.", (("foundScheme", named),)
        if space:
            return f"{message[:-1]}: it carries another scheme than '{scheme}'.", ()
        return f"{message[:-1]}: it holds a value without the '{scheme}' scheme.", ()
    others = [h for h in _CREDENTIAL_HEADERS if h != policy.token_header and h in headers]
    if others:
        names = ", ".join(f"'{h}'" for h in others)
        return f"{message[:-1]}; the request has {names} instead.", (("foundHeaders", others),)
    if policy.token_query_param is None and "?" in raw_path:
        query = raw_path.split("?", 1)[1].split("#", 1)[0]
        params = {k for k, _ in parse_qsl(query, keep_blank_values=True)}
        sent = [p for p in _QUERY_CREDENTIALS if p in params]
        if sent:
            names = ", ".join(f"'{p}'" for p in sent)
            found = f"the request has the query parameter {names} instead"
            return f"{message[:-1]}; {found}.", (("foundQueryParams", sent),)
    return message, ()
