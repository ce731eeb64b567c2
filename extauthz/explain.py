"""``extauthz explain``: one token against the exact policy the server applies, every check shown.

Two things are computed, and kept apart:

* the **checks**: the pure functions of :mod:`extauthz.validation`, run one at a time on the
  policy that :func:`~extauthz.routing.select_route` picks, so that every result is shown (the
  server stops at the first failure);
* the **decision**: not re-derived, but what :meth:`Engine.check <extauthz.engine.Engine.check>`
  returns for a :class:`~extauthz.engine.CheckInput` built from the command line, with the same
  providers the server builds. Only with ``--offline`` and remote keys, where the engine cannot
  run without the network, is it composed from the same pure functions minus the signature, and
  it says so.

:func:`explain` computes an :class:`Explanation`; :func:`render_text` and :func:`to_json` format
it; the CLI prints. The token is never part of the output: it is named by the first 8 hex
characters of its SHA-256, and every value read from it is shown JSON-escaped.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, cast
from urllib.parse import quote

import httpx

from .config import AuthPolicy, ClaimRule, Config, ConfigError, Deployment, KeySource
from .decision import OUTCOMES, Decision, Denial, Reason, allow, deny
from .engine import CheckInput, Engine
from .errors import ExtauthzError, IdpError
from .idp import DeploymentIdp, Providers, StaticKeysProvider
from .idp.http import TlsSettings, make_client
from .idp.introspection import IntrospectionClient
from .keys import KeySet
from .logs import token_hash
from .response import http_status, www_authenticate
from .routing import Selection, select
from .tokens import extract_token
from .validation import (
    JwtHeader,
    check_audience,
    check_claims,
    check_issuer,
    check_rule,
    check_scope,
    check_time,
    claim_text,
    looks_like_jwt,
    read_header,
    scopes_of,
    verify_signature,
)

__all__ = [
    "CheckLine",
    "ExplainRequest",
    "Explanation",
    "UsageError",
    "Verdict",
    "build_input",
    "clean_token",
    "explain",
    "render_text",
    "to_json",
]

Result = Literal["PASS", "FAIL", "SKIP"]


@dataclass(frozen=True, slots=True)
class ExplainRequest:
    """The command line: a token and the request it would come with."""

    token: str = field(repr=False)  # never in a repr, a log or a traceback
    deployment: str | None = None  # like Envoy's context_extensions `deployment`
    path: str | None = None  # default: the named (or only) deployment's pathPrefix
    method: str = "GET"
    host: str | None = None  # default: that deployment's first exact host, else ""
    offline: bool = False


@dataclass(frozen=True, slots=True)
class CheckLine:
    """One check: its result, a one-line ``detail`` with the values compared, and for a failure
    the reason code and execution-log sentence the server would use for it."""

    name: str
    result: Result
    detail: str
    reason: Reason | None = None
    message: str | None = None
    facts: Mapping[str, Any] = field(default_factory=dict)  # expected / actual, for --json


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer the server gives, rendered through the contract's table (CONTRACT.md §3)."""

    allowed: bool | None  # None: cannot be decided offline (the IdP must introspect the token)
    exact: bool  # True: computed by Engine.check itself
    note: str
    deployment: str = ""
    route: str = ""
    status: int | None = None  # HTTP status of a denial; None when allowed (the upstream answers)
    reason: str | None = None
    error: str | None = None
    www_authenticate: str | None = None
    event: str = ""
    message: str = ""
    log_fields: tuple[tuple[str, str], ...] = ()
    upstream_headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Explanation:
    token_id: str  # first 8 hex characters of the token's SHA-256
    token_kind: Literal["jwt", "opaque"]
    request: CheckInput = field(repr=False)  # its headers hold the token: never render them
    offline: bool
    selection: Selection | None
    checks: tuple[CheckLine, ...]
    claims_verified: bool
    verdict: Verdict
    notes: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        """0 allowed, 1 denied (or undecided: not known to be allowed)."""
        return 0 if self.verdict.allowed else 1


class UsageError(ExtauthzError):
    """The command line names something the config does not have."""


class _NeedsNetwork(Exception):
    """Raised by the offline stand-ins when the engine reaches for keys or introspection."""


# --------------------------------------------------------------------------------------------
# The request, as Envoy would send it
# --------------------------------------------------------------------------------------------


