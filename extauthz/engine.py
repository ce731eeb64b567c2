"""The check, start to finish: select the policy, find the token, get keys, validate, authorize.

The only ``await`` is for key material from the identity-provider layer; every decision is made by
the pure functions of ``routing``, ``tokens`` and ``validation``. Whatever happens, ``check``
returns a :class:`~extauthz.decision.Decision`: an IdpError becomes ``idp_call_failed`` here, at
this one boundary.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .bounded import BoundedCache
from .config import Config, Deployment
from .decision import Decision, Denial, Reason, allow, deny
from .errors import IdpError
from .idp import DeploymentIdp
from .routing import Selection, request_path, select
from .tokens import extract_token
from .validation import (
    check_claims,
    check_scope,
    claim_text,
    looks_like_jwt,
    numeric_date,
    read_header,
    scopes_of,
    verifying_key,
)
from .verified import Verified, VerifiedTokens, token_digest

__all__ = [
    "AMBIGUOUS_EVENT",
    "IDP_FAILED_EVENT",
    "MAX_ANSWERS",
    "NO_POLICY_EVENT",
    "Answer",
    "CheckInput",
    "Engine",
]

IDP_FAILED_EVENT = "authentication.idpCallFailed"
NO_POLICY_EVENT = "routing.noMatchingPolicy"
AMBIGUOUS_EVENT = "routing.requestAmbiguous"
_MAX_REUSED_ALLOWS = 8_192
_MAX_ROUTES = 8_192
# A longer request line (authority, path, method and context_extensions together) is selected
# every time and never kept: the route memo holds at most 8,192 x 512 characters of requests.
_MAX_ROUTE_KEY_CHARS = 512
_MAX_MESSAGE_PATH_CHARS = 128  # how much of a path a message quotes
MAX_ANSWERS = 16_384  # remembered answers (with their serialized responses)
EXPIRED_TOKEN_MEMORY_SECONDS = 300.0
_NO_CLAIMS: Mapping[str, Any] = {}  # an anonymous allow
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # all but TAB


def idp_log_fields(exc: IdpError) -> tuple[tuple[str, str], ...]:
    """``endpoint``, and for an unusable answer what was wrong with it (never the body itself)."""
    fields: tuple[tuple[str, str], ...] = (("endpoint", exc.endpoint),)
    detail = getattr(exc, "detail", "")
    return (*fields, ("detail", detail)) if detail else fields


@dataclass(frozen=True, slots=True)
class CheckInput:
    """What the engine needs from a CheckRequest, already lifted out of protobuf."""

    method: str
    host: str
    raw_path: str  # as Envoy sent it, query string included
    headers: Mapping[str, str]  # lower-case names
    context_extensions: Mapping[str, str]

    @property
    def path(self) -> str:
        """The path without query string and fragment, as matched and logged."""
        return request_path(self.raw_path)


RouteKey = tuple[str, str, str, frozenset[tuple[str, str]] | None]


def _route_key(
    host: str, path: str, method: str, context_extensions: Mapping[str, str]
) -> tuple[RouteKey, int]:
    """The route memo's key for a request line, and its size in characters."""
    size = len(host) + len(path) + len(method)
    if not context_extensions:
        return (host, path, method, None), size
    for k, v in context_extensions.items():
        size += len(k) + len(v)
    return (host, path, method, frozenset(context_extensions.items())), size


def _quoted_path(path: str) -> str:
    """A path for a message, cut short: a message is logged and may be rendered to the client."""
    if len(path) <= _MAX_MESSAGE_PATH_CHARS:
        return path
    return f"{path[:_MAX_MESSAGE_PATH_CHARS]}... ({len(path)} characters)"


def _credential_digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


@dataclass(slots=True, eq=False)
class Answer:
    """A decision that may be given again to the same credential on the same route without
    validating it again: while the wall clock is within ``[not_before, not_after]`` and the IdP
    documents it rested on are the same version and within their TTL. For an allow the window is
    the token's nbf and exp with the clock skew, and the introspection answer's cache lifetime;
    for an expired token's denial, from just past exp plus the skew on."""

    decision: Decision
    not_before: float
    not_after: float
    idp: DeploymentIdp
    documents_version: int
    # The server's serialized response to a reusable allow, set the first time the answer is
    # given again; the engine never reads it. Kept here rather than in a cache of the server's
    # own, a remembered answer is two objects for the garbage collector to visit, not three.
    wire: bytes | None = None

    def valid(self, now: float) -> bool:
        return (
            self.not_before <= now <= self.not_after
            and self.idp.documents_version() == self.documents_version
        )


