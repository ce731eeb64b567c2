"""The token checks of CONTRACT.md §2, as pure functions.

Order: well formed → signature with an allowed algorithm and a known key → exp/nbf with skew →
iss → aud → each verifyClaims entry → route authorization. Every function takes what it needs
(token, policy, keys, ``now``) and returns a value or a :class:`Denial`; none awaits or raises for
a bad token.
"""

from __future__ import annotations

import binascii
import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
import jwt.algorithms

from .config import AuthPolicy, ClaimRule
from .decision import Denial, Reason
from .keys import KeySet, VerificationKey

__all__ = [
    "JwtHeader",
    "check_audience",
    "check_claims",
    "check_issuer",
    "check_rule",
    "check_scope",
    "check_time",
    "claim_text",
    "looks_like_jwt",
    "numeric_date",
    "read_header",
    "scopes_of",
    "verify_signature",
    "verifying_key",
]


@dataclass(frozen=True, slots=True)
class JwtHeader:
    """A JWS parsed once: its header fields, its payload and the bytes the signature covers."""

    alg: str
    kid: str | None
    fields: dict[str, Any] = field(default_factory=dict, repr=False)
    payload: Any = field(default=None, repr=False)
    signing_input: bytes = field(default=b"", repr=False)
    signature: bytes = field(default=b"", repr=False)


_ALGORITHMS = jwt.algorithms.get_default_algorithms()
_URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_SEXTET = {c: i for i, c in enumerate(_URL_ALPHABET)}
# base64url → standard alphabet; the standard-only characters become invalid so that the strict
# decoder refuses them.
_TO_STANDARD = bytes.maketrans(b"-_+/=", b"+/!!!")


def _b64url(segment: str) -> bytes | None:
    """Strict RFC 7515 base64url: the URL-safe alphabet, no padding, canonical trailing bits."""
    rem = len(segment) % 4
    if rem == 1:
        return None
    if rem:
        # The unused low bits of the last character must be zero, or two encodings would decode
        # to the same bytes.
        last = _SEXTET.get(segment[-1])
        if last is None or last & (0b1111 if rem == 2 else 0b11):
            return None
    try:
        standard = segment.encode("ascii").translate(_TO_STANDARD)
        return binascii.a2b_base64(standard + b"=" * ((4 - rem) % 4), strict_mode=True)
    except (binascii.Error, ValueError):  # UnicodeEncodeError is a ValueError
        return None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate member name")
    return out


# Built once: json.loads with a hook builds a decoder (and its scanner) per call.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates)


def _json_object(raw: bytes) -> dict[str, Any] | None:
    """A JSON object from UTF-8 bytes (RFC 7519 §7.2), strictly.

    A duplicate member name makes the JWT invalid here, rather than letting the parser silently
    keep the last value (RFC 7515 §4); a ``\\u`` escape that leaves a lone surrogate, which no
    UTF-8 text can hold, is refused too.
    """
    try:
        value = _DECODER.decode(raw.decode("utf-8"))
        if b"\\u" in raw:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):  # UnicodeError is a ValueError
        return None
    return value if isinstance(value, dict) else None


def looks_like_jwt(token: str) -> bool:
    """A JWS in compact form: three dot-separated parts (RFC 7515 §7.1)."""
    return token.count(".") == 2


_MAX_CACHED_HEAD = 512


def _parse_head(
    head_b64: str, allowed: frozenset[str]
) -> tuple[str, str | None, dict[str, Any]] | Denial:
    """The JOSE header segment: ``(alg, kid, fields)``, or why the token is refused."""
    head_raw = _b64url(head_b64)
    header = _json_object(head_raw) if head_raw is not None else None
    if header is None:
        return Denial(Reason.TOKEN_MALFORMED, "The JWT header is not valid base64url JSON.")
    alg = header.get("alg")
    if not isinstance(alg, str):
        return Denial(Reason.TOKEN_MALFORMED, "The JWT header has no 'alg'.")
    if alg not in allowed:
        return Denial(
            Reason.ALGORITHM_NOT_ALLOWED,
            f"JWT token algorithm '{_printable(alg)}' is not among the allowed algorithms.",
        )
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        return Denial(Reason.TOKEN_MALFORMED, "The JWT header 'kid' is not a string.")
    for name in ("typ", "cty"):
        if name in header and not isinstance(header[name], str):
            return Denial(Reason.TOKEN_MALFORMED, f"The JWT header '{name}' is not a string.")
    if "crit" in header:
        # RFC 7515 §4.1.11: we understand no extension, so any critical one makes it invalid.
        return Denial(
            Reason.TOKEN_MALFORMED, "The JWT header lists critical extensions we do not support."
        )
    if header.get("b64") is False:
        return Denial(Reason.TOKEN_MALFORMED, "Unencoded JWS payloads (b64: false) are refused.")
    return alg, kid, header


