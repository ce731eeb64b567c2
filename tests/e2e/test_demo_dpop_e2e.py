"""The demo's DPoP lines, run as printed: `make run` prints shell lines that call
examples/dpop.py (a key, a DPoP-bound token from the demo IdP, a proof) and curl (the request with
the proof, then the same request again). Here they run in bash, from the repository's root,
against the demo's own stack (examples/stack.py: the real oidc-provider, extauthz serving
examples/demo.yaml, the echo upstream and Envoy from envoy/envoy.yaml) on free ports: the only
change to the lines is where the IdP and Envoy listen.

Without node or npm the module skips (under CI=true it fails).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))
import demo  # noqa: E402 (examples/ is not a package; needs the path above)
from stack import Ports, Stack  # noqa: E402

SPLIT = "----- the same proof again -----"


@pytest.fixture(scope="module")
def demo_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    missing = [tool for tool in ("node", "npm", "curl", "bash") if shutil.which(tool) is None]
    if missing:
        reason = f"the demo's DPoP lines need {' and '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    with Stack(
        config_template=REPO / "examples" / "demo.yaml",
        ports=Ports.free(),
        workdir=tmp_path_factory.mktemp("demo-dpop"),
        listen_address="127.0.0.1",
    ) as running:
        yield running


def head(response: str) -> tuple[int, dict[str, str], str]:
    """The status, the headers (lower-case names) and the body of one `curl -i` output."""
    text = response.replace("\r\n", "\n").strip()
    head_text, _, body = text.partition("\n\n")
    status_line, *lines = head_text.splitlines()
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def test_the_printed_dpop_lines_do_what_they_say(demo_stack: Stack, tmp_path: Path) -> None:
    token_line, proof_line, request, again = demo.dpop_commands(
        tmp_path, sys.executable, envoy=demo_stack.envoy_url, issuer=demo_stack.issuer
    )
    # The lines the demo prints are these, with the demo's ports.
    printed = demo.instructions(tmp_path / "logs", tmp_path)
    for line in demo.dpop_commands(tmp_path):
        assert line in printed
    script = "\n".join(["set -eu", token_line, proof_line, request, f"echo '{SPLIT}'", again])
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    first, _, second = result.stdout.partition(SPLIT)

    status, _, body = head(first)
    assert status == 200, first
    echoed: dict[str, str] = json.loads(body)["headers"]  # what the echo upstream saw
    assert echoed["x-auth-subject"] == "dpop-client" and echoed["x-auth-tenant"] == "acme"

    status, headers, _ = head(second)
    assert status == 401, second
    assert headers["x-extauthz-reason"] == "dpop_proof_invalid"
    assert headers["www-authenticate"].startswith(
        'DPoP realm="dpop-orders", error="invalid_dpop_proof"'
    )

    # The key and the token stay with the user: files only they can read.
    for name in ("dpop-key.pem", "dpop-token"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    # Nothing printed the private key: neither its PEM nor its scalar (a JWK's "d").
    pem = (tmp_path / "dpop-key.pem").read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    d = key.private_numbers().private_value.to_bytes(32, "big")
    for secret in (
        "".join(pem.decode().splitlines()[1:-1]),
        base64.urlsafe_b64encode(d).rstrip(b"=").decode(),
    ):
        assert secret not in result.stdout + result.stderr
