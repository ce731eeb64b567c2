"""Speed, as a layer around the engine: answers given again, and the selections they rest on.

Most checks are a client sending the same credential to the same route again. The engine says
how long each of its decisions holds for that credential on that route (:class:`Validity`); this
layer keeps the decision that long, keyed by the SHA-256 of the credential header (never the
credential), and gives it again without any validation step. Route selection is memoized the same
way: a pure function of the request line and the config. Delete this module in your head and
every rule is still in the engine; nothing here decides anything.

Allows with the same content are one object, shared by the answers that give it; a wire keeps
its rendered bytes with each answer (:attr:`Answer.wire`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .bounded import BoundedCache
from .config import Config
from .decision import Decision, Denial
from .engine import CheckInput, Engine, Validity
from .idp import DeploymentIdp
from .routing import Selection
from .tokens import extract_token
from .verified import token_digest

__all__ = ["MAX_ANSWERS", "Answer", "AnswerCache"]

MAX_ANSWERS = 16_384  # remembered answers (with their serialized responses)
_MAX_ROUTES = 8_192
# A longer request line (authority, path, method and context_extensions together) is selected
# every time and never kept: the route memo holds at most 8,192 x 512 characters of requests.
_MAX_ROUTE_KEY_CHARS = 512
_MAX_ALLOWS = 8_192

RouteKey = tuple[str, str, str, frozenset[tuple[str, str]] | None]
AnswerKey = tuple[int, int, bytes]
AllowContent = tuple[tuple[tuple[str, str], ...], tuple[str, ...], tuple[tuple[str, Any], ...]]


def route_key(req: CheckInput) -> RouteKey:
    """The route memo's key for a request line."""
    extensions = req.context_extensions
    frozen = frozenset(extensions.items()) if extensions else None
    return (req.host, req.path, req.method, frozen)


def _size(key: RouteKey) -> int:
    """A route memo key's size in characters."""
    host, path, method, extensions = key
    size = len(host) + len(path) + len(method)
    for k, v in extensions or ():
        size += len(k) + len(v)
    return size


def _credential_key(selection: Selection, headers: Mapping[str, str]) -> AnswerKey | None:
    """(deployment, route, SHA-256 of the credential header), or None without one. The ids are
    of objects of the cache's config, which lives as long as the cache: never reused."""
    header = selection.deployment.auth.token_header
    value = headers.get(header) if header is not None else None
    if value is None:
        return None
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()
    return (id(selection.deployment), id(selection.route), digest)


@dataclass(slots=True, eq=False)
class Answer:
    """A remembered decision and the window it holds in (the fields of its
    :class:`~extauthz.engine.Validity`, kept flat: a remembered answer is two objects for the
    garbage collector to visit, this and its decision)."""

    decision: Decision
    not_before: float
    not_after: float
    idp: DeploymentIdp
    documents_version: int
    # The wire's serialized response to a remembered allow, set the first time the answer is
    # given again (an allow has no request id in it: the same bytes answer every check).
    wire: bytes | None = None
    # The same allow as the HTTP wire's response (extauthz.http_wire), likewise rendered once.
    http_wire: bytes | None = None
    # The SHA-256 of the token in the credential: what an eviction names it by.
    token_sha256: bytes = b""

    def holds(self, now: float) -> bool:
        return (
            self.not_before <= now <= self.not_after
            and self.idp.documents_version() == self.documents_version
        )


class AnswerCache:
    """The engine with memory: :meth:`reuse` first, and :meth:`check` when it finds nothing."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.config: Config = engine.config  # an engine's config never changes: a reload
        # builds a new engine, and a new cache around it
        self._routes: BoundedCache[RouteKey, Selection | None] = BoundedCache(
            _MAX_ROUTES, _MAX_ROUTE_KEY_CHARS
        )
        # An answer's size is its decision's, interned and bounded below: the key and the
        # window are fixed.
        self._answers: BoundedCache[AnswerKey, Answer] = BoundedCache(MAX_ANSWERS, 0)
        # An allow's content (identity headers, headers removed, metadata) → the one Decision.
        # Its values come from a token's claims: at most 16 KiB each, as many as the config
        # names, so entries are bounded by the token size and the config.
        self._allows: BoundedCache[AllowContent, Decision] = BoundedCache(_MAX_ALLOWS, 0)

    def reuse(self, req: CheckInput, path: str | None = None) -> Answer | None:
        """The answer an earlier check gave the same credential on the same route, if it still
        holds; None sends the check down the whole path. ``path``: ``req.path``, when the caller
        has it already (this is every remembered answer's path: each step counts)."""
        extensions = req.context_extensions
        frozen = frozenset(extensions.items()) if extensions else None
        key = (req.host, req.path if path is None else path, req.method, frozen)  # route_key
        selection = self._routes.get(key)
        if selection is None:
            return None
        # _credential_key, written out: this is every remembered answer's path.
        header = selection.deployment.auth.token_header
        value = req.headers.get(header) if header is not None else None
        if value is None:
            return None
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()
        answer = self._answers.get((id(selection.deployment), id(selection.route), digest))
        if answer is not None and answer.holds(self.engine.clock()):
            return answer
        return None

    async def check(self, req: CheckInput) -> Decision:
        """The engine's decision, remembered for as long as the engine says it holds."""
        key = route_key(req)
        selection = self._routes.get(key)
        if selection is None and key not in self._routes:
            found = self.engine.select(req)
            if isinstance(found, Denial):  # not in normal form: never remembered
                decision, _ = await self.engine.decide(req, found)
                return decision
            selection = found
            self._routes.put(key, selection, _size(key))
        decision, validity = await self.engine.decide(req, selection)
        if decision.allowed and not decision.dry_run:  # a dry run keeps its would-be reason
            decision = self._intern(decision)
        if validity is not None and selection is not None:
            self._remember(selection, req.headers, decision, validity)
        return decision

    def _intern(self, decision: Decision) -> Decision:
        """The one object for an allow with this content (the same client, whichever of its
        tokens), so that its rendering is made once."""
        content = (decision.upstream_headers, decision.remove_headers, decision.metadata)
        same = self._allows.get(content)
        if same is not None:
            return same
        self._allows.put(content, decision, 0)
        return decision

    def _remember(
        self,
        selection: Selection,
        headers: Mapping[str, str],
        decision: Decision,
        validity: Validity,
    ) -> None:
        credential = _credential_key(selection, headers)
        if credential is None or validity.not_before > validity.not_after:
            return
        answer = Answer(
            decision,
            validity.not_before,
            validity.not_after,
            validity.idp,
            validity.documents_version,
        )
        token = extract_token(selection.deployment.auth, headers, "")
        if isinstance(token, str):
            answer.token_sha256 = token_digest(token)
        self._answers.put(credential, answer, 0)

    def evict(self, digest: bytes | None) -> int:
        """Stop giving again the answers remembered for the token whose SHA-256 is ``digest``
        (every answer, for None): its next check goes down the whole path. The number of answers
        dropped. (Answers are keyed by the credential header's SHA-256, which the token's does
        not give: each answer keeps its token's.)"""
        if digest is None:
            dropped = len(self._answers)
            self._answers.clear()
            return dropped
        dropped = 0
        for answer in self._answers.values():
            if answer.token_sha256 == digest and answer.not_after != -math.inf:
                answer.not_after = -math.inf  # never holds again; replaced at the next check
                dropped += 1
        return dropped
