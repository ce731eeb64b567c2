"""The identity-provider layer: everything that touches the network for keys or introspection.

One module per validation method (``static_keys`` here, ``jwks``, ``discovery``,
``introspection``); :class:`Providers` builds them from the config. Caching, single-flight and
circuit breaking are written once (``cache.py``, ``http.IdpEndpoint``, ``resilience.py``) and
wrapped around every method. Endpoints with the same URI and settings are shared across
deployments, so ten deployments on one IdP fetch its JWKS once and share one breaker.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from ..config import (
    ASYMMETRIC_ALGORITHMS,
    ClientDetails,
    Config,
    ConfigError,
    Deployment,
    KeySource,
)
from ..errors import IdpBadResponse, IdpError
from ..keys import KeySet, keyset_from_static
from .cache import CachedDocument, CacheSettings
from .discovery import DiscoveryProvider
from .http import IdpEndpoint, IdpObserver, NullObserver, TlsSettings, make_client
from .introspection import ClientSecret, IntrospectionClient
from .jwks import JwksProvider
from .resilience import CircuitBreaker

__all__ = ["DeploymentIdp", "KeyProvider", "Providers", "StaticKeysProvider"]


class KeyProvider(Protocol):
    async def keyset(self, kid: str | None) -> KeySet:
        """Keys to verify a token whose header names ``kid``; raises IdpError if none can be had."""
        ...

    async def issuers(self) -> tuple[str, ...]:
        """The issuers a token must come from; empty: any."""
        ...


def _never() -> int | None:
    return None


def _always() -> int | None:
    return 0  # static keys, or introspection alone: nothing is fetched that could change


@dataclass(frozen=True, slots=True)
class DeploymentIdp:
    """How one deployment validates tokens: JWTs with ``keys``, others with ``introspection``.

    ``REMOTE_INTROSPECTION`` has no keys (every token is introspected); ``REMOTE_DISCOVERY``
    without ``clientDetails`` has no introspection (a token that is not a JWT is malformed).
    """

    keys: KeyProvider | None
    introspection: IntrospectionClient | None
    issuers: Callable[[], Awaitable[tuple[str, ...]]]
    # REMOTE_DISCOVERY: the document itself (what `extauthz probe` checks); None otherwise.
    discovery: DiscoveryProvider | None = None
    # The version of the IdP documents (JWKS, discovery) this deployment's decisions rest on,
    # or None once one of them is past its TTL. A decision may be answered again without
    # re-validation only while this still returns what it returned when the decision was made.
    documents_version: Callable[[], int | None] = _never


class StaticKeysProvider:
    def __init__(self, source: KeySource, issuers: tuple[str, ...]) -> None:
        self._keys = keyset_from_static(source.static_keys, frozenset(ASYMMETRIC_ALGORITHMS))
        self._issuers = issuers

    async def keyset(self, kid: str | None) -> KeySet:
        return self._keys

    async def issuers(self) -> tuple[str, ...]:
        return self._issuers


class _JwksKeys:
    """A JWKS seen through a deployment's configured issuers."""

    def __init__(self, jwks: JwksProvider, issuers: tuple[str, ...]) -> None:
        self._jwks = jwks
        self._issuers = issuers

    async def keyset(self, kid: str | None) -> KeySet:
        return await self._jwks.keyset(kid)

    async def issuers(self) -> tuple[str, ...]:
        return self._issuers


class _DiscoveredKeys:
    """Keys from the JWKS that a discovery document names."""

    def __init__(
        self,
        discovery: DiscoveryProvider,
        issuers: tuple[str, ...],
        jwks_for: Callable[[str], JwksProvider],
    ) -> None:
        self.discovery = discovery
        self._issuers = issuers
        self._jwks_for = jwks_for
        self._jwks: tuple[str, JwksProvider] | None = None

    def jwks_for(self, jwks_uri: str) -> JwksProvider:
        if self._jwks is None or self._jwks[0] != jwks_uri:
            self._jwks = (jwks_uri, self._jwks_for(jwks_uri))
        return self._jwks[1]

    async def keyset(self, kid: str | None) -> KeySet:
        doc = await self.discovery.document()
        return await self.jwks_for(doc.jwks_uri).keyset(kid)

    async def issuers(self) -> tuple[str, ...]:
        # The configured issuers, or else the one the IdP names for itself.
        if self._issuers:
            return self._issuers
        return ((await self.discovery.document()).issuer,)


