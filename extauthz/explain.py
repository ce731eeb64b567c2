"""``extauthz explain``: one request against the exact policy the server applies, every check shown.

The report is the server's own run, traced: :meth:`Engine.check <extauthz.engine.Engine.check>`
runs on a :class:`~extauthz.engine.CheckInput` built from the command line, with the providers the
server builds, and records every step in a :class:`~extauthz.steps.Trace` that goes on past the
first failure. This module only builds that input and runs it; :mod:`extauthz.report` renders
the steps. No check is run here, so the decision printed is the server's by construction.

The request is either built around a token (``--token``: put where the selected policy reads it)
or replayed as the client sent it (``--header``, ``--request``: :class:`SentRequest`, read by
:func:`sent_headers` and :func:`read_request`). A replayed request carries no token of ours: the
engine looks for the credential exactly where the server does, so a request with another scheme,
another header or none at all is denied here as it is there.

With ``--offline`` the key and introspection sources raise
:class:`~extauthz.steps.Unverifiable`: the engine records what it could not check and, when
nothing failed before, the decision is marked as holding only if the signature does.

:func:`explain` computes an :class:`Explanation`; ``report.render_text`` and ``report.to_json``
format it; the CLI prints. The token is never part of the output: it is named by the first 8 hex
characters of its SHA-256, and every value read from it is shown JSON-escaped. No header value is
ever printed, and no error message quotes a line of a request read here: any of them may be a
credential.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Literal, cast
from urllib.parse import parse_qsl, quote, urlsplit

import httpx

from .config import Config, Deployment, KeySource
from .decision import Decision, allow
from .engine import CheckInput, Engine
from .errors import ExtauthzError
from .idp import DeploymentIdp, Providers, StaticKeysProvider
from .idp.http import TlsSettings, make_client
from .idp.introspection import IntrospectionClient
from .keys import KeySet
from .logs import token_hash
from .report import CheckLine, Explanation, Verdict, render_step, render_text, to_json, verdict_of
from .routing import Selection, select
from .steps import Trace, Unverifiable
from .tokens import extract_token
from .validation import looks_like_jwt

__all__ = [
    "MAX_REQUEST_BYTES",
    "CheckLine",
    "ExplainRequest",
    "Explanation",
    "RequestError",
    "SentRequest",
    "UsageError",
    "Verdict",
    "build_input",
    "clean_token",
    "explain",
    "parse_request",
    "read_request",
    "render_text",
    "replaying",
    "sent_headers",
    "to_json",
]


@dataclass(frozen=True, slots=True)
class ExplainRequest:
    """The command line: a token, the request it would come with, or the request as sent.

    ``headers`` (lower-case names, repeats joined with ","): the request's headers as the client
    sent them. With ``headers`` and no ``token`` the request is checked as it is, the credential
    found (or not) where the server looks; with a ``token`` too, the token is added where the
    policy reads it, and a request that already carries something there is a usage error."""

    token: str | None = field(default=None, repr=False)  # never in a repr, a log or a traceback
    deployment: str | None = None  # like Envoy's context_extensions `deployment`
    path: str | None = None  # default: the named (or only) deployment's pathPrefix
    method: str | None = None  # default GET
    host: str | None = None  # default: that deployment's first exact host, else ""
    offline: bool = False
    headers: Mapping[str, str] | None = field(default=None, repr=False)  # may hold credentials


class UsageError(ExtauthzError):
    """The command line names something the config does not have."""


class RequestError(UsageError):
    """A request given with ``--header`` or ``--request`` cannot be read. The message names the
    option and the line, never the line's content: it may hold a credential."""


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
    """The CheckInput Envoy would send: the request's headers as given, and the token (when one
    is given) where the governing policy expects it (``tokenHeader`` with ``tokenAuthScheme``,
    or ``tokenQueryParam``)."""
    if req.token is None and req.headers is None:
        raise UsageError(
            "give a token (--token, --token-file) or the request (--header, --request)"
        )
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
    headers: dict[str, str] = {}
    for name, value in (req.headers or {}).items():
        _add_header(headers, name, value)  # lower-case names, as the engine reads them
    raw_path = path
    if req.token is not None:
        # Selection never depends on the token, so it tells where the token must go.
        found = select(
            config, authority=host, raw_path=path, method=method, context_extensions=context
        )
        selection = found if isinstance(found, Selection) else None
        raw_path = _with_token(selection, path, headers, req.token)
    # A DPoP proof's htu (RFC 9449 §4.3) names the scheme: the request's x-forwarded-proto when
    # given, else https, what a client of a gateway uses.
    scheme = headers.get("x-forwarded-proto", "https")
    return CheckInput(
        method=method,
        host=host,
        raw_path=raw_path,
        headers=headers,
        context_extensions=context,
        scheme=scheme,
    )


