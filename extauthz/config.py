"""The config file: what the user wrote, validated, then resolved into frozen policy objects.

Two layers (pyjwt's ``Options`` → ``FullOptions``, without mutating anything):

* ``_raw`` models mirror the YAML of docs/configuration.md exactly (camelCase keys, unknown keys are
  errors). pydantic collects every error with its location.
* :func:`resolve` turns them into the frozen dataclasses below, with every default filled in and
  the legacy ``JWT_AUTHENTICATION`` form folded into the same shape as ``TOKEN_AUTHENTICATION``.

:func:`load_config` is the one entry point; it raises :class:`ConfigError` carrying every problem
as ``"<yaml path>: <message>"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from .errors import ExtauthzError
from .keys import keyset_from_static
from .route_template import RouteTemplate

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "AuthPolicy",
    "ClaimRule",
    "ClientDetails",
    "Config",
    "ConfigError",
    "Deployment",
    "HostGroup",
    "HostIndex",
    "KeySource",
    "Route",
    "ServerSettings",
    "SharedCacheSettings",
    "TlsFiles",
    "load_config",
    "parse_config",
]

# Only public-key algorithms: a shared secret (HS*) has no place in a gateway that verifies tokens
# issued by someone else, and "none" is never a signature.
ASYMMETRIC_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "ES256K", "EdDSA",
)  # fmt: skip

DEFAULT_TIMEOUT_SECONDS = 5.0
DEFAULT_MAX_CACHE_HOURS = 1.0
DEFAULT_STALE_HOURS = 1.0
# On SIGTERM, NOT_SERVING while still answering, for this long: two failed health checks at the
# shipped examples' 1 s interval (3 s with a timed-out one) notice it before the listener closes.
DEFAULT_DRAIN_SECONDS = 5.0


class ConfigError(ExtauthzError):
    """The config cannot be used; ``errors`` lists every problem as ``path: message``."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# --------------------------------------------------------------------------------------------
# Layer 1: the file as written.
# --------------------------------------------------------------------------------------------


class _Raw(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        alias_generator=to_camel,
        populate_by_name=False,
        strict=False,
    )


class _RawBreaker(_Raw):
    failure_threshold: Annotated[int, Field(ge=1, le=1000)] = 5
    cool_down_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0


class _RawTls(_Raw):
    cert_file: Annotated[str, Field(min_length=1)]
    key_file: Annotated[str, Field(min_length=1)]
    client_ca_file: Annotated[str, Field(min_length=1)] | None = None


class _RawSharedCache(_Raw):
    uri: Annotated[str, Field(pattern=r"^rediss?://[^/?#]+")]
    password_file: Annotated[str, Field(min_length=1)] | None = None
    password_env: Annotated[str, Field(min_length=1)] | None = None
    signing_key_file: Annotated[str, Field(min_length=1)] | None = None
    signing_key_env: Annotated[str, Field(min_length=1)] | None = None
    # Redis sits on the path of every local cache miss: a slow one must cost little.
    timeout_milliseconds: Annotated[int, Field(ge=1, le=5000)] = 50
    ca_file: Annotated[str, Field(min_length=1)] | None = None

    @field_validator("uri")
    @classmethod
    def _no_inline_password(cls, v: str) -> str:
        # The config file is not a secret store (it is printed, diffed, kept in Git): a password
        # in the URI's userinfo would sit there in clear.
        authority = v.split("://", 1)[1].split("/", 1)[0]
        if ":" in authority.rpartition("@")[0]:
            raise ValueError("a password in the uri is refused: use passwordFile or passwordEnv")
        return v

    @model_validator(mode="after")
    def _sources(self) -> _RawSharedCache:
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("set at most one of passwordFile or passwordEnv")
        if (self.signing_key_file is None) == (self.signing_key_env is None):
            raise ValueError("set exactly one of signingKeyFile or signingKeyEnv")
        if self.ca_file is not None and not self.uri.startswith("rediss://"):
            raise ValueError("caFile needs a rediss:// uri")
        return self


class _RawServer(_Raw):
    expose_detailed_errors: bool = False
    log_claim_values: bool = False
    deny_status_on_idp_failure: Literal[500, 503] = 500
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # REJECT: %2F in a path is request_ambiguous; KEEP: an ordinary character of a segment.
    encoded_slashes: Literal["REJECT", "KEEP"] = "REJECT"
    circuit_breaker: _RawBreaker = _RawBreaker()
    tls: _RawTls | None = None
    drain_seconds: Annotated[float, Field(ge=0, le=300)] = DEFAULT_DRAIN_SECONDS
    shared_cache: _RawSharedCache | None = None


class _RawClaim(_Raw):
    key: Annotated[str, Field(min_length=1)]
    values: tuple[str, ...] | None = None
    is_required: bool = False

    @field_validator("values", mode="before")
    @classmethod
    def _values_are_text(cls, v: Any) -> Any:
        # Contract: values are strings; a bool or number claim is compared by its JSON text.
        # Accept YAML's `true` / `42` but store the JSON text so the comparison is exact.
        if isinstance(v, list | tuple):
            return tuple(_json_text(x) for x in v)
        return v


