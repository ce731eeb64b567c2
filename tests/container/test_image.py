"""The image as a tested artifact: what it is (the chart's tag, a numeric non-root user, the
ports and command the chart expects, no build secret left in it), and what it does when it runs
as the chart runs it: hardened, healthy on every probe, deciding through a real Envoy and on the
HTTP wire, draining on SIGTERM, and refusing an invalid config."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extauthz.server import SERVICE_NAME
from tests.conftest import SigningKey, claims
from tests.container.checks import (
    GRACE_SECONDS,
    check_image_config,
    check_runs_hardened,
    check_sigterm_drains,
)
from tests.container.conftest import (
    IMAGE,
    REPO,
    ULIMITS,
    Engine,
    ExtauthzPorts,
    Gateway,
    Running,
    chart_image,
    hardened,
    logs,
    skip_module_without_an_engine,
    start,
)
from tests.integration.faulty_idp import FaultyIdp

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from stack import http_get

skip_module_without_an_engine()

HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
HOST = "api.example.com"


# -- what the image is ------------------------------------------------------------------------


def test_make_image_tags_the_image_the_chart_deploys_by_default() -> None:
    made = subprocess.run(
        ["make", "-s", "--no-print-directory", "print-image"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert made == chart_image()


def test_the_image_runs_extauthz_as_a_numeric_non_root_user(image: Any) -> None:
    check_image_config(image.attrs["Config"])


def test_no_file_in_the_image_is_the_build_hosts_ca_bundle(engine: Engine, image: Any) -> None:
    """The CA bundle handed to pip as a build secret is in no layer: no file that the builder
    stage passed on (/opt/extauthz, the virtualenv) nor any under /run has its content, and no
    variable points pip at it. (The base's own /etc/ssl/certs may well equal a host's bundle
    that has no proxy CA in it: it is not looked at.)"""
    if not HOST_CA_BUNDLE.is_file():
        pytest.skip(f"no {HOST_CA_BUNDLE} on this host: none was handed to the build")
    bundle = HOST_CA_BUNDLE.read_bytes()
    env = image.attrs["Config"].get("Env") or []
    assert not [v for v in env if v.startswith(("PIP_CERT=", "REQUESTS_CA_BUNDLE=", "SSL_CERT"))]
    # Every regular file there of the bundle's size, hashed inside a throw-away container.
    scan = (
        "import hashlib, os, sys\n"
        "size = int(sys.argv[1])\n"
        "for top in ('/opt', '/run'):\n"
        "    for d, _, files in os.walk(top):\n"
        "        for f in files:\n"
        "            p = os.path.join(d, f)\n"
        "            if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) == size:\n"
        "                print(p, hashlib.sha256(open(p, 'rb').read()).hexdigest())\n"
        "print('secret mount:', os.path.exists('/run/secrets/ca_bundle'))\n"
    )
    output = engine.client.containers.run(
        IMAGE,
        entrypoint=["python3", "-c", scan, str(len(bundle))],
        command=[],
        user="0:0",  # to read every file, root-only ones too
        network_mode="none",
        ulimits=ULIMITS,
        remove=True,
    ).decode()
    digest = hashlib.sha256(bundle).hexdigest()
    assert digest not in output, output
    assert "secret mount: False" in output, output


# -- the image running -------------------------------------------------------------------------


def test_it_runs_non_root_on_a_read_only_filesystem_without_capabilities(
    extauthz: Running,
) -> None:
    check_runs_hardened(extauthz.container.get_wrapped_container())


def health_check(engine: Engine) -> list[str]:
    """The image's HEALTHCHECK command, read with the engine's own CLI (podman's Docker API
    does not show it)."""
    field = "{{json .HealthCheck}}" if engine.name == "podman" else "{{json .Config.Healthcheck}}"
    shown = subprocess.run(
        [engine.name, "image", "inspect", "--format", field, IMAGE],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    test: list[str] = (json.loads(shown) or {}).get("Test") or []
    return test


def test_the_images_health_check_is_kept_and_passes(engine: Engine, extauthz: Running) -> None:
    """The OCI format has no HEALTHCHECK, so podman would drop it: `make image` builds the
    docker format. Run inside the serving container, it passes."""
    test = health_check(engine)
    assert test[:1] == ["CMD"] and "http://127.0.0.1:9090/healthz" in " ".join(test), test
    # The command names the default admin port; this container's is another one.
    command = [arg.replace(":9090/", f":{extauthz.ports.admin}/") for arg in test[1:]]
    code, output = extauthz.container.exec(command)
    assert code == 0, output


def test_healthz_readyz_and_grpc_health_answer(extauthz: Running) -> None:
    admin = f"http://127.0.0.1:{extauthz.ports.admin}"
    status, _, body = http_get(f"{admin}/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, _, body = http_get(f"{admin}/readyz")
    assert status == 200, body
    with grpc.insecure_channel(f"127.0.0.1:{extauthz.ports.grpc}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
        for service in ("", SERVICE_NAME):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service


def _get(url: str, token: str | None = None, **headers: str) -> tuple[int, dict[str, str], bytes]:
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return http_get(url, headers, timeout=10.0)


def test_envoy_in_front_of_the_container_allows_and_denies(
    gateway: Gateway, rsa_key: SigningKey
) -> None:
    """allow, 401, 403 and the IdP-down 500, each as Envoy's client sees it."""
    orders = f"{gateway.url}/orders/42"
    status, _, body = _get(orders, rsa_key.sign(claims(sub="alice")))
    assert status == 200, body
    assert json.loads(body)["headers"]["x-auth-subject"] == "alice"  # from the check's allow

    status, headers, body = _get(orders)
    assert status == 401, body
    assert headers["www-authenticate"].startswith("Bearer")

    status, headers, body = _get(orders, rsa_key.sign(claims(scope="orders.write")))
    assert status == 403, body
    assert "insufficient_scope" in headers["www-authenticate"]

    status, headers, body = _get(f"{gateway.url}/idp-down/1", "an-opaque-token")
    assert status == 500, body
    assert headers["x-extauthz-reason"] == "idp_call_failed"


