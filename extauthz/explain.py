"""``extauthz explain``: one token against the exact policy the server applies, every check shown.

The report is the server's own run, traced: :meth:`Engine.check <extauthz.engine.Engine.check>`
runs on a :class:`~extauthz.engine.CheckInput` built from the command line, with the providers the
server builds, and records every step in a :class:`~extauthz.steps.Trace` that goes on past the
first failure. This module only builds that input and runs it; :mod:`extauthz.report` renders
the steps. No check is run here, so the decision printed is the server's by construction.

With ``--offline`` the key and introspection sources raise
:class:`~extauthz.steps.Unverifiable`: the engine records what it could not check and, when
nothing failed before, the decision is marked as holding only if the signature does.

:func:`explain` computes an :class:`Explanation`; ``report.render_text`` and ``report.to_json``
format it; the CLI prints. The token is never part of the output: it is named by the first 8 hex
characters of its SHA-256, and every value read from it is shown JSON-escaped.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast
from urllib.parse import quote

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
from .validation import looks_like_jwt

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


@dataclass(frozen=True, slots=True)
class ExplainRequest:
    """The command line: a token and the request it would come with."""

    token: str = field(repr=False)  # never in a repr, a log or a traceback
    deployment: str | None = None  # like Envoy's context_extensions `deployment`
    path: str | None = None  # default: the named (or only) deployment's pathPrefix
    method: str = "GET"
    host: str | None = None  # default: that deployment's first exact host, else ""
    offline: bool = False


class UsageError(ExtauthzError):
    """The command line names something the config does not have."""


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
    """Every check of ``req.token`` against the policy the server would select, and the
    server's decision. Raises :class:`UsageError` or :class:`ConfigError`."""
    inp = build_input(config, req)
    now = clock()  # one instant for every step
    token_id = token_hash(req.token)
    kind: Literal["jwt", "opaque"] = "jwt" if looks_like_jwt(req.token) else "opaque"
    found = select(
        config,
        authority=inp.host,
        raw_path=inp.raw_path,
        method=inp.method,
        context_extensions=inp.context_extensions,
    )
    selection = found if isinstance(found, Selection) else None
    providers: Providers | None = None
    idps: dict[str, DeploymentIdp] = {}
    if selection is not None:
        deployment = selection.deployment
        if req.offline:
            idps[deployment.name] = _offline_idp(deployment)
        else:
            # Only this deployment's: other deployments' client secrets need not be readable here.
            providers = Providers(config, client_factory=client_factory, deployments=(deployment,))
            idps[deployment.name] = providers.by_deployment[deployment.name]
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
    )