class _RawAdditional(_Raw):
    issuers: tuple[Annotated[str, Field(min_length=1)], ...] = ()
    audiences: tuple[Annotated[str, Field(min_length=1)], ...] = ()
    verify_claims: tuple[_RawClaim, ...] = ()


class _RawClientDetails(_Raw):
    client_id: Annotated[str, Field(min_length=1)]
    client_secret_file: str | None = None
    client_secret_env: str | None = None
    auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    # Declared only to refuse it with a clear message instead of "extra inputs".
    client_secret: Any = None

    @field_validator("client_secret")
    @classmethod
    def _no_inline_secret(cls, v: Any) -> Any:
        if v is not None:
            raise ValueError(
                "an inline client secret is refused: use clientSecretFile or clientSecretEnv"
            )
        return v

    @model_validator(mode="after")
    def _one_secret_source(self) -> _RawClientDetails:
        if (self.client_secret_file is None) == (self.client_secret_env is None):
            raise ValueError("set exactly one of clientSecretFile or clientSecretEnv")
        return self


class _RawStaticKey(_Raw):
    """A JWK (any JWK members are kept), or ``{kid, format: PEM, key}``."""

    model_config = ConfigDict(extra="allow", frozen=True, alias_generator=None)

    kid: str | None = None
    kty: str | None = None
    format: Literal["JSON_WEB_KEY", "PEM"] | None = None
    key: str | None = None
    alg: str | None = None

    @model_validator(mode="after")
    def _shape(self) -> _RawStaticKey:
        if self.format == "PEM":
            if not self.key or "PRIVATE KEY" in self.key:
                raise ValueError("a PEM key needs `key` holding a PUBLIC key in PEM form")
        elif self.kty is None:
            raise ValueError("a static key is a JWK (with `kty`) or {kid, format: PEM, key}")
        extra = self.model_extra or {}
        if self.kty and any(k in extra for k in ("d", "p", "q", "dp", "dq", "qi", "k")):
            raise ValueError("private or symmetric key material is refused: give public keys")
        return self


def _only_asymmetric(v: tuple[str, ...]) -> tuple[str, ...]:
    bad = [a for a in v if a not in ASYMMETRIC_ALGORITHMS]
    if bad:
        raise ValueError(
            f"not allowed: {', '.join(bad)}; choose from {', '.join(ASYMMETRIC_ALGORITHMS)}"
            " ('none' and HMAC algorithms are never accepted)"
        )
    if not v:
        raise ValueError("must name at least one algorithm")
    return v


def _absolute_url(v: str) -> str:
    if not re.match(r"^https?://[^/\s]+", v):
        raise ValueError("must be an absolute http(s) URL")
    if "@" in v.split("://", 1)[1].split("/", 1)[0]:
        # A URI is logged and shown by /readyz and probe; credentials belong in clientDetails.
        raise ValueError("credentials in the URI are refused; use clientDetails")
    return v


_Algorithms = Annotated[tuple[str, ...], AfterValidator(_only_asymmetric)]
_Url = Annotated[str, AfterValidator(_absolute_url)]


class _RawPolicyBase(_Raw):
    max_cache_duration_in_hours: Annotated[float, Field(gt=0, le=24 * 7)] = DEFAULT_MAX_CACHE_HOURS
    max_stale_duration_in_hours: Annotated[float, Field(ge=0, le=24 * 7)] = DEFAULT_STALE_HOURS
    is_ssl_verify_disabled: bool = False
    ca_file: str | None = None
    timeout_seconds: Annotated[float, Field(gt=0, le=60)] = DEFAULT_TIMEOUT_SECONDS
    allowed_algorithms: _Algorithms = ASYMMETRIC_ALGORITHMS
    additional_validation_policy: _RawAdditional = _RawAdditional()


def _non_empty(v: tuple[Any, ...]) -> tuple[Any, ...]:
    # Not Field(min_length=1): pydantic would also report a bogus "0 items" when an item fails.
    if not v:
        raise ValueError("must not be empty")
    return v


_StaticKeys = Annotated[tuple[_RawStaticKey, ...], AfterValidator(_non_empty)]


def _keys_usable(keys: tuple[_RawStaticKey, ...], algorithms: tuple[str, ...]) -> None:
    keyset_from_static([k.model_dump(exclude_none=True) for k in keys], frozenset(algorithms))


class _RawStaticKeysPolicy(_RawPolicyBase):
    type: Literal["STATIC_KEYS"]
    keys: _StaticKeys

    @model_validator(mode="after")
    def _usable(self) -> _RawStaticKeysPolicy:
        _keys_usable(self.keys, self.allowed_algorithms)
        return self


class _RawJwksPolicy(_RawPolicyBase):
    type: Literal["REMOTE_JWKS"]
    uri: _Url


class _RawDiscoveryPolicy(_RawPolicyBase):
    type: Literal["REMOTE_DISCOVERY"]
    uri: _Url
    client_details: _RawClientDetails | None = None


