"""The check, start to finish: select the policy, find the token, get keys, validate, authorize.

The only ``await`` is for key material from the identity-provider layer; every check is one of
the pure functions of ``routing``, ``tokens`` and ``validation``, which return step values, run
here in their documented order. Whatever happens, ``check`` returns a
:class:`~extauthz.decision.Decision`: an IdpError becomes ``idp_call_failed`` here, at this one
boundary. Remembering answers is not done here but around the engine (:mod:`extauthz.answers`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .config import AuthPolicy, Config, Deployment
from .decision import Decision, Denial, Reason, allow, deny, dry_run
from .dpop import (
    REPLAYED_JTI_MESSAGE,
    Proof,
    ReplayCache,
    binding_step,
    certificate_sha256,
    proof_steps,
    remember,
    remember_in_fleet,
)
from .errors import IdpError
from .idp import DeploymentIdp
from .logs import token_hash
from .routing import Selection, request_path, select, unmatched
from .shared_cache import SharedCache, jwt_scope
from .steps import Step, Trace, Unverifiable, checked, skipped
from .tokens import extract_token, missing_token, sent_as_dpop
from .validation import (
    algorithm_step,
    claim_steps,
    claim_text,
    failure_fields,
    format_step,
    key_steps,
    looks_like_jwt,
    numeric_date,
    parse_jws,
    scope_step,
    scopes_of,
)
from .verified import Verified, VerifiedTokens, token_digest

__all__ = [
    "AMBIGUOUS_EVENT",
    "IDP_FAILED_EVENT",
    "NO_POLICY_EVENT",
    "CheckInput",
    "Engine",
    "Validity",
]

IDP_FAILED_EVENT = "authentication.idpCallFailed"
NO_POLICY_EVENT = "routing.noMatchingPolicy"
AMBIGUOUS_EVENT = "routing.requestAmbiguous"
_MAX_MESSAGE_PATH_CHARS = 128  # how much of a path a message quotes
EXPIRED_TOKEN_MEMORY_SECONDS = 300.0
_NO_CLAIMS: Mapping[str, Any] = {}  # an anonymous allow
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # all but TAB


def idp_log_fields(exc: IdpError) -> tuple[tuple[str, str], ...]:
    """The failed call's fields for its log line (:meth:`IdpError.log_fields`)."""
    return exc.log_fields()


def _denied(selection: Selection, denial: Denial, **fields: Any) -> Decision:
    """A denial on the selected deployment and route, logged under the policy's event."""
    policy = selection.deployment.auth
    return deny(
        denial.reason,
        denial.message,
        deployment=selection.deployment.name,
        route=selection.route_name,
        event=fields.pop("event", None) or policy.log_event,
        auth_server=selection.deployment.auth_server,
        **fields,
    )


def _must(denial: Denial | None) -> Denial:
    assert denial is not None
    return denial


class _FirstFailure:
    """The failure one check answers with (the first), and whether to go on after one.

    The failed step is kept with its denial: the failure line's fields are read from it
    (:func:`~extauthz.validation.failure_fields`), so that the log says what was compared."""

    __slots__ = (
        "claim_values",
        "denial",
        "event",
        "jwks_uri",
        "keep_going",
        "log_fields",
        "required_scope",
        "step",
        "token",
    )

    def __init__(self, keep_going: bool, claim_values: bool, token: str) -> None:
        self.keep_going = keep_going
        self.claim_values = claim_values
        self.token = token  # hashed (never logged) when the failure line is made
        self.jwks_uri: str | None = None  # where the keys came from, for a key's failure
        self.denial: Denial | None = None
        self.step: Step | None = None
        self.event: str | None = None
        self.log_fields: tuple[tuple[str, Any], ...] = ()
        self.required_scope: tuple[str, ...] = ()

    def fail(
        self,
        denial: Denial,
        *,
        step: Step | None = None,
        event: str | None = None,
        log_fields: tuple[tuple[str, Any], ...] = (),
        required_scope: tuple[str, ...] = (),
    ) -> bool:
        """Note a failure; True when the check stops here."""
        if self.denial is None:
            self.denial, self.step, self.event = denial, step, event
            self.log_fields, self.required_scope = log_fields, required_scope
        return not self.keep_going

    def decision(self, selection: Selection) -> Decision:
        assert self.denial is not None
        fields: tuple[tuple[str, Any], ...] = (("tokenSha256", token_hash(self.token)),)
        algs: tuple[str, ...] = ()
        if self.denial.reason is Reason.DPOP_PROOF_INVALID:
            algs = tuple(sorted(selection.deployment.auth.algorithms))
        if self.step is not None:
            fields += failure_fields(self.step, claim_values=self.claim_values)
            if self.step.name in ("kid", "signature") and self.jwks_uri is not None:
                fields += (("jwksUri", self.jwks_uri),)
        return _denied(
            selection,
            self.denial,
            event=self.event,
            log_fields=fields + self.log_fields,
            required_scope=self.required_scope,
            dpop_algs=algs,
        )


