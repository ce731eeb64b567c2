"""REMOTE_DISCOVERY: an OpenID / RFC 8414 discovery document names the issuer and the JWKS."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from ..errors import IdpBadResponse, IdpError
from ..keys import KeySet
from .cache import CachedDocument
from .http import fetch_json
from .jwks import JwksProvider, cache_ttl

__all__ = ["DiscoveryDocument", "DiscoveryProvider", "IssuerMismatch"]


class IssuerMismatch(IdpBadResponse):
    def __init__(self, uri: str, issuer: str) -> None:
        super().__init__("discovery", uri, "issuer mismatch")
        self.message = (
            f"The discovery document at {uri} names issuer {issuer!r}, which is not among the "
            "configured issuers."
        )
        self.args = (self.message,)


@dataclass(frozen=True, slots=True)
class DiscoveryDocument:
    issuer: str
    jwks_uri: str
    introspection_endpoint: str | None


class DiscoveryProvider:
    endpoint = "discovery"

    def __init__(
        self,
        uri: str,
        client: httpx.AsyncClient,
        *,
        issuers: tuple[str, ...],
        timeout: float,
        max_cache_seconds: float,
        stale_seconds: float,
        jwks_for: Callable[[str], JwksProvider],
        on_stale: Callable[[IdpError], None] = lambda _e: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.uri = uri
        self._client = client
        self._issuers = issuers
        self._timeout = timeout
        self._max_cache_seconds = max_cache_seconds
        self._jwks_for = jwks_for
        self.cache: CachedDocument[DiscoveryDocument] = CachedDocument(
            self._load, stale_seconds=stale_seconds, on_stale=on_stale, clock=clock
        )

    async def _load(self) -> tuple[DiscoveryDocument, float]:
        resp = await fetch_json(self._client, self.endpoint, self.uri, timeout=self._timeout)
        doc = resp.data
        if not isinstance(doc, dict):
            raise IdpBadResponse(self.endpoint, self.uri, "not a JSON object")
        issuer, jwks_uri = doc.get("issuer"), doc.get("jwks_uri")
        introspection = doc.get("introspection_endpoint")
        if not isinstance(issuer, str) or not isinstance(jwks_uri, str):
            raise IdpBadResponse(self.endpoint, self.uri, "missing issuer or jwks_uri")
        if not jwks_uri.startswith(("https://", "http://")):
            raise IdpBadResponse(self.endpoint, self.uri, "jwks_uri is not an http(s) URL")
        if self._issuers and issuer not in self._issuers:
            raise IssuerMismatch(self.uri, issuer)
        document = DiscoveryDocument(
            issuer, jwks_uri, introspection if isinstance(introspection, str) else None
        )
        return document, cache_ttl(resp.max_age, self._max_cache_seconds)

    async def issuers(self) -> tuple[str, ...]:
        """The configured issuers, or else the one the IdP names for itself."""
        if self._issuers:
            return self._issuers
        return ((await self.cache.get()).issuer,)

    async def keyset(self, kid: str | None) -> KeySet:
        doc = await self.cache.get()
        return await self._jwks_for(doc.jwks_uri).keyset(kid)