class _RawIntrospectionPolicy(_RawPolicyBase):
    type: Literal["REMOTE_INTROSPECTION"]
    uri: _Url
    client_details: _RawClientDetails


_RawValidationPolicy = Annotated[
    _RawStaticKeysPolicy | _RawJwksPolicy | _RawDiscoveryPolicy | _RawIntrospectionPolicy,
    Field(discriminator="type"),
]


class _RawTokenSource(_Raw):
    token_header: str | None = None
    token_query_param: str | None = None
    token_auth_scheme: str | None = None
    is_anonymous_access_allowed: bool = False
    max_clock_skew_in_seconds: Annotated[float, Field(ge=0, le=3600)] = 0
    # RFC 9449 (DPoP) and RFC 8705 §3 (certificate-bound tokens): the token must be bound.
    sender_constraint: Literal["NONE", "DPOP", "MTLS", "DPOP_OR_MTLS"] = "NONE"

    @model_validator(mode="after")
    def _one_source(self) -> _RawTokenSource:
        if self.token_header is not None and self.token_query_param is not None:
            raise ValueError("set tokenHeader or tokenQueryParam, not both")
        if "DPOP" in self.sender_constraint and self.token_query_param is not None:
            # RFC 9449 §7.1: a DPoP-bound token travels in the Authorization header only.
            raise ValueError("senderConstraint DPOP needs the Authorization header, not a query")
        return self


class _RawTokenAuthentication(_RawTokenSource):
    type: Literal["TOKEN_AUTHENTICATION"]
    validation_policy: _RawValidationPolicy


class _RawLegacyStaticKeys(_Raw):
    type: Literal["STATIC_KEYS"]
    keys: _StaticKeys


class _RawLegacyJwks(_Raw):
    type: Literal["REMOTE_JWKS"]
    uri: _Url
    max_cache_duration_in_hours: Annotated[float, Field(gt=0, le=24 * 7)] = DEFAULT_MAX_CACHE_HOURS
    max_stale_duration_in_hours: Annotated[float, Field(ge=0, le=24 * 7)] = DEFAULT_STALE_HOURS
    is_ssl_verify_disabled: bool = False


class _RawJwtAuthentication(_RawTokenSource):
    """The legacy flat form: checks sit directly under ``authentication``."""

    type: Literal["JWT_AUTHENTICATION"]
    issuers: tuple[Annotated[str, Field(min_length=1)], ...] = ()
    audiences: tuple[Annotated[str, Field(min_length=1)], ...] = ()
    verify_claims: tuple[_RawClaim, ...] = ()
    allowed_algorithms: _Algorithms = ASYMMETRIC_ALGORITHMS
    public_keys: Annotated[_RawLegacyStaticKeys | _RawLegacyJwks, Field(discriminator="type")]

    @model_validator(mode="after")
    def _usable(self) -> _RawJwtAuthentication:
        if isinstance(self.public_keys, _RawLegacyStaticKeys):
            _keys_usable(self.public_keys.keys, self.allowed_algorithms)
        return self


_RawServerAuthentication = Annotated[
    _RawTokenAuthentication | _RawJwtAuthentication, Field(discriminator="type")
]