def _with_token(selection: Selection | None, path: str, headers: dict[str, str], token: str) -> str:
    """The path, with the token added where the policy reads it (into ``headers``, or the query
    string of the path returned). Refused when the request already has a credential there: the
    report would be about a request that carries two."""
    auth = selection.deployment.auth if selection is not None else None
    if auth is not None and auth.token_query_param is not None:
        param = auth.token_query_param
        query = path.split("?", 1)[1] if "?" in path else ""
        if any(k == param for k, _ in parse_qsl(query, keep_blank_values=True)):
            raise UsageError(
                f"the path already has the query parameter {param!r} the policy reads the token "
                "from: give the token there or with --token, not both"
            )
        sep = "&" if "?" in path else "?"
        return f"{path}{sep}{quote(param, safe='')}={quote(token, safe='')}"
    header = "authorization"
    scheme: str | None = "Bearer"
    if auth is not None:
        assert auth.token_header is not None
        header, scheme = auth.token_header, auth.token_auth_scheme
    if header in headers:
        raise UsageError(
            f"the request already has the {header!r} header the policy reads the token from: "
            "give the token there (the request is then checked as sent) or with --token, not both"
        )
    headers[header] = f"{scheme} {token}" if scheme else token
    return path


# --------------------------------------------------------------------------------------------
# The request as the client sent it: --header, --request
# --------------------------------------------------------------------------------------------

MAX_REQUEST_BYTES = 64 * 1024  # a request head larger than this is not a request to replay
# RFC 9110 §5.1: a field name is a token (§5.6.2: tchar).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 §5.5: CR, LF and NUL make a field value invalid; the other controls (but HTAB) are
# refused too, as a request a proxy may not pass on as written is no request to replay.
_VALUE_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_VERSION = re.compile(r"HTTP/\d(\.\d)?")
# AttributeContext.HttpRequest (envoy/service/auth/v3/attribute_context.proto), both JSON spellings.
_HTTP_FIELDS = frozenset(
    {"id", "method", "headers", "path", "host", "scheme", "query", "fragment", "size"}
    | {"protocol", "body", "header_map", "headerMap", "raw_body", "rawBody"}
)


@dataclass(frozen=True, slots=True)
class SentRequest:
    """A request as the client sent it: what ``--request`` or ``--header`` gave. None: not
    given (the command line's flag, or explain's default, applies)."""

    method: str | None
    path: str | None  # the request target's path, query string included
    host: str | None  # :authority (the Host header of an HTTP/1.1 request)
    headers: Mapping[str, str] = field(repr=False)  # lower-case names, repeats joined with ","
    deployment: str | None = None  # a CheckRequest's context_extensions `deployment`


def _add_header(headers: dict[str, str], name: str, value: str) -> None:
    # Envoy lower-cases names (HTTP/1.1 names are case-insensitive, RFC 9110 §5.1) and joins
    # repeated field lines with "," (RFC 9110 §5.3), as lift_request does for header_map.
    key = name.lower()
    headers[key] = f"{headers[key]},{value}" if key in headers else value


def _field_line(line: str, where: str) -> tuple[str, str]:
    """``Name: value`` (RFC 9112 §5.1), the value without the whitespace around it."""
    name, colon, value = line.partition(":")
    if not colon:
        raise RequestError(f"{where}: not a 'Name: value' header line (no ':')")
    if not _TOKEN.fullmatch(name):
        # RFC 9112 §5.1: no whitespace between the name and the colon; a name is a token.
        raise RequestError(f"{where}: the header name is not a token (RFC 9110 §5.1)")
    value = value.strip(" \t")
    if _VALUE_CONTROL.search(value):
        raise RequestError(f"{where}: the header value holds a control character (RFC 9110 §5.5)")
    return name, value


def sent_headers(lines: Iterable[str]) -> SentRequest:
    """The request given as ``--header 'Name: value'`` options, in order."""
    headers: dict[str, str] = {}
    hosts = 0
    for n, line in enumerate(lines, 1):
        name, value = _field_line(line, f"--header [{n}]")
        hosts += name.lower() == "host"
        if hosts > 1:
            raise RequestError(f"--header [{n}]: a second Host header (RFC 9112 §3.2)")
        _add_header(headers, name, value)
    host = headers.pop("host", None)  # Envoy sends it as the request's host (:authority)
    return SentRequest(None, None, host, headers)