class CheckInput(NamedTuple):
    """What the engine needs from a CheckRequest, already lifted out of protobuf. A named tuple:
    immutable, and built on every check for a tenth of a frozen dataclass's cost."""

    method: str
    host: str
    raw_path: str  # as Envoy sent it, query string included
    headers: Mapping[str, str]  # lower-case names
    context_extensions: Mapping[str, str]
    # For sender-constrained tokens: the scheme Envoy received the request with (for the DPoP
    # proof's htu, RFC 9449 §4.3), and the client certificate it saw (RFC 8705 §3): the
    # URL-encoded PEM of attributes.source.certificate (gRPC), or the SHA-256 of its DER from
    # x-forwarded-client-cert's Hash (the HTTP wire).
    scheme: str = ""
    client_certificate: str = ""
    client_certificate_sha256: bytes | None = None

    @property
    def path(self) -> str:
        """The path without query string and fragment, as matched and logged."""
        raw = self.raw_path
        return raw if "?" not in raw and "#" not in raw else request_path(raw)


def _quoted_path(path: str) -> str:
    """A path for a message, cut short: a message is logged and may be rendered to the client."""
    if len(path) <= _MAX_MESSAGE_PATH_CHARS:
        return path
    return f"{path[:_MAX_MESSAGE_PATH_CHARS]}... ({len(path)} characters)"


class Validity(NamedTuple):
    """How long a decision holds for the same credential on the same route: while the wall
    clock is within ``[not_before, not_after]`` and the IdP documents it rested on are still
    ``documents_version`` (no fetch since, none past its TTL). For an allow, the window is the
    token's nbf and exp widened by the clock skew, and the introspection answer's cache lifetime;
    for an expired token's denial, from just past exp plus the skew on."""

    not_before: float
    not_after: float
    idp: DeploymentIdp
    documents_version: int


