"""The ``explain`` report: each step of a traced check as a line a person reads, and the verdict.

:mod:`extauthz.explain` runs the server's engine with a :class:`~extauthz.steps.Trace`; this
module turns its steps into :class:`CheckLine` values (a one-line ``detail`` with the values
compared, and the facts for ``--json``) and formats the whole :class:`Explanation` as text or
JSON. Every value read from a token is shown JSON-escaped and cut short; the token itself is
never part of the report. Of a replayed request's headers only the names are: the values of the
credential header, ``Authorization``, ``Cookie`` and ``DPoP`` are credentials, and the others are
not needed to read the report.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from .config import AuthServer, Config, KeySource
from .decision import OUTCOMES, Decision, Reason, http_status, www_authenticate
from .engine import CheckInput
from .routing import Selection
from .steps import Result, Step, Trace
from .validation import NOT_COMPACT

__all__ = [
    "CheckLine",
    "Explanation",
    "Verdict",
    "render_step",
    "render_text",
    "to_json",
    "verdict_of",
]


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
    """The answer the server gives, rendered through the decision table (docs/decisions.md)."""

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
    log_fields: tuple[tuple[str, Any], ...] = ()
    upstream_headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Explanation:
    # The first 8 hex characters of the token's SHA-256, and its kind; None when the request
    # replayed carries no token the server would use (none, another scheme, unusable) or no
    # policy was selected to look for one.
    token_id: str | None
    token_kind: Literal["jwt", "opaque"] | None
    request: CheckInput = field(repr=False)  # its headers hold the token: never render them
    offline: bool
    selection: Selection | None
    checks: tuple[CheckLine, ...]
    claims_verified: bool
    verdict: Verdict
    notes: tuple[str, ...] = ()
    # A replayed request (--header, --request): the names of its headers, sorted; their values
    # are never rendered. None: the request was built around a token.
    header_names: tuple[str, ...] | None = None

    @property
    def exit_code(self) -> int:
        """0 allowed, 1 denied (or undecided: not known to be allowed)."""
        return 0 if self.verdict.allowed else 1


# --------------------------------------------------------------------------------------------
# Formatting values
# --------------------------------------------------------------------------------------------

_MAX_VALUE_CHARS = 160
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")  # RFC 9110 §5.6.2 tchar, lower case


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


# --------------------------------------------------------------------------------------------
# The steps, rendered
# --------------------------------------------------------------------------------------------


def _line(step: Step, detail: str, **facts: Any) -> CheckLine:
    """A check line: the step's result, the detail written for a person, the step's denial."""
    denial = step.denial
    return CheckLine(
        step.name,
        step.result,
        detail,
        denial.reason if denial else None,
        denial.message if denial else None,
        facts,
    )


def _key_source(keys: KeySource) -> str:
    if keys.type == "STATIC_KEYS":
        return "the static keys"
    if keys.type == "REMOTE_DISCOVERY":
        return f"the JWKS named by {keys.uri}"
    return f"the JWKS at {keys.uri}"


def _policy_line(step: Step, inp: CheckInput) -> CheckLine:
    denial = step.denial
    if denial is not None and denial.reason is Reason.NO_MATCHING_POLICY:
        named = inp.context_extensions.get("deployment")
        why = f"deployment {_j(named)}" if named else f"host {_j(inp.host)}"
        detail = f"no deployment or route matches {inp.method} {inp.path} ({why})"
        return _line(step, detail, method=inp.method, host=inp.host, path=inp.path)
    if denial is not None:  # request_ambiguous
        return _line(step, denial.message, method=inp.method, host=inp.host, path=inp.path)
    selection: Selection = step.actual
    d, r = selection.deployment, selection.route
    where = f"{d.path_prefix}{r.template if r else ''}".replace("//", "/")
    methods = ",".join(sorted(r.methods)) if r and r.methods else "any method"
    authz = selection.authorization
    scope = f" {_jl(r.allowed_scope)}" if r and r.allowed_scope else ""
    keys = d.auth.keys
    source = keys.type + (f" {keys.uri}" if keys.uri else "")
    if d.select_by is not None:
        servers = ", ".join(s.name for s in d.servers)
        source = f"DYNAMIC_AUTHENTICATION by {' '.join(d.select_by)} (servers {servers})"
    detail = (
        f"deployment {_j(d.name)}, route {_j(selection.route_name)} ({methods} {where}), "
        f"{authz}{scope}; {source}"
    )
    return _line(
        step,
        detail,
        deployment=d.name,
        route=selection.route_name,
        authorization=authz,
        allowedScope=list(r.allowed_scope) if r else [],
        validation=keys.type,
        uri=keys.uri,
    )


def _format_line(step: Step) -> CheckLine:
    if step.denial is not None:
        if step.denial == NOT_COMPACT:
            return _line(step, "not a JWT (three dot-separated parts)")
        return _line(step, step.denial.message)
    if step.note == "introspected":
        if step.actual == "jwt":
            return _line(step, "JWT; REMOTE_INTROSPECTION checks every token")
        return _line(step, "opaque token (not a JWT): it is introspected")
    fields = step.actual
    shown = ", ".join(f"{k} {_j(fields[k])}" for k in ("alg", "kid", "typ") if k in fields)
    return _line(step, f"JWT (compact JWS), header {shown}")


def _kid_text(kid: str | None) -> str:
    return _j(kid) if kid is not None else "(none)"


def _alg_line(step: Step) -> CheckLine:
    allowed = sorted(step.expected)
    if step.result == "FAIL":
        detail = f"token: {_j(step.actual)}  allowed algorithms: {_j(allowed)}"
        return _line(step, detail, actual=step.actual, expected=allowed)
    return _line(step, f"{_j(step.actual)}  allowed: {_j(allowed)}", actual=step.actual)


def _kid_line(step: Step, keys: KeySource, alg: str | None) -> CheckLine:
    kid_text = _kid_text(step.actual)
    if step.result == "SKIP":
        if step.note == "keys are not fetched offline":
            return _line(step, f"token kid: {kid_text}; keys are not fetched offline")
        return _line(step, step.note)
    denial = step.denial
    if denial is not None and denial.reason is Reason.IDP_CALL_FAILED:
        return _line(step, f"keys unavailable: {denial.message}", endpoint=step.fact("endpoint"))
    keys_seen = step.fact("keys")
    known = [k.kid for k in keys_seen.keys] if keys_seen is not None else []
    source = _key_source(keys)
    facts = {"actual": step.actual, "knownKids": known, "source": keys.uri}
    if denial is None:
        if step.actual is None:
            return _line(step, f"no kid in the token; {source} has {len(known)} key(s)", **facts)
        return _line(step, f"token kid: {kid_text} found in {source}", **facts)
    if denial.reason is Reason.ALGORITHM_NOT_ALLOWED:
        detail = f"token kid: {kid_text} names a key that cannot verify {_j(alg)}"
        return _line(step, detail, **facts)
    return _line(step, f"token kid: {kid_text}  known kids: {_j(known)} ({source})", **facts)


def _signature_line(step: Step) -> CheckLine:
    if step.result == "SKIP":
        return _line(step, step.note)
    kid_text = _kid_text(step.actual)
    if step.denial is not None:
        if step.expected is None:  # found while reading the token (an empty signature)
            return _line(step, step.denial.message)
        return _line(step, f"{step.denial.message} (key {kid_text}, {step.expected})")
    return _line(step, f"verified with key {kid_text} ({step.expected})")


def _introspection_line(step: Step) -> CheckLine:
    if step.result == "SKIP":
        return _line(step, step.note)
    denial = step.denial
    if denial is not None and denial.reason is Reason.IDP_CALL_FAILED:
        return _line(step, denial.message, endpoint=step.fact("endpoint"))
    if denial is not None:
        detail = 'IdP answer: {"active": false}  expected: {"active": true}'
        return _line(step, detail, actual=False, expected=True)
    answer: Mapping[str, Any] = step.actual
    who = ", ".join(f"{k} {_j(answer[k])}" for k in ("client_id", "sub") if k in answer)
    return _line(step, '{"active": true}' + (f", {who}" if who else ""))


def _date_line(step: Step) -> CheckLine:
    """``exp``, ``nbf`` or ``iat``: its date, how far from now, and the skew that applies."""
    name, value, denial = step.name, step.actual, step.denial
    if step.result == "SKIP":
        return _line(step, step.note)
    if denial is not None and denial.reason is Reason.CLAIM_MISSING:
        return _line(step, "token: (absent)  a JWT access token must carry exp")
    if name == "iat":
        return _line(step, f"token: {_j(value)} is not a NumericDate")
    now, skew = step.fact("now"), step.fact("skewSeconds")
    facts = {"actual": value, "now": now, "skewSeconds": skew}
    if denial is not None and denial.reason is Reason.TOKEN_MALFORMED:
        return _line(step, f"token: {_j(value)} is not a NumericDate", **facts)
    sk = _seconds(skew)
    # exp is in the past once expired; nbf is in the future while not yet valid.
    late = now - value if name == "exp" else value - now
    if denial is not None:
        what = f"expired {_span(late)} ago" if name == "exp" else f"valid in {_span(late)}"
        return _line(step, f"{_time(value)}, {what} (skew {sk}, now {_time(now)})", **facts)
    if late > 0:
        what = f"expired {_span(late)} ago" if name == "exp" else f"in {_span(late)}"
        return _line(step, f"{_time(value)}, {what}, within the skew of {sk}", **facts)
    what = f"{_span(-late)} left" if name == "exp" else f"{_span(-late)} ago"
    return _line(step, f"{_time(value)}, {what} (skew {sk})", **facts)


def _iss_line(step: Step, policy_issuers: tuple[str, ...]) -> CheckLine:
    if step.result == "SKIP":
        return _line(step, step.note)
    denial = step.denial
    if denial is not None and denial.reason is Reason.IDP_CALL_FAILED:
        return _line(step, f"issuer unavailable: {denial.message}")
    iss = step.actual
    label = "policy issuers" if policy_issuers else "discovery issuer"
    issuers = list(step.expected)
    detail = f"token: {'(absent)' if iss is None else _j(iss)}  {label}: {_j(issuers)}"
    return _line(step, detail, actual=iss, expected=issuers)


def _aud_line(step: Step) -> CheckLine:
    if step.result == "SKIP":
        return _line(step, step.note)
    audiences = sorted(step.expected)
    detail = f"token: {_j(step.actual)}  policy audiences: {_j(audiences)}"
    return _line(step, detail, actual=step.actual, expected=audiences)


def _claim_line(step: Step) -> CheckLine:
    if step.result == "SKIP":
        return _line(step, step.note)
    value, values = step.actual, list(step.expected)
    required = step.fact("isRequired")
    actual = "(absent)" if value is None else _j(value)
    if not values:
        expected = "required (presence only)" if required else "not required"
    else:
        mode = "required" if required else "optional: checked only when present"
        expected = f"expected one of: {_jl(values)} ({mode})"
    facts = {
        "actual": value,
        "expected": values,
        "isRequired": required,
        "compared": step.fact("compared"),
    }
    return _line(step, f"token: {actual}  {expected}", **facts)


def _scope_line(step: Step) -> CheckLine:
    if step.result == "SKIP":
        return _line(step, step.note)
    granted, required = sorted(step.actual), list(step.expected)
    detail = f"token: {_j(granted)}  route requires any of: {_jl(required)}"
    return _line(step, detail, actual=granted, expected=required)


def render_step(step: Step, inp: CheckInput, trace: Trace) -> CheckLine:
    policy_step = trace.step("policy")
    selection = policy_step.actual if policy_step is not None else None
    policy = selection.deployment.auth if isinstance(selection, Selection) else None
    server_step = trace.step("server")
    if server_step is not None and isinstance(server_step.actual, AuthServer):
        policy = server_step.actual.deployment.auth  # the chosen server's checks follow
    name = step.name
    if name == "policy":
        return _policy_line(step, inp)
    if name == "server":
        return _server_line(step)
    if name == "format":
        return _format_line(step)
    if name == "alg":
        return _alg_line(step) if step.result != "SKIP" else _line(step, step.note)
    if name == "kid":
        assert policy is not None
        alg = trace.step("alg")
        return _kid_line(step, policy.keys, alg.actual if alg is not None else None)
    if name == "signature":
        return _signature_line(step)
    if name == "introspection":
        return _introspection_line(step)
    if name in ("exp", "nbf", "iat"):
        return _date_line(step)
    if name == "iss":
        assert policy is not None
        return _iss_line(step, policy.issuers)
    if name == "aud":
        return _aud_line(step)
    if name == "scope":
        return _scope_line(step)
    if name.startswith("claim "):
        return _claim_line(step)
    if name.startswith(("dpop", "cnf")):
        return _sender_line(step)
    return _line(step, step.denial.message if step.denial else step.note)


def _server_line(step: Step) -> CheckLine:
    """DYNAMIC_AUTHENTICATION: which server the selecting claim or header chose, and what that
    server verifies with."""
    facts = dict(step.facts)
    if step.denial is not None:
        return _line(step, step.denial.message, **facts)
    server: AuthServer = step.actual
    keys = server.deployment.auth.keys
    source = keys.type + (f" {keys.uri}" if keys.uri else "")
    detail = f"server {_j(server.name)} (by {step.expected}); {source}"
    return _line(step, detail, server=server.name, validation=keys.type, uri=keys.uri, **facts)


def _sender_line(step: Step) -> CheckLine:
    """A DPoP proof or ``cnf`` binding step (RFC 9449, RFC 8705): what it compared, from its
    facts (never the proof or the token)."""
    facts = dict(step.facts)
    shown = ", ".join(f"{k}: {_j(v)}" for k, v in facts.items())
    if step.denial is not None:
        detail = f"{step.denial.message} ({shown})" if shown else step.denial.message
    elif step.expected is not None:
        detail = f"{_j(step.actual)}, expected {_j(step.expected)}"
    else:
        detail = shown or (_j(step.actual) if step.actual is not None else "ok")
    return _line(step, detail, **facts)


# --------------------------------------------------------------------------------------------
# The verdict
# --------------------------------------------------------------------------------------------


def verdict_of(decision: Decision, config: Config, *, exact: bool, note: str) -> Verdict:
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


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _token_text(e: Explanation) -> str:
    if e.token_id is not None:
        return f"token sha256:{e.token_id} ({e.token_kind})"
    if e.selection is None:
        return "no policy to read a token for"
    return "no usable token in the request"


def _name(name: str) -> str:
    """A header name as given: a token (RFC 9110 §5.1) as it is, anything else JSON-escaped."""
    return name if _HEADER_NAME.fullmatch(name) else _j(name)


def render_text(e: Explanation) -> str:
    """The human report: one line per check, then the decision."""
    inp = e.request
    path = inp.path  # without the query string, where a token may be
    target = f"{inp.method} {inp.host or '(no host)'} {path}"
    if inp.context_extensions.get("deployment"):
        target += f" (deployment {_j(inp.context_extensions['deployment'])})"
    mode = " --offline" if e.offline else ""
    lines = [f"extauthz explain{mode}: {_token_text(e)}, {target}"]
    if e.header_names is not None:
        names = ", ".join(_name(n) for n in e.header_names) or "(none)"
        lines.append(f"request headers (values not shown): {names}")
    lines.append("")
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
        lines.append(f"{'log':<{width}}  {v.event}: {v.message}")
        if v.log_fields:  # the fields of the server's line: what was compared
            fields = " ".join(f"{k}={json.dumps(val, default=str)}" for k, val in v.log_fields)
            lines.append(f"{'':<{width}}  {fields}")
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
    token = {"sha256Prefix": e.token_id, "kind": e.token_kind} if e.token_id else None
    return {
        "token": token,
        "request": {
            "method": inp.method,
            "host": inp.host,
            "path": inp.path,
            "deployment": inp.context_extensions.get("deployment"),
            "headers": None if e.header_names is None else list(e.header_names),
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
