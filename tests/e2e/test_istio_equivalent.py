"""Istio's CUSTOM policy and path normalization, through a real Envoy configured as Istio would
configure it, in front of a real extauthz and an echo upstream.

No Istio runs here: this Envoy stands in for the config istiod generates for a sidecar (or a
gateway) from the files the repository ships, read at run time so that the test follows them:

- ``envoy/istio/mesh-config.yaml``'s ``meshConfig.pathNormalization.normalization`` becomes the
  HTTP connection manager's path settings. Istio maps the mesh setting onto three fields of the
  connection manager (its reference, "MeshConfig.ProxyPathNormalization.NormalizationType":
  https://istio.io/latest/docs/reference/config/istio.mesh.v1alpha1/ , and the security best
  practices' "Understand path normalization in authorization policy":
  https://istio.io/latest/docs/ops/best-practices/security/ ; istiod's HTTP connection manager
  builder sets them so):

  =========================== ============== ============= ==================================
  pathNormalization           normalize_path merge_slashes path_with_escaped_slashes_action
  =========================== ============== ============= ==================================
  NONE                        false          false         KEEP_UNCHANGED
  BASE (Istio's default)      true           false         KEEP_UNCHANGED
  MERGE_SLASHES               true           true          KEEP_UNCHANGED
  DECODE_AND_MERGE_SLASHES    true           true          UNESCAPE_AND_FORWARD
  =========================== ============== ============= ==================================

- The ``extauthz`` provider of that file becomes the ext_authz filter: ``timeout``, ``failOpen``
  (``failure_mode_allow``) and ``statusOnError`` (``status_on_error``), no ``context_extensions``
  (Istio has no way to set them, so extauthz selects the deployment by host and path).
- ``envoy/istio/authorization-policy.yaml``'s workload policy (action CUSTOM, ``notPaths``: the
  probes) becomes the routes: each probe path a route whose ``ExtAuthzPerRoute`` is disabled,
  everything else checked. Istio itself expresses it as an RBAC shadow rule that enables the
  ext_authz filter per request; which requests are checked is the same.

A second listener stands in for what the repository no longer ships: a CUSTOM policy with positive
``paths: ["/orders", "/orders/*"]`` under Istio's default ``BASE``. There ``//orders/7``,
``/orders%2F7`` and ``/ORDERS/7`` match no rule, so they are never checked and reach the
application as they are, where many frameworks read them as ``/orders/7``. With ``notPaths``
every request but the probes goes to extauthz, and ``no_matching_policy`` denies what no
deployment covers.

Whether a request reached the upstream is read from the upstream's own log (one line per
request, written before it answers), by a unique query parameter, which path normalization leaves
alone. Requests go out byte for byte with ``http.client``, like ``curl --path-as-is``.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import AUDIENCE, ISSUER, SigningKey, claims
from tests.integration.serverproc import ExtauthzProcess, free_port, stop_process
from tests.policies import GET_ORDER, orders
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
ISTIO = REPO / "envoy" / "istio"
sys.path.insert(0, str(REPO / "examples"))

from stack import find_envoy, http_get  # noqa: E402 (examples/ is not a package; needs the path above)

HOST = "orders.shop.svc.cluster.local"  # the :authority a caller inside the mesh uses

# Istio's pathNormalization as HTTP connection manager settings (the table above).
NORMALIZATION: dict[str, dict[str, Any]] = {
    "NONE": {
        "normalize_path": False,
        "merge_slashes": False,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
    },
    "BASE": {
        "normalize_path": True,
        "merge_slashes": False,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
    },
    "MERGE_SLASHES": {
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
    },
    "DECODE_AND_MERGE_SLASHES": {
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD",
    },
}

# Ways to write /orders/7 that a positive `paths` rule does not match, and that an application
# (or its framework) may still serve as /orders/7.
EVASIONS = ["//orders/7", "/orders%2F7", "/ORDERS/7"]
ORDER = "/orders/7"

PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"
DISABLED = {"envoy.filters.http.ext_authz": {"@type": PER_ROUTE, "disabled": True}}


def mesh_config() -> dict[str, Any]:
    [values] = [d for d in yaml.safe_load_all((ISTIO / "mesh-config.yaml").read_text()) if d]
    mesh: dict[str, Any] = values["meshConfig"]
    return mesh


def workload_policy() -> dict[str, Any]:
    """The shipped CUSTOM policy on a workload (selector app: orders)."""
    policies = [
        d for d in yaml.safe_load_all((ISTIO / "authorization-policy.yaml").read_text()) if d
    ]
    [policy] = [p for p in policies if p["spec"].get("selector", {}).get("matchLabels", {}).get("app") == "orders"]  # fmt: skip
    return policy


def probe_paths(policy: dict[str, Any]) -> list[str]:
    """The notPaths of a CUSTOM policy that checks everything but them (one rule, one operation,
    nothing else), as Envoy route matches are written: exact, or a prefix for `/x/*`."""
    spec = policy["spec"]
    assert spec["action"] == "CUSTOM" and spec["provider"]["name"] == "extauthz"
    [rule] = spec["rules"]
    assert set(rule) == {"to"}, "a rule with `from` or `when` would leave other requests unchecked"
    [to] = rule["to"]
    operation = to["operation"]
    assert set(operation) == {"notPaths"}, operation
    assert "paths" not in operation
    not_paths: list[str] = operation["notPaths"]
    return not_paths


def route_match(istio_path: str) -> dict[str, str]:
    """An Istio path pattern (exact, or ending in `*`) as an Envoy route match."""
    if istio_path.endswith("*"):
        return {"prefix": istio_path[:-1]}
    assert "*" not in istio_path, istio_path
    return {"path": istio_path}


def ext_authz_filter(provider: dict[str, Any], cluster: str) -> dict[str, Any]:
    """The ext_authz filter Istio generates for an envoyExtAuthzGrpc provider."""
    status_names = {"503": "ServiceUnavailable", "500": "InternalServerError", "403": "Forbidden"}
    return {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "grpc_service": {
                "envoy_grpc": {"cluster_name": cluster},
                "timeout": provider["timeout"],
            },
            "failure_mode_allow": provider["failOpen"],
            "status_on_error": {"code": status_names[provider["statusOnError"]]},
        },
    }


def listener(
    name: str, port: int, normalization: str, routes: list[dict[str, Any]], provider: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": name,
                            **NORMALIZATION[normalization],
                            "route_config": {
                                "name": name,
                                "virtual_hosts": [
                                    {"name": name, "domains": ["*"], "routes": routes}
                                ],
                            },
                            "http_filters": [
                                ext_authz_filter(provider, "extauthz"),
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                    },
                                },
                            ],
                        },
                    }
                ]
            }
        ],
    }


def static_cluster(name: str, port: int, *, http2: bool = False) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


@dataclass(frozen=True)
class Ports:
    notpaths: int  # as shipped: the mesh's normalization, CUSTOM on everything but the probes
    positive: int  # the hazard: BASE, CUSTOM on paths ["/orders", "/orders/*"] only
    admin: int
    upstream: int


def envoy_bootstrap(ports: Ports, extauthz_port: int) -> dict[str, Any]:
    mesh = mesh_config()
    [provider] = [
        p["envoyExtAuthzGrpc"] for p in mesh["extensionProviders"] if p["name"] == "extauthz"
    ]
    probes = probe_paths(workload_policy())
    as_shipped = [
        *({"match": route_match(p), "route": {"cluster": "upstream"}, "typed_per_filter_config": DISABLED} for p in probes),
        {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}},
    ]  # fmt: skip
    positive = [
        {"match": {"path": "/orders"}, "route": {"cluster": "upstream"}},
        {"match": {"prefix": "/orders/"}, "route": {"cluster": "upstream"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}, "typed_per_filter_config": DISABLED},
    ]  # fmt: skip
    return {
        "static_resources": {
            "listeners": [
                listener(
                    "notpaths",
                    ports.notpaths,
                    mesh["pathNormalization"]["normalization"],
                    as_shipped,
                    provider,
                ),
                listener("positive", ports.positive, "BASE", positive, provider),
            ],
            "clusters": [
                static_cluster("extauthz", extauthz_port, http2=True),
                static_cluster("upstream", ports.upstream),
            ],
        },
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": ports.admin}}
        },
    }


@dataclass
class Mesh:
    ports: Ports
    extauthz: ExtauthzProcess
    upstream_log: Path
    token: str

    def upstream_targets(self, probe: str) -> list[str]:
        """The request targets the upstream logged with this probe; none if it was not reached.
        The upstream writes its line before it answers, and the answer came back through Envoy
        before this is read."""
        lines = self.upstream_log.read_text().splitlines()
        return [line.split()[2] for line in lines if line.startswith("upstream ") and probe in line]


@pytest.fixture(scope="module")
def mesh(rsa_key: SigningKey, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp("istio-equivalent")
    validation = {
        "type": "STATIC_KEYS",
        "keys": [rsa_key.public_jwk],
        "additionalValidationPolicy": {"issuers": [ISSUER], "audiences": [AUDIENCE]},
    }
    # Inside the mesh: no `hosts` (the caller's :authority varies), selected by path alone.
    config = {"deployments": [orders(validation, routes=[GET_ORDER])]}
    ports = Ports(free_port(), free_port(), free_port(), free_port())
    upstream_log = workdir / "upstream.log"
    started: list[subprocess.Popen[bytes]] = []
    with ExtauthzProcess(config, workdir / "extauthz") as extauthz:
        try:
            with upstream_log.open("wb") as log:
                upstream = subprocess.Popen(
                    [sys.executable, str(REPO / "examples" / "upstream.py"), str(ports.upstream)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                )  # fmt: skip
            started.append(upstream)
            bootstrap = workdir / "envoy.yaml"
            bootstrap.write_text(yaml.safe_dump(envoy_bootstrap(ports, extauthz.port)))
            with (workdir / "envoy.log").open("wb") as log:
                envoy = subprocess.Popen(
                    [
                        find_envoy(), "-c", str(bootstrap), "--base-id", str(ports.admin),
                        "--concurrency", "1", "--log-level", "warn",
                    ],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                )  # fmt: skip
            started.append(envoy)
            wait_until(
                lambda: envoy.poll() is not None or envoy_live(ports.admin),
                timeout=60, what="Envoy LIVE",
            )  # fmt: skip
            assert envoy.poll() is None, (workdir / "envoy.log").read_text()[-3000:]
            wait_until(
                lambda: "listening" in upstream_log.read_text(), timeout=30, what="the upstream"
            )
            token = rsa_key.sign(claims(scope="orders.read"))
            yield Mesh(ports, extauthz, upstream_log, token)
        finally:
            for process in reversed(started):
                stop_process(process)


def envoy_live(admin_port: int) -> bool:
    try:
        status, _, body = http_get(f"http://127.0.0.1:{admin_port}/ready", timeout=1.0)
    except OSError:
        return False
    return status == 200 and body.strip() == b"LIVE"


@dataclass(frozen=True)
class Sent:
    status: int
    body: bytes
    probe: str
    request_id: str


def send(port: int, path: str, token: str | None = None) -> Sent:
    """One GET whose request target is ``path`` exactly as written, plus a unique query
    parameter to find it in the upstream's log; the x-request-id finds it in extauthz's."""
    probe, request_id = f"probe={uuid.uuid4().hex}", str(uuid.uuid4())
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("GET", f"{path}?{probe}", skip_host=True, skip_accept_encoding=True)
        connection.putheader("host", HOST)
        connection.putheader("x-request-id", request_id)
        if token is not None:
            connection.putheader("authorization", f"Bearer {token}")
        connection.endheaders()
        response = connection.getresponse()
        return Sent(response.status, response.read(), probe, request_id)
    finally:
        connection.close()


def reason(sent: Sent) -> str:
    body: dict[str, Any] = json.loads(sent.body)
    return str(body["reason"])


# -- the shipped mesh config and policy ------------------------------------------------------


def test_the_stand_in_follows_the_shipped_files() -> None:
    """The mesh normalizes as the table maps it (merging slashes at least), and the workload
    policy checks everything but probes."""
    normalization = mesh_config()["pathNormalization"]["normalization"]
    assert normalization in {"MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"}
    assert NORMALIZATION[normalization]["merge_slashes"] is True
    assert set(probe_paths(workload_policy())) >= {"/healthz", "/readyz"}


@pytest.mark.parametrize("path", [*EVASIONS, ORDER])
def test_without_a_token_nothing_reaches_the_upstream(mesh: Mesh, path: str) -> None:
    """Every spelling of /orders/7 goes to extauthz and is denied there: 401 token_missing once
    normalized to /orders/7, 403 no_matching_policy for /ORDERS/7 (no deployment covers it), or
    400 request_ambiguous for an encoded slash the mesh would leave encoded."""
    sent = send(mesh.ports.notpaths, path)
    assert sent.status in (400, 401, 403), sent
    assert mesh.upstream_targets(sent.probe) == []
    access = mesh.extauthz.line(sent.request_id, "access")
    assert access["decision"] == "deny"
    expected = {
        ORDER: "token_missing",
        "//orders/7": "token_missing",
        "/ORDERS/7": "no_matching_policy",
    }
    if path in expected:
        assert (sent.status, reason(sent)) == (
            403 if expected[path] == "no_matching_policy" else 401,
            expected[path],
        )
        assert access["reason"] == expected[path]


def test_an_encoded_slash_is_checked_as_decoded(mesh: Mesh) -> None:
    """Under DECODE_AND_MERGE_SLASHES, /orders%2F7 is checked (and would be forwarded) as
    /orders/7; under MERGE_SLASHES it reaches extauthz encoded and is denied as ambiguous."""
    sent = send(mesh.ports.notpaths, "/orders%2F7")
    access = mesh.extauthz.line(sent.request_id, "access")
    if mesh_config()["pathNormalization"]["normalization"] == "DECODE_AND_MERGE_SLASHES":
        assert (sent.status, reason(sent), access["path"]) == (401, "token_missing", ORDER)
    else:
        assert (sent.status, reason(sent)) == (400, "request_ambiguous")


@pytest.mark.parametrize("probe", ["/healthz", "/readyz"])
def test_the_probes_reach_the_upstream_unchecked(mesh: Mesh, probe: str) -> None:
    """The notPaths are never sent to extauthz: the kubelet's probes need no token."""
    sent = send(mesh.ports.notpaths, probe)
    assert sent.status == 200, sent
    assert mesh.upstream_targets(sent.probe) == [f"{probe}?{sent.probe}"]
    assert mesh.extauthz.lines_for(sent.request_id) == []


