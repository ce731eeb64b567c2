"""REMOTE_DISCOVERY: an OpenID / RFC 8414 discovery document names the issuer, the JWKS and the
introspection endpoint."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import IdpBadResponse
from .cache import CachedDocument, CacheSettings
from .http import IdpEndpoint
from .jwks import cache_ttl

__all__ = ["DiscoveryDocument", "DiscoveryProvider", "IssuerMismatch"]


class IssuerMismatch(IdpBadResponse):
    """The document is well formed but names another issuer: not a usable answer (the contract's
    "Unable to parse" message), with the reason in ``detail`` for the log line."""

    def __init__(self, uri: str, issuer: str) -> None:
        super().__init__("discovery", uri, "the document's issuer is not a configured issuer")
        self.issuer = issuer


@dataclass(frozen=True, slots=True)
class DiscoveryDocument:
    issuer: str
    jwks_uri: str
    introspection_endpoint: str | None


def _is_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("https://", "http://"))


class DiscoveryProvider:
    def __init__(
        self, endpoint: IdpEndpoint, issuers: tuple[str, ...], settings: CacheSettings
    ) -> None:
        self.endpoint = endpoint
        self._issuers = issuers
        self._max_cache_seconds = settings.max_cache_seconds
        self.cache: CachedDocument[DiscoveryDocument] = CachedDocument(self._load, settings)

    async def _load(self) -> tuple[DiscoveryDocument, float]:
        name, uri = self.endpoint.name, self.endpoint.uri
        resp = await self.endpoint.call()
        doc = resp.data
        if not isinstance(doc, dict):
            raise IdpBadResponse(name, uri, "not a JSON object")
        issuer, jwks_uri = doc.get("issuer"), doc.get("jwks_uri")
        introspection = doc.get("introspection_endpoint")
        if not isinstance(issuer, str) or not _is_url(jwks_uri):
            raise IdpBadResponse(name, uri, "missing issuer or jwks_uri")
        if introspection is not None and not _is_url(introspection):
            raise IdpBadResponse(name, uri, "introspection_endpoint is not an http(s) URL")
        if self._issuers and issuer not in self._issuers:
            raise IssuerMismatch(uri, issuer)
        assert isinstance(jwks_uri, str)
        document = DiscoveryDocument(issuer, jwks_uri, introspection)
        return document, cache_ttl(resp.max_age, self._max_cache_seconds)

    async def document(self) -> DiscoveryDocument:
        return await self.cache.get()