def read_request(source: str, stdin: IO[bytes] | None = None) -> SentRequest:
    """The request in ``source`` (a file, ``-`` for standard input): an HTTP/1.1 request head, or
    the JSON of an Envoy CheckRequest or its ``attributes.request.http``. At most
    :data:`MAX_REQUEST_BYTES` are read."""
    where = f"--request {source}"
    try:
        if source == "-":
            data = (stdin or sys.stdin.buffer).read(MAX_REQUEST_BYTES + 1)
        else:
            with open(source, "rb") as f:
                data = f.read(MAX_REQUEST_BYTES + 1)
    except OSError as exc:
        raise RequestError(f"{where}: cannot read: {exc.strerror}") from None
    return parse_request(data, where)


def parse_request(data: bytes, where: str = "--request") -> SentRequest:
    """The request in ``data``: JSON when it starts with ``{``, else an HTTP/1.1 request head."""
    if data.lstrip()[:1] == b"{":
        if len(data) > MAX_REQUEST_BYTES:
            raise RequestError(f"{where}: longer than {MAX_REQUEST_BYTES // 1024} KiB")
        return _json_request(data, where)
    return _http_request(data, where)


def _http_request(data: bytes, where: str) -> SentRequest:
    """An HTTP/1.1 request head (RFC 9112 §2.1): the request line, field lines, an empty line.
    What follows (a body) is ignored. CRLF or a bare LF ends a line (RFC 9112 §2.2)."""
    if len(data) > MAX_REQUEST_BYTES:
        data = data[:MAX_REQUEST_BYTES]
        if not re.search(rb"\n\r?\n", data.lstrip(b"\r\n")):
            raise RequestError(
                f"{where}: the request head is longer than {MAX_REQUEST_BYTES // 1024} KiB"
            )
    headers: dict[str, str] = {}
    hosts = 0
    request_line: tuple[int, str] | None = None
    for n, raw in enumerate(data.split(b"\n"), 1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"{where}: line {n}: not UTF-8") from None
        if "\r" in line:
            raise RequestError(f"{where}: line {n}: a CR not followed by LF (RFC 9112 §2.2)")
        if request_line is None:
            if line:
                request_line = (n, line)
            # else: RFC 9112 §2.2, an empty line before the request line is ignored
            continue
        if not line:
            break  # the end of the head; a body may follow
        if line[0] in " \t":
            # RFC 9112 §5.2: obsolete line folding, which a server rejects (or replaces).
            raise RequestError(f"{where}: line {n}: a folded header line (RFC 9112 §5.2)")
        name, value = _field_line(line, f"{where}: line {n}")
        hosts += name.lower() == "host"
        if hosts > 1:
            # RFC 9112 §3.2: a request with more than one Host field line is answered 400.
            raise RequestError(f"{where}: line {n}: a second Host header (RFC 9112 §3.2)")
        _add_header(headers, name, value)
    if request_line is None:
        raise RequestError(f"{where}: no request line ('GET /path HTTP/1.1')")
    n, line = request_line
    method, path, host = _request_line(line, f"{where}: line {n}")
    sent_host = headers.pop("host", None)  # Envoy sends it as the request's host (:authority)
    # RFC 9112 §3.2.2: with an absolute-form target, its authority is the host (Host is ignored).
    return SentRequest(method, path, host if host is not None else sent_host, headers)


def _request_line(line: str, where: str) -> tuple[str, str, str | None]:
    """``METHOD target HTTP/1.1`` (RFC 9112 §3): the method, the path with its query string, and
    the host of an absolute-form target."""
    parts = line.split(" ")
    if len(parts) != 3 or not _VERSION.fullmatch(parts[2]):
        raise RequestError(f"{where}: not a request line 'METHOD /path HTTP/1.1'")
    method, target, _ = parts
    if not _TOKEN.fullmatch(method):
        raise RequestError(f"{where}: the method is not a token (RFC 9110 §9.1)")
    if _VALUE_CONTROL.search(target) or "\t" in target:
        raise RequestError(f"{where}: the request target holds a control character")
    if target.startswith("/"):
        return method, target, None  # origin-form (RFC 9112 §3.2.1)
    if target.lower().startswith(("http://", "https://")):
        # absolute-form (RFC 9112 §3.2.2), as sent to a proxy
        url = urlsplit(target)
        if "@" in url.netloc:
            # RFC 9110 §4.2.4: a sender must not put userinfo in an http(s) URI.
            raise RequestError(f"{where}: the request target has userinfo (RFC 9110 §4.2.4)")
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        return method, path, url.netloc
    raise RequestError(
        f"{where}: the request target is neither a path ('/...') nor an absolute http(s) URI"
    )


