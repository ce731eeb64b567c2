"""The identity-provider layer: everything that touches the network to get keys.

One :class:`KeyProvider` per validation method (``static_keys``, ``jwks``, ``discovery``), all
built by :class:`Providers` from the config. Providers with the same URI and settings are shared
across deployments, so ten deployments on one IdP fetch its JWKS once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import httpx

from ..config import ASYMMETRIC_ALGORITHMS, Config, KeySource
from ..errors import IdpError
from ..keys import KeySet, keyset_from_static
from .discovery import DiscoveryProvider
from .http import TlsSettings, make_client
from .jwks import JwksProvider

__all__ = ["KeyProvider", "Providers", "StaticKeysProvider"]

DEFAULT_STALE_SECONDS = 3600.0


class KeyProvider(Protocol):
    async def keyset(self, kid: str | None) -> KeySet:
        """Keys to verify a token whose header names ``kid``; raises IdpError if none can be had."""
        ...

    async def issuers(self) -> tuple[str, ...]:
        """The issuers a token must come from; empty: any."""
        ...


class StaticKeysProvider:
    def __init__(self, source: KeySource, issuers: tuple[str, ...]) -> None:
        self._keys = keyset_from_static(source.static_keys, frozenset(ASYMMETRIC_ALGORITHMS))
        self._issuers = issuers

    async def keyset(self, kid: str | None) -> KeySet:
        return self._keys

    async def issuers(self) -> tuple[str, ...]:
        return self._issuers


class _FixedIssuers:
    """A JWKS provider seen through a deployment's configured issuers."""

    def __init__(self, jwks: JwksProvider, issuers: tuple[str, ...]) -> None:
        self._jwks = jwks
        self._issuers = issuers

    async def keyset(self, kid: str | None) -> KeySet:
        return await self._jwks.keyset(kid)

    async def issuers(self) -> tuple[str, ...]:
        return self._issuers


class Providers:
    """Key providers for every deployment of a config, sharing clients and caches."""

    def __init__(
        self,
        config: Config,
        *,
        on_stale: Callable[[IdpError], None] = lambda _e: None,
        client_factory: Callable[[TlsSettings], httpx.AsyncClient] = make_client,
        clock: Callable[[], float] = time.monotonic,
        stale_seconds: float = DEFAULT_STALE_SECONDS,
    ) -> None:
        self._on_stale = on_stale
        self._client_factory = client_factory
        self._clock = clock
        self._stale_seconds = stale_seconds
        self._clients: dict[TlsSettings, httpx.AsyncClient] = {}
        self._jwks: dict[tuple[str, TlsSettings, float, float], JwksProvider] = {}
        self._discovery: dict[tuple[str, TlsSettings, float, float, tuple[str, ...]], DiscoveryProvider] = {}
        self.by_deployment: dict[str, KeyProvider] = {
            d.name: self._provider(d.auth.keys, d.auth.issuers) for d in config.deployments
        }

    def _client(self, tls: TlsSettings) -> httpx.AsyncClient:
        if tls not in self._clients:
            self._clients[tls] = self._client_factory(tls)
        return self._clients[tls]

    def _jwks_provider(self, uri: str, source: KeySource) -> JwksProvider:
        tls = TlsSettings(source.verify_tls, source.ca_file)
        key = (uri, tls, source.timeout_seconds, source.max_cache_seconds)
        if key not in self._jwks:
            self._jwks[key] = JwksProvider(
                uri,
                self._client(tls),
                timeout=source.timeout_seconds,
                max_cache_seconds=source.max_cache_seconds,
                stale_seconds=self._stale_seconds,
                on_stale=self._on_stale,
                clock=self._clock,
            )
        return self._jwks[key]

    def _provider(self, source: KeySource, issuers: tuple[str, ...]) -> KeyProvider:
        if source.type == "STATIC_KEYS":
            return StaticKeysProvider(source, issuers)
        assert source.uri is not None
        if source.type == "REMOTE_JWKS":
            return _FixedIssuers(self._jwks_provider(source.uri, source), issuers)
        if source.type == "REMOTE_DISCOVERY":
            tls = TlsSettings(source.verify_tls, source.ca_file)
            key = (source.uri, tls, source.timeout_seconds, source.max_cache_seconds, issuers)
            if key not in self._discovery:
                self._discovery[key] = DiscoveryProvider(
                    source.uri,
                    self._client(tls),
                    issuers=issuers,
                    timeout=source.timeout_seconds,
                    max_cache_seconds=source.max_cache_seconds,
                    stale_seconds=self._stale_seconds,
                    jwks_for=lambda uri: self._jwks_provider(uri, source),
                    on_stale=self._on_stale,
                    clock=self._clock,
                )
            return self._discovery[key]
        raise NotImplementedError(f"{source.type} is not supported yet")

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
