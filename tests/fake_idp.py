"""An identity provider in the test's own process, for ``httpx.MockTransport``.

It serves a discovery document, a JWKS and an RFC 7662 introspection endpoint at fixed URLs on
``idp.example.com``, counts and keeps every request, and can be told how to answer:

    idp = FakeIdp([rsa_key.public_jwk])
    engine = idp.engine(config)                  # Providers on this IdP, and the Engine
    idp.calls["/jwks"]                           # requests per path
    idp.urls                                     # every URL asked, in order
    idp.status = 503                             # every endpoint answers 503 (None: do its job)
    idp.delay = 0.05                             # every answer comes that much later
    idp.cache_control = "max-age=60"             # on the discovery document and the JWKS
    idp.answer = {"active": True, "sub": "svc"}  # what every introspection answers
    idp.raw = b"<html>"                          # these bytes instead of JSON, from every endpoint
    idp.error = httpx.ConnectError("refused")    # no answer: the transport raises this
    idp.errors = [httpx.ConnectError("refused")] # the next requests raise these, one each, in order
    await idp.until_called("/introspect")        # once a request has arrived there

Without ``answer``, an introspected token is active when it was registered in ``active`` (with
its claims) or starts with ``active_prefix`` (with ``active_claims``), and one that starts with
``failing_prefix`` gets a 500; any other is ``{"active": false}``.

The real HTTP server that misbehaves on purpose, for the server process, is
``tests/integration/faulty_idp.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import httpx

from extauthz.config import Config
from extauthz.engine import Engine
from extauthz.idp import Providers
from tests.conftest import AUDIENCE, ISSUER
from tests.waiting import TimedOut

__all__ = ["DISCOVERY", "INTROSPECT", "JWKS", "FakeIdp"]

ORIGIN = "https://idp.example.com"
DISCOVERY = f"{ORIGIN}/.well-known/openid-configuration"
JWKS = f"{ORIGIN}/jwks"
INTROSPECT = f"{ORIGIN}/introspect"
# What an active token introspects as, unless told otherwise: every check of the test policies.
ACTIVE_CLAIMS: dict[str, Any] = {
    "iss": ISSUER,
    "aud": AUDIENCE,
    "sub": "svc",
    "scope": "orders.read",
    "client_id": "svc",
    "exp": 4_000_000_000,
}


class FakeIdp:
    """The IdP: an async handler for ``httpx.MockTransport`` (see the module's docstring)."""

    def __init__(self, jwks: list[dict[str, Any]] | None = None, *, issuer: str = ISSUER) -> None:
        self.jwks = list(jwks or [])
        self.issuer = issuer
        self.status: int | None = None
        self.delay = 0.0
        self.cache_control: str | None = None
        self.answer: Any = None
        self.raw: bytes | None = None
        self.error: Exception | None = None
        self.errors: list[Exception] = []
        self.active: dict[str, dict[str, Any]] = {}
        self.active_prefix: str | None = "good"
        self.active_claims: dict[str, Any] = dict(ACTIVE_CLAIMS)
        self.failing_prefix: str | None = None
        self.calls: Counter[str] = Counter()
        self.requests: list[httpx.Request] = []
        self._waiting: list[tuple[str, int, asyncio.Future[None]]] = []

    # -- the handler -----------------------------------------------------------------------

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.calls[path] += 1
        self.requests.append(request)
        for waited, times, arrived in self._waiting:
            if self.calls[waited] >= times and not arrived.done():
                arrived.set_result(None)
        if self.delay:
            await asyncio.sleep(self.delay)  # a slow IdP
        if self.errors:
            raise self.errors.pop(0)
        if self.error is not None:
            raise self.error
        return self.respond(request)

    def respond(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        if self.status is not None:
            return httpx.Response(self.status)
        if self.raw is not None:
            return httpx.Response(200, content=self.raw)
        headers = {"cache-control": self.cache_control} if self.cache_control else {}
        if url == DISCOVERY:
            document = {"issuer": self.issuer, "jwks_uri": JWKS, "introspection_endpoint": INTROSPECT}
            return httpx.Response(200, json=document, headers=headers)
        if url == JWKS:
            return httpx.Response(200, json={"keys": self.jwks}, headers=headers)
        if url == INTROSPECT:
            token = parse_qs(request.content.decode()).get("token", [""])[0]
            if self.failing_prefix is not None and token.startswith(self.failing_prefix):
                return httpx.Response(500, text="IDP-BODY")
            return httpx.Response(200, json=self.introspect(token))
        return httpx.Response(404)

    def introspect(self, token: str) -> Any:
        """The introspection answer for ``token``."""
        if self.answer is not None:
            return self.answer
        if token in self.active:
            return {"active": True, **self.active[token]}
        if self.active_prefix is not None and token.startswith(self.active_prefix):
            return {"active": True, **self.active_claims}
        return {"active": False}

    # -- what it saw -----------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return [str(request.url) for request in self.requests]

    async def until_called(self, path: str, times: int = 1, *, timeout: float = 5.0) -> None:
        """Returns as soon as ``path`` has been asked ``times`` times (the handler itself says
        so, the moment the request arrives); fails the test after ``timeout`` seconds."""
        if self.calls[path] >= times:
            return
        arrived: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (path, times, arrived)
        self._waiting.append(entry)
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                await arrived
        except TimeoutError:
            raise TimedOut(
                f"timed out after {time.monotonic() - started:.1f}s waiting for request {times} "
                f"to {path} (it has had {self.calls[path]})"
            ) from None
        finally:
            self._waiting.remove(entry)

    # -- the code under test, on this IdP ----------------------------------------------------

    def client_factory(self) -> Callable[[Any], httpx.AsyncClient]:
        """What ``Providers(client_factory=...)`` takes: every client talks to this IdP."""
        transport = httpx.MockTransport(self)
        return lambda _tls: httpx.AsyncClient(transport=transport)

    def providers(self, config: Config, **kwargs: Any) -> Providers:
        """``Providers`` for ``config`` on this IdP; ``kwargs`` as Providers takes them (clock,
        wall_clock, observer, ...)."""
        return Providers(config, client_factory=self.client_factory(), **kwargs)

    def engine(
        self,
        config: Config,
        *,
        clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] | None = None,
    ) -> Engine:
        """The Engine for ``config`` on this IdP. ``clock`` is the IdP layer's monotonic clock;
        ``wall_clock`` the one both the IdP layer and the engine read the time of day from."""
        kwargs: dict[str, Any] = {}
        if clock is not None:
            kwargs["clock"] = clock
        if wall_clock is not None:
            kwargs["wall_clock"] = wall_clock
        providers = self.providers(config, **kwargs)
        if wall_clock is None:
            return Engine(config, providers.by_deployment)
        return Engine(config, providers.by_deployment, clock=wall_clock)