def clean_token(text: str) -> tuple[str, str | None]:
    """The token without surrounding blanks or a pasted ``Bearer`` prefix, and a note if cut."""
    token = text.strip()
    m = re.match(r"(?i)^bearer\s+", token)
    if m and " " not in token[m.end() :]:
        return token[m.end() :], "A leading 'Bearer ' was removed from the token given."
    return token, None


def build_input(config: Config, req: ExplainRequest) -> CheckInput:
    """The CheckInput Envoy would send for this token: the token sits where the governing
    policy expects it (``tokenHeader`` with ``tokenAuthScheme``, or ``tokenQueryParam``)."""
    named: Deployment | None = None
    context: dict[str, str] = {}
    if req.deployment is not None:
        named = config.by_name.get(req.deployment)
        if named is None:
            known = ", ".join(d.name for d in config.deployments)
            raise UsageError(f"--deployment {req.deployment!r}: no such deployment ({known})")
        context["deployment"] = req.deployment
    # Without --path: the deployment's own prefix (the named one, or the only one there is).
    default = named or (config.deployments[0] if len(config.deployments) == 1 else None)
    if req.path is None and default is None:
        raise UsageError(
            f"the config has {len(config.deployments)} deployments: give --path (and --host) "
            "as the request has them, or --deployment"
        )
    method = (req.method or "GET").upper()
    path = req.path if req.path is not None else default.path_prefix if default else "/"
    if not path.startswith("/"):
        path = "/" + path
    host = req.host
    if host is None:
        host = next((h for h in default.hosts if not h.startswith("*.")), "") if default else ""
    # Selection never depends on the token, so it tells where the token must go.
    found = select(config, authority=host, raw_path=path, method=method, context_extensions=context)
    selection = found if isinstance(found, Selection) else None
    headers: dict[str, str] = {}
    raw_path = path
    if selection is not None and selection.deployment.auth.token_query_param is not None:
        sep = "&" if "?" in path else "?"
        param = selection.deployment.auth.token_query_param
        raw_path = f"{path}{sep}{quote(param, safe='')}={quote(req.token, safe='')}"
    elif selection is not None:
        auth = selection.deployment.auth
        assert auth.token_header is not None
        scheme = auth.token_auth_scheme
        headers[auth.token_header] = f"{scheme} {req.token}" if scheme else req.token
    else:
        headers["authorization"] = f"Bearer {req.token}"
    return CheckInput(
        method=method, host=host, raw_path=raw_path, headers=headers, context_extensions=context
    )


# --------------------------------------------------------------------------------------------
# Providers: the server's, or offline stand-ins
# --------------------------------------------------------------------------------------------


class _OfflineKeys:
    async def keyset(self, kid: str | None) -> KeySet:
        raise _NeedsNetwork

    async def issuers(self) -> tuple[str, ...]:
        raise _NeedsNetwork


class _OfflineIntrospection:
    async def introspect(self, token: str) -> dict[str, Any] | None:
        raise _NeedsNetwork


def _introspects(source: KeySource) -> bool:
    return source.type == "REMOTE_INTROSPECTION" or (
        source.type == "REMOTE_DISCOVERY" and source.client is not None
    )


def _offline_idp(deployment: Deployment) -> DeploymentIdp:
    """What the engine gets with ``--offline``: static keys work; anything remote raises."""
    auth = deployment.auth
    if auth.keys.type == "STATIC_KEYS":
        static = StaticKeysProvider(auth.keys, auth.issuers)
        return DeploymentIdp(static, None, static.issuers)

    async def issuers() -> tuple[str, ...]:
        if auth.issuers or auth.keys.type != "REMOTE_DISCOVERY":
            return auth.issuers
        raise _NeedsNetwork  # the discovery document names the issuer

    keys = None if auth.keys.type == "REMOTE_INTROSPECTION" else _OfflineKeys()
    introspection = (
        # Duck-typed stand-in: the engine only calls introspect().
        cast(IntrospectionClient, _OfflineIntrospection()) if _introspects(auth.keys) else None
    )
    return DeploymentIdp(keys, introspection, issuers)