@pytest.mark.parametrize("path", [ORDER, "//orders/7", "/orders%2F7"])
def test_with_a_valid_token_the_upstream_gets_the_path_that_was_checked(
    mesh: Mesh, path: str
) -> None:
    """/orders/7 with a token for orders.read reaches the upstream; so do the spellings the
    mesh normalizes to it, as /orders/7, the very path extauthz allowed."""
    sent = send(mesh.ports.notpaths, path, mesh.token)
    access = mesh.extauthz.line(sent.request_id, "access")
    normalization = mesh_config()["pathNormalization"]["normalization"]
    if path == "/orders%2F7" and normalization != "DECODE_AND_MERGE_SLASHES":
        assert sent.status == 400 and mesh.upstream_targets(sent.probe) == []
        return
    assert sent.status == 200, sent
    assert (access["decision"], access["path"], access["deployment"]) == ("allow", ORDER, "orders")
    assert json.loads(sent.body)["path"] == f"{ORDER}?{sent.probe}"
    assert mesh.upstream_targets(sent.probe) == [f"{ORDER}?{sent.probe}"]


def test_with_a_valid_token_an_uncovered_path_is_still_denied(mesh: Mesh) -> None:
    """/ORDERS/7 is no deployment's path: no token makes it allowed."""
    sent = send(mesh.ports.notpaths, "/ORDERS/7", mesh.token)
    assert (sent.status, reason(sent)) == (403, "no_matching_policy")
    assert mesh.upstream_targets(sent.probe) == []


