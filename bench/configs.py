"""Config generation: extauthz policies (docs/configuration.md) and the bench Envoy bootstrap.

Pure functions of their arguments (no files, no processes), so bench/tests/test_run.py
checks them, and extauthz's own parser validates the policies there too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import yaml

from bench.keys import AUDIENCE, CLIENT_ID, CLIENT_SECRET_ENV, ISSUER, SCOPE

TEMPLATES = Path(__file__).resolve().parent / "envoy_templates"

TARGET_DEPLOYMENT = "api"
TARGET_PATH = "/api/items"  # the path every bench request asks for (but the hostile paths)

# The hostile paths' deployment: its routes are templates, so a path under /files is matched
# segment by segment against `/{name}.{ext}` and then `/{folder}/{rest*}`.
FILES_DEPLOYMENT = "files"
FILES_PREFIX = "/files"
FILES_SCOPE = "files.read"

# The DPoP scenario's deployment: scenario 1's policy with senderConstraint DPOP (RFC 9449), so
# the same server answers the cached bearer check on TARGET_PATH and the DPoP one on DPOP_PATH.
DPOP_DEPLOYMENT = "dpop"
DPOP_PREFIX = "/dpop"
DPOP_PATH = DPOP_PREFIX + "/items"


@dataclass(frozen=True)
class HostilePath:
    """A path a client can send to make route selection work hard; sent without a token, it is
    selected (a route of the ``files`` deployment) and denied 401 ``token_missing``."""

    key: str  # short name, in the results
    title: str
    path: str
    status: int = 401
    reason: str = "token_missing"


# Each is about as long as Envoy lets through with its default limit on request headers (60 KiB
# for the request line and headers together): a 90 KB path gets 431 there, never reaching the
# ext_authz server.
HOSTILE_PATHS = (
    # 30,001 segments: selected through `/{folder}/{rest*}`.
    HostilePath("long path", "60 KB path: /files + '/a' × 30,000", FILES_PREFIX + "/a" * 30_000),
    # A segment of 20,000 dots is an ordinary segment (only '.' and '..' are dot segments), so it
    # reaches the templates: the '/' after it makes `/{name}.{ext}` fail and `/{folder}/{rest*}`
    # match. A backtracking `[^/]+\.[^/]+` takes time quadratic in the dots to fail on it.
    HostilePath(
        "dotted segment",
        "/files/ + 20,000 dots + /",
        FILES_PREFIX + "/" + "." * 20_000 + "/",
    ),
    # In normal form too ('.x' is no dot segment), but the '/.' in it makes the whole 60 KB path
    # go through the normal-form check's full scan, not only its quick substring tests.
    HostilePath(
        "dot-led segment",
        "60 KB path ending in a dot-led segment: /files + '/a' × 29,999 + '/.x'",
        FILES_PREFIX + "/a" * 29_999 + "/.x",
    ),
)


def _policy(kind: str, idp_url: str) -> dict[str, Any]:
    additional = {"issuers": [ISSUER], "audiences": [AUDIENCE]}
    if kind == "jwt":
        return {
            "type": "REMOTE_JWKS",
            "uri": f"{idp_url}/jwks",
            "maxCacheDurationInHours": 1,
            "allowedAlgorithms": ["RS256", "ES256"],
            "additionalValidationPolicy": additional,
        }
    if kind == "introspection":
        return {
            "type": "REMOTE_INTROSPECTION",
            "uri": f"{idp_url}/introspect",
            "maxCacheDurationInHours": 1,
            "timeoutSeconds": 5,
            "clientDetails": {"clientId": CLIENT_ID, "clientSecretEnv": CLIENT_SECRET_ENV},
            "additionalValidationPolicy": additional,
        }
    raise ValueError(f"unknown policy kind {kind!r}")


def _route(name: str, path: str, scope: str) -> dict[str, Any]:
    return {
        "name": name,
        "path": path,
        "methods": ["GET"],
        "authorization": {"type": "ANY_OF", "allowedScope": [scope]},
    }


def _deployment(
    name: str, prefix: str, policy: dict[str, Any], routes: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "name": name,
        "pathPrefix": prefix,
        "authentication": {
            "type": "TOKEN_AUTHENTICATION",
            "tokenHeader": "Authorization",
            "tokenAuthScheme": "Bearer",
            "validationPolicy": policy,
        },
        "routes": routes if routes is not None else [_route("get-items", "/items", SCOPE)],
        "headersFromClaims": {"x-auth-subject": "sub"},
    }


def files_deployment(policy: dict[str, Any]) -> dict[str, Any]:
    """The deployment the hostile paths aim at: routes that are templates."""
    return _deployment(
        FILES_DEPLOYMENT,
        FILES_PREFIX,
        policy,
        [
            _route("get-file", "/{name}.{ext}", FILES_SCOPE),
            _route("get-folder", "/{folder}/{rest*}", FILES_SCOPE),
        ],
    )


def dpop_deployment(policy: dict[str, Any]) -> dict[str, Any]:
    """The DPoP scenario's deployment: tokens bound to a proof key (``cnf.jkt``), sent as
    ``Authorization: DPoP <token>`` with a new proof each time."""
    deployment = _deployment(DPOP_DEPLOYMENT, DPOP_PREFIX, policy)
    deployment["authentication"]["senderConstraint"] = "DPOP"
    return deployment


def extauthz_config(
    kind: str, idp_url: str, deployments: int = 1, *, files: bool = False, dpop: bool = False
) -> dict[str, Any]:
    """A policy with ``deployments`` deployments; requests to TARGET_PATH hit the one named
    ``api``, which sits near the end (10th from last) when there are many, so a linear scan
    over deployments would pay for nearly all of them. ``files`` adds the deployment of the
    hostile paths (:func:`files_deployment`) after them, ``dpop`` the DPoP one
    (:func:`dpop_deployment`), and no drain on SIGTERM: that scenario restarts its server."""
    if deployments < 1:
        raise ValueError("deployments must be >= 1")
    policy = _policy(kind, idp_url)
    fillers = [_deployment(f"svc-{i:05d}", f"/svc{i:05d}", policy) for i in range(deployments - 1)]
    at = max(0, len(fillers) - 9)
    target = _deployment(TARGET_DEPLOYMENT, "/api", policy)
    extra = [files_deployment(policy)] if files else []
    if dpop:
        extra.append(dpop_deployment(policy))
    server: dict[str, Any] = {"logLevel": "INFO"}
    if dpop:
        server["drainSeconds"] = 0
    return {"server": server, "deployments": [*fillers[:at], target, *fillers[at:], *extra]}


def _render(template: str, **values: Any) -> dict[str, Any]:
    text = (TEMPLATES / template).read_text(encoding="utf-8")
    loaded: dict[str, Any] = yaml.safe_load(Template(text).substitute(values))
    return loaded


def ext_authz_listener(name: str, port: int, cluster: str) -> dict[str, Any]:
    return _render("listener_ext_authz.yaml", name=name, port=port, cluster=cluster)


def ext_authz_http_listener(name: str, port: int, cluster: str) -> dict[str, Any]:
    """A listener whose ext_authz filter speaks the HTTP wire (``http_service``) to ``cluster``."""
    return _render("listener_ext_authz_http.yaml", name=name, port=port, cluster=cluster)


def jwt_authn_listener(name: str, port: int, jwks: dict[str, Any]) -> dict[str, Any]:
    listener = _render(
        "listener_jwt_authn.yaml", name=name, port=port, issuer=ISSUER, audience=AUDIENCE
    )
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    provider = hcm["http_filters"][0]["typed_config"]["providers"]["bench"]
    provider["local_jwks"]["inline_string"] = json.dumps(jwks)
    return listener


def grpc_cluster(name: str, ports: list[int], max_streams: int = 0) -> dict[str, Any]:
    """A gRPC cluster with one endpoint per port. ``max_streams`` > 0 caps the concurrent
    streams per HTTP/2 connection, so Envoy opens another connection beyond that: the way
    checks spread over ``--workers`` sharing one SO_REUSEPORT port."""
    cluster = _render("cluster_grpc.yaml", name=name)
    if max_streams > 0:
        opts = cluster["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]
        opts["explicit_http_config"]["http2_protocol_options"]["max_concurrent_streams"] = (
            max_streams
        )
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
        for p in ports
    ]
    return cluster


def http_cluster(name: str, ports: list[int]) -> dict[str, Any]:
    """An HTTP/1.1 cluster with one endpoint per port, for the HTTP wire."""
    cluster = _render("cluster_http.yaml", name=name)
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
        for p in ports
    ]
    return cluster


def envoy_bootstrap(
    admin_port: int,
    *,
    ext_authz: dict[str, tuple[int, list[int]]],
    ext_authz_http: dict[str, tuple[int, list[int]]] | None = None,
    jwt_authn: tuple[int, dict[str, Any]] | None = None,
    max_streams: int = 0,
) -> dict[str, Any]:
    """The bench Envoy: for each ``name: (listen port, server ports)`` of ``ext_authz`` a listener
    and its gRPC cluster (``<name>_grpc``); for each of ``ext_authz_http`` a listener
    ``<name>_http`` and its HTTP/1.1 cluster (``<name>_http_service``), on the HTTP wire; with
    ``jwt_authn=(port, jwks)`` a (c) listener too."""
    boot = _render("bootstrap.yaml", admin_port=admin_port)
    listeners, clusters = (
        boot["static_resources"]["listeners"],
        boot["static_resources"]["clusters"],
    )
    for name, (port, server_ports) in ext_authz.items():
        listeners.append(ext_authz_listener(name, port, f"{name}_grpc"))
        clusters.append(grpc_cluster(f"{name}_grpc", server_ports, max_streams))
    for name, (port, server_ports) in (ext_authz_http or {}).items():
        listeners.append(ext_authz_http_listener(f"{name}_http", port, f"{name}_http_service"))
        clusters.append(http_cluster(f"{name}_http_service", server_ports))
    if jwt_authn is not None:
        listeners.append(jwt_authn_listener("jwt_authn", *jwt_authn))
    return boot