def _online_providers(
    config: Config,
    deployment: Deployment,
    client_factory: Callable[[TlsSettings], httpx.AsyncClient],
) -> Providers:
    """The server's providers for the one deployment in question (other deployments' client
    secrets need not be readable here)."""
    index = config.deployments.index(deployment)
    only = dataclasses.replace(
        config, deployments=(deployment,), by_name={deployment.name: deployment}
    )
    try:
        return Providers(only, client_factory=client_factory)
    except ConfigError as exc:
        here, there = "deployments[0].", f"deployments[{index}]."
        raise ConfigError([e.replace(here, there, 1) for e in exc.errors]) from None


# --------------------------------------------------------------------------------------------
# Formatting values
# --------------------------------------------------------------------------------------------

_MAX_VALUE_CHARS = 160


def _j(value: Any) -> str:
    """A value as JSON text: token-sourced strings are escaped, so nothing can reach the terminal
    raw, and long values are shortened."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    text = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 1] + "…"


def _jl(values: Any) -> str:
    return _j(sorted(values) if isinstance(values, set | frozenset) else list(values))


def _time(epoch: float) -> str:
    try:
        return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return _j(epoch)


def _span(seconds: float) -> str:
    """A duration for a person: 12s, 3m12s, 14m, 2h05m, 3d04h."""
    s = int(abs(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s" if m < 10 and s else f"{m}m"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m" if m else f"{h}h"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h" if h else f"{d}d"


def _seconds(skew: float) -> str:
    return f"{skew:g}s"


def _unverified_part(token: str, index: int) -> dict[str, Any] | None:
    """Header (0) or payload (1) of a compact JWS, read without any check, or None."""
    try:
        part = token.split(".")[index]
        data = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (IndexError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------------
# The checks, one by one
# --------------------------------------------------------------------------------------------


def _fail(name: str, detail: str, denial: Denial, **facts: Any) -> CheckLine:
    return CheckLine(name, "FAIL", detail, denial.reason, denial.message, facts)


def _policy_line(inp: CheckInput, selection: Selection | Denial | None) -> CheckLine:
    if isinstance(selection, Denial):
        return _fail("policy", f"{inp.method} {inp.host} {inp.path}: ambiguous", selection)
    if selection is None:
        named = inp.context_extensions.get("deployment")
        why = f"deployment {_j(named)}" if named else f"host {_j(inp.host)}"
        detail = f"no deployment or route matches {inp.method} {inp.path} ({why})"
        return CheckLine(
            "policy",
            "FAIL",
            detail,
            Reason.NO_MATCHING_POLICY,
            f"No deployment or route policy matches {inp.method} {inp.path}.",
            {"method": inp.method, "host": inp.host, "path": inp.path},
        )
    d, r = selection.deployment, selection.route
    where = f"{d.path_prefix}{r.template if r else ''}".replace("//", "/")
    methods = ",".join(sorted(r.methods)) if r and r.methods else "any method"
    authz = selection.authorization
    scope = f" {_jl(r.allowed_scope)}" if r and r.allowed_scope else ""
    keys = d.auth.keys
    source = keys.type + (f" {keys.uri}" if keys.uri else "")
    detail = (
        f"deployment {_j(d.name)}, route {_j(selection.route_name)} ({methods} {where}), "
        f"{authz}{scope}; {source}"
    )
    return CheckLine(
        "policy",
        "PASS",
        detail,
        facts={
            "deployment": d.name,
            "route": selection.route_name,
            "authorization": authz,
            "allowedScope": list(r.allowed_scope) if r else [],
            "validation": keys.type,
            "uri": keys.uri,
        },
    )


def _key_source(keys: KeySource) -> str:
    if keys.type == "STATIC_KEYS":
        return "the static keys"
    if keys.type == "REMOTE_DISCOVERY":
        return f"the JWKS named by {keys.uri}"
    return f"the JWKS at {keys.uri}"


@dataclass
class _Claims:
    values: Mapping[str, Any] | None = None
    verified: bool = False
    introspected: bool = False


async def _jwt_checks(
    token: str, policy: AuthPolicy, idp: DeploymentIdp | None, out: list[CheckLine]
) -> _Claims:
    """format, alg, kid, signature. ``idp`` None: offline with remote keys."""
    raw_header = _unverified_part(token, 0)
    payload = _unverified_part(token, 1)
    alg = raw_header.get("alg") if raw_header else None
    # With the header's own algorithm "allowed", a Denial left is about the token's shape.
    shape = read_header(token, frozenset({alg}) if isinstance(alg, str) else policy.algorithms)
    signature_denial: Denial | None = None
    if isinstance(shape, Denial):
        if shape.reason is not Reason.SIGNATURE_INVALID or not isinstance(alg, str):
            out.append(_fail("format", shape.message, shape))
            for name in ("alg", "kid", "signature"):
                out.append(CheckLine(name, "SKIP", "the token cannot be read"))
            return _Claims()
        signature_denial = shape  # e.g. an empty signature: found while parsing
    assert raw_header is not None and isinstance(alg, str)
    shown = ", ".join(f"{k} {_j(raw_header[k])}" for k in ("alg", "kid", "typ") if k in raw_header)
    out.append(CheckLine("format", "PASS", f"JWT (compact JWS), header {shown}"))

    allowed = sorted(policy.algorithms)
    checked = read_header(token, policy.algorithms)
    alg_ok = not (isinstance(checked, Denial) and checked.reason is Reason.ALGORITHM_NOT_ALLOWED)
    if not alg_ok:
        assert isinstance(checked, Denial)
        detail = f"token: {_j(alg)}  allowed algorithms: {_jl(allowed)}"
        out.append(_fail("alg", detail, checked, actual=alg, expected=allowed))
    else:
        detail = f"{_j(alg)}  allowed: {_jl(allowed)}"
        out.append(CheckLine("alg", "PASS", detail, facts={"actual": alg}))

    kid = raw_header.get("kid") if isinstance(raw_header.get("kid"), str) else None
    header = shape if isinstance(shape, JwtHeader) else JwtHeader(alg=alg, kid=kid)
    kid_text = _j(header.kid) if header.kid is not None else "(none)"
    if idp is None or idp.keys is None:
        out.append(CheckLine("kid", "SKIP", f"token kid: {kid_text}; keys are not fetched offline"))
        out.append(CheckLine("signature", "SKIP", "not checked offline (--offline)"))
        return _Claims(payload)
    try:
        keys = await idp.keys.keyset(header.kid)
    except IdpError as exc:
        denial = Denial(Reason.IDP_CALL_FAILED, exc.message)
        out.append(_fail("kid", f"keys unavailable: {exc.message}", denial, endpoint=exc.endpoint))
        out.append(CheckLine("signature", "SKIP", "no keys to verify with"))
        return _Claims(payload)
    known = [k.kid for k in keys.keys]
    source = _key_source(policy.keys)
    facts = {"actual": header.kid, "knownKids": known, "source": policy.keys.uri}
    if header.kid is None:
        found_detail = f"no kid in the token; {source} has {len(known)} key(s)"
    else:
        found_detail = f"token kid: {kid_text} found in {source}"
    missing_detail = f"token kid: {kid_text}  known kids: {_j(known)} ({source})"

    if not alg_ok or signature_denial is not None:
        # The engine stops before the key; it is still looked up, for the report.
        if header.kid is not None and not keys.has_kid(header.kid):
            unknown = Denial(Reason.KEY_NOT_FOUND, f"No key matches the token's kid {kid_text}.")
            out.append(_fail("kid", missing_detail, unknown, **facts))
        else:
            out.append(CheckLine("kid", "PASS", found_detail, facts=facts))
        if signature_denial is not None:
            out.append(_fail("signature", signature_denial.message, signature_denial))
        else:
            out.append(CheckLine("signature", "SKIP", "the algorithm is not allowed"))
        return _Claims(payload)

    if not keys.candidates(header.kid, header.alg):
        none = verify_signature(token, header, keys)  # no candidate: only the reason
        assert isinstance(none, Denial)
        if none.reason is Reason.ALGORITHM_NOT_ALLOWED:
            detail = f"token kid: {kid_text} names a key that cannot verify {_j(header.alg)}"
        else:
            detail = missing_detail
        out.append(_fail("kid", detail, none, **facts))
        out.append(CheckLine("signature", "SKIP", "no key to verify with"))
        return _Claims(payload)
    out.append(CheckLine("kid", "PASS", found_detail, facts=facts))
    verified = verify_signature(token, header, keys)
    if isinstance(verified, Denial):
        out.append(_fail("signature", f"{verified.message} (key {kid_text}, {alg})", verified))
        return _Claims(payload)
    out.append(CheckLine("signature", "PASS", f"verified with key {kid_text} ({alg})"))
    return _Claims(verified, verified=True)


async def _introspection_checks(
    token: str, policy: AuthPolicy, idp: DeploymentIdp | None, out: list[CheckLine]
) -> _Claims:
    if looks_like_jwt(token):
        out.append(CheckLine("format", "PASS", "JWT; REMOTE_INTROSPECTION checks every token"))
    else:
        out.append(CheckLine("format", "PASS", "opaque token (not a JWT): it is introspected"))
    out.append(CheckLine("signature", "SKIP", "not checked locally: the IdP's answer vouches"))
    if idp is None or idp.introspection is None:
        out.append(CheckLine("introspection", "SKIP", "the IdP is not asked offline"))
        return _Claims(introspected=True)
    try:
        answer = await idp.introspection.introspect(token)
    except IdpError as exc:
        denial = Denial(Reason.IDP_CALL_FAILED, exc.message)
        out.append(_fail("introspection", exc.message, denial, endpoint=exc.endpoint))
        return _Claims(introspected=True)
    if answer is None:
        denial = Denial(
            Reason.TOKEN_INACTIVE, "The identity provider reports the token as not active."
        )
        detail = 'IdP answer: {"active": false}  expected: {"active": true}'
        out.append(_fail("introspection", detail, denial, actual=False, expected=True))
        return _Claims(introspected=True)
    who = ", ".join(f"{k} {_j(answer[k])}" for k in ("client_id", "sub") if k in answer)
    out.append(CheckLine("introspection", "PASS", '{"active": true}' + (f", {who}" if who else "")))
    return _Claims(answer, verified=True, introspected=True)


def _date_line(name: str, value: Any, skew: float, now: float, require_exp: bool) -> CheckLine:
    """``exp`` or ``nbf``: its date, how far from now, and the skew that applies."""
    d = check_time({name: value}, skew, now, require_exp=require_exp)
    facts = {"actual": value, "now": now, "skewSeconds": skew}
    if d and d.reason is Reason.TOKEN_MALFORMED:
        return _fail(name, f"token: {_j(value)} is not a NumericDate", d, **facts)
    sk = _seconds(skew)
    # exp is in the past once expired; nbf is in the future while not yet valid.
    late = now - value if name == "exp" else value - now
    if d:
        what = f"expired {_span(late)} ago" if name == "exp" else f"valid in {_span(late)}"
        return _fail(name, f"{_time(value)}, {what} (skew {sk}, now {_time(now)})", d, **facts)
    if late > 0:
        what = f"expired {_span(late)} ago" if name == "exp" else f"in {_span(late)}"
        return CheckLine(
            name, "PASS", f"{_time(value)}, {what}, within the skew of {sk}", facts=facts
        )
    what = f"{_span(-late)} left" if name == "exp" else f"{_span(-late)} ago"
    return CheckLine(name, "PASS", f"{_time(value)}, {what} (skew {sk})", facts=facts)


def _time_lines(
    claims: Mapping[str, Any], skew: float, now: float, require_exp: bool
) -> list[CheckLine]:
    out: list[CheckLine] = []
    if "exp" not in claims:
        d = check_time({}, skew, now, require_exp=require_exp)
        if d:
            out.append(_fail("exp", "token: (absent)  a JWT access token must carry exp", d))
        else:
            out.append(CheckLine("exp", "SKIP", "no exp in the introspection answer (optional)"))
    else:
        out.append(_date_line("exp", claims["exp"], skew, now, require_exp))
    if "nbf" not in claims:
        out.append(CheckLine("nbf", "SKIP", "no nbf claim"))
    else:
        out.append(_date_line("nbf", claims["nbf"], skew, now, False))
    if "iat" in claims:
        d = check_time({"iat": claims["iat"]}, skew, now, require_exp=False)
        if d:  # only a malformed iat fails; its value is not checked
            out.append(_fail("iat", f"token: {_j(claims['iat'])} is not a NumericDate", d))
    # check_time refuses a date that is not a NumericDate before it compares any: so do the lines.
    return sorted(out, key=lambda c: c.reason is not Reason.TOKEN_MALFORMED)


def _claim_line(claims: Mapping[str, Any], rule: ClaimRule) -> CheckLine:
    name = f"claim {rule.key}"
    value = claims.get(rule.key)
    actual = "(absent)" if value is None else _j(value)
    if not rule.values:
        expected = "required (presence only)" if rule.is_required else "not required"
    else:
        mode = "required" if rule.is_required else "optional: checked only when present"
        expected = f"expected one of: {_jl(rule.values)} ({mode})"
    detail = f"token: {actual}  {expected}"
    facts = {
        "actual": value,
        "expected": list(rule.values),
        "isRequired": rule.is_required,
        "compared": [claim_text(v) for v in value]
        if isinstance(value, list)
        else (None if value is None else claim_text(value)),
    }
    denial = check_rule(claims, rule)
    if denial:
        return _fail(name, detail, denial, **facts)
    return CheckLine(name, "PASS", detail, facts=facts)


async def _claim_checks(
    claims: _Claims,
    policy: AuthPolicy,
    selection: Selection,
    idp: DeploymentIdp | None,
    now: float,
    out: list[CheckLine],
) -> None:
    values = claims.values
    names = ["exp", "nbf", "iss", "aud", *(f"claim {r.key}" for r in policy.claims), "scope"]
    if values is None:
        for name in names:
            out.append(CheckLine(name, "SKIP", "no claims to check"))
        return
    out.extend(_time_lines(values, policy.clock_skew, now, require_exp=not claims.introspected))

    # iss: the configured issuers, or (discovery) the one the IdP names for itself.
    issuers: tuple[str, ...] | None
    try:
        issuers = await idp.issuers() if idp is not None else policy.issuers
    except IdpError as exc:
        denial = Denial(Reason.IDP_CALL_FAILED, exc.message)
        out.append(_fail("iss", f"issuer unavailable: {exc.message}", denial))
        issuers = None
    except _NeedsNetwork:
        out.append(CheckLine("iss", "SKIP", "the issuer comes from the discovery document"))
        issuers = None
    if issuers is not None:
        iss = values.get("iss")
        label = "policy issuers" if policy.issuers else "discovery issuer"
        detail = f"token: {'(absent)' if iss is None else _j(iss)}  {label}: {_jl(issuers)}"
        facts = {"actual": iss, "expected": list(issuers)}
        if not issuers:
            out.append(CheckLine("iss", "SKIP", "no issuers configured: any issuer is accepted"))
        elif wrong_iss := check_issuer(values, issuers):
            out.append(_fail("iss", detail, wrong_iss, **facts))
        else:
            out.append(CheckLine("iss", "PASS", detail, facts=facts))

    aud = values.get("aud")
    auds = aud if isinstance(aud, list) else ([] if aud is None else [aud])
    audiences = sorted(policy.audiences)
    detail = f"token: {_j(auds)}  policy audiences: {_j(audiences)}"
    facts = {"actual": auds, "expected": audiences}
    if not policy.audiences:
        out.append(CheckLine("aud", "SKIP", "no audiences configured: any audience is accepted"))
    elif wrong_aud := check_audience(values, policy.audiences):
        out.append(_fail("aud", detail, wrong_aud, **facts))
    else:
        out.append(CheckLine("aud", "PASS", detail, facts=facts))

    for rule in policy.claims:
        out.append(_claim_line(values, rule))

    if selection.authorization == "ANY_OF":
        assert selection.route is not None
        required = selection.route.allowed_scope
        granted = sorted(scopes_of(values))
        detail = f"token: {_j(granted)}  route requires any of: {_jl(required)}"
        facts = {"actual": granted, "expected": list(required)}
        if no_scope := check_scope(values, required):
            out.append(_fail("scope", detail, no_scope, **facts))
        else:
            out.append(CheckLine("scope", "PASS", detail, facts=facts))
    else:
        why = (
            "the route is ANONYMOUS: a token that is sent is still validated"
            if selection.authorization == "ANONYMOUS"
            else "the route is AUTHENTICATION_ONLY: no scope required"
        )
        out.append(CheckLine("scope", "SKIP", why))


# --------------------------------------------------------------------------------------------
# The decision
# --------------------------------------------------------------------------------------------


def _verdict(decision: Decision, config: Config, *, exact: bool, note: str) -> Verdict:
    common: dict[str, Any] = {
        "exact": exact,
        "note": note,
        "deployment": decision.deployment,
        "route": decision.route,
    }
    if decision.allowed:
        return Verdict(allowed=True, upstream_headers=decision.upstream_headers, **common)
    assert decision.reason is not None
    return Verdict(
        allowed=False,
        status=http_status(decision, config.server),
        reason=decision.reason.value,
        error=OUTCOMES[decision.reason].error,
        www_authenticate=www_authenticate(decision),
        event=decision.event,
        message=decision.message,
        log_fields=decision.log_fields,
        **common,
    )


def _offline_decision(
    selection: Selection, checks: list[CheckLine], claims: _Claims, now: float
) -> tuple[Decision | None, str]:
    """Offline with remote keys: the engine's steps on the unverified claims, minus the signature.

    Before the claims, the first failing line (the token's shape or algorithm); then the engine's
    own ``check_claims`` and ``check_scope``, so the order of the contract holds exactly.
    """
    deployment, policy = selection.deployment, selection.deployment.auth
    early = next(
        (c for c in checks if c.result == "FAIL" and c.name in ("policy", "format", "alg")), None
    )
    denial: Denial | None = None
    if early is not None:
        assert early.reason is not None and early.message is not None
        denial = Denial(early.reason, early.message)
    elif claims.values is None:
        return None, "undecided offline: only the identity provider can tell if the token is active"
    else:
        # A discovery document that is not fetched names no issuer: iss is left unchecked.
        denial = check_claims(
            claims.values, policy, now, policy.issuers, require_exp=not claims.introspected
        )
        if denial is None and selection.authorization == "ANY_OF":
            assert selection.route is not None
            denial = check_scope(claims.values, selection.route.allowed_scope)
    note = "computed offline WITHOUT the signature check: it holds only if the signature is valid"
    if denial is None:
        # Upstream headers are left out: they come from claims whose signature is unchecked.
        return allow(deployment.name, selection.route_name), note
    required = (
        selection.route.allowed_scope
        if denial.reason is Reason.INSUFFICIENT_SCOPE and selection.route
        else ()
    )
    return (
        deny(
            denial.reason,
            denial.message,
            deployment=deployment.name,
            route=selection.route_name,
            event=policy.log_event,
            required_scope=required,
        ),
        note,
    )


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


async def explain(
    config: Config,
    req: ExplainRequest,
    *,
    client_factory: Callable[[TlsSettings], httpx.AsyncClient] = make_client,
    clock: Callable[[], float] = time.time,
) -> Explanation:
    """Every check of ``req.token`` against the policy the server would select, and the
    server's decision. Raises :class:`UsageError` or :class:`ConfigError`."""
    inp = build_input(config, req)
    selection = select(
        config,
        authority=inp.host,
        raw_path=inp.raw_path,
        method=inp.method,
        context_extensions=inp.context_extensions,
    )
    now = clock()  # one instant for the lines and the engine, so they cannot disagree
    token_id = token_hash(req.token)
    kind: Literal["jwt", "opaque"] = "jwt" if looks_like_jwt(req.token) else "opaque"
    checks = [_policy_line(inp, selection)]
    if not isinstance(selection, Selection):
        unmatched = await Engine(config, {}, clock=lambda: now).check(inp)
        verdict = _verdict(unmatched, config, exact=True, note="computed by the server's engine")
        return Explanation(token_id, kind, inp, req.offline, None, tuple(checks), False, verdict)

    deployment = selection.deployment
    policy = deployment.auth
    static = policy.keys.type == "STATIC_KEYS"
    providers: Providers | None = None
    if req.offline:
        idp = _offline_idp(deployment)
    else:
        providers = _online_providers(config, deployment, client_factory)
        idp = providers.by_deployment[deployment.name]
    try:
        engine = Engine(config, {deployment.name: idp}, clock=lambda: now)
        decision: Decision | None
        try:
            decision = await engine.check(inp)
        except _NeedsNetwork:
            decision = None

        line_idp = idp if (not req.offline or static) else None
        claims = _Claims()
        token = extract_token(policy, inp.headers, inp.raw_path)
        if isinstance(token, Denial):
            checks.append(_fail("format", token.message, token))
        elif token is not None:
            if policy.keys.type == "REMOTE_INTROSPECTION" or (
                not looks_like_jwt(token) and _introspects(policy.keys)
            ):
                claims = await _introspection_checks(token, policy, line_idp, checks)
            elif not looks_like_jwt(token):
                denial = Denial(
                    Reason.TOKEN_MALFORMED, "The token is not a JWT in compact serialization."
                )
                checks.append(_fail("format", "not a JWT (three dot-separated parts)", denial))
            else:
                claims = await _jwt_checks(token, policy, line_idp, checks)
            await _claim_checks(claims, policy, selection, line_idp, now, checks)
    finally:
        if providers is not None:
            await providers.aclose()

    notes: list[str] = []
    if claims.values is not None and not claims.verified:
        notes.append("Claims were read from the token WITHOUT a verified signature.")
    if decision is not None:
        if static:
            note = "computed by the server's engine; static keys need no network"
        elif req.offline:
            note = "computed by the server's engine; it needed no key or IdP call"
        else:
            note = "computed by the server's engine, with keys / introspection from the IdP"
        verdict = _verdict(decision, config, exact=True, note=note)
    else:
        composed, note = _offline_decision(selection, checks, claims, now)
        if composed is None:
            verdict = Verdict(
                allowed=None,
                exact=False,
                note=note,
                deployment=deployment.name,
                route=selection.route_name,
            )
        else:
            verdict = _verdict(composed, config, exact=False, note=note)
    return Explanation(
        token_id,
        kind,
        inp,
        req.offline,
        selection,
        tuple(checks),
        claims.verified,
        verdict,
        tuple(notes),
    )


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def render_text(e: Explanation) -> str:
    """The human report: one line per check, then the decision."""
    inp = e.request
    path = inp.path
    target = f"{inp.method} {inp.host or '(no host)'} {path}"
    if inp.context_extensions.get("deployment"):
        target += f" (deployment {_j(inp.context_extensions['deployment'])})"
    mode = " --offline" if e.offline else ""
    lines = [f"extauthz explain{mode}: token sha256:{e.token_id} ({e.token_kind}), {target}", ""]
    width = max([len(c.name) for c in e.checks] + [len("www-authenticate")])
    for c in e.checks:
        lines.append(f"{c.name:<{width}}  {c.result}  {c.detail}".rstrip())
    lines.extend(f"note: {n}" for n in e.notes)
    lines.append("")
    v = e.verdict
    if v.allowed is None:
        lines.append(f"{'decision':<{width}}  UNDECIDED  {v.note}")
        return "\n".join(lines) + "\n"
    word = "ALLOW" if v.allowed else "DENY"
    lines.append(f"{'decision':<{width}}  {word}  ({v.note})")
    where = f"{_j(v.deployment)}, route {_j(v.route)}" if v.deployment else "(none)"
    lines.append(f"{'deployment':<{width}}  {where}")
    if v.allowed:
        lines.append(f"{'status':<{width}}  forwarded to the upstream")
        headers = "; ".join(f"{k}: {_j(val)}" for k, val in v.upstream_headers) or "(none)"
        lines.append(f"{'headers':<{width}}  {headers}")
    else:
        lines.append(f"{'status':<{width}}  {v.status}")
        lines.append(f"{'reason':<{width}}  {v.reason}")
        lines.append(f"{'error':<{width}}  {v.error}")
        lines.append(f"{'www-authenticate':<{width}}  {v.www_authenticate or '(none)'}")
        extra = "".join(f" {k}={val}" for k, val in v.log_fields)
        lines.append(f"{'log':<{width}}  {v.event}{extra}: {v.message}")
    return "\n".join(lines) + "\n"


def to_json(e: Explanation) -> dict[str, Any]:
    """The same facts for machines (camelCase, like the config and the logs)."""
    v = e.verdict
    inp = e.request
    decision: dict[str, Any] = {
        "allowed": v.allowed,
        "exact": v.exact,
        "note": v.note,
        "deployment": v.deployment or None,
        "route": v.route or None,
    }
    if v.allowed:
        decision["upstreamHeaders"] = dict(v.upstream_headers)
    elif v.allowed is False:
        decision.update(
            status=v.status,
            reason=v.reason,
            error=v.error,
            wwwAuthenticate=v.www_authenticate,
            log={"event": v.event, "reason": v.reason, "message": v.message, **dict(v.log_fields)},
        )
    return {
        "token": {"sha256Prefix": e.token_id, "kind": e.token_kind},
        "request": {
            "method": inp.method,
            "host": inp.host,
            "path": inp.path,
            "deployment": inp.context_extensions.get("deployment"),
        },
        "offline": e.offline,
        "claimsVerified": e.claims_verified,
        "checks": [
            {
                "check": c.name,
                "result": c.result,
                "detail": c.detail,
                **({"reason": c.reason.value, "message": c.message} if c.reason else {}),
                **dict(c.facts),
            }
            for c in e.checks
        ],
        "notes": list(e.notes),
        "decision": decision,
    }
