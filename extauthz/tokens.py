"""Finding the token in a request: ``tokenHeader`` + ``tokenAuthScheme``, or ``tokenQueryParam``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import parse_qsl

from .config import AuthPolicy
from .decision import Denial, Reason

__all__ = ["extract_token"]

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
    if prefix.lower() != scheme.lower():
        # Another scheme (Basic, DPoP, ...) is not a credential for this policy: RFC 6750 §3.1
        # treats that like a request without a token.
        return None
    return _check_shape(rest.strip())


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