def _json_request(data: bytes, where: str) -> SentRequest:
    """An Envoy CheckRequest in JSON, or its ``attributes.request.http`` alone (proto3 JSON: the
    camelCase and the original field names are both accepted)."""
    try:
        doc = json.loads(data)
    except UnicodeDecodeError:
        raise RequestError(f"{where}: not UTF-8") from None
    except json.JSONDecodeError as exc:
        # exc.msg says what was expected, never the text found there.
        raise RequestError(f"{where}: line {exc.lineno}: not JSON ({exc.msg})") from None
    http = _object(doc, "the document", where)
    deployment: str | None = None
    if "attributes" in http:
        attrs = _object(http["attributes"], "attributes", where)
        context = attrs.get("contextExtensions", attrs.get("context_extensions", {}))
        extensions = _strings(context, "attributes.contextExtensions", where)
        deployment = extensions.get("deployment")
        request = _object(attrs.get("request", {}), "attributes.request", where)
        http = _object(request.get("http", {}), "attributes.request.http", where)
        field_prefix = "attributes.request.http."
    else:
        field_prefix = ""
    unknown = sorted(k for k in http if k not in _HTTP_FIELDS)
    if unknown:
        # Names only: a misspelt "headers" would otherwise read as a request without any.
        shown = ", ".join(json.dumps(k[:40]) for k in unknown)
        raise RequestError(f"{where}: {field_prefix}: unknown member(s) {shown}")
    headers: dict[str, str] = {}
    sent = _strings(http.get("headers", {}), f"{field_prefix}headers", where)
    for name, value in sent.items():
        # A lower-case copy of a name wins over a mixed-case one, as lift_request has it.
        if name.islower() or name.lower() not in headers:
            headers[name.lower()] = value
    raw_map = http.get("headerMap", http.get("header_map"))
    if not headers and raw_map is not None:
        # Envoy sends header_map instead when encode_raw_headers is on.
        for name, value in _header_map(raw_map, f"{field_prefix}headerMap", where):
            _add_header(headers, name, value)
    method = _string(http, "method", field_prefix, where) or headers.get(":method") or None
    host = _string(http, "host", field_prefix, where) or headers.get(":authority") or None
    host = host or headers.get("host") or None
    path = _string(http, "path", field_prefix, where) or headers.get(":path") or None
    return SentRequest(method, path, host, headers, deployment)


