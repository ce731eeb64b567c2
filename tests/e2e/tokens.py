"""Tokens from the demo IdP (JWTs read and altered, opaque ones issued and revoked) the way the
end-to-end tests need them.

Nothing here verifies a signature: the tests only need to know what they sent, or to send a token
that is wrong in exactly one way.
"""

from __future__ import annotations

import base64
import json
import time
from typing import TYPE_CHECKING, Any

from tests.waiting import wait_until

if TYPE_CHECKING:  # the fixture's type; conftest is never imported at run time
    from tests.e2e.conftest import IdP

__all__ = [
    "OPAQUE_API",
    "claims_of",
    "header_of",
    "opaque_token",
    "revoked_token",
    "tamper_signature",
    "until_expired",
    "with_header",
]

# The resource the demo IdP issues opaque access tokens for.
OPAQUE_API = "https://opaque.example.com"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64json(part: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return data


def header_of(token: str) -> dict[str, Any]:
    """A JWT's JOSE header."""
    return _b64json(token.split(".")[0])


def claims_of(token: str) -> dict[str, Any]:
    """A JWT's payload."""
    return _b64json(token.split(".")[1])


def with_header(token: str, **fields: str) -> str:
    """The same JWT with these JOSE header fields replaced (its signature no longer matches)."""
    head, payload, signature = token.split(".")
    header = {**_b64json(head), **fields}
    raw = json.dumps(header, separators=(",", ":")).encode()
    return ".".join([_b64url(raw), payload, signature])


def tamper_signature(token: str) -> str:
    """The same JWT with one character in the middle of its signature changed."""
    head, payload, signature = token.split(".")
    middle = len(signature) // 2  # not the last character, whose low bits are only padding
    flipped = "A" if signature[middle] != "A" else "B"
    return ".".join([head, payload, signature[:middle] + flipped + signature[middle + 1 :]])


def until_expired(token: str, *, timeout: float = 10.0) -> str:
    """``token``, once its ``exp`` is a second past (so that the server's clock sees it past too)."""
    exp = claims_of(token)["exp"]
    wait_until(lambda: time.time() > exp + 1, timeout=timeout, what="the short-lived token to expire")
    return token


def opaque_token(idp: IdP, client_id: str = "acme-client", scope: str = "orders.read") -> str:
    """An opaque access token (only the IdP's introspection endpoint can say what it is)."""
    token = idp.token(client_id, resource=OPAQUE_API, scope=scope)
    assert token.count(".") != 2, "expected an opaque token from the IdP, not a JWT"
    return token


def revoked_token(idp: IdP) -> str:
    """An opaque token revoked at the IdP (RFC 7009) by the client it was issued to."""
    token = opaque_token(idp)
    response = idp.http.post(
        f"{idp.issuer}/token/revocation",
        auth=("acme-client", "acme-client-secret"),
        data={"token": token, "token_type_hint": "access_token"},
    )
    assert response.status_code == 200, response.text
    return token