def _header_value(value: Any) -> str | None:
    """A claim as an upstream header value; None when it cannot be one safely."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        text = ",".join(value)
    else:
        text = claim_text(value)
    # CR, LF and other controls would let a claim smuggle headers; drop rather than encode.
    return None if _CONTROL_CHARS.search(text) else text


class Engine:
    """Decides one request at a time from the config, the IdP layer and the clock.

    Apart from the verified-token cache (the cryptographic fact "this key signed these claims",
    which every check still re-validates against its policy and the time), the engine remembers
    nothing: reusing whole answers is :class:`~extauthz.answers.AnswerCache`'s job, around it.
    """

    def __init__(
        self,
        config: Config,
        providers: Mapping[str, DeploymentIdp],
        *,
        clock: Callable[[], float] = time.time,
        shared_cache: SharedCache | None = None,
    ) -> None:
        """``shared_cache``: the fleet's (``server.sharedCache``), for verified JWTs and DPoP
        ``jti`` values (:mod:`extauthz.shared_cache`)."""
        self.config = config
        self._providers = providers
        self.clock = clock
        self._shared = shared_cache
        # Each key source's scope in the shared cache, made once (static keys are hashed for it).
        self._jwt_scopes = {
            id(p.auth.keys): jwt_scope(p.auth.keys)
            for d in (config.deployments if shared_cache is not None else ())
            for p in d.policies
        }
        self._verified = VerifiedTokens()
        self._replay = ReplayCache()  # DPoP proofs' jti (RFC 9449 §11.1), per process

    def evict(self, digest: bytes | None) -> int:
        """Forget the verified token whose SHA-256 is ``digest`` (every one, for None): its next
        check verifies it again. The number of entries dropped."""
        return self._verified.evict(digest)

    def select(self, req: CheckInput) -> Selection | Denial | None:
        """The policy for a request: a Selection, None when none matches, or a
        ``request_ambiguous`` Denial when the path or authority is not in normal form."""
        return select(
            self.config,
            authority=req.host,
            raw_path=req.raw_path,
            method=req.method,
            context_extensions=req.context_extensions,
        )

    async def check(self, req: CheckInput, trace: Trace | None = None) -> Decision:
        """The decision for one request. With a ``trace``, every step is recorded there (and,
        with ``trace.keep_going``, every check runs even after the first failure); the decision
        is the same either way."""
        decision, _ = await self.decide(req, self.select(req), trace)
        return decision

    async def decide(
        self, req: CheckInput, selection: Selection | Denial | None, trace: Trace | None = None
    ) -> tuple[Decision, Validity | None]:
        """:meth:`check` for a request whose policy is already selected (``self.select(req)``),
        with how long the decision holds for the same credential on the same route (None: only
        this once). A traced check holds only once: it may have gone on past a failure.

        A deployment with ``enforcement: DRY_RUN`` is decided exactly the same; a denial is then
        answered as an allow that keeps its reason for the logs (:func:`.decision.dry_run`). A
        request no deployment was selected for is denied whatever the deployments say."""
        decision, validity = await self._decide(req, selection, trace)
        if not decision.allowed and isinstance(selection, Selection):
            deployment = selection.deployment
            if deployment.dry_run:
                names = tuple(name for name, _ in deployment.headers_from_claims)
                decision = dry_run(decision, names)
        return decision, validity

    async def _decide(
        self, req: CheckInput, selection: Selection | Denial | None, trace: Trace | None
    ) -> tuple[Decision, Validity | None]:
        if isinstance(selection, Denial):
            if trace is not None:
                trace.add(checked("policy", selection))
            return deny(selection.reason, selection.message, event=AMBIGUOUS_EVENT), None
        if selection is None:
            tried = unmatched(
                self.config,
                authority=req.host,
                raw_path=req.raw_path,
                context_extensions=req.context_extensions,
            )
            nothing = Denial(
                Reason.NO_MATCHING_POLICY,
                "No deployment or route policy matches"
                f" {req.method.upper()} {_quoted_path(req.path)}.",
            )
            listed = (
                ("routesTried", list(tried.routes_tried)),
                ("nearestPrefixes", list(tried.nearest_prefixes)),
            )
            fields = tuple((k, v) for k, v in listed if v)
            if trace is not None:
                trace.add(checked("policy", nothing, facts=fields))
            decision = deny(
                nothing.reason,
                nothing.message,
                deployment=tried.deployment,
                event=NO_POLICY_EVENT,
                log_fields=fields,
            )
            return decision, None
        if trace is not None:
            trace.add(checked("policy", None, actual=selection))
        policy = selection.deployment.auth

        token = extract_token(policy, req.headers, req.raw_path)
        if isinstance(token, Denial):
            if trace is not None:
                trace.add(checked("format", token))
            return _denied(selection, token), None
        if token is None:
            if selection.authorization == "ANONYMOUS":
                return _allow(selection, _NO_CLAIMS), None
            message, found = missing_token(policy, req.headers, req.raw_path)
            missing = Denial(Reason.TOKEN_MISSING, message)
            if trace is not None:
                trace.add(checked("token", missing, facts=found))
            # RFC 9449 §7.1: a DPoP-only resource challenges with the DPoP scheme and the
            # proof algorithms it accepts (still no error code: no credential came).
            algs = tuple(sorted(policy.algorithms)) if policy.sender_constraint == "DPOP" else ()
            return _denied(selection, missing, log_fields=found, dpop_algs=algs), None

        by_header = False
        if selection.deployment.servers:
            server = auth_server(selection.deployment, req.headers, token)
            if trace is not None:
                trace.add(server)
            if server.denial is not None:
                found = (("tokenSha256", token_hash(token)), *server.facts)
                return _denied(selection, server.denial, log_fields=found), None
            by_header = selection.deployment.select_by is not None and (
                selection.deployment.select_by[0] == "header"
            )
            # From here on, the server's policy is the deployment's: its keys, its issuers.
            selection = Selection(server.actual.deployment, selection.route)
            policy = selection.deployment.auth

        idp = self._providers[selection.deployment.idp_key]
        # Taken before any await: a document fetched meanwhile makes the answer unusable.
        documents_version = idp.documents_version()
        claim_values = self.config.server.log_claim_values
        failure = _FirstFailure(trace is not None and trace.keep_going, claim_values, token)
        claims, cached_until = await self._authenticate(token, policy, idp, failure, trace)
        if claims is None:
            if trace is not None:
                names = ["exp", "nbf", "iss", "aud", *(f"claim {r.key}" for r in policy.claims)]
                trace.add(*(skipped(n, "no claims to check") for n in [*names, "scope"]))
            if failure.denial is None and trace is not None and trace.undecided:
                raise Unverifiable("the identity provider must be asked")
            assert failure.denial is not None
            return failure.decision(selection), None
        if trace is not None:
            trace.claims_read = True
        constrained = policy.sender_constraint != "NONE"
        if constrained and (failure.denial is None or failure.keep_going):
            await self._sender_constraint(req, token, claims, policy, failure, trace)

        issuers: tuple[str, ...] | Step
        try:
            issuers = await idp.issuers()
        except IdpError as exc:
            unavailable = Denial(Reason.IDP_CALL_FAILED, exc.message)
            endpoint = (("endpoint", exc.endpoint),)
            issuers = checked("iss", unavailable, note="issuer unavailable", facts=endpoint)
            if failure.fail(unavailable, event=IDP_FAILED_EVENT, log_fields=idp_log_fields(exc)):
                return failure.decision(selection), None
        except Unverifiable:
            if trace is None:
                raise
            issuers = skipped("iss", "the issuer comes from the discovery document")
        # RFC 7662 makes `exp` optional in an introspection answer; a JWT must carry it.
        require_exp = idp.keys is not None and looks_like_jwt(token)
        for step in claim_steps(claims, policy, self.clock(), issuers, require_exp=require_exp):
            if trace is not None:
                trace.add(step)
            if step.denial is not None and failure.fail(step.denial, step=step):
                break
        route = selection.route
        allowed_scope = route.allowed_scope if route is not None else ()
        if failure.denial is None or failure.keep_going:
            scope = scope_step(claims, selection.authorization, allowed_scope)
            if trace is not None:
                trace.add(scope)
            if scope.denial is not None:
                failure.fail(scope.denial, step=scope, required_scope=allowed_scope)

        skew = policy.clock_skew
        exp = numeric_date(claims.get("exp"))
        # A sender-constrained decision holds once: every request carries a new proof. A server
        # chosen by a header holds once too: the same token may come with another header.
        holds = (
            documents_version is not None and trace is None and not constrained and not by_header
        )
        if failure.denial is not None:
            decision = failure.decision(selection)
            if holds and exp is not None and failure.denial.reason is Reason.TOKEN_EXPIRED:
                # An expired token stays expired (until the keys change): from just past exp
                # plus the skew, the same denial holds without a parse or a key lookup.
                after = math.nextafter(exp + skew, math.inf)
                assert documents_version is not None
                return decision, Validity(after, cached_until, idp, documents_version)
            return decision, None
        decision = _allow(selection, claims)
        if not holds:
            return decision, None
        assert documents_version is not None
        nbf = numeric_date(claims.get("nbf"))
        not_before = -math.inf if nbf is None else nbf - skew
        not_after = min(cached_until, math.inf if exp is None else exp + skew)
        return decision, Validity(not_before, not_after, idp, documents_version)

    async def _sender_constraint(
        self,
        req: CheckInput,
        token: str,
        claims: Mapping[str, Any],
        policy: AuthPolicy,
        failure: _FirstFailure,
        trace: Trace | None,
    ) -> None:
        """The DPoP proof (RFC 9449 §4.3) and the token's ``cnf`` binding (RFC 9449 §6, RFC 8705
        §3), as steps, after the signature or introspection and before the claims."""
        mode = policy.sender_constraint
        steps: list[Step] = []
        proof: Proof | None = None
        cnf = claims.get("cnf")
        dpop_bound = isinstance(cnf, dict) and "jkt" in cnf
        if sent_as_dpop(policy, req.headers):
            steps, proof = proof_steps(
                req.headers.get("dpop"),
                token=token,
                method=req.method,
                htu=_request_uri(req),
                allowed=policy.algorithms,
                skew=policy.clock_skew,
                now=self.clock(),
                replay=self._replay,
            )
            if proof is not None:
                steps.append(binding_step(claims, proof=proof, certificate_sha256=None))
        elif mode == "DPOP" or (mode == "DPOP_OR_MTLS" and dpop_bound):
            # RFC 9449 §7.1: a DPoP-bound token is presented with the DPoP scheme, never as Bearer.
            wrong = Denial(
                Reason.TOKEN_BINDING_MISMATCH,
                "The token was sent with another scheme than DPoP; this deployment requires DPoP."
                if mode == "DPOP"
                else "The token is DPoP-bound ('cnf' 'jkt') but was sent with another scheme.",
            )
            steps = [checked("cnf", wrong, facts=(("dpopBound", dpop_bound),))]
        else:
            digest = req.client_certificate_sha256
            if digest is None:
                digest = certificate_sha256(req.client_certificate)
            steps = [binding_step(claims, proof=None, certificate_sha256=digest)]
        for step in steps:
            if trace is not None:
                trace.add(step)
            if step.denial is not None:
                failure.fail(step.denial, step=step)
                return
        recorded = (
            proof is None or trace is not None or remember(self._replay, proof, policy.clock_skew)
        )
        if not recorded:
            # Seen meanwhile, or the memory filled: refuse rather than accept twice.
            full = Denial(
                Reason.DPOP_PROOF_INVALID, "The DPoP proof's 'jti' could not be recorded."
            )
            failure.fail(full, step=checked("dpop jti", full))
        elif proof is not None and trace is None and self._shared is not None:
            # A jti another replica recorded is a replay too; Redis unavailable: None, and this
            # replica's memory alone has decided.
            now = self.clock()
            if await remember_in_fleet(self._shared, proof, policy.clock_skew, now) is False:
                replayed = Denial(Reason.DPOP_PROOF_INVALID, REPLAYED_JTI_MESSAGE)
                facts = (("jtiReplayed", True),)
                failure.fail(replayed, step=checked("dpop jti", replayed, facts=facts))

    async def _authenticate(
        self,
        token: str,
        policy: AuthPolicy,
        idp: DeploymentIdp,
        failure: _FirstFailure,
        trace: Trace | None,
    ) -> tuple[Mapping[str, Any] | None, float]:
        """The token's claims once its signature (or the IdP's introspection) vouches for them,
        with how long that vouching may be remembered (wall clock). None: no claims to check
        (the failure is recorded). Tracing with ``keep_going``, the claims of a token whose
        signature failed are returned too, unverified, so that their checks can be shown."""
        if idp.keys is None or (not looks_like_jwt(token) and idp.introspection is not None):
            return await self._introspect(token, idp, failure, trace)
        digest = token_digest(token) if trace is None else b""
        if trace is None:
            hit = self._verified.get(digest, self.clock())
            if hit is not None and hit.alg in policy.algorithms:
                try:
                    keys = await idp.keys.keyset(hit.kid)
                except IdpError as exc:
                    fleet = await self._fleet_verified(digest, policy)
                    if fleet is not None:
                        return fleet
                    unavailable = Denial(Reason.IDP_CALL_FAILED, exc.message)
                    failure.fail(
                        unavailable, event=IDP_FAILED_EVENT, log_fields=idp_log_fields(exc)
                    )
                    return None, math.inf
                # Equal keys count too: two deployments with the same static key hold two copies.
                if any(k is hit.key or k == hit.key for k in keys.keys):
                    return hit.claims, math.inf

        # Every step is recorded when tracing; written out rather than through a helper, as
        # this runs for every first-seen token.
        parsed = parse_jws(token)
        shape = format_step(parsed)
        if trace is not None:
            trace.add(shape)
        if not looks_like_jwt(token):  # not a JWS at all: nothing else to look at
            failure.fail(_must(shape.denial), step=shape)
            return None, math.inf
        if shape.denial is not None:
            failure.fail(shape.denial, step=shape)
            if trace is not None:
                unreadable = "the token cannot be read"
                trace.add(*(skipped(n, unreadable) for n in ("alg", "kid", "signature")))
            return None, math.inf
        if trace is not None:
            trace.add(algorithm_step(parsed, policy.algorithms))
        blocked = parsed.denial(policy.algorithms)  # the algorithm, or an empty signature
        if blocked is not None:
            alg = algorithm_step(parsed, policy.algorithms)
            if failure.fail(blocked, step=alg if alg.denial is not None else None):
                return None, math.inf
        try:
            keys = await idp.keys.keyset(parsed.kid)
        except IdpError as exc:
            fleet = await self._fleet_verified(digest, policy) if trace is None else None
            if fleet is not None:
                return fleet
            unavailable = Denial(Reason.IDP_CALL_FAILED, exc.message)
            endpoint = (("endpoint", exc.endpoint),)
            if trace is not None:
                trace.add(
                    checked("kid", unavailable, note="keys unavailable", facts=endpoint),
                    skipped("signature", "no keys to verify with"),
                )
            if failure.fail(unavailable, event=IDP_FAILED_EVENT, log_fields=idp_log_fields(exc)):
                return None, math.inf
            return parsed.payload, math.inf
        except Unverifiable:
            if trace is None:
                raise
            trace.add(
                skipped("kid", "keys are not fetched offline", actual=parsed.kid),
                skipped("signature", "not checked offline (--offline)"),
            )
            # The decision holds only if the signature does, unless something failed first.
            trace.unverified_signature = failure.denial is None
            return parsed.payload, math.inf
        kid_step, signature_step, key = key_steps(parsed, keys, blocked=blocked)
        if trace is not None:
            trace.add(kid_step, signature_step)
        if key is None and kid_step.denial is not None and trace is None:
            # No key here for its kid (this replica's JWKS may be older than the token, and the
            # IdP unreachable): the fleet may have verified it. A signature that fails with a
            # key this replica holds is never looked up.
            fleet = await self._fleet_verified(digest, policy)
            if fleet is not None:
                return fleet
        if key is None:
            failed = kid_step if kid_step.denial is not None else signature_step
            if blocked is None and failed.denial is not None:
                failure.jwks_uri = _jwks_uri(policy, idp)
                if failure.fail(failed.denial, step=failed):
                    return None, math.inf
            return parsed.payload, math.inf
        assert parsed.payload is not None and parsed.alg is not None
        payload: dict[str, Any] = parsed.payload
        if trace is not None:
            trace.claims_verified = True
            return payload, math.inf
        exp = numeric_date(payload.get("exp"))
        if exp is not None:
            # Kept a while past exp too: a client retrying an expired token is denied cheaply.
            until = max(exp, self.clock()) + EXPIRED_TOKEN_MEMORY_SECONDS
            verified = Verified(payload, parsed.alg, parsed.kid, key, until)
            self._verified.put(digest, verified, len(token))
            if self._shared is not None:  # for the replicas that cannot verify it themselves
                shared_until = min(exp, self.clock() + policy.keys.max_cache_seconds)
                key_name = self._jwt_key(digest, policy)
                self._shared.put_later(key_name, shared_until, payload)
        return payload, math.inf

    def _jwt_key(self, digest: bytes, policy: AuthPolicy) -> str:
        """The shared cache's key for the verified token whose SHA-256 is ``digest``, under
        ``policy``'s key source."""
        assert self._shared is not None
        return self._shared.key_for_digest("jwt", self._jwt_scopes[id(policy.keys)], digest)

    async def _fleet_verified(
        self, digest: bytes, policy: AuthPolicy
    ) -> tuple[Mapping[str, Any], float] | None:
        """The claims another replica verified for the token whose SHA-256 is ``digest`` with
        keys from the same source as ``policy``'s, and until when they may be used; None
        without a shared cache or an entry that verifies. Every claim check still runs on them."""
        if self._shared is None:
            return None
        entry = await self._shared.get("jwt", self._jwt_key(digest, policy))
        if entry is None or entry.claims is None:
            return None
        return entry.claims, entry.expires_at

    @staticmethod
    async def _introspect(
        token: str, idp: DeploymentIdp, failure: _FirstFailure, trace: Trace | None
    ) -> tuple[Mapping[str, Any] | None, float]:
        """RFC 7662: the IdP's answer vouches for the claims; no signature is checked here."""
        assert idp.introspection is not None
        if trace is not None:
            kind = "jwt" if looks_like_jwt(token) else "opaque"
            trace.add(
                checked("format", None, actual=kind, note="introspected"),
                skipped("signature", "not checked locally: the IdP's answer vouches"),
            )
        try:
            claims = await idp.introspection.introspect(token)
        except IdpError as exc:
            unavailable = Denial(Reason.IDP_CALL_FAILED, exc.message)
            if trace is not None:
                trace.add(
                    checked("introspection", unavailable, facts=(("endpoint", exc.endpoint),))
                )
            failure.fail(unavailable, event=IDP_FAILED_EVENT, log_fields=idp_log_fields(exc))
            return None, math.inf
        except Unverifiable:
            if trace is None:
                raise
            trace.add(skipped("introspection", "the IdP is not asked offline"))
            trace.undecided = True
            return None, math.inf
        if claims is None:
            inactive = Denial(
                Reason.TOKEN_INACTIVE, "The identity provider reports the token as not active."
            )
            if trace is not None:
                trace.add(checked("introspection", inactive, actual=False, expected=True))
            failure.fail(inactive)
            return None, math.inf
        if trace is not None:
            trace.add(checked("introspection", None, actual=claims, expected=True))
            trace.claims_verified = True
        return claims, idp.introspection.cached_until(token)


