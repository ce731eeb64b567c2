"""REMOTE_DISCOVERY: an OpenID / RFC 8414 discovery document names the issuer, the JWKS and the
introspection endpoint."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import IdpBadResponse
from ..tracing import url_without_userinfo
from .cache import CachedDocument, CacheSettings
from .http import IdpEndpoint, IdpResponse
from .jwks import cache_ttl

__all__ = ["DiscoveryDocument", "DiscoveryProvider", "IssuerMismatch"]

# The document's issuer is the IdP's text: cut, and anything unprintable shown as `?`, so that it
# can neither make a long log line nor forge one.
_MAX_SHOWN_ISSUER = 200


def _shown(issuer: str) -> str:
    text = url_without_userinfo(issuer)
    cut = "".join(c if c.isprintable() else "?" for c in text[:_MAX_SHOWN_ISSUER])
    return f"'{cut}…'" if len(text) > _MAX_SHOWN_ISSUER else f"'{cut}'"


class IssuerMismatch(IdpBadResponse):
    """The document is well formed but names another issuer: not a usable answer (the "Unable
    to parse" message), with both issuers in ``detail``. OpenID Connect Discovery 1.0 §4.3 and
    RFC 8414 §3.3: the issuer in the document MUST be identical to the issuer it was asked for,
    or its keys could be another issuer's. The issuers are URLs of configuration, no secret.

    The IdP answered as it should, only not for this deployment (another deployment may expect
    that very issuer from the same endpoint): /readyz shows it, the breaker does not count it."""

    idp_at_fault = False

    def __init__(self, uri: str, issuer: str, configured: tuple[str, ...]) -> None:
        expected = ", ".join(_shown(i) for i in configured)
        which = "the configured issuer is" if len(configured) == 1 else "the configured issuers are"
        super().__init__(
            "discovery",
            uri,
            f"issuer in the discovery document is {_shown(issuer)}, {which} {expected}",
        )
        self.issuer = issuer

    @property
    def error_type(self) -> str:
        return "issuer_mismatch"


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
        return await self.endpoint.fetch(self._read)

    def _read(self, resp: IdpResponse) -> tuple[DiscoveryDocument, float]:
        """The document and its lifetime; IdpBadResponse (IssuerMismatch) when it is unusable,
        which the endpoint then counts as its failure (the breaker, the metric, /readyz)."""
        name, uri = self.endpoint.name, self.endpoint.uri
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
            raise IssuerMismatch(uri, issuer, self._issuers)
        assert isinstance(jwks_uri, str)
        document = DiscoveryDocument(issuer, jwks_uri, introspection)
        return document, cache_ttl(resp.max_age, self._max_cache_seconds)

    async def document(self) -> DiscoveryDocument:
        return await self.cache.get()