def _object(value: Any, what: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RequestError(f"{where}: {what} must be a JSON object")
    return value


def _strings(value: Any, what: str, where: str) -> dict[str, str]:
    mapping = _object(value, what, where)
    if not all(isinstance(v, str) for v in mapping.values()):
        raise RequestError(f"{where}: {what} must map names to strings")
    return mapping


def _string(http: Mapping[str, Any], name: str, prefix: str, where: str) -> str:
    value = http.get(name, "")
    if not isinstance(value, str):
        raise RequestError(f"{where}: {prefix}{name} must be a string")
    return value


def _header_map(value: Any, what: str, where: str) -> list[tuple[str, str]]:
    """HeaderMap's ``headers``: each a ``key`` with a ``value`` or a base64 ``rawValue``."""
    entries = _object(value, what, where).get("headers", [])
    if not isinstance(entries, list):
        raise RequestError(f"{where}: {what}.headers must be a list")
    found: list[tuple[str, str]] = []
    for i, entry in enumerate(entries):
        item = _object(entry, f"{what}.headers[{i}]", where)
        key = item.get("key")
        raw = item.get("rawValue", item.get("raw_value"))
        text = item.get("value", "")
        if not isinstance(key, str) or not isinstance(text, str):
            raise RequestError(f"{where}: {what}.headers[{i}]: key and value must be strings")
        if raw is not None:
            try:
                # The server decodes raw_value the same way (lift_request).
                text = base64.b64decode(str(raw), validate=True).decode("utf-8", "replace")
            except (binascii.Error, ValueError):
                raise RequestError(f"{where}: {what}.headers[{i}].rawValue is not base64") from None
        found.append((key, text))
    return found


def replaying(
    sent: SentRequest,
    *,
    token: str | None = None,
    deployment: str | None = None,
    path: str | None = None,
    method: str | None = None,
    host: str | None = None,
    offline: bool = False,
) -> ExplainRequest:
    """The request to explain: ``sent``, where a flag given on the command line wins."""
    return ExplainRequest(
        token,
        deployment if deployment is not None else sent.deployment,
        path if path is not None else sent.path,
        method if method is not None else sent.method,
        host if host is not None else sent.host,
        offline,
        sent.headers,
    )


# --------------------------------------------------------------------------------------------
# Providers: the server's, or offline stand-ins
# --------------------------------------------------------------------------------------------


class _OfflineKeys:
    async def keyset(self, kid: str | None) -> KeySet:
        raise Unverifiable("not fetched offline")

    async def issuers(self) -> tuple[str, ...]:
        raise Unverifiable("not fetched offline")


class _OfflineIntrospection:
    async def introspect(self, token: str) -> dict[str, Any] | None:
        raise Unverifiable("not fetched offline")


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
        raise Unverifiable("not fetched offline")  # the discovery document names the issuer

    keys = None if auth.keys.type == "REMOTE_INTROSPECTION" else _OfflineKeys()
    introspection = (
        # Duck-typed stand-in: the engine only calls introspect().
        cast(IntrospectionClient, _OfflineIntrospection()) if _introspects(auth.keys) else None
    )
    return DeploymentIdp(keys, introspection, issuers)


_UNVERIFIED_NOTE = (
    "computed offline WITHOUT the signature check: it holds only if the signature is valid"
)


def _engine_note(selection: Selection | None, offline: bool) -> str:
    if selection is None:
        return "computed by the server's engine"
    if selection.deployment.auth.keys.type == "STATIC_KEYS":
        return "computed by the server's engine; static keys need no network"
    if offline:
        return "computed by the server's engine; it needed no key or IdP call"
    return "computed by the server's engine, with keys / introspection from the IdP"


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
    """Every check of the request (``req.token`` where the policy reads it, or the request as
    sent) against the policy the server would select, and the server's decision. Raises
    :class:`UsageError` or :class:`ConfigError`."""
    inp = build_input(config, req)
    now = clock()  # one instant for every step
    found = select(
        config,
        authority=inp.host,
        raw_path=inp.raw_path,
        method=inp.method,
        context_extensions=inp.context_extensions,
    )
    selection = found if isinstance(found, Selection) else None
    # The token named in the report: the one given, or the one the server finds in the request.
    token = req.token
    if token is None and selection is not None:
        extracted = extract_token(selection.deployment.auth, inp.headers, inp.raw_path)
        token = extracted if isinstance(extracted, str) else None
    token_id = token_hash(token) if token is not None else None
    kind: Literal["jwt", "opaque"] | None = None
    if token is not None:
        kind = "jwt" if looks_like_jwt(token) else "opaque"
    providers: Providers | None = None
    idps: dict[str, DeploymentIdp] = {}
    if selection is not None:
        deployment = selection.deployment
        if req.offline:
            for policy in deployment.policies:  # each DYNAMIC_AUTHENTICATION server's own
                idps[policy.idp_key] = _offline_idp(policy)
        else:
            # Only this deployment's: other deployments' client secrets need not be readable here.
            providers = Providers(config, client_factory=client_factory, deployments=(deployment,))
            idps = dict(providers.by_deployment)
    trace = Trace(keep_going=True)
    decision: Decision | None
    try:
        decision = await Engine(config, idps, clock=lambda: now).check(inp, trace)
    except Unverifiable:
        decision = None
    finally:
        if providers is not None:
            await providers.aclose()

    checks = tuple(render_step(step, inp, trace) for step in trace.steps)
    notes: list[str] = []
    if trace.claims_read and not trace.claims_verified:
        notes.append("Claims were read from the token WITHOUT a verified signature.")
    if decision is None:
        assert selection is not None
        verdict = Verdict(
            allowed=None,
            exact=False,
            note="undecided offline: only the identity provider can tell if the token is active",
            deployment=selection.deployment.name,
            route=selection.route_name,
        )
    elif trace.unverified_signature:
        if decision.allowed:
            # Upstream headers are left out: they come from claims whose signature is unchecked.
            decision = allow(decision.deployment, decision.route)
        verdict = verdict_of(decision, config, exact=False, note=_UNVERIFIED_NOTE)
    else:
        note = _engine_note(selection, req.offline)
        verdict = verdict_of(decision, config, exact=True, note=note)
    return Explanation(
        token_id,
        kind,
        inp,
        req.offline,
        selection,
        checks,
        trace.claims_verified,
        verdict,
        tuple(notes),
        None if req.headers is None else tuple(sorted(inp.headers)),
    )
