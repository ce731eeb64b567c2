"""The token checks, as pure functions that return step values.

Order: well formed → signature with an allowed algorithm and a known key → exp/nbf with skew →
iss → aud → each verifyClaims entry → route authorization. Every check takes what it needs
(token, policy, keys, ``now``) and returns a :class:`~extauthz.steps.Step`: what it compared and
the denial it causes; none awaits or raises for a bad token. The engine runs them in order and
``extauthz explain`` prints the same steps, so the two cannot disagree.
"""

from __future__ import annotations

import binascii
import functools
import json
import math
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import jwt
import jwt.algorithms

from .config import AuthPolicy, ClaimRule
from .decision import Denial, Reason
from .keys import KeySet, VerificationKey
from .steps import Step, checked, first_denial, skipped

__all__ = [
    "NOT_COMPACT",
    "ParsedJws",
    "algorithm_step",
    "audience_step",
    "check_claims",
    "check_scope",
    "claim_steps",
    "claim_text",
    "failure_fields",
    "format_step",
    "issuer_step",
    "key_steps",
    "looks_like_jwt",
    "numeric_date",
    "parse_jws",
    "read_header",
    "rule_step",
    "scope_step",
    "scopes_of",
    "time_steps",
    "verify_signature",
    "verifying_key",
]


_NO_FIELDS: Mapping[str, Any] = MappingProxyType({})


class ParsedJws(NamedTuple):
    """A compact JWS read once, strictly, with what is wrong with it in the checks' order.

    ``before_alg`` is a problem found before the algorithm can be read (the header is not JSON,
    has no ``alg``); ``after_alg`` the first problem after it (``kid`` not a string, ``crit``,
    the payload, an empty signature). The algorithm itself is checked against each policy's
    allow-list by :meth:`denial`, so one parse serves every policy.
    """

    alg: str | None
    kid: str | None
    fields: Mapping[str, Any] = _NO_FIELDS
    payload: dict[str, Any] | None = None
    signing_input: bytes = b""
    signature: bytes = b""
    before_alg: Denial | None = None
    after_alg: Denial | None = None

    def __repr__(self) -> str:
        # Never the payload or the signature: with the header they are the token itself.
        return f"ParsedJws(alg={self.alg!r}, kid={self.kid!r})"

    def denial(self, allowed: frozenset[str]) -> Denial | None:
        """Why a policy allowing ``allowed`` refuses the token before any key is looked at."""
        return self.before_alg or _algorithm_denial(self.alg, allowed) or self.after_alg

    @property
    def shape(self) -> Denial | None:
        """What is wrong with the token's form, apart from its algorithm and its signature."""
        if self.before_alg is not None:
            return self.before_alg
        after = self.after_alg
        return after if after is not None and after.reason is not Reason.SIGNATURE_INVALID else None


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


def _algorithm_denial(alg: str | None, allowed: frozenset[str]) -> Denial | None:
    if alg is None or alg in allowed:
        return None
    return Denial(
        Reason.ALGORITHM_NOT_ALLOWED,
        f"JWT token algorithm '{_printable(alg)}' is not among the allowed algorithms.",
    )


_MAX_CACHED_HEAD = 512
_Head = tuple[str | None, str | None, dict[str, Any], Denial | None, Denial | None]


def _parse_head(head_b64: str) -> _Head:
    """The JOSE header segment: ``(alg, kid, fields, before_alg, after_alg)``."""
    head_raw = _b64url(head_b64)
    header = _json_object(head_raw) if head_raw is not None else None
    if header is None:
        return None, None, {}, _malformed("The JWT header is not valid base64url JSON."), None
    alg = header.get("alg")
    if not isinstance(alg, str):
        return None, None, header, _malformed("The JWT header has no 'alg'."), None
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        return alg, None, header, None, _malformed("The JWT header 'kid' is not a string.")
    for name in ("typ", "cty"):
        if name in header and not isinstance(header[name], str):
            return alg, kid, header, None, _malformed(f"The JWT header '{name}' is not a string.")
    if "crit" in header:
        # RFC 7515 §4.1.11: we understand no extension, so any critical one makes it invalid.
        problem = _malformed("The JWT header lists critical extensions we do not support.")
        return alg, kid, header, None, problem
    if header.get("b64") is False:
        problem = _malformed("Unencoded JWS payloads (b64: false) are refused.")
        return alg, kid, header, None, problem
    return alg, kid, header, None, None