def auth_server(deployment: Deployment, headers: Mapping[str, str], token: str) -> Step:
    """The ``server`` step of a DYNAMIC_AUTHENTICATION deployment: the server that takes the
    value of the selecting claim (read from the token before it is verified: it only says which
    policy verifies it) or header, else the ``"*"`` server; the step's ``actual`` is the
    :class:`~extauthz.config.AuthServer`. None takes it: ``issuer_mismatch``."""
    assert deployment.select_by is not None
    kind, name = deployment.select_by
    value: Any
    if kind == "header":
        value = headers.get(name)
    else:
        payload = parse_jws(token).payload
        value = payload.get(name) if payload is not None else None
    text = value if isinstance(value, str) else None
    server = deployment.server_by_value.get(text) if text is not None else None
    if server is None:
        server = deployment.server_by_value.get("*")
    by = (("selectBy", f"{kind} {name}"),)
    if server is not None:
        return checked("server", None, actual=server, expected=by[0][1], facts=by)
    shown = _control_free(text or "")[:_MAX_MESSAGE_PATH_CHARS]
    nobody = Denial(
        Reason.ISSUER_MISMATCH, f"No authentication server is configured for '{shown}'."
    )
    facts = (*by, ("selectValue", shown), ("servers", [s.name for s in deployment.servers]))
    return checked("server", nobody, actual=shown, facts=facts)


