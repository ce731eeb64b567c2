"""Config generation: extauthz policies (CONTRACT.md §2) and the bench Envoy bootstrap.

Pure functions of their arguments (no files, no processes), so tests/unit/test_bench_smoke.py
checks them, and extauthz's own parser validates the policies there too.
"""

from __future__ import annotations

import json
from pathlib import Path
from string import Template
from typing import Any

import yaml

from bench.keys import AUDIENCE, CLIENT_ID, CLIENT_SECRET_ENV, ISSUER, SCOPE

TEMPLATES = Path(__file__).resolve().parent / "envoy_templates"

TARGET_DEPLOYMENT = "api"
TARGET_PATH = "/api/items"  # the path every bench request asks for


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


def _deployment(name: str, prefix: str, policy: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "pathPrefix": prefix,
        "authentication": {
            "type": "TOKEN_AUTHENTICATION",
            "tokenHeader": "Authorization",
            "tokenAuthScheme": "Bearer",
            "validationPolicy": policy,
        },
        "routes": [
            {
                "name": "get-items",
                "path": "/items",
                "methods": ["GET"],
                "authorization": {"type": "ANY_OF", "allowedScope": [SCOPE]},
            }
        ],
        "headersFromClaims": {"x-auth-subject": "sub"},
    }


def extauthz_config(kind: str, idp_url: str, deployments: int = 1) -> dict[str, Any]:
    """A policy with ``deployments`` deployments; requests to TARGET_PATH hit the one named
    ``api``, which sits near the end (10th from last) when there are many, so a linear scan
    over deployments would pay for nearly all of them."""
    if deployments < 1:
        raise ValueError("deployments must be >= 1")
    policy = _policy(kind, idp_url)
    fillers = [_deployment(f"svc-{i:05d}", f"/svc{i:05d}", policy) for i in range(deployments - 1)]
    at = max(0, len(fillers) - 9)
    target = _deployment(TARGET_DEPLOYMENT, "/api", policy)
    return {
        "server": {"logLevel": "INFO"},
        "deployments": [*fillers[:at], target, *fillers[at:]],
    }


def _render(template: str, **values: Any) -> dict[str, Any]:
    text = (TEMPLATES / template).read_text(encoding="utf-8")
    loaded: dict[str, Any] = yaml.safe_load(Template(text).substitute(values))
    return loaded


def ext_authz_listener(name: str, port: int, cluster: str) -> dict[str, Any]:
    return _render("listener_ext_authz.yaml", name=name, port=port, cluster=cluster)


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


def envoy_bootstrap(
    admin_port: int,
    *,
    ext_authz: dict[str, tuple[int, list[int]]],
    jwt_authn: tuple[int, dict[str, Any]] | None = None,
    max_streams: int = 0,
) -> dict[str, Any]:
    """The bench Envoy: for each ``name: (listen port, server ports)`` of ``ext_authz`` a listener
    and its gRPC cluster; with ``jwt_authn=(port, jwks)`` a (c) listener too."""
    boot = _render("bootstrap.yaml", admin_port=admin_port)
    listeners, clusters = (
        boot["static_resources"]["listeners"],
        boot["static_resources"]["clusters"],
    )
    for name, (port, server_ports) in ext_authz.items():
        listeners.append(ext_authz_listener(name, port, f"{name}_grpc"))
        clusters.append(grpc_cluster(f"{name}_grpc", server_ports, max_streams))
    if jwt_authn is not None:
        listeners.append(jwt_authn_listener("jwt_authn", *jwt_authn))
    return boot
