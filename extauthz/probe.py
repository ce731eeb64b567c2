"""``extauthz probe``: every identity-provider endpoint of a config, checked from where it runs.

For each endpoint (the discovery document, the JWKS it or the config names, the introspection
endpoint) the probe walks the network path one layer at a time, so a failure names its layer:

    dns ─▶ tcp ─▶ tls (https) ─▶ http ─▶ json ─▶ issuer | keys | introspection

``dns``, ``tcp`` and ``tls`` are measured here; ``http`` and everything after go through the
server's own IdP layer (:class:`~extauthz.idp.Providers`, built for one endpoint at a time, on a
client from :func:`~extauthz.idp.http.make_client`), so a failure carries the exact
execution-log message the server would write (docs/logs.md). Introspection is called with the
configured client credentials and a made-up token: a healthy IdP answers ``{"active": false}``.

:func:`probe` computes a :class:`ProbeReport`; :func:`render_text` and :func:`to_json` format it.
Client secrets are never part of it, and credentials in a URI are masked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Literal

import httpx
from cryptography import x509

from .config import ClientDetails, Config, ConfigError, Deployment, KeySource
from .errors import IdpBadResponse, IdpBadStatus, IdpError, IdpUnreachable
from .idp import DeploymentIdp, Providers
from .idp.discovery import DiscoveryDocument
from .idp.http import TlsSettings, make_client, tls_context
from .keys import KeySet

__all__ = ["EndpointReport", "ProbeReport", "Step", "probe", "render_text", "to_json"]

OK_MARK, FAIL_MARK = "✔", "✘"
CERT_EXPIRY_WARNING_DAYS = 14


@dataclass(frozen=True, slots=True)
class Step:
    """One layer of one endpoint: ✔ or ✘, what was seen, and for a failure the log message."""

    name: str
    ok: bool
    detail: str
    message: str | None = None
    ms: float | None = None
    facts: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EndpointReport:
    endpoint: str  # discovery | jwks_uri | introspection_endpoint
    uri: str
    deployments: tuple[str, ...]
    via: str | None  # "named by the discovery document <uri>", for derived endpoints
    steps: tuple[Step, ...]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)


@dataclass(frozen=True, slots=True)
class ProbeReport:
    source: str
    endpoints: tuple[EndpointReport, ...]
    static_only: tuple[str, ...]  # deployments with static keys: nothing to probe

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.endpoints)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


# --------------------------------------------------------------------------------------------
# What to probe
# --------------------------------------------------------------------------------------------


@dataclass
class _Target:
    endpoint: str
    uri: str
    source: KeySource
    deployments: list[Deployment]
    via: str | None = None
    client: ClientDetails | None = None  # introspection only

    @property
    def tls(self) -> TlsSettings:
        return TlsSettings(self.source.verify_tls, self.source.ca_file)

    def key(self) -> tuple[Any, ...]:
        return (self.endpoint, self.uri, self.tls, self.source.timeout_seconds, self.client)


def _targets(config: Config) -> tuple[list[_Target], list[str]]:
    """The endpoints the config names directly, each once, in config order."""
    found: dict[tuple[Any, ...], _Target] = {}
    static: list[str] = []
    for d in (policy for deployment in config.deployments for policy in deployment.policies):
        keys = d.auth.keys
        if keys.type == "STATIC_KEYS" or keys.uri is None:
            static.append(d.label)
            continue
        endpoint = {
            "REMOTE_JWKS": "jwks_uri",
            "REMOTE_DISCOVERY": "discovery",
            "REMOTE_INTROSPECTION": "introspection_endpoint",
        }[keys.type]
        client = keys.client if endpoint == "introspection_endpoint" else None
        target = _Target(endpoint, keys.uri, keys, [], client=client)
        found.setdefault(target.key(), target).deployments.append(d)
    return list(found.values()), static


# --------------------------------------------------------------------------------------------
# dns, tcp, tls
# --------------------------------------------------------------------------------------------


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


def _describe_cert(der: bytes | None) -> tuple[str, dict[str, Any]]:
    if not der:
        return "no certificate", {}
    cert = x509.load_der_x509_certificate(der)
    not_after = cert.not_valid_after_utc
    days = (not_after - datetime.now(UTC)).total_seconds() / 86400
    when = not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
    left = f"expired {-days:.0f} days ago" if days < 0 else f"in {days:.0f} days"
    facts = {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "notAfter": when,
    }
    return f"subject {facts['subject']}, expires {when} ({left})", facts


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close a probe connection and wait (briefly) until it is closed: a transport still closing
    when the probe's event loop ends is never closed at all."""
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 1.0)