def _header_value(value: Any) -> str | None:
    """A claim as an upstream header value; None when it cannot be one safely."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        text = ",".join(value)
    else:
        text = claim_text(value)
    # CR, LF and other controls would let a claim smuggle headers; drop rather than encode.
    return None if _CONTROL_CHARS.search(text) else text


class Engine:
    def __init__(
        self,
        config: Config,
        providers: Mapping[str, DeploymentIdp],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._providers = providers
        self._clock = clock
        self._verified = VerifiedTokens()
        # The content of an allow decision (headers, headers to remove, metadata: the metadata
        # names the deployment and route) → the one Decision object with that content.
        self._allows: dict[tuple[tuple[Any, ...], ...], Decision] = {}
        # Route selection is a pure function of the request line and the config: memoized, for
        # request lines in normal form only.
        self._routes: BoundedCache[RouteKey, Selection | None] = BoundedCache(
            _MAX_ROUTES, _MAX_ROUTE_KEY_CHARS
        )
        # (id(deployment), id(route), SHA-256 of the credential header) → Answer. The ids are of
        # objects of this engine's config, which lives as long as the engine: never reused.
        self._answers: dict[tuple[int, int, bytes], Answer] = {}
        self._last_digest: tuple[str, bytes] = ("", b"")

    def _select(self, req: CheckInput) -> Selection | Denial | None:
        """The policy for a request: a Selection, None when none matches, or a
        ``request_ambiguous`` Denial when the path or authority is not in normal form."""
        key, size = _route_key(req.host, req.path, req.method, req.context_extensions)
        found = self._routes.get(key)
        if found is not None or key in self._routes:  # None is kept too: no policy matches
            return found
        selection = select(
            self.config,
            authority=req.host,
            raw_path=req.raw_path,
            method=req.method,
            context_extensions=req.context_extensions,
        )
        if not isinstance(selection, Denial):
            self._routes.put(key, selection, size)
        return selection

    def reuse(
        self,
        host: str,
        raw_path: str,
        method: str,
        context_extensions: Mapping[str, str],
        headers: Mapping[str, str],
    ) -> Answer | None:
        """The answer an earlier check gave the same credential on the same route, if it may be
        given again now (see :class:`Answer`); None sends the check down the whole path.

        ``host``, ``raw_path`` and ``method`` are the CheckRequest's own fields: when one is empty
        the whole path derives it from the headers instead, so nothing is reused.
        """
        if not (host and raw_path and method):
            return None
        key, _ = _route_key(host, request_path(raw_path), method, context_extensions)
        selection = self._routes.get(key)
        if selection is None:
            return None
        header = selection.deployment.auth.token_header
        value = headers.get(header) if header is not None else None
        if value is None:
            return None
        digest = _credential_digest(value)
        self._last_digest = (value, digest)  # a miss goes on to check(), which needs it again
        answer = self._answers.get((id(selection.deployment), id(selection.route), digest))
        if answer is not None and answer.valid(self._clock()):
            return answer
        return None

    def _remember(
        self,
        selection: Selection,
        headers: Mapping[str, str],
        answer: Answer,
    ) -> None:
        policy = selection.deployment.auth
        value = headers.get(policy.token_header) if policy.token_header is not None else None
        if value is None or answer.not_before > answer.not_after:
            return
        if len(self._answers) >= MAX_ANSWERS:
            self._answers.clear()
        last_value, digest = self._last_digest
        if value != last_value:
            digest = _credential_digest(value)
        self._answers[(id(selection.deployment), id(selection.route), digest)] = answer

    async def check(self, req: CheckInput) -> Decision:
        selection = self._select(req)
        if isinstance(selection, Denial):
            return deny(selection.reason, selection.message, event=AMBIGUOUS_EVENT)
        if selection is None:
            return deny(
                Reason.NO_MATCHING_POLICY,
                "No deployment or route policy matches"
                f" {req.method.upper()} {_quoted_path(req.path)}.",
                event=NO_POLICY_EVENT,
            )
        deployment, route = selection.deployment, selection.route_name
        policy = deployment.auth

        def denied(d: Denial, **kw: Any) -> Decision:
            return deny(
                d.reason,
                d.message,
                deployment=deployment.name,
                route=route,
                event=kw.pop("event", policy.log_event),
                **kw,
            )

        token = extract_token(policy, req.headers, req.raw_path)
        if isinstance(token, Denial):
            return denied(token)
        if token is None:
            if selection.authorization == "ANONYMOUS":
                return self._allow(selection, _NO_CLAIMS)
            where = (
                f"query parameter '{policy.token_query_param}'"
                if policy.token_query_param
                else f"'{policy.token_header}' header"
            )
            return denied(Denial(Reason.TOKEN_MISSING, f"No token was found in the {where}."))

        idp = self._providers[deployment.name]
        # Taken before any await: a document fetched meanwhile makes the answer unusable.
        documents_version = idp.documents_version()
        try:
            authenticated = await self._authenticate(token, policy.algorithms, idp)
            issuers = await idp.issuers()
        except IdpError as exc:
            return denied(
                Denial(Reason.IDP_CALL_FAILED, exc.message),
                event=IDP_FAILED_EVENT,
                log_fields=idp_log_fields(exc),
            )
        if isinstance(authenticated, Denial):
            return denied(authenticated)
        claims, cached_until = authenticated
        # RFC 7662 makes `exp` optional in an introspection answer; a JWT must carry it.
        failure = check_claims(
            claims,
            policy,
            self._clock(),
            issuers,
            require_exp=idp.keys is not None and looks_like_jwt(token),
        )
        if failure is None and selection.authorization == "ANY_OF":
            assert selection.route is not None
            failure = check_scope(claims, selection.route.allowed_scope)
            if failure:
                return denied(failure, required_scope=selection.route.allowed_scope)
        skew = policy.clock_skew
        exp = numeric_date(claims.get("exp"))
        if failure:
            decision = denied(failure)
            expired = failure.reason is Reason.TOKEN_EXPIRED
            if expired and exp is not None and documents_version is not None:
                # A client retrying an expired token gets the same denial without a parse or a
                # key lookup: an expired token stays expired (until the keys change).
                after = math.nextafter(exp + skew, math.inf)
                answer = Answer(decision, after, cached_until, idp, documents_version)
                self._remember(selection, req.headers, answer)
            return decision
        decision = self._allow(selection, claims)
        if documents_version is not None:
            nbf = numeric_date(claims.get("nbf"))
            answer = Answer(
                decision,
                -math.inf if nbf is None else nbf - skew,
                min(cached_until, math.inf if exp is None else exp + skew),
                idp,
                documents_version,
            )
            self._remember(selection, req.headers, answer)
        return decision

    async def _authenticate(
        self, token: str, algorithms: frozenset[str], idp: DeploymentIdp
    ) -> tuple[Mapping[str, Any], float] | Denial:
        """The token's claims once its signature (or the IdP's introspection) vouches for them,
        with how long that vouching may be remembered (wall clock)."""
        if idp.keys is None or (not looks_like_jwt(token) and idp.introspection is not None):
            assert idp.introspection is not None
            claims = await idp.introspection.introspect(token)
            if claims is None:
                inactive = "The identity provider reports the token as not active."
                return Denial(Reason.TOKEN_INACTIVE, inactive)
            return claims, idp.introspection.cached_until(token)
        digest = token_digest(token)
        hit = self._verified.get(digest, self._clock())
        if hit is not None and hit.alg in algorithms:
            keys = await idp.keys.keyset(hit.kid)
            # Equal keys count too: two deployments with the same static key hold two copies.
            if any(k is hit.key or k == hit.key for k in keys.keys):
                return hit.claims, math.inf
        header = read_header(token, algorithms)
        if isinstance(header, Denial):
            return header
        keys = await idp.keys.keyset(header.kid)
        key = verifying_key(header, keys)
        if isinstance(key, Denial):
            return key
        payload: dict[str, Any] = header.payload
        exp = numeric_date(payload.get("exp"))
        if exp is not None:
            # Kept a while past exp too: a client retrying an expired token is denied cheaply.
            until = max(exp, self._clock()) + EXPIRED_TOKEN_MEMORY_SECONDS
            self._verified.put(digest, Verified(payload, header.alg, header.kid, key, until))
        return payload, math.inf

    def _allow(self, selection: Selection, claims: Mapping[str, Any]) -> Decision:
        """The allow decision for these claims on this route. Decisions with the same content
        (headers and metadata: the same client, whichever of its tokens) are one object, so
        that the servicer renders each once."""
        deployment: Deployment = selection.deployment
        headers: list[tuple[str, str]] = []
        remove: list[str] = []
        for name, claim in deployment.headers_from_claims:
            value = claims.get(claim)
            text = _header_value(value) if value is not None else None
            if text is None:
                remove.append(name)  # never let a client-sent copy through
            else:
                headers.append((name, text))
        metadata: dict[str, Any] = {
            "deployment": deployment.name,
            "route": selection.route_name,
        }
        if claims:
            for key in ("sub", "iss"):
                if isinstance(claims.get(key), str):
                    metadata[key] = claims[key]
            client_id = claims.get("client_id", claims.get("azp"))
            if isinstance(client_id, str):
                metadata["client_id"] = client_id
            metadata["scope"] = " ".join(sorted(scopes_of(claims)))
        content = (tuple(headers), tuple(remove), tuple(metadata.items()))
        decision = self._allows.get(content)
        if decision is None:
            decision = allow(
                deployment.name,
                selection.route_name,
                upstream_headers=content[0],
                remove_headers=content[1],
                metadata=metadata,
                reusable=True,
            )
            if len(self._allows) >= _MAX_REUSED_ALLOWS:
                self._allows.clear()
            self._allows[content] = decision
        return decision