# An IdP signs every token with one of a few headers: each is parsed once.
_cached_head = functools.lru_cache(maxsize=1024)(_parse_head)


def _malformed(message: str) -> Denial:
    return Denial(Reason.TOKEN_MALFORMED, message)


NOT_COMPACT = _malformed("The token is not a JWT in compact serialization.")


def parse_jws(token: str) -> ParsedJws:
    """Parse a compact JWS strictly; what is wrong with it is kept on the result, in order.

    Keys named by the header itself (``jku``, ``x5u``, ``jwk``, ``x5c``) are ignored: only keys
    from the policy can verify a token.
    """
    if not looks_like_jwt(token):
        return ParsedJws(None, None, before_alg=NOT_COMPACT)
    head_b64, payload_b64, signature_b64 = token.split(".")
    head = _cached_head(head_b64) if len(head_b64) <= _MAX_CACHED_HEAD else _parse_head(head_b64)
    alg, kid, header, before, after = head
    if before is not None or after is not None:
        return ParsedJws(alg, kid, header, before_alg=before, after_alg=after)
    payload_raw = _b64url(payload_b64)
    signature = _b64url(signature_b64)
    if payload_raw is None or signature is None:
        problem = _malformed("The JWT payload or signature is not base64url.")
        return ParsedJws(alg, kid, header, after_alg=problem)
    if not signature:
        problem = Denial(Reason.SIGNATURE_INVALID, "The JWT has an empty signature.")
        return ParsedJws(alg, kid, header, _json_object(payload_raw), after_alg=problem)
    payload = _json_object(payload_raw)
    if payload is None:
        problem = _malformed("The JWT payload is not a JSON object.")
        return ParsedJws(alg, kid, header, after_alg=problem)
    return ParsedJws(alg, kid, header, payload, f"{head_b64}.{payload_b64}".encode(), signature)


def read_header(token: str, allowed: frozenset[str]) -> ParsedJws | Denial:
    """The parsed JWS when a policy allowing ``allowed`` can go on to its key, else why not."""
    parsed = parse_jws(token)
    denial = parsed.denial(allowed)
    return parsed if denial is None else denial


# -- the JWT's own steps: format, alg, kid, signature -------------------------------------------


def format_step(parsed: ParsedJws) -> Step:
    """The token is a compact JWS whose parts read strictly (the algorithm aside)."""
    problem = parsed.shape
    if problem is not None:
        return checked("format", problem)
    return checked("format", None, actual=parsed.fields)


def algorithm_step(parsed: ParsedJws, allowed: frozenset[str]) -> Step:
    denial = _algorithm_denial(parsed.alg, allowed)
    return checked("alg", denial, actual=parsed.alg, expected=allowed)


def _no_key(kid: str | None) -> Denial:
    named = f"'{_printable(kid)}'" if kid is not None else "(no kid)"
    return Denial(Reason.KEY_NOT_FOUND, f"No key matches the token's kid {named}.")