_cached_head = functools.lru_cache(maxsize=1024)(_parse_head)


def read_header(token: str, allowed: frozenset[str]) -> JwtHeader | Denial:
    """Parse the whole JWS (strictly) and check its algorithm against the allow-list.

    Keys named by the header itself (``jku``, ``x5u``, ``jwk``, ``x5c``) are ignored: only keys
    from the policy can verify a token.
    """
    if not looks_like_jwt(token):
        return Denial(Reason.TOKEN_MALFORMED, "The token is not a JWT in compact serialization.")
    head_b64, payload_b64, signature_b64 = token.split(".")
    # An IdP signs every token with one of a few headers: each is parsed once.
    head = (
        _cached_head(head_b64, allowed)
        if len(head_b64) <= _MAX_CACHED_HEAD
        else _parse_head(head_b64, allowed)
    )
    if isinstance(head, Denial):
        return head
    alg, kid, header = head
    payload_raw = _b64url(payload_b64)
    signature = _b64url(signature_b64)
    if payload_raw is None or signature is None:
        return Denial(Reason.TOKEN_MALFORMED, "The JWT payload or signature is not base64url.")
    if not signature:
        return Denial(Reason.SIGNATURE_INVALID, "The JWT has an empty signature.")
    payload = _json_object(payload_raw)
    if payload is None:
        return Denial(Reason.TOKEN_MALFORMED, "The JWT payload is not a JSON object.")
    return JwtHeader(
        alg=alg,
        kid=kid,
        fields=header,
        payload=payload,
        signing_input=f"{head_b64}.{payload_b64}".encode(),
        signature=signature,
    )


def verify_signature(token: str, header: JwtHeader, keys: KeySet) -> dict[str, Any] | Denial:
    """Verify with the key named by ``kid`` (or each key for the algorithm when there is no kid).

    The cryptography is pyjwt's (its algorithm objects over ``cryptography``); only the parsing is
    ours, done once in :func:`read_header`.
    """
    if header.payload is None:  # a JwtHeader built by hand, not by read_header
        parsed = read_header(token, frozenset({header.alg}))
        if isinstance(parsed, Denial):
            return parsed
        header = parsed
    key = verifying_key(header, keys)
    if isinstance(key, Denial):
        return key
    return dict(header.payload)


def verifying_key(header: JwtHeader, keys: KeySet) -> VerificationKey | Denial:
    """The key whose signature the token carries, or why there is none."""
    candidates = keys.candidates(header.kid, header.alg)
    if not candidates:
        if header.kid is not None and keys.has_kid(header.kid):
            return Denial(
                Reason.ALGORITHM_NOT_ALLOWED,
                f"The key '{_printable(header.kid)}' cannot verify algorithm '{header.alg}'.",
            )
        named = f"'{_printable(header.kid)}'" if header.kid is not None else "(no kid)"
        return Denial(Reason.KEY_NOT_FOUND, f"No key matches the token's kid {named}.")
    algorithm = _ALGORITHMS[header.alg]
    for candidate in candidates:
        try:
            if algorithm.verify(header.signing_input, candidate.key, header.signature):
                return candidate
        except (ValueError, TypeError, jwt.InvalidKeyError):
            continue
    return Denial(Reason.SIGNATURE_INVALID, "JWT signature verification failed.")


def numeric_date(value: Any) -> float | None:
    """A NumericDate (RFC 7519 §2) as a float, or None: bool, str, NaN, ±Infinity and integers
    too large for a float are not dates."""
    kind = type(value)
    if kind is float:
        return float(value) if math.isfinite(value) else None
    if kind is int:
        try:
            return float(value)
        except OverflowError:  # 10**400: no float, so no date
            return None
    return None


