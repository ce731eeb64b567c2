"""The identity-provider layer: everything that touches the network for keys or introspection.

One module per validation method (``static_keys`` here, ``jwks``, ``discovery``,
``introspection``); :class:`Providers` builds them from the config. Caching, single-flight and
circuit breaking are written once (``cache.py``, ``http.IdpEndpoint``, ``resilience.py``) and
wrapped around every method. Endpoints with the same URI and settings are shared across
deployments, so ten deployments on one IdP fetch its JWKS once and share one breaker.

A reloaded config is built from the providers in service (``Providers(new, previous=old)``):
each pooled HTTP client, endpoint (with its breaker and /readyz history), JWKS or discovery
cache and introspection client (answers, calls in flight, secret) whose settings did not change
is taken over with what it holds, so a reload costs no refetch and a stopped IdP does not turn a
reload into a key outage. Only what the new config no longer uses retires with the old
generation (:meth:`Providers.aclose` closes the HTTP clients the new one did not take over).

:meth:`Providers.warm_up` fetches every JWKS and discovery document before the server reports
SERVING, so the first checks of a new replica find the keys already there.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable, Collection
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

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
from ..shared_cache import introspection_scope
from ..tracing import url_without_userinfo
from .cache import CachedDocument, CacheSettings
from .discovery import DiscoveryDocument, DiscoveryProvider
from .http import IdpEndpoint, IdpObserver, NullObserver, TlsSettings, make_client
from .introspection import (
    ClientSecret,
    FixedSecret,
    IntrospectionClient,
    Report,
    SecretFile,
    SecretSource,
    SecretUnusable,
)
from .jwks import JwksProvider
from .resilience import CircuitBreaker

if TYPE_CHECKING:
    from ..shared_cache import SharedCache

__all__ = [
    "MAX_WARM_START_SECONDS",
    "DeploymentIdp",
    "KeyProvider",
    "Providers",
    "StaticKeysProvider",
    "warm_start_budget",
]

V = TypeVar("V")

# The warm start's budget is the longest a check may wait for its IdP calls (the policies'
# worst case, 2 x timeoutSeconds for REMOTE_DISCOVERY), but never more than this: an IdP that
# cannot be reached must not hold a replica out of service for long.
MAX_WARM_START_SECONDS = 10.0
# Between two attempts at a document the warm start could not fetch: doubling, up to the last.
_WARM_RETRY_SECONDS = (0.25, 0.5, 1.0, 2.0)

# True inside the warm start's tasks (and the fetches they start): see _Breaker.
_warming: ContextVar[bool] = ContextVar("extauthz_idp_warming", default=False)


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


def _secret_error(where: str, exc: SecretUnusable) -> ConfigError:
    return ConfigError([f"{where}.clientSecretFile: {exc}"])


def _env_secret(client: ClientDetails, where: str) -> ClientSecret:
    """``clientSecretEnv``, read once: nothing outside the process can change its environment,
    so a new value needs a restart (a file, :class:`SecretFile`, is read again when it
    changes). ConfigError when the variable is not set."""
    assert client.secret_env is not None
    value = os.environ.get(client.secret_env, "").strip()
    if not value:
        raise ConfigError(
            [f"{where}.clientSecretEnv: environment variable {client.secret_env} is not set"]
        )
    return ClientSecret(value)


def warm_start_budget(config: Config) -> float:
    """How long the warm start may take for ``config``: the worst case of its JWKS and discovery
    policies' IdP calls, at most MAX_WARM_START_SECONDS; 0 when nothing is to be fetched."""
    worst = [
        p.auth.keys.worst_case_seconds
        for d in config.deployments
        for p in d.policies
        if p.auth.keys.type in ("REMOTE_JWKS", "REMOTE_DISCOVERY")
    ]
    return min(MAX_WARM_START_SECONDS, max(worst, default=0.0))