def key_steps(
    parsed: ParsedJws, keys: KeySet, *, blocked: Denial | None = None
) -> tuple[Step, Step, VerificationKey | None]:
    """The ``kid`` and ``signature`` steps, and the key that verified the token (or None).

    ``blocked``: the token is already refused (an algorithm not allowed, an empty signature);
    its kid is still looked up, for the record, but nothing is verified.
    """
    kid, alg = parsed.kid, parsed.alg
    facts = (("keys", keys),)  # the kids it has, should a report show them
    if blocked is not None:
        unknown = _no_key(kid) if kid is not None and not keys.has_kid(kid) else None
        kid_step = checked("kid", unknown, actual=kid, facts=facts)
        if blocked.reason is Reason.SIGNATURE_INVALID:
            return kid_step, checked("signature", blocked, actual=kid), None
        return kid_step, skipped("signature", "the algorithm is not allowed"), None
    assert alg is not None
    candidates = keys.candidates(kid, alg)
    if not candidates:
        if kid is not None and keys.has_kid(kid):
            denial = Denial(
                Reason.ALGORITHM_NOT_ALLOWED,
                f"The key '{_printable(kid)}' cannot verify algorithm '{alg}'.",
            )
        else:
            denial = _no_key(kid)
        kid_step = checked("kid", denial, actual=kid, facts=facts)
        return kid_step, skipped("signature", "no key to verify with"), None
    kid_step = checked("kid", None, actual=kid, facts=facts)
    algorithm = _ALGORITHMS[alg]
    for candidate in candidates:
        try:
            if algorithm.verify(parsed.signing_input, candidate.key, parsed.signature):
                return kid_step, checked("signature", None, actual=kid, expected=alg), candidate
        except (ValueError, TypeError, jwt.InvalidKeyError):
            continue
    denial = Denial(Reason.SIGNATURE_INVALID, "JWT signature verification failed.")
    return kid_step, checked("signature", denial, actual=kid, expected=alg), None


def verifying_key(parsed: ParsedJws, keys: KeySet) -> VerificationKey | Denial:
    """The key whose signature the token carries, or why there is none."""
    kid_step, signature_step, key = key_steps(parsed, keys)
    if key is not None:
        return key
    denial = first_denial((kid_step, signature_step))
    assert denial is not None
    return denial


def verify_signature(token: str, parsed: ParsedJws, keys: KeySet) -> dict[str, Any] | Denial:
    """The verified claims, or why the signature does not hold. The cryptography is pyjwt's
    (its algorithm objects over ``cryptography``); only the parsing is ours."""
    key = verifying_key(parsed, keys)
    if isinstance(key, Denial):
        return key
    assert parsed.payload is not None
    return dict(parsed.payload)


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


# -- the claims' steps: exp, nbf, iat, iss, aud, each verifyClaims entry, scope ----------------


def time_steps(
    claims: Mapping[str, Any], skew: float, now: float, *, require_exp: bool = True
) -> list[Step]:
    """``exp`` and ``nbf`` against ``now`` with ``skew`` seconds of tolerance either way, and
    ``iat`` when it is not a date. A date that is not a NumericDate fails before any date is
    compared, so those steps come first."""
    facts = (("now", now), ("skewSeconds", skew))
    steps: list[Step] = []
    if "exp" not in claims:
        if require_exp:
            # A JWT access token that never expires is not accepted (RFC 9068 §2.2 requires exp).
            missing = Denial(Reason.CLAIM_MISSING, "JWT token missing required claim 'exp'.")
            steps.append(checked("exp", missing, note="absent"))
        else:
            steps.append(skipped("exp", "no exp in the introspection answer (optional)"))
    else:
        steps.append(_date_step("exp", claims["exp"], skew, now, facts))
    if "nbf" not in claims:
        steps.append(skipped("nbf", "no nbf claim"))
    else:
        steps.append(_date_step("nbf", claims["nbf"], skew, now, facts))
    if "iat" in claims and numeric_date(claims["iat"]) is None:  # its value is not checked
        steps.append(checked("iat", _not_a_date("iat"), actual=claims["iat"]))
    malformed = [s for s in steps if s.denial is not None and s.denial.reason is _MALFORMED]
    if not malformed or malformed == steps[: len(malformed)]:
        return steps
    return malformed + [s for s in steps if s not in malformed]


_MALFORMED = Reason.TOKEN_MALFORMED


def _not_a_date(name: str) -> Denial:
    return Denial(Reason.TOKEN_MALFORMED, f"The '{name}' claim is not a NumericDate.")


