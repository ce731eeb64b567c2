"""Every Envoy config in the repository is one the real Envoy accepts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

from stack import Ports, find_envoy, render_envoy_config  # noqa: E402 (examples/ is not a package)

ENVOY_CONFIGS = sorted((REPO / "envoy").glob("**/*.yaml"))


def envoy_validate(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(config), "--log-level", "warn"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_there_are_envoy_configs() -> None:
    """The glob below finds the demo config (so the parametrized test cannot pass on nothing)."""
    assert REPO / "envoy" / "envoy.yaml" in ENVOY_CONFIGS


@pytest.mark.parametrize("config", ENVOY_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
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