def test_the_http_wire_answers_on_its_port(extauthz: Running, rsa_key: SigningKey) -> None:
    """Envoy's http_service protocol on --http-listen, from the same container."""
    url = f"http://127.0.0.1:{extauthz.ports.http}/orders/42"
    named = {"host": HOST, "x-extauthz-deployment": "orders"}
    status, headers, body = _get(url, rsa_key.sign(claims(sub="bob")), **named)
    assert status == 200, body
    assert headers["x-auth-subject"] == "bob"
    status, headers, _ = _get(url, **named)
    assert status == 401
    assert headers["x-extauthz-reason"] == "token_missing"


def test_sigterm_drains_a_check_in_flight_within_the_grace(
    image: Any, policy: Path, container_env: dict[str, str], idp: FaultyIdp
) -> None:
    """A check waiting on the IdP when SIGTERM comes is answered after the listener closed,
    and the container then exits 0 within drainSeconds + --grace-seconds."""
    container, ports = start(policy, container_env, ["--grace-seconds", str(GRACE_SECONDS)])
    try:
        check_sigterm_drains(container, ports, idp)
    finally:
        container.stop()


INVALID = """\
deployments:
  - name: orders
    pathPrefix: orders
    authentication:
      type: TOKEN_AUTHENTICATION
      validationPolicy:
        type: REMOTE_JWKS
        uri: not-a-url
        bogus: 1
"""


def test_an_invalid_config_stops_the_container_with_the_errors_on_stderr(
    image: Any, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(INVALID)
    checked = subprocess.run(
        [sys.executable, "-m", "extauthz", "check-config", str(config)],
        capture_output=True,
        text=True,
    )
    errors = [line for line in checked.stderr.splitlines() if line.startswith("deployments[")]
    assert checked.returncode == 2 and len(errors) == 3, checked.stderr

    container = hardened(config, ExtauthzPorts.free().serve_args()).start()
    try:
        exit_status = container.get_wrapped_container().wait(timeout=60)["StatusCode"]
        _, stderr = logs(container)
    finally:
        container.stop()
    assert exit_status == checked.returncode
    missing = [line for line in errors if line not in stderr.splitlines()]
    assert missing == [], stderr
