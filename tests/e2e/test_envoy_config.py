"""Every Envoy config in the repository is one the real Envoy accepts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench import configs
from bench.keys import BenchKeys

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

from stack import Ports, find_envoy, render_envoy_config  # noqa: E402 (examples/ is not a package)

BOOTSTRAP_KEYS = {"static_resources", "dynamic_resources", "admin", "node", "overload_manager"}


def yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def is_envoy_bootstrap(path: Path) -> bool:
    """A single YAML document with Envoy Bootstrap keys at the top."""
    docs = yaml_documents(path)
    return len(docs) == 1 and isinstance(docs[0], dict) and bool(BOOTSTRAP_KEYS & docs[0].keys())


def is_mesh_manifest(path: Path) -> bool:
    """Istio / Kubernetes resources (apiVersion + kind) or istiod values (meshConfig)."""
    docs = yaml_documents(path)
    return bool(docs) and all(
        isinstance(doc, dict) and ({"apiVersion", "kind"} <= doc.keys() or "meshConfig" in doc)
        for doc in docs
    )


YAML_FILES = sorted((REPO / "envoy").glob("**/*.yaml"))
BOOTSTRAPS = [path for path in YAML_FILES if is_envoy_bootstrap(path)]


def envoy_validate(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(config), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_yaml_under_envoy_is_a_bootstrap_or_a_mesh_manifest() -> None:
    """Nothing under envoy/ escapes validation by being neither kind of file."""
    unknown = [p for p in YAML_FILES if not (is_envoy_bootstrap(p) or is_mesh_manifest(p))]
    assert unknown == []
    assert REPO / "envoy" / "envoy.yaml" in BOOTSTRAPS


@pytest.mark.parametrize("config", BOOTSTRAPS, ids=lambda p: str(p.relative_to(REPO)))
def test_envoy_accepts_config(config: Path) -> None:
    """envoy --mode validate accepts the file as written."""
    result = envoy_validate(config)
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_accepts_config_rendered_for_tests(tmp_path: Path) -> None:
    """The copy examples/stack.py renders with other ports is valid too, and uses those ports."""
    ports = Ports.free()
    rendered = render_envoy_config((REPO / "envoy" / "envoy.yaml").read_text(), ports, "127.0.0.1")
    for port in (ports.envoy, ports.extauthz, ports.upstream, ports.envoy_admin):
        assert f"port_value: {port}" in rendered
    config = tmp_path / "envoy.yaml"
    config.write_text(rendered)
    result = envoy_validate(config)
    assert result.returncode == 0, result.stdout + result.stderr


def test_envoy_accepts_the_bench_bootstrap(tmp_path: Path) -> None:
    """The bench's Envoy config, rendered from bench/envoy_templates with every listener kind, is
    valid too (its templates are never run through envoy otherwise, outside a bench run)."""
    bootstrap = configs.envoy_bootstrap(
        9901,
        ext_authz={"floor": (8001, [9001]), "extauthz": (8002, [9002, 9003])},
        jwt_authn=(8003, BenchKeys.generate().jwks),
    )
    config = tmp_path / "bench-envoy.json"
    config.write_text(json.dumps(bootstrap))
    result = envoy_validate(config)
    assert result.returncode == 0, result.stdout + result.stderr