async def _peer_certificate(ip: str, port: int, host: str, timeout: float) -> bytes | None:
    """The certificate the server presents, fetched without verifying it (to show it)."""
    ctx = tls_context(TlsSettings(verify=False))
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(ip, port, ssl=ctx, server_hostname=host), timeout
        )
    except (OSError, TimeoutError):
        return None
    try:
        obj = writer.get_extra_info("ssl_object")
        return obj.getpeercert(binary_form=True) if obj else None
    finally:
        await _close(writer)


async def _reach(
    target: _Target, uri: str, tls_context: ssl.SSLContext | Exception
) -> tuple[list[Step], bool]:
    """dns, tcp and (for https) tls; False when a layer failed and the rest cannot be tried."""
    url = httpx.URL(uri)
    host = url.host
    https = url.scheme == "https"
    port = url.port or (443 if https else 80)
    timeout = target.source.timeout_seconds
    name = target.endpoint
    steps: list[Step] = []
    loop = asyncio.get_running_loop()

    started = time.perf_counter()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout
        )
    except (OSError, TimeoutError) as exc:
        why = "no answer in time" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        message = IdpUnreachable(name, uri, "DNS_FAILURE").message
        steps.append(Step("dns", False, f"{host}: {why}", message, _ms(started)))
        return steps, False
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    steps.append(
        Step(
            "dns",
            True,
            f"{host} → {', '.join(addresses[:4])}",
            ms=_ms(started),
            facts={"addresses": addresses},
        )
    )

    ip = addresses[0]
    started = time.perf_counter()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
    except (OSError, TimeoutError) as exc:
        kind = "TIMEOUT" if isinstance(exc, TimeoutError) else "CONNECTION_REFUSED"
        if kind == "TIMEOUT":
            why = "no answer in time"
        elif isinstance(exc, ConnectionRefusedError):
            why = "connection refused"
        else:
            why = exc.strerror or str(exc)
        message = IdpUnreachable(name, uri, kind).message
        steps.append(Step("tcp", False, f"{ip} port {port}: {why}", message, _ms(started)))
        return steps, False
    steps.append(Step("tcp", True, f"{ip} port {port}", ms=_ms(started)))
    if not https:
        await _close(writer)
        return steps, True

    started = time.perf_counter()
    if isinstance(tls_context, Exception):  # caFile unreadable or not PEM
        await _close(writer)
        why = getattr(tls_context, "strerror", None) or str(tls_context)
        message = IdpUnreachable(name, uri, "TLS_ERROR").message
        steps.append(Step("tls", False, f"caFile {target.tls.ca_file}: {why}", message))
        return steps, False
    ctx = tls_context
    try:
        await asyncio.wait_for(writer.start_tls(ctx, server_hostname=host), timeout)
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        await _close(writer)
        if isinstance(exc, ssl.SSLCertVerificationError):
            why = f"certificate verify failed: {exc.verify_message}"
        elif isinstance(exc, TimeoutError):
            why = "no handshake in time"
        else:
            why = getattr(exc, "reason", None) or str(exc)
        shown, facts = _describe_cert(await _peer_certificate(ip, port, host, timeout))
        message = IdpUnreachable(name, uri, "TLS_ERROR").message
        detail = f"{why}; the server presents: {shown}"
        steps.append(Step("tls", False, detail, message, _ms(started), facts))
        return steps, False
    obj = writer.get_extra_info("ssl_object")
    version = obj.version() if obj else "?"
    shown, facts = _describe_cert(obj.getpeercert(binary_form=True) if obj else None)
    await _close(writer)
    verified = "verified" if target.tls.verify else "NOT verified (isSslVerifyDisabled)"
    days_left = _days_left(facts.get("notAfter"))
    note = ""
    if days_left is not None and days_left < CERT_EXPIRY_WARNING_DAYS:
        note = " — renew soon"
    detail = f"{version}, {verified}, {shown}{note}"
    steps.append(Step("tls", True, detail, ms=_ms(started), facts={"version": version, **facts}))
    return steps, True