def _date_step(
    name: str, value: Any, skew: float, now: float, facts: tuple[tuple[str, Any], ...]
) -> Step:
    date = numeric_date(value)
    denial: Denial | None = None
    if date is None:
        denial = _not_a_date(name)
    elif name == "exp" and now > date + skew:
        denial = Denial(Reason.TOKEN_EXPIRED, "Validation failed for 'exp' claim.")
    elif name == "nbf" and now + skew < date:
        denial = Denial(Reason.TOKEN_NOT_YET_VALID, "Validation failed for 'nbf' claim.")
    return checked(name, denial, actual=value, facts=facts)


def issuer_step(claims: Mapping[str, Any], issuers: tuple[str, ...]) -> Step:
    """``iss`` is exactly one of ``issuers`` (no trailing-slash or case folding); none
    configured: not checked."""
    if not issuers:
        return skipped("iss", "no issuers configured: any issuer is accepted")
    iss = claims.get("iss")
    wrong = None
    if iss not in issuers:
        wrong = Denial(Reason.ISSUER_MISMATCH, "JWT token not issued by the configured issuers.")
    return checked("iss", wrong, actual=iss, expected=issuers)


def audience_step(claims: Mapping[str, Any], audiences: frozenset[str]) -> Step:
    """``aud`` (a string or an array) shares at least one value with ``audiences``."""
    if not audiences:
        return skipped("aud", "no audiences configured: any audience is accepted")
    aud = claims.get("aud")
    auds = aud if isinstance(aud, list) else ([] if aud is None else [aud])
    wrong = None
    if not any(isinstance(a, str) and a in audiences for a in auds):
        wrong = Denial(
            Reason.AUDIENCE_MISMATCH, "JWT token not issued for the configured audience."
        )
    return checked("aud", wrong, actual=auds, expected=audiences)


def claim_text(value: Any) -> str:
    """A claim value as the text verifyClaims compares: strings as is, others as JSON text."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def rule_step(claims: Mapping[str, Any], rule: ClaimRule) -> Step:
    """One verifyClaims entry: presence when required, then the values when there are any."""
    name = f"claim {rule.key}"
    value = claims.get(rule.key)
    compared = (
        None
        if value is None
        else [claim_text(v) for v in value]
        if isinstance(value, list)
        else claim_text(value)
    )
    facts = (("isRequired", rule.is_required), ("compared", compared))
    denial: Denial | None = None
    if value is None:
        if rule.is_required:
            missing = f"JWT token missing required claim '{rule.key}'."
            denial = Denial(Reason.CLAIM_MISSING, missing)
    elif rule.values:
        candidates = compared if isinstance(compared, list) else [compared]
        if not any(c in rule.values for c in candidates):
            mismatch = f"JWT token does not have the expected claim value for '{rule.key}'."
            denial = Denial(Reason.CLAIM_VALUE_MISMATCH, mismatch)
    return checked(name, denial, actual=value, expected=rule.values, facts=facts)


def claim_steps(
    claims: Mapping[str, Any],
    policy: AuthPolicy,
    now: float,
    issuers: tuple[str, ...] | Step,
    *,
    require_exp: bool = True,
) -> Iterator[Step]:
    """exp/nbf with skew, then iss ∈ ``issuers`` (empty: any), aud and each verifyClaims rule,
    in the documented order, lazily: the server stops at the first failure. ``issuers`` may be
    the ``iss`` step itself, when the issuers could not be had."""
    yield from time_steps(claims, policy.clock_skew, now, require_exp=require_exp)
    yield issuers if isinstance(issuers, Step) else issuer_step(claims, issuers)
    yield audience_step(claims, policy.audiences)
    for rule in policy.claims:
        yield rule_step(claims, rule)


def check_claims(
    claims: Mapping[str, Any],
    policy: AuthPolicy,
    now: float,
    issuers: tuple[str, ...],
    *,
    require_exp: bool = True,
) -> Denial | None:
    """The first failure of :func:`claim_steps`."""
    return first_denial(claim_steps(claims, policy, now, issuers, require_exp=require_exp))


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


_NOT_REQUIRED = {
    "ANONYMOUS": "the route is ANONYMOUS: a token that is sent is still validated",
    "AUTHENTICATION_ONLY": "the route is AUTHENTICATION_ONLY: no scope required",
}


def scope_step(
    claims: Mapping[str, Any], authorization: str, allowed_scope: tuple[str, ...]
) -> Step:
    """ANY_OF: at least one of ``allowed_scope`` is granted; other authorizations need none."""
    if authorization != "ANY_OF":
        return skipped("scope", _NOT_REQUIRED[authorization])
    granted = scopes_of(claims)
    denial = None
    if not granted.intersection(allowed_scope):
        missing = "The token does not grant any of the scopes the route requires."
        denial = Denial(Reason.INSUFFICIENT_SCOPE, missing)
    return checked("scope", denial, actual=granted, expected=allowed_scope)


def check_scope(claims: Mapping[str, Any], allowed_scope: tuple[str, ...]) -> Denial | None:
    """ANY_OF: at least one of ``allowed_scope`` is granted."""
    return scope_step(claims, "ANY_OF", allowed_scope).denial


def _printable(text: str, limit: int = 64) -> str:
    """Attacker-controlled header text, made safe for a log line."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return cleaned + ("…" if len(text) > limit else "")