def check_claims(
    claims: Mapping[str, Any],
    policy: AuthPolicy,
    now: float,
    issuers: tuple[str, ...],
    *,
    require_exp: bool = True,
) -> Denial | None:
    """exp/nbf with skew, then iss ∈ ``issuers`` (empty: any), aud and each verifyClaims rule.

    The first failure wins, in the contract's order; ``extauthz explain`` runs the same steps one
    by one to show every result.
    """
    return (
        check_time(claims, policy.clock_skew, now, require_exp=require_exp)
        or check_issuer(claims, issuers)
        or check_audience(claims, policy.audiences)
        or next((d for rule in policy.claims if (d := check_rule(claims, rule))), None)
    )


def check_time(
    claims: Mapping[str, Any], skew: float, now: float, *, require_exp: bool = True
) -> Denial | None:
    """``exp`` and ``nbf`` against ``now`` with ``skew`` seconds of tolerance either way."""
    for name in ("exp", "nbf", "iat"):
        if name in claims and numeric_date(claims[name]) is None:
            return Denial(Reason.TOKEN_MALFORMED, f"The '{name}' claim is not a NumericDate.")
    if "exp" not in claims:
        if require_exp:
            # A JWT access token that never expires is not accepted (RFC 9068 §2.2 requires exp).
            return Denial(Reason.CLAIM_MISSING, "JWT token missing required claim 'exp'.")
    elif now > float(claims["exp"]) + skew:
        return Denial(Reason.TOKEN_EXPIRED, "Validation failed for 'exp' claim.")
    if "nbf" in claims and now + skew < float(claims["nbf"]):
        return Denial(Reason.TOKEN_NOT_YET_VALID, "Validation failed for 'nbf' claim.")
    return None


def check_issuer(claims: Mapping[str, Any], issuers: tuple[str, ...]) -> Denial | None:
    """``iss`` is exactly one of ``issuers``; no issuers configured: not checked."""
    if issuers and claims.get("iss") not in issuers:
        return Denial(Reason.ISSUER_MISMATCH, "JWT token not issued by the configured issuers.")
    return None


def check_audience(claims: Mapping[str, Any], audiences: frozenset[str]) -> Denial | None:
    """``aud`` (a string or an array) shares at least one value with ``audiences``."""
    if not audiences:
        return None
    aud = claims.get("aud")
    auds = aud if isinstance(aud, list) else [aud]
    if any(isinstance(a, str) and a in audiences for a in auds):
        return None
    return Denial(Reason.AUDIENCE_MISMATCH, "JWT token not issued for the configured audience.")


def claim_text(value: Any) -> str:
    """A claim value as the text verifyClaims compares: strings as is, others as JSON text."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def check_rule(claims: Mapping[str, Any], rule: ClaimRule) -> Denial | None:
    """One verifyClaims entry: presence when required, then the values when there are any."""
    value = claims.get(rule.key)
    if value is None:
        if rule.is_required:
            return Denial(Reason.CLAIM_MISSING, f"JWT token missing required claim '{rule.key}'.")
        return None
    if not rule.values:
        return None
    candidates = value if isinstance(value, list) else [value]
    if any(claim_text(c) in rule.values for c in candidates):
        return None
    return Denial(
        Reason.CLAIM_VALUE_MISMATCH,
        f"JWT token does not have the expected claim value for '{rule.key}'.",
    )


def scopes_of(claims: Mapping[str, Any]) -> frozenset[str]:
    """``scope`` as a space-separated string (RFC 8693 §4.2) or an array; ``scp`` as a fallback.

    Only the space separates scopes (RFC 6749 §3.3): "a\u00a0b" or "a\tb" is one scope.
    """
    raw = claims.get("scope", claims.get("scp"))
    if isinstance(raw, str):
        return frozenset(s for s in raw.split(" ") if s)
    if isinstance(raw, list):
        return frozenset(s for s in raw if isinstance(s, str))
    return frozenset()


def check_scope(claims: Mapping[str, Any], allowed_scope: tuple[str, ...]) -> Denial | None:
    """ANY_OF: at least one of ``allowed_scope`` is granted."""
    if scopes_of(claims).intersection(allowed_scope):
        return None
    return Denial(
        Reason.INSUFFICIENT_SCOPE,
        "The token does not grant any of the scopes the route requires.",
    )


def _printable(text: str, limit: int = 64) -> str:
    """Attacker-controlled header text, made safe for a log line."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return cleaned + ("…" if len(text) > limit else "")