def _days_left(not_after: str | None) -> float | None:
    if not not_after:
        return None
    end = datetime.strptime(not_after, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return (end - datetime.now(UTC)).total_seconds() / 86400


# --------------------------------------------------------------------------------------------
# http, json and what each endpoint must say
# --------------------------------------------------------------------------------------------


class _Recorder:
    """httpx event hooks: the status, content type and time to headers of the probe's request."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.content_type = ""
        self.ms: float | None = None
        self._started = 0.0

    async def request(self, _request: httpx.Request) -> None:
        self._started = time.perf_counter()

    async def response(self, response: httpx.Response) -> None:
        self.status = response.status_code
        self.content_type = response.headers.get("content-type", "").split(";")[0] or "none"
        self.ms = _ms(self._started)

    def http_step(self) -> Step:
        status = self.status or 0
        detail = f"{status} {_phrase(status)}, {self.content_type}"
        return Step("http", True, detail, ms=self.ms, facts={"status": status})


def _failure_steps(exc: IdpError, rec: _Recorder, target: _Target) -> list[Step]:
    """An IdpError from the server's code, placed on the layer it belongs to."""
    if isinstance(exc, IdpBadStatus):
        detail = f"received ({exc.status}, {_phrase(exc.status)})"
        if exc.status in (401, 403) and target.endpoint == "introspection_endpoint":
            detail += ": the IdP refuses the configured client credentials"
        return [Step("http", False, detail, exc.message, rec.ms, {"status": exc.status})]
    if isinstance(exc, IdpUnreachable):
        return [Step("http", False, exc.kind, exc.message, rec.ms)]
    if isinstance(exc, IdpBadResponse):
        steps = [rec.http_step()] if rec.status is not None else []
        what = exc.detail or "unexpected content"
        detail = f"{what} (content-type {rec.content_type or 'none'})"
        return [*steps, Step("json", False, detail, exc.message)]
    return [Step("http", False, type(exc).__name__, exc.message, rec.ms)]


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


async def _server_says(
    config: Config, target: _Target, issuers: tuple[str, ...], client: httpx.AsyncClient
) -> str:
    """The message the server's discovery provider fails with when it expects ``issuers``."""
    idp = _endpoint_idp(config, target, client, issuers)
    assert idp.discovery is not None
    try:
        await idp.discovery.document()
    except IdpError as exc:
        return exc.message
    return f"The discovery document at {target.uri} names an issuer that is not configured."


async def _discovery_steps(
    config: Config, target: _Target, doc: DiscoveryDocument, client: httpx.AsyncClient
) -> list[Step]:
    fields = ["issuer", "jwks_uri"] + (
        ["introspection_endpoint"] if doc.introspection_endpoint else []
    )
    steps = [Step("json", True, f"discovery document with {', '.join(fields)}")]
    mismatched = [
        d for d in target.deployments if d.auth.issuers and doc.issuer not in d.auth.issuers
    ]
    if mismatched:
        configured = sorted({i for d in mismatched for i in d.auth.issuers})
        names = ", ".join(d.label for d in mismatched)
        detail = (
            f"document issuer: {_q(doc.issuer)}  configured issuers: {_q(configured)} "
            f"(deployments: {names})"
        )
        message = await _server_says(config, target, mismatched[0].auth.issuers, client)
        steps.append(
            Step(
                "issuer",
                False,
                detail,
                message,
                facts={"actual": doc.issuer, "expected": configured},
            )
        )
    elif any(d.auth.issuers for d in target.deployments):
        steps.append(Step("issuer", True, f"{_q(doc.issuer)} is a configured issuer"))
    else:
        steps.append(
            Step(
                "issuer",
                True,
                f"{_q(doc.issuer)} (no issuers configured: tokens must come from it)",
            )
        )
    wanting = [d.label for d in target.deployments if d.auth.keys.client is not None]
    if wanting and doc.introspection_endpoint is None:
        message = IdpBadResponse("discovery", target.uri, "no introspection_endpoint").message
        detail = f"no introspection_endpoint, needed by clientDetails of {', '.join(wanting)}"
        steps.append(Step("introspection_endpoint", False, detail, message))
    return steps


def _keys_steps(target: _Target, uri: str, keys: KeySet) -> list[Step]:
    skipped = (
        f", {keys.skipped} skipped (private, encryption or unknown type)" if keys.skipped else ""
    )
    steps = [Step("json", True, f"JWKS with {len(keys.keys)} signing key(s){skipped}")]
    by_algorithms: dict[frozenset[str], list[str]] = {}
    for d in target.deployments:
        by_algorithms.setdefault(d.auth.algorithms, []).append(d.label)
    offered = sorted({a for k in keys.keys for a in k.algorithms})
    for allowed, names in by_algorithms.items():
        usable = [k for k in keys.keys if k.algorithms & allowed]
        who = f"deployment{'s' if len(names) > 1 else ''} {', '.join(names)}"
        facts = {"deployments": names, "usable": len(usable), "allowed": sorted(allowed)}
        if usable:
            kids = ", ".join(_q(k.kid) for k in usable[:5])
            algs = sorted({a for k in usable for a in k.algorithms & allowed})
            detail = f"{len(usable)} key(s) for {', '.join(algs)} (kid {kids}); {who}"
            steps.append(Step("keys", True, detail, facts=facts))
        else:
            detail = (
                f"no key for the allowed algorithms {_q(sorted(allowed))}; the JWKS offers "
                f"{_q(offered)} ({who})"
            )
            message = (
                f"No key of the JWKS at {uri} can verify the allowed algorithms: every token of "
                f"{who} will fail with key_not_found or algorithm_not_allowed."
            )
            steps.append(Step("keys", False, detail, message, facts=facts))
    return steps


def _q(value: Any) -> str:
    """A value as JSON text (escaped: IdP answers are not trusted to be printable)."""
    return json.dumps(value, ensure_ascii=False)


def _secret_source(client: ClientDetails) -> str:
    if client.secret_file is not None:
        return f"file {client.secret_file}"
    return f"environment variable {client.secret_env}"


def _endpoint_idp(
    config: Config, target: _Target, client: httpx.AsyncClient, issuers: tuple[str, ...] = ()
) -> DeploymentIdp:
    """The server's own IdP layer for just this endpoint, on this probe's client (to see the
    HTTP status). Issuers are left out by default: the probe compares them itself, to report
    them rather than fail on them. Raises ConfigError when the client secret cannot be read."""
    kind: Literal["REMOTE_DISCOVERY", "REMOTE_JWKS", "REMOTE_INTROSPECTION"] = (
        "REMOTE_DISCOVERY"
        if target.endpoint == "discovery"
        else "REMOTE_JWKS"
        if target.endpoint == "jwks_uri"
        else "REMOTE_INTROSPECTION"
    )
    client_details = target.client if kind == "REMOTE_INTROSPECTION" else None
    source = dataclasses.replace(target.source, type=kind, uri=target.uri, client=client_details)
    index = config.deployments.index(target.deployments[0])
    where = f"deployments[{index}].authentication.validationPolicy"
    providers = Providers(config, client_factory=lambda _tls: client, deployments=())
    return providers.for_source(source, issuers, where)


async def _probe(
    target: _Target,
    config: Config,
    client: httpx.AsyncClient,
    tls_context: ssl.SSLContext | Exception,
) -> tuple[EndpointReport, DiscoveryDocument | None]:
    uri = target.uri
    steps, reachable = await _reach(target, uri, tls_context)
    doc: DiscoveryDocument | None = None
    idp: DeploymentIdp | None = None
    if reachable:
        try:
            idp = _endpoint_idp(config, target, client)
        except ConfigError as exc:  # the client secret cannot be read
            errors = exc.errors
            steps.append(Step("credentials", False, "; ".join(errors), errors[0]))
    if idp is not None and target.client is not None:
        detail = (
            f"client {_q(target.client.client_id)}, {target.client.auth_method}, "
            f"secret from {_secret_source(target.client)}"
        )
        steps.append(Step("credentials", True, detail))
    if idp is not None:
        rec = _Recorder()
        client.event_hooks["request"].append(rec.request)
        client.event_hooks["response"].append(rec.response)
        try:
            if target.endpoint == "discovery":
                assert idp.discovery is not None
                doc = await idp.discovery.document()
                steps.append(rec.http_step())
                steps.extend(await _discovery_steps(config, target, doc, client))
            elif target.endpoint == "jwks_uri":
                assert idp.keys is not None
                keys = await idp.keys.keyset(None)
                steps.append(rec.http_step())
                steps.extend(_keys_steps(target, uri, keys))
            else:
                assert idp.introspection is not None
                # A made-up token that no IdP has issued: the only right answer is inactive.
                dummy = "extauthz-probe-" + secrets.token_hex(16)
                answer = await idp.introspection.introspect(dummy)
                steps.append(rec.http_step())
                steps.append(Step("json", True, "an RFC 7662 answer with a boolean 'active'"))
                if answer is None:
                    detail = '{"active": false} for a made-up token: the credentials are accepted'
                    steps.append(Step("introspection", True, detail))
                else:
                    detail = '{"active": true} for a made-up token: its answers cannot be trusted'
                    message = (
                        f"The introspection_endpoint uri: {uri} reports a token no IdP issued as "
                        "active."
                    )
                    steps.append(Step("introspection", False, detail, message))
        except IdpError as exc:
            steps.extend(_failure_steps(exc, rec, target))
    report = EndpointReport(
        target.endpoint,
        uri,
        tuple(d.label for d in target.deployments),
        target.via,
        tuple(steps),
    )
    return report, doc


def _derived(target: _Target, doc: DiscoveryDocument) -> list[_Target]:
    """The JWKS and introspection endpoints a discovery document names."""
    via = f"named by the discovery document {target.uri}"
    out = [_Target("jwks_uri", doc.jwks_uri, target.source, list(target.deployments), via)]
    if doc.introspection_endpoint:
        by_client: dict[ClientDetails, list[Deployment]] = {}
        for d in target.deployments:
            if d.auth.keys.client is not None:
                by_client.setdefault(d.auth.keys.client, []).append(d)
        for client, deployments in by_client.items():
            out.append(
                _Target(
                    "introspection_endpoint",
                    doc.introspection_endpoint,
                    deployments[0].auth.keys,
                    deployments,
                    via,
                    client,
                )
            )
    return out


async def _probe_all(
    targets: list[_Target],
    config: Config,
    client_factory: Callable[[TlsSettings], httpx.AsyncClient],
) -> list[tuple[EndpointReport, DiscoveryDocument | None]]:
    """Probe concurrently. Clients and TLS contexts are made first: loading the CA bundle
    blocks the event loop, and would otherwise show up in the other endpoints' timings."""
    contexts: dict[TlsSettings, ssl.SSLContext | Exception] = {}
    for t in targets:
        if t.tls not in contexts:
            try:
                contexts[t.tls] = tls_context(t.tls)
            except (OSError, ssl.SSLError) as exc:
                contexts[t.tls] = exc
    clients = [client_factory(t.tls) for t in targets]
    try:
        return list(
            await asyncio.gather(
                *(
                    _probe(t, config, c, contexts[t.tls])
                    for t, c in zip(targets, clients, strict=True)
                )
            )
        )
    finally:
        for c in clients:
            await c.aclose()


async def probe(
    config: Config,
    *,
    client_factory: Callable[[TlsSettings], httpx.AsyncClient] = make_client,
) -> ProbeReport:
    """Probe every IdP endpoint of ``config``; report in config order, each endpoint a discovery
    document names right after it."""
    targets, static = _targets(config)
    first = await _probe_all(targets, config, client_factory)
    seen: set[tuple[Any, ...]] = set()
    follow: list[list[_Target]] = []
    for target, (_, doc) in zip(targets, first, strict=True):
        derived = []
        for t in _derived(target, doc) if doc is not None else []:
            if t.key() not in seen:
                seen.add(t.key())
                derived.append(t)
        follow.append(derived)
    second = iter(await _probe_all([t for g in follow for t in g], config, client_factory))
    reports: list[EndpointReport] = []
    for (report, _), group in zip(first, follow, strict=True):
        reports.append(report)
        reports.extend(next(second)[0] for _ in group)
    return ProbeReport(config.source, tuple(reports), tuple(static))


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


_USERINFO_PASSWORD = re.compile(r"(//[^/\s:@]+):[^/\s@]+@")


def _mask(text: str) -> str:
    """Text with the password of any URI userinfo (``https://user:pw@host``) masked."""
    return _USERINFO_PASSWORD.sub(r"\1:***@", text)


def render_text(report: ProbeReport) -> str:
    lines = [f"extauthz probe: {report.source or 'config'}", ""]
    width = max([len(s.name) for e in report.endpoints for s in e.steps] + [len("introspection")])
    for e in report.endpoints:
        about = f"deployments: {', '.join(e.deployments)}"
        if e.via:
            about = f"{e.via}; {about}"
        lines.append(f"{e.endpoint}  {_mask(e.uri)}  ({_mask(about)})")
        for s in e.steps:
            mark = OK_MARK if s.ok else FAIL_MARK
            took = f"  {s.ms:.1f} ms" if s.ms is not None else ""
            lines.append(f"  {mark} {s.name:<{width}}  {_mask(s.detail)}{took}")
            if not s.ok and s.message:
                lines.append(f"    {' ' * width}  {_mask(s.message)}")
        lines.append("")
    if report.static_only:
        lines.append(f"static keys, nothing to probe: {', '.join(report.static_only)}")
    failed = [e for e in report.endpoints if not e.ok]
    if not report.endpoints:
        lines.append("probe: the config names no identity-provider endpoint")
    else:
        verdict = f"{len(failed)} failed" if failed else "all good"
        lines.append(f"probe: {len(report.endpoints)} endpoint(s), {verdict}")
    return "\n".join(lines) + "\n"


def to_json(report: ProbeReport) -> dict[str, Any]:
    return {
        "config": report.source,
        "ok": report.ok,
        "endpoints": [
            {
                "endpoint": e.endpoint,
                "uri": _mask(e.uri),
                "via": _mask(e.via) if e.via else None,
                "deployments": list(e.deployments),
                "ok": e.ok,
                "checks": [
                    {
                        "check": s.name,
                        "ok": s.ok,
                        "detail": _mask(s.detail),
                        "message": _mask(s.message) if s.message else None,
                        "ms": s.ms,
                        **dict(s.facts),
                    }
                    for s in e.steps
                ],
            }
            for e in report.endpoints
        ],
        "staticKeys": list(report.static_only),
    }