class _Breaker(CircuitBreaker):
    """An endpoint's circuit breaker, which the warm start's own calls neither wait on nor count
    for. The warm start retries an unreachable IdP until its budget runs out; were those
    failures counted, the circuit would be open when the first checks come, and would fail them
    fast for a whole cool-down after the IdP is back. Checks count as they always do, and a
    warm start that succeeds closes the circuit like any success."""

    def allow(self) -> bool:
        return True if _warming.get() else super().allow()

    def failure(self) -> None:
        if not _warming.get():
            super().failure()

    def abandon(self) -> None:
        if not _warming.get():  # it took no probe slot: it must not free a check's
            super().abandon()


class _Count:
    """A counter several generations of Providers share."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


# An endpoint's key is every setting it is built with: name, URI, TLS, timeoutSeconds, and the
# breaker's failure threshold and cool-down (server.circuitBreaker).
_EndpointKey = tuple[str, str, TlsSettings, float, int, float]


@dataclass
class _Holdings:
    """What one generation of Providers built or took over, each by the settings it was built
    with (the key): what the next generation may take over."""

    clients: dict[TlsSettings, httpx.AsyncClient] = field(default_factory=dict)
    endpoints: dict[_EndpointKey, IdpEndpoint] = field(default_factory=dict)
    # (endpoint key, maxCacheDuration, maxStaleDuration)
    jwks: dict[tuple[_EndpointKey, float, float], JwksProvider] = field(default_factory=dict)
    # (endpoint key, maxCacheDuration, maxStaleDuration, the configured issuers)
    discovery: dict[tuple[_EndpointKey, float, float, tuple[str, ...]], DiscoveryProvider] = field(
        default_factory=dict
    )
    # (where its endpoint comes from, the client credentials, maxCacheDuration)
    introspection: dict[tuple[object, ClientDetails, float], IntrospectionClient] = field(
        default_factory=dict
    )
    secret_files: dict[str, SecretFile] = field(default_factory=dict)  # by path


class _Warming:
    """One document the warm start fetches until it has it or is cancelled: a JWKS, or a
    discovery document and then the JWKS it names."""

    def __init__(
        self,
        jwks: JwksProvider | None = None,
        discovery: DiscoveryProvider | None = None,
        jwks_for: Callable[[str], JwksProvider] | None = None,
    ) -> None:
        self._jwks, self._discovery, self._jwks_for = jwks, discovery, jwks_for
        first = discovery if discovery is not None else jwks
        assert first is not None
        self.asking = first.endpoint  # the endpoint the fetch under way waits for
        self.error: IdpError | None = None  # the last failure, until a success
        self.done = False

    async def run(self) -> None:
        for attempt in itertools.count():
            try:
                await self._fetch()
            except IdpError as exc:
                self.error = exc
            else:
                self.error, self.done = None, True
                return
            await asyncio.sleep(_WARM_RETRY_SECONDS[min(attempt, len(_WARM_RETRY_SECONDS) - 1)])

    async def _fetch(self) -> None:
        jwks = self._jwks
        if self._discovery is not None:
            assert self._jwks_for is not None
            self.asking = self._discovery.endpoint
            doc: DiscoveryDocument | None = self._discovery.cache.fresh()
            if doc is None:
                doc = await self._discovery.cache.refresh()
            jwks = self._jwks_for(doc.jwks_uri)
        assert jwks is not None
        self.asking = jwks.endpoint
        if jwks.cache.fresh() is None:
            await jwks.cache.refresh()

    def failure(self, budget: float) -> dict[str, str]:
        """What could not be had: as an IdP failure's log line says it."""
        if self.error is not None:
            return {"message": self.error.message, **dict(self.error.log_fields())}
        endpoint = self.asking
        return {
            "message": f"No answer from the {endpoint.name} uri: {endpoint.display_uri} within"
            f" the warm start's {budget:g} s.",
            "endpoint": endpoint.name,
            "uri": url_without_userinfo(endpoint.uri),
        }


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
        previous: Providers | None = None,
        report: Report | None = None,
        shared_cache: SharedCache | None = None,
    ) -> None:
        """The providers of ``deployments`` (default: every deployment of ``config``), under
        ``config``'s server settings. ``probe`` and ``explain`` build them for one deployment,
        or none and then :meth:`for_source`, so that only what they use must be readable.
        ``previous``: the providers serving so far, whose parts this config asks for again
        with the same settings are taken over rather than built. ``report`` writes the log
        lines of rotated client secret files. ``shared_cache``: the fleet's
        (``server.sharedCache``), behind every new introspection client's own cache."""
        self._on_stale = on_stale
        self._client_factory = client_factory
        self._observer = observer or NullObserver()
        self._clock = clock
        self._wall_clock = wall_clock
        self._report = report
        self._shared_cache = shared_cache
        self._breaker_threshold = config.server.breaker_failure_threshold
        self._breaker_cool_down = config.server.breaker_cool_down_seconds
        # Bumped whenever any JWKS or discovery document is (re)fetched: keys may have gone. One
        # counter for every generation: a document taken over is refetched for the new one too.
        self._fetched: _Count = previous._fetched if previous is not None else _Count()
        self._held = _Holdings()
        # What the previous generation holds: looked up only while this one is built.
        self._inherited = previous._held if previous is not None else _Holdings()
        self._warming: dict[int, _Warming] = {}  # the documents to fetch at warm start
        self.by_deployment: dict[str, DeploymentIdp] = {}
        try:
            for i, d in enumerate(config.deployments):
                if deployments is None or d in deployments:
                    for j, policy in enumerate(d.policies):
                        self.by_deployment[policy.idp_key] = self.for_deployment(d, i, j)
        finally:
            self._inherited = _Holdings()

    @property
    def documents_fetched(self) -> int:
        return self._fetched.value

    @property
    def endpoints(self) -> dict[_EndpointKey, IdpEndpoint]:
        """Every endpoint in use, by its settings: what /readyz lists."""
        return self._held.endpoints

    def _take(
        self, mine: dict[Any, V], inherited: dict[Any, V], key: Any, build: Callable[[], V]
    ) -> V:
        """``mine[key]``: already there, else taken over from the previous generation, else
        built."""
        found = mine.get(key)
        if found is None:
            found = inherited.get(key)
            if found is None:
                found = build()
            mine[key] = found
        return found

    def _client(self, tls: TlsSettings) -> httpx.AsyncClient:
        return self._take(
            self._held.clients, self._inherited.clients, tls, lambda: self._client_factory(tls)
        )

    def _endpoint_key(self, name: str, uri: str, source: KeySource) -> _EndpointKey:
        tls = TlsSettings(source.verify_tls, source.ca_file)
        threshold, cool_down = self._breaker_threshold, self._breaker_cool_down
        return (name, uri, tls, source.timeout_seconds, threshold, cool_down)

    def _endpoint(self, name: str, uri: str, source: KeySource) -> IdpEndpoint:
        key = self._endpoint_key(name, uri, source)
        client = self._client(key[2])

        def build() -> IdpEndpoint:
            return IdpEndpoint(
                name,
                uri,
                client,
                timeout=source.timeout_seconds,
                breaker=_Breaker(
                    failure_threshold=self._breaker_threshold,
                    cool_down_seconds=self._breaker_cool_down,
                    clock=self._clock,
                    wall_clock=self._wall_clock,
                ),
                observer=self._observer,
                wall_clock=self._wall_clock,
            )

        return self._take(self._held.endpoints, self._inherited.endpoints, key, build)

    def _keep_endpoint(self, name: str, uri: str | None, source: KeySource) -> None:
        """Take over the previous generation's endpoint at ``uri``, if it had one, though this
        one builds its own only at the first call (a URI a discovery document names)."""
        if uri is not None and self._endpoint_key(name, uri, source) in self._inherited.endpoints:
            self._endpoint(name, uri, source)

    def _cache_settings(self, source: KeySource, cache: str) -> CacheSettings:
        # What the callbacks touch outlives this generation (a cache may be taken over by the
        # next one): the observer and the shared counter, never this object.
        observer, fetched = self._observer, self._fetched

        def on_result(result: str) -> None:
            observer.cache(cache, result)

        def on_fetched() -> None:
            fetched.value += 1

        lifetimes = (source.max_cache_seconds, source.stale_seconds)
        return CacheSettings(*lifetimes, self._on_stale, on_result, on_fetched, self._clock)

    def _version_while_fresh(self, *docs: CachedDocument[Any]) -> int | None:
        return None if any(d.past_ttl() for d in docs) else self._fetched.value

    def _jwks_key(self, uri: str, source: KeySource) -> tuple[_EndpointKey, float, float]:
        endpoint = self._endpoint_key("jwks_uri", uri, source)
        return (endpoint, source.max_cache_seconds, source.stale_seconds)

    def _jwks_provider(self, uri: str, source: KeySource) -> JwksProvider:
        endpoint = self._endpoint("jwks_uri", uri, source)
        return self._take(
            self._held.jwks,
            self._inherited.jwks,
            self._jwks_key(uri, source),
            lambda: JwksProvider(endpoint, self._cache_settings(source, "jwks")),
        )

    def _discovery_provider(self, source: KeySource, issuers: tuple[str, ...]) -> DiscoveryProvider:
        assert source.uri is not None
        endpoint = self._endpoint("discovery", source.uri, source)
        key = (
            self._endpoint_key("discovery", source.uri, source),
            source.max_cache_seconds,
            source.stale_seconds,
            issuers,
        )
        return self._take(
            self._held.discovery,
            self._inherited.discovery,
            key,
            lambda: DiscoveryProvider(endpoint, issuers, self._cache_settings(source, "discovery")),
        )

    def _secret(self, client: ClientDetails, where: str) -> SecretSource:
        """The client secret: a file (read again when it changes, one reader per path, taken
        over across reloads), or an environment variable (read once). ConfigError if it cannot
        be read now."""
        path = client.secret_file
        if path is None:
            return FixedSecret(_env_secret(client, where))

        def build() -> SecretFile:
            try:
                return SecretFile(path, self._report)
            except SecretUnusable as exc:
                raise _secret_error(where, exc) from None

        return self._take(self._held.secret_files, self._inherited.secret_files, path, build)

    def _introspection(
        self,
        source: KeySource,
        where: str,
        origin: object,
        endpoint: Callable[[], Awaitable[IdpEndpoint]],
    ) -> IntrospectionClient:
        """The introspection client for ``source``, whose endpoint comes from ``origin`` (its
        fixed URI's endpoint key, or the key of the discovery document that names it) and is
        found with ``endpoint``. One client for every deployment with the same settings; taken
        over from the previous generation (with its answers) when that had one."""
        assert source.client is not None
        key = (origin, source.client, source.max_cache_seconds)
        found = self._held.introspection.get(key)
        if found is not None:
            return found
        previous = self._inherited.introspection.get(key)
        if previous is not None:
            client = previous.rebound(endpoint)  # found with this generation's endpoints
        else:
            client = IntrospectionClient(
                endpoint,
                source.client,
                self._secret(source.client, f"{where}.clientDetails"),
                max_cache_seconds=source.max_cache_seconds,
                observer=self._observer,
                clock=self._wall_clock,
                shared_cache=self._shared_cache,
                scope=introspection_scope(source),
            )
        self._held.introspection[key] = client
        return client

    def for_deployment(self, deployment: Deployment, index: int, server: int = 0) -> DeploymentIdp:
        """The IdP side of ``config.deployments[index]`` (of its ``server``-th server, for
        DYNAMIC_AUTHENTICATION): keyed by its ``idp_key``, each server with its own."""
        where = f"deployments[{index}].authentication"
        if deployment.servers:
            where += f".servers[{server}].authentication"
        policy = deployment.policies[server].auth
        return self.for_source(policy.keys, policy.issuers, f"{where}.validationPolicy")

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
            self._warming.setdefault(id(provider), _Warming(jwks=provider))
            jwks = _JwksKeys(provider, issuers)
            return DeploymentIdp(
                jwks,
                None,
                jwks.issuers,
                documents_version=lambda: self._version_while_fresh(provider.cache),
            )
        if source.type == "REMOTE_INTROSPECTION":

            async def fixed_issuers() -> tuple[str, ...]:
                return issuers

            built: list[IdpEndpoint] = []

            async def fixed_endpoint() -> IdpEndpoint:
                # Built at the first call (no client for a policy never used), then kept: its
                # key costs more to make than the rest of the call's bookkeeping.
                if not built:
                    built.append(self._endpoint("introspection_endpoint", uri, source))
                return built[0]

            self._keep_endpoint("introspection_endpoint", uri, source)
            origin = self._endpoint_key("introspection_endpoint", uri, source)
            client = self._introspection(source, where, origin, fixed_endpoint)
            return DeploymentIdp(None, client, fixed_issuers, documents_version=_always)
        discovery = self._discovery_provider(source, issuers)

        def jwks_for(jwks_uri: str) -> JwksProvider:
            return self._jwks_provider(jwks_uri, source)

        keys = _DiscoveredKeys(discovery, issuers, jwks_for)
        self._warming.setdefault(id(discovery), _Warming(discovery=discovery, jwks_for=jwks_for))
        # The JWKS and introspection endpoint the document named last time: their caches and
        # breakers carry on, as the document's do.
        known = discovery.cache.latest()
        if known is not None:
            if self._jwks_key(known.jwks_uri, source) in self._inherited.jwks:
                jwks_for(known.jwks_uri)
            if source.client is not None:
                self._keep_endpoint("introspection_endpoint", known.introspection_endpoint, source)
        introspection = None
        if source.client is not None:
            named: dict[str, IdpEndpoint] = {}  # by the URI the document names

            async def discovered_endpoint() -> IdpEndpoint:
                doc = await discovery.document()
                at = doc.introspection_endpoint
                if at is None:
                    raise IdpBadResponse("discovery", uri, "no introspection_endpoint")
                found = named.get(at)
                if found is None:
                    named.clear()  # the document changed: the old endpoint is not called again
                    found = named[at] = self._endpoint("introspection_endpoint", at, source)
                return found

            introspection = self._introspection(source, where, discovery, discovered_endpoint)

        def documents_version() -> int | None:
            doc = discovery.cache.fresh()
            if doc is None:
                return None
            return self._version_while_fresh(keys.jwks_for(doc.jwks_uri).cache)

        return DeploymentIdp(keys, introspection, keys.issuers, discovery, documents_version)

    async def warm_up(self, budget: float) -> list[dict[str, str]]:
        """Fetch every JWKS and discovery document of this config (and the JWKS each discovery
        document names) that is not already fresh, all at once, each tried again until it is
        had or ``budget`` seconds have passed. What could not be had, one entry per document:
        ``message``, ``endpoint``, ``uri`` and ``detail`` as an IdP failure's log line has them.

        These calls count in the metrics and show in /readyz like any, but not for the
        breakers (:class:`_Breaker`) nor in any check's ``idpCalls``."""
        jobs = list(self._warming.values())  # a fresh document (taken over) is not asked for
        token = _warming.set(True)  # copied into the tasks (and the fetches they start)
        try:
            tasks = [asyncio.ensure_future(job.run()) for job in jobs]
        finally:
            _warming.reset(token)
        try:
            if tasks:
                await asyncio.wait(tasks, timeout=budget)
        finally:
            for task in tasks:
                task.cancel()  # a fetch under way goes on, within its timeout, for the checks
            await asyncio.gather(*tasks, return_exceptions=True)
        return [job.failure(budget) for job in jobs if not job.done]

    async def aclose(self, keep: Providers | None = None) -> None:
        """Close the pooled HTTP clients, except those ``keep`` (the generation that took over
        from this one) still uses."""
        kept = {id(client) for client in keep._held.clients.values()} if keep is not None else set()
        for client in self._held.clients.values():
            if id(client) not in kept:
                await client.aclose()