def _control_free(text: str) -> str:
    return _CONTROL_CHARS.sub("", text.replace("\t", " "))


def _request_uri(req: CheckInput) -> str:
    """The URI the client sent the request to, as Envoy saw it, without query and fragment
    (RFC 9449 §4.3's htu); an unknown scheme makes no URI, so no proof matches it."""
    # Envoy sets the CheckRequest's scheme; a client that does not may send :scheme instead.
    scheme = (req.scheme or req.headers.get(":scheme", "")).lower()
    if scheme not in ("http", "https") or not req.host:
        return ""
    return f"{scheme}://{req.host}{req.path}"


def _jwks_uri(policy: AuthPolicy, idp: DeploymentIdp) -> str | None:
    """Where the keys that failed came from: the configured JWKS, or the one the discovery
    document names; None for static keys."""
    if policy.keys.type == "REMOTE_JWKS":
        return policy.keys.uri
    document = idp.discovery.cache.fresh() if idp.discovery is not None else None
    return document.jwks_uri if document is not None else None


def _allow(selection: Selection, claims: Mapping[str, Any]) -> Decision:
    """The allow decision for these claims on this route: the identity headers (each set, or
    removed when its claim cannot be one, so that a client-sent copy never passes) and the
    dynamic metadata."""
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
    metadata: dict[str, Any] = {"deployment": deployment.name, "route": selection.route_name}
    if deployment.auth_server:
        metadata["authServer"] = deployment.auth_server
    if claims:
        for key in ("sub", "iss"):
            if isinstance(claims.get(key), str):
                metadata[key] = claims[key]
        client_id = claims.get("client_id", claims.get("azp"))
        if isinstance(client_id, str):
            metadata["client_id"] = client_id
        metadata["scope"] = " ".join(sorted(scopes_of(claims)))
    return allow(
        deployment.name,
        selection.route_name,
        upstream_headers=tuple(headers),
        remove_headers=tuple(remove),
        metadata=metadata,
        auth_server=deployment.auth_server,
    )