def read_client_secret(client: ClientDetails, where: str) -> ClientSecret:
    """The secret from ``clientSecretFile`` or ``clientSecretEnv``; ConfigError if unreadable."""
    if client.secret_file is not None:
        try:
            with open(client.secret_file, encoding="utf-8") as f:
                value = f.read().strip()
        except OSError as exc:
            raise ConfigError(
                [f"{where}.clientSecretFile: cannot read {client.secret_file}: {exc.strerror}"]
            ) from None
        if not value:
            raise ConfigError([f"{where}.clientSecretFile: {client.secret_file} is empty"])
        return ClientSecret(value)
    assert client.secret_env is not None
    value = os.environ.get(client.secret_env, "").strip()
    if not value:
        raise ConfigError(
            [f"{where}.clientSecretEnv: environment variable {client.secret_env} is not set"]
        )
    return ClientSecret(value)


class Providers:
    """The IdP side of every deployment of a config, sharing clients, caches and breakers."""

    def __init__(
        self,
        config: Config,
        *,
        on_stale: Callable[[IdpError], None] = lambda _e: None,
        client_factory: Callable[[TlsSettings], httpx.AsyncClient] = make_client,
        observer: IdpObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        deployments: Collection[Deployment] | None = None,
    ) -> None:
        """The providers of ``deployments`` (default: every deployment of ``config``), under
        ``config``'s server settings. ``probe`` and ``explain`` build them for one deployment,
        or none and then :meth:`for_source`, so that only what they use must be readable."""
        self._on_stale = on_stale
        self._client_factory = client_factory
        self._observer = observer or NullObserver()
        self._clock = clock
        self._wall_clock = wall_clock
        self._breaker_threshold = config.server.breaker_failure_threshold
        self._breaker_cool_down = config.server.breaker_cool_down_seconds
        # Bumped whenever any JWKS or discovery document is (re)fetched: keys may have gone.
        self.documents_fetched = 0
        self._clients: dict[TlsSettings, httpx.AsyncClient] = {}
        self.endpoints: dict[tuple[str, str, TlsSettings, float], IdpEndpoint] = {}
        self._jwks: dict[tuple[str, TlsSettings, float, float, float], JwksProvider] = {}
        self._discovery: dict[
            tuple[str, TlsSettings, float, float, float, tuple[str, ...]], DiscoveryProvider
        ] = {}
        self.by_deployment: dict[str, DeploymentIdp] = {}
        for i, d in enumerate(config.deployments):
            if deployments is None or d in deployments:
                self.by_deployment[d.name] = self.for_deployment(d, i)

    def _client(self, tls: TlsSettings) -> httpx.AsyncClient:
        if tls not in self._clients:
            self._clients[tls] = self._client_factory(tls)
        return self._clients[tls]

    def _endpoint(self, name: str, uri: str, source: KeySource) -> IdpEndpoint:
        tls = TlsSettings(source.verify_tls, source.ca_file)
        key = (name, uri, tls, source.timeout_seconds)
        if key not in self.endpoints:
            self.endpoints[key] = IdpEndpoint(
                name,
                uri,
                self._client(tls),
                timeout=source.timeout_seconds,
                breaker=CircuitBreaker(
                    failure_threshold=self._breaker_threshold,
                    cool_down_seconds=self._breaker_cool_down,
                    clock=self._clock,
                    wall_clock=self._wall_clock,
                ),
                observer=self._observer,
                wall_clock=self._wall_clock,
            )
        return self.endpoints[key]

    def _cache_settings(self, source: KeySource, cache: str) -> CacheSettings:
        def on_result(result: str) -> None:
            self._observer.cache(cache, result)

        def on_fetched() -> None:
            self.documents_fetched += 1

        lifetimes = (source.max_cache_seconds, source.stale_seconds)
        return CacheSettings(*lifetimes, self._on_stale, on_result, on_fetched, self._clock)

    def _version_while_fresh(self, *docs: CachedDocument[Any]) -> int | None:
        return None if any(d.past_ttl() for d in docs) else self.documents_fetched

    def _jwks_provider(self, uri: str, source: KeySource) -> JwksProvider:
        tls = TlsSettings(source.verify_tls, source.ca_file)
        key = (uri, tls, source.timeout_seconds, source.max_cache_seconds, source.stale_seconds)
        if key not in self._jwks:
            self._jwks[key] = JwksProvider(
                self._endpoint("jwks_uri", uri, source), self._cache_settings(source, "jwks")
            )
        return self._jwks[key]

    def _discovery_provider(self, source: KeySource, issuers: tuple[str, ...]) -> DiscoveryProvider:
        assert source.uri is not None
        tls = TlsSettings(source.verify_tls, source.ca_file)
        key = (
            source.uri,
            tls,
            source.timeout_seconds,
            source.max_cache_seconds,
            source.stale_seconds,
            issuers,
        )
        if key not in self._discovery:
            self._discovery[key] = DiscoveryProvider(
                self._endpoint("discovery", source.uri, source),
                issuers,
                self._cache_settings(source, "discovery"),
            )
        return self._discovery[key]

    def _introspection(
        self, source: KeySource, where: str, uri: Callable[[], Awaitable[str]]
    ) -> IntrospectionClient:
        assert source.client is not None
        secret = read_client_secret(source.client, f"{where}.clientDetails")

        async def endpoint() -> IdpEndpoint:
            return self._endpoint("introspection_endpoint", await uri(), source)

        return IntrospectionClient(
            endpoint,
            source.client,
            secret,
            max_cache_seconds=source.max_cache_seconds,
            observer=self._observer,
            clock=self._wall_clock,
        )

    def for_deployment(self, deployment: Deployment, index: int) -> DeploymentIdp:
        """The IdP side of ``config.deployments[index]``."""
        where = f"deployments[{index}].authentication.validationPolicy"
        return self.for_source(deployment.auth.keys, deployment.auth.issuers, where)

    def for_source(self, source: KeySource, issuers: tuple[str, ...], where: str) -> DeploymentIdp:
        """Keys, introspection and issuers from one validation policy; ``where`` is its YAML
        path, for the errors (an unreadable client secret is a :class:`ConfigError`)."""
        if source.type == "STATIC_KEYS":
            static = StaticKeysProvider(source, issuers)
            return DeploymentIdp(static, None, static.issuers, documents_version=_always)
        assert source.uri is not None
        uri = source.uri
        if source.type == "REMOTE_JWKS":
            provider = self._jwks_provider(uri, source)
            jwks = _JwksKeys(provider, issuers)
            return DeploymentIdp(
                jwks,
                None,
                jwks.issuers,
                documents_version=lambda: self._version_while_fresh(provider.cache),
            )
        if source.type == "REMOTE_INTROSPECTION":

            async def fixed_uri() -> str:
                return uri

            async def fixed_issuers() -> tuple[str, ...]:
                return issuers

            client = self._introspection(source, where, fixed_uri)
            return DeploymentIdp(None, client, fixed_issuers, documents_version=_always)
        discovery = self._discovery_provider(source, issuers)
        keys = _DiscoveredKeys(
            discovery, issuers, lambda jwks_uri: self._jwks_provider(jwks_uri, source)
        )
        introspection = None
        if source.client is not None:

            async def discovered_uri() -> str:
                doc = await discovery.document()
                if doc.introspection_endpoint is None:
                    raise IdpBadResponse("discovery", uri, "no introspection_endpoint")
                return doc.introspection_endpoint

            introspection = self._introspection(source, where, discovered_uri)

        def documents_version() -> int | None:
            doc = discovery.cache.fresh()
            if doc is None:
                return None
            return self._version_while_fresh(keys.jwks_for(doc.jwks_uri).cache)

        return DeploymentIdp(keys, introspection, keys.issuers, discovery, documents_version)

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