# -- what a failure line says beside its message -------------------------------------------------

# A value read from a token is cut before it is logged: a 16 KiB token must not make a 16 KiB
# line, and one claim must not hide the others.
_MAX_LOGGED_CHARS = 256
_MAX_LOGGED_ITEMS = 16


def _loggable(value: Any) -> Any:
    """A value read from a token, as a log field: strings and numbers as they are (cut), an
    array as at most 16 of its items, anything else as its JSON text (cut)."""
    if isinstance(value, bool) or value is None or isinstance(value, int | float):
        return value
    if isinstance(value, str):
        return value if len(value) <= _MAX_LOGGED_CHARS else f"{value[:_MAX_LOGGED_CHARS]}…"
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else list(value)
        return [_loggable(v) for v in items[:_MAX_LOGGED_ITEMS]]
    return _loggable(claim_text(value))


def _kids(keys: Any) -> list[str | None]:
    return sorted((k.kid for k in keys.keys), key=str) if isinstance(keys, KeySet) else []


def failure_fields(step: Step, *, claim_values: bool) -> tuple[tuple[str, Any], ...]:
    """The two sides a failed step compared, as the fields of its execution-log line: read from
    the step itself, the values ``explain`` prints, never computed again. A verifyClaims rule's
    values are included only with ``claim_values`` (``server.logClaimValues``): they may be
    personal data. Configured values (issuers, audiences, scopes) are not secrets."""
    name, actual, expected = step.name, step.actual, step.expected
    fields: list[tuple[str, Any]]
    if name == "iss":
        fields = [("tokenIss", _loggable(actual)), ("issuers", list(expected or ()))]
    elif name == "aud":
        fields = [("tokenAud", _loggable(actual)), ("audiences", sorted(expected or ()))]
    elif name in ("exp", "nbf", "iat"):
        fields = [(name, _loggable(actual)), ("now", step.fact("now"))]
        fields.append(("skewSeconds", step.fact("skewSeconds")))
    elif name == "scope":
        fields = [("tokenScopes", _loggable(actual)), ("requiredScopes", list(expected or ()))]
    elif name == "alg":
        fields = [("alg", _loggable(actual)), ("allowedAlgorithms", sorted(expected or ()))]
    elif name == "kid":
        fields = [("kid", _loggable(actual)), ("knownKids", _kids(step.fact("keys")))]
    elif name == "signature":
        fields = [("kid", _loggable(actual)), ("alg", expected)]
    elif name.startswith(("dpop", "cnf")):
        # The sender-constraint steps (extauthz.dpop) keep what they compared as facts, and
        # never the proof or the token.
        fields = [(k, _loggable(v)) for k, v in step.facts]
    elif name.startswith("claim "):
        fields = [("claim", name.removeprefix("claim "))]
        if claim_values:
            fields.append(("claimValue", _loggable(actual)))
            fields.append(("expectedValues", list(expected or ())))
    else:
        fields = []
    return tuple((k, v) for k, v in fields if v is not None)