class _RawSelectBy(_Raw):
    """How DYNAMIC_AUTHENTICATION picks a server: by one claim of the token, read before it is
    verified (``iss`` most often), or by one request header."""

    claim: Annotated[str, Field(min_length=1)] | None = None
    header: Annotated[str, Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one(self) -> _RawSelectBy:
        if (self.claim is None) == (self.header is None):
            raise ValueError("set claim or header, exactly one")
        if self.header is not None and not _HEADER_NAME.match(self.header.lower()):
            raise ValueError(f"{self.header!r} is not a valid header name")
        return self


class _RawAuthServer(_Raw):
    values: tuple[Annotated[str, Field(min_length=1)], ...]
    authentication: _RawServerAuthentication

    @field_validator("values")
    @classmethod
    def _values(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one value is needed")
        if "*" in v and len(v) > 1:
            raise ValueError("'*' (the default server) stands alone")
        return v


# Where a token is found: one place for every server of a DYNAMIC_AUTHENTICATION deployment, as
# the token is read before a server is chosen.
_TOKEN_PLACE = ("token_header", "token_query_param", "token_auth_scheme")


class _RawDynamicAuthentication(_Raw):
    """Several identity providers for one deployment: each server a whole policy; the token's
    unverified claim (or a header) only chooses which one verifies it."""

    type: Literal["DYNAMIC_AUTHENTICATION"]
    select_by: _RawSelectBy
    servers: tuple[_RawAuthServer, ...]

    @model_validator(mode="after")
    def _servers(self) -> _RawDynamicAuthentication:
        if not self.servers:
            raise ValueError("at least one server is needed")
        seen: set[str] = set()
        first = self.servers[0].authentication
        for i, server in enumerate(self.servers):
            for value in server.values:
                if value in seen:
                    raise ValueError(f"servers[{i}]: {value!r} is taken by an earlier server")
                seen.add(value)
            a = server.authentication
            for field_name in (*_TOKEN_PLACE, "is_anonymous_access_allowed"):
                if getattr(a, field_name) != getattr(first, field_name):
                    alias = to_camel(field_name)
                    raise ValueError(
                        f"servers[{i}].authentication.{alias} differs from servers[0]'s: the"
                        " token is found, and anonymous access decided, before a server is chosen"
                    )
        return self

    @property
    def is_anonymous_access_allowed(self) -> bool:
        return self.servers[0].authentication.is_anonymous_access_allowed


_RawAuthentication = Annotated[
    _RawTokenAuthentication | _RawJwtAuthentication | _RawDynamicAuthentication,
    Field(discriminator="type"),
]


class _RawAuthorization(_Raw):
    type: Literal["ANY_OF", "AUTHENTICATION_ONLY", "ANONYMOUS"] = "AUTHENTICATION_ONLY"
    allowed_scope: tuple[Annotated[str, Field(min_length=1)], ...] = ()

    @model_validator(mode="after")
    def _scope_matches_type(self) -> _RawAuthorization:
        if self.type == "ANY_OF" and not self.allowed_scope:
            raise ValueError("ANY_OF needs a non-empty allowedScope")
        if self.type != "ANY_OF" and self.allowed_scope:
            raise ValueError(f"allowedScope only applies to ANY_OF, not {self.type}")
        return self


class _RawRoute(_Raw):
    name: str | None = None
    path: str = "/"
    methods: tuple[str, ...] = ()
    authorization: _RawAuthorization = _RawAuthorization()

    @field_validator("path")
    @classmethod
    def _template(cls, v: str) -> str:
        RouteTemplate.parse(v)  # raises ValueError with the reason
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple(m.upper() for m in v)
        for m in out:
            if not re.fullmatch(r"[A-Z]+", m):
                raise ValueError(f"not an HTTP method: {m!r}")
        return out


_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
# A configured host: labels of letters, digits, '-' and '_' (as request authorities are read), or
# a bracketed IPv6 literal. Ports are not part of it: a request's port is ignored.
_HOST_NAME = re.compile(r"\[[0-9a-f:.]+\]|[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
# Never let a claim overwrite what routing or the transport depends on.
_RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer",
     "upgrade", "proxy-connection", "proxy-authorization", "authorization", "cookie",
     "x-request-id", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "traceparent",
     "tracestate"}
)  # fmt: skip


class _RawDeployment(_Raw):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")]
    hosts: tuple[Annotated[str, Field(min_length=1)], ...] = ()
    path_prefix: str
    authentication: _RawAuthentication
    routes: tuple[_RawRoute, ...] = ()
    headers_from_claims: dict[str, str] = Field(default_factory=dict)
    # DRY_RUN: decide and log as usual, but allow every request (docs/configuration.md).
    enforcement: Literal["ENFORCE", "DRY_RUN"] = "ENFORCE"

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/") or "?" in v or "#" in v:
            raise ValueError("must start with '/' and hold no query or fragment")
        prefix = v.rstrip("/") or "/"
        # A request path is matched as sent and must be in normal form, so a prefix that is not
        # could never match anything.
        if (
            "\\" in prefix
            or "%" in prefix
            or any(seg in ("", ".", "..") for seg in prefix.split("/")[1:] if prefix != "/")
        ):
            raise ValueError("must be in normal form: no '//', '.', '..', '%' or backslash")
        return prefix

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out: list[str] = []
        for h in v:
            if "*" in h and not (h.startswith("*.") and "*" not in h[2:]):
                raise ValueError(f"{h!r}: only a leading '*.' wildcard is supported")
            name = h.lower().removesuffix(".")  # a fully qualified name is the same host
            if not _HOST_NAME.fullmatch(name.removeprefix("*.")):
                raise ValueError(f"{h!r} is not a host name (no port, scheme or path)")
            if name in out:
                raise ValueError(f"{h!r} is listed twice")
            out.append(name)
        return tuple(out)

    @field_validator("headers_from_claims")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, claim in v.items():
            lname = name.lower()
            if not _HEADER_NAME.match(lname) or lname.startswith(":"):
                raise ValueError(f"{name!r} is not a valid header name")
            if lname in _RESERVED_HEADERS or lname.startswith("x-envoy-"):
                raise ValueError(f"{name!r} may not be set from a claim")
            if lname in out:
                raise ValueError(f"{name!r} is listed twice (header names ignore case)")
            if not claim:
                raise ValueError(f"{name!r} needs a claim name")
            out[lname] = claim
        return out

    @model_validator(mode="after")
    def _anonymous_routes(self) -> _RawDeployment:
        if not self.authentication.is_anonymous_access_allowed:
            for i, r in enumerate(self.routes):
                if r.authorization.type == "ANONYMOUS":
                    raise ValueError(
                        f"routes[{i}] is ANONYMOUS but authentication.isAnonymousAccessAllowed"
                        " is false"
                    )
        return self


class _RawConfig(_Raw):
    server: _RawServer = _RawServer()
    deployments: tuple[_RawDeployment, ...]

    @field_validator("deployments")
    @classmethod
    def _unique_names(cls, v: tuple[_RawDeployment, ...]) -> tuple[_RawDeployment, ...]:
        if not v:
            raise ValueError("at least one deployment is needed")
        seen: set[str] = set()
        for d in v:
            if d.name in seen:
                raise ValueError(f"deployment name {d.name!r} is used twice")
            seen.add(d.name)
        return v


# --------------------------------------------------------------------------------------------
# Layer 2: frozen, fully resolved policy.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """``server.tls``: PEM files of the check listeners' certificate chain and key, and of the
    CA whose client certificates are required (mTLS; None: no client certificate asked)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None


@dataclass(frozen=True, slots=True)
class SharedCacheSettings:
    """``server.sharedCache``: the Redis (or Valkey) that the replicas of a fleet share their
    introspection answers through. The password and the signing key are named, never held:
    they are read when the cache is made (:mod:`extauthz.shared_cache`)."""

    uri: str
    signing_key_file: str | None
    signing_key_env: str | None
    password_file: str | None = None
    password_env: str | None = None
    timeout_seconds: float = 0.05
    ca_file: str | None = None


@dataclass(frozen=True, slots=True)
class ServerSettings:
    expose_detailed_errors: bool = False
    # A failure line carries the verifyClaims values compared only when asked: claim values
    # may be personal data (an email, a name).
    log_claim_values: bool = False
    deny_status_on_idp_failure: int = 500
    log_level: str = "INFO"
    keep_encoded_slashes: bool = False  # server.encodedSlashes: KEEP
    breaker_failure_threshold: int = 5
    breaker_cool_down_seconds: float = 30.0
    tls: TlsFiles | None = None  # server.tls: TLS (and mTLS) on the check listeners
    drain_seconds: float = DEFAULT_DRAIN_SECONDS  # on SIGTERM: NOT_SERVING, still answering
    shared_cache: SharedCacheSettings | None = None  # server.sharedCache


@dataclass(frozen=True, slots=True)
class ClaimRule:
    key: str
    values: tuple[str, ...]
    is_required: bool


@dataclass(frozen=True, slots=True)
class ClientDetails:
    client_id: str
    secret_file: str | None
    secret_env: str | None
    auth_method: str


@dataclass(frozen=True, slots=True)
class KeySource:
    """Where verification keys (or introspection answers) come from."""

    type: Literal["STATIC_KEYS", "REMOTE_JWKS", "REMOTE_DISCOVERY", "REMOTE_INTROSPECTION"]
    uri: str | None = None
    static_keys: tuple[Mapping[str, Any], ...] = ()
    max_cache_seconds: float = DEFAULT_MAX_CACHE_HOURS * 3600
    stale_seconds: float = DEFAULT_STALE_HOURS * 3600
    verify_tls: bool = True
    ca_file: str | None = None
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    client: ClientDetails | None = None

    @property
    def worst_case_seconds(self) -> float:
        """The longest a check may wait for this source's IdP calls, each bounded by
        ``timeoutSeconds``: discovery fetches its document first, then the JWKS or the
        introspection endpoint it names, in series."""
        calls = {"STATIC_KEYS": 0, "REMOTE_DISCOVERY": 2}.get(self.type, 1)
        return calls * self.timeout_seconds


@dataclass(frozen=True, slots=True)
class AuthPolicy:
    style: Literal["TOKEN_AUTHENTICATION", "JWT_AUTHENTICATION"]
    token_header: str | None  # lower-case header name, or None when the query is used
    token_query_param: str | None
    token_auth_scheme: str | None  # None: the whole header value is the token
    anonymous_allowed: bool
    clock_skew: float
    keys: KeySource
    algorithms: frozenset[str]
    issuers: tuple[str, ...]
    audiences: frozenset[str]
    claims: tuple[ClaimRule, ...]
    # NONE, DPOP, MTLS or DPOP_OR_MTLS (RFC 9449, RFC 8705): what the token must be bound to.
    sender_constraint: str = "NONE"

    @property
    def log_event(self) -> str:
        prefix = (
            "jwtAuthentication" if self.style == "JWT_AUTHENTICATION" else "tokenAuthentication"
        )
        return f"{prefix}.authenticationFailed"


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    template: str
    path: RouteTemplate
    methods: frozenset[str]  # empty: every method
    authorization: Literal["ANY_OF", "AUTHENTICATION_ONLY", "ANONYMOUS"]
    allowed_scope: tuple[str, ...]

    def matches(self, relative_path: str, method: str) -> bool:
        return (not self.methods or method in self.methods) and self.path.matches(relative_path)


@dataclass(frozen=True, slots=True)
class Deployment:
    name: str
    hosts: tuple[str, ...]
    path_prefix: str
    auth: AuthPolicy
    routes: tuple[Route, ...]
    headers_from_claims: tuple[tuple[str, str], ...]  # (lower-case header, claim)
    # How many leading path segments the deepest route template looks at one by one.
    template_depth: int = 0
    dry_run: bool = False  # enforcement: DRY_RUN
    # DYNAMIC_AUTHENTICATION: what chooses the server, ("claim", name) or ("header", lower-case
    # name), and the servers by the values they take ("*": the default). ``auth`` is then the
    # first server's, for what is decided before a server is chosen (where the token is, whether
    # anonymous access is allowed).
    select_by: tuple[Literal["claim", "header"], str] | None = None
    servers: tuple[AuthServer, ...] = ()
    server_by_value: Mapping[str, AuthServer] = field(repr=False, default_factory=dict)
    # A server's own deployment (see AuthServer): the server's name, its first value.
    auth_server: str = ""

    @property
    def policies(self) -> tuple[Deployment, ...]:
        """What tokens are verified with: this deployment, or each of its servers'."""
        return tuple(s.deployment for s in self.servers) or (self,)

    @property
    def idp_key(self) -> str:
        """The key of this policy's IdP side (keys, introspection) among the providers."""
        return f"{self.name} {self.auth_server}" if self.auth_server else self.name

    @property
    def label(self) -> str:
        """How reports name this policy: the deployment, and the server when it is one."""
        return f"{self.name} (server {self.auth_server})" if self.auth_server else self.name


@dataclass(frozen=True, slots=True)
class AuthServer:
    """One identity provider of a DYNAMIC_AUTHENTICATION deployment: the values that choose it
    and the deployment as it is checked with this server's policy (same name, routes and
    headers; its own ``auth``), so that every check downstream reads one shape."""

    values: tuple[str, ...]
    deployment: Deployment

    @property
    def name(self) -> str:
        return self.values[0]


@dataclass(frozen=True, slots=True)
class HostGroup:
    """The deployments that serve one host pattern (an exact host, one ``*.`` wildcard, or no
    ``hosts`` at all), by ``pathPrefix``, with the prefix lengths present, longest first: route
    selection tries a path's prefixes of those lengths only."""

    by_prefix: Mapping[str, Deployment]
    prefix_lengths: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class HostIndex:
    """The deployments grouped for route selection: hosts before paths, most specific first."""

    exact: Mapping[str, HostGroup]
    # (suffix length, suffix → group), longest first; a suffix keeps its leading dot.
    wildcards: tuple[tuple[int, Mapping[str, HostGroup]], ...]
    hostless: HostGroup


_NO_HOSTS = HostIndex({}, (), HostGroup({}, ()))


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerSettings
    deployments: tuple[Deployment, ...]
    by_name: Mapping[str, Deployment] = field(repr=False, default_factory=dict)
    host_index: HostIndex = field(repr=False, default=_NO_HOSTS)
    # What check-config and the server log as warnings: valid, but perhaps not what was meant.
    warnings: tuple[str, ...] = ()
    source: str = ""

    def summary(self) -> str:
        routes = sum(len(d.routes) or 1 for d in self.deployments)
        kinds = sorted({p.auth.keys.type for d in self.deployments for p in d.policies})
        return (
            f"{self.source or 'config'}: OK, {len(self.deployments)} deployment(s), "
            f"{routes} route(s), validation: {', '.join(kinds)}"
        )


def _json_text(v: Any) -> Any:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    return v


def _resolve_keys(raw: Any) -> KeySource:
    if isinstance(raw, _RawLegacyStaticKeys | _RawStaticKeysPolicy):
        return KeySource(
            type="STATIC_KEYS", static_keys=tuple(_static_key_dict(k) for k in raw.keys)
        )
    common: dict[str, Any] = {
        "max_cache_seconds": raw.max_cache_duration_in_hours * 3600,
        "stale_seconds": raw.max_stale_duration_in_hours * 3600,
        "verify_tls": not raw.is_ssl_verify_disabled,
    }
    if isinstance(raw, _RawLegacyJwks):
        return KeySource(type="REMOTE_JWKS", uri=raw.uri, **common)
    raw_client = getattr(raw, "client_details", None)
    client = None
    if raw_client is not None:
        client = ClientDetails(
            raw_client.client_id,
            raw_client.client_secret_file,
            raw_client.client_secret_env,
            raw_client.auth_method,
        )
    return KeySource(
        raw.type, raw.uri, ca_file=raw.ca_file, timeout_seconds=raw.timeout_seconds, client=client,
        **common,
    )  # fmt: skip


def _static_key_dict(k: _RawStaticKey) -> Mapping[str, Any]:
    return k.model_dump(exclude_none=True)


def _resolve_auth(a: _RawTokenAuthentication | _RawJwtAuthentication) -> AuthPolicy:
    if isinstance(a, _RawTokenAuthentication):
        vp = a.validation_policy
        extra = vp.additional_validation_policy
        issuers, audiences, claims = extra.issuers, extra.audiences, extra.verify_claims
        algorithms = vp.allowed_algorithms
        keys = _resolve_keys(vp)
    else:
        issuers, audiences, claims = a.issuers, a.audiences, a.verify_claims
        algorithms = a.allowed_algorithms
        keys = _resolve_keys(a.public_keys)
    if a.token_query_param is not None:
        header, scheme = None, None
    else:
        header = (a.token_header or "Authorization").lower()
        scheme = a.token_auth_scheme if a.token_auth_scheme is not None else "Bearer"
        scheme = scheme or None
    return AuthPolicy(
        style=a.type,
        token_header=header,
        token_query_param=a.token_query_param,
        token_auth_scheme=scheme,
        anonymous_allowed=a.is_anonymous_access_allowed,
        clock_skew=a.max_clock_skew_in_seconds,
        keys=keys,
        algorithms=frozenset(algorithms),
        issuers=issuers,
        audiences=frozenset(audiences),
        claims=tuple(ClaimRule(c.key, c.values or (), c.is_required) for c in claims),
        sender_constraint=a.sender_constraint,
    )


def _server_auth(
    a: _RawTokenAuthentication | _RawJwtAuthentication,
    values: tuple[str, ...],
    select_by: tuple[str, str],
) -> AuthPolicy:
    """A server's policy. Chosen by the token's unverified ``iss``, a server that lists no
    issuers of its own takes exactly the issuers that choose it: the claim only says where to
    look, and the verified token must then say the same."""
    auth = _resolve_auth(a)
    if select_by == ("claim", "iss") and not auth.issuers:
        named = tuple(v for v in values if v != "*")
        if named:
            auth = replace(auth, issuers=named)
    return auth


def _resolve_deployment(raw: _RawDeployment) -> Deployment:
    a = raw.authentication
    select_by: tuple[Literal["claim", "header"], str] | None = None
    if isinstance(a, _RawDynamicAuthentication):
        by = a.select_by
        chosen_by: tuple[Literal["claim", "header"], str] = (
            ("claim", by.claim) if by.claim is not None else ("header", _lower(by.header))
        )
        select_by = chosen_by
        server_auths = [
            (s.values, _server_auth(s.authentication, s.values, chosen_by)) for s in a.servers
        ]
        auth = server_auths[0][1]
    else:
        auth = _resolve_auth(a)
    routes = tuple(
        Route(
            name=r.name if r.name is not None else str(i),
            template=r.path,
            path=RouteTemplate.parse(r.path),
            methods=frozenset(r.methods),
            authorization=r.authorization.type,
            allowed_scope=r.authorization.allowed_scope,
        )
        for i, r in enumerate(raw.routes)
    )
    deployment = Deployment(
        name=raw.name,
        hosts=raw.hosts,
        path_prefix=raw.path_prefix,
        auth=auth,
        routes=routes,
        headers_from_claims=tuple(raw.headers_from_claims.items()),
        template_depth=max((r.path.max_segments for r in routes), default=0),
        dry_run=raw.enforcement == "DRY_RUN",
    )
    if select_by is None:
        return deployment
    servers = tuple(
        AuthServer(values, replace(deployment, auth=policy, auth_server=values[0]))
        for values, policy in server_auths
    )
    by_value = {value: server for server in servers for value in server.values}
    return replace(
        deployment,
        select_by=select_by,
        servers=servers,
        server_by_value=MappingProxyType(by_value),
    )


def _lower(header: str | None) -> str:
    assert header is not None
    return header.lower()


def _host_group(members: Mapping[str, Deployment]) -> HostGroup:
    lengths = tuple(sorted({len(p) for p in members}, reverse=True))
    return HostGroup(MappingProxyType(dict(members)), lengths)


def _index_hosts(deployments: tuple[Deployment, ...]) -> tuple[HostIndex, list[str]]:
    """Group the deployments by host pattern and prefix; the errors are two deployments that
    would compete for the same host and prefix (config order never decides between them)."""
    groups: dict[str, dict[str, int]] = {}  # host pattern ("" for none) → prefix → index
    errors: list[str] = []
    for i, d in enumerate(deployments):
        for pattern in d.hosts or ("",):
            members = groups.setdefault(pattern, {})
            other = members.setdefault(d.path_prefix, i)
            if other != i:
                for_host = f"host {pattern!r}" if pattern else "requests of any host"
                errors.append(
                    f"deployments[{i}].pathPrefix: {d.path_prefix!r} for {for_host} is also"
                    f" deployments[{other}] ({deployments[other].name!r})'s; two deployments"
                    " may not serve the same host and prefix"
                )

    def group(pattern: str) -> HostGroup:
        return _host_group({p: deployments[i] for p, i in groups[pattern].items()})

    wildcards: dict[int, dict[str, HostGroup]] = {}
    for pattern in groups:
        if pattern.startswith("*."):
            suffix = pattern[1:]
            wildcards.setdefault(len(suffix), {})[suffix] = group(pattern)
    index = HostIndex(
        exact=MappingProxyType({p: group(p) for p in groups if p and not p.startswith("*.")}),
        wildcards=tuple(
            (length, MappingProxyType(by_suffix))
            for length, by_suffix in sorted(wildcards.items(), reverse=True)
        ),
        hostless=group("") if "" in groups else _host_group({}),
    )
    return index, errors


def _prefix_and_parents(prefix: str) -> list[str]:
    """``/a/b``, ``/a``, ``/``: every pathPrefix that holds ``prefix``."""
    out = [prefix]
    while prefix != "/":
        prefix = prefix.rsplit("/", 1)[0] or "/"
        out.append(prefix)
    return out


def _shadowing_warnings(deployments: tuple[Deployment, ...]) -> tuple[str, ...]:
    """Where a deployment without ``hosts`` and one with ``hosts`` cover the same paths: hosts
    come first, so for the listed hosts the host-scoped one applies, even to a longer prefix of
    the host-less one. Valid, and worth saying."""
    warnings: list[str] = []
    scoped_by_prefix: dict[str, list[Deployment]] = {}
    for d in deployments:
        if d.hosts:
            scoped_by_prefix.setdefault(d.path_prefix, []).append(d)
    for anywhere in (d for d in deployments if not d.hosts):
        for prefix in _prefix_and_parents(anywhere.path_prefix):
            for scoped in scoped_by_prefix.get(prefix, ()):
                warnings.append(_shadowing_warning(scoped, anywhere))
    return tuple(warnings)


def _shadowing_warning(scoped: Deployment, anywhere: Deployment) -> str:
    hosts = ", ".join(scoped.hosts)
    shared = (
        f"share pathPrefix {scoped.path_prefix!r}"
        if anywhere.path_prefix == scoped.path_prefix
        else f"cover {anywhere.path_prefix!r} ({scoped.name!r} through its pathPrefix"
        f" {scoped.path_prefix!r})"
    )
    return (
        f"deployments {scoped.name!r} (hosts {hosts}) and {anywhere.name!r} (no hosts)"
        f" {shared}: for {hosts}, {scoped.name!r} applies; for any other host, {anywhere.name!r}"
    )


def resolve(raw: _RawConfig, source: str = "") -> Config:
    deployments = tuple(_resolve_deployment(d) for d in raw.deployments)
    host_index, errors = _index_hosts(deployments)
    if errors:
        raise ConfigError(errors)
    s = raw.server
    return Config(
        server=ServerSettings(
            expose_detailed_errors=s.expose_detailed_errors,
            log_claim_values=s.log_claim_values,
            deny_status_on_idp_failure=s.deny_status_on_idp_failure,
            log_level=s.log_level,
            keep_encoded_slashes=s.encoded_slashes == "KEEP",
            breaker_failure_threshold=s.circuit_breaker.failure_threshold,
            breaker_cool_down_seconds=s.circuit_breaker.cool_down_seconds,
            tls=None
            if s.tls is None
            else TlsFiles(s.tls.cert_file, s.tls.key_file, s.tls.client_ca_file),
            drain_seconds=s.drain_seconds,
            shared_cache=_resolve_shared_cache(s.shared_cache),
        ),
        deployments=deployments,
        by_name=MappingProxyType({d.name: d for d in deployments}),
        host_index=host_index,
        warnings=_shadowing_warnings(deployments),
        source=source,
    )


def _resolve_shared_cache(raw: _RawSharedCache | None) -> SharedCacheSettings | None:
    if raw is None:
        return None
    return SharedCacheSettings(
        raw.uri,
        raw.signing_key_file,
        raw.signing_key_env,
        password_file=raw.password_file,
        password_env=raw.password_env,
        timeout_seconds=raw.timeout_milliseconds / 1000,
        ca_file=raw.ca_file,
    )


# Tags of discriminated unions appear in pydantic's error locations; the YAML has no such level.
_UNION_TAGS = frozenset(
    {"STATIC_KEYS", "REMOTE_JWKS", "REMOTE_DISCOVERY", "REMOTE_INTROSPECTION",
     "TOKEN_AUTHENTICATION", "JWT_AUTHENTICATION"}
)  # fmt: skip


def _yaml_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_TAGS:
            continue
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _format_errors(exc: ValidationError) -> list[str]:
    errors: list[str] = []
    for e in exc.errors(include_url=False, include_input=False):
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown type {e.get('ctx', {}).get('tag')!r}; expected one of " + str(
                e.get("ctx", {}).get("expected_tags")
            )
        msg = msg.removeprefix("Value error, ")
        line = f"{_yaml_path(tuple(e['loc']))}: {msg}"
        if line not in errors:
            errors.append(line)
    return errors


def parse_config(data: Any, source: str = "") -> Config:
    """Validate an already-parsed YAML document and resolve it."""
    if not isinstance(data, Mapping):
        raise ConfigError(["(top level): the config must be a mapping with `deployments`"])
    try:
        raw = _RawConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None
    return resolve(raw, source)


def load_config(path: str | Path) -> Config:
    """Read, validate and resolve a config file; raise :class:`ConfigError` on any problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read: {exc.strerror}"]) from None
    try:
        # libyaml's loader when the wheel has it: a 10,000-deployment file loads 3× faster.
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError([f"{p}: not valid YAML{at}"]) from None
    return parse_config(data, source=str(p))