# -- why not positive paths ------------------------------------------------------------------


@pytest.mark.parametrize("path", EVASIONS)
def test_positive_paths_under_base_let_other_spellings_through_unchecked(
    mesh: Mesh, path: str
) -> None:
    """The hazard the shipped policy avoids: with `paths: ["/orders", "/orders/*"]` under BASE,
    these spellings match no rule, skip extauthz and reach the application without a token."""
    sent = send(mesh.ports.positive, path)
    assert sent.status == 200, sent
    # Python's http.server, the upstream here, itself reads a leading // as / (as many servers
    # do): the application served /orders/7 to a request nobody checked.
    served = ORDER if path.startswith("//") else path
    assert mesh.upstream_targets(sent.probe) == [f"{served}?{sent.probe}"]
    assert mesh.extauthz.lines_for(sent.request_id) == []
    # The same request through the shipped configuration is denied.
    assert send(mesh.ports.notpaths, path).status in (400, 401, 403)


def test_positive_paths_do_check_the_canonical_spelling(mesh: Mesh) -> None:
    """The control: /orders/7 itself is checked there too (so the requests above were not
    let through for another reason)."""
    sent = send(mesh.ports.positive, ORDER)
    assert (sent.status, reason(sent)) == (401, "token_missing")
    assert mesh.upstream_targets(sent.probe) == []
