"""mTLS between a real Envoy and extauthz (`server.tls` with `clientCaFile`).

extauthz serves a STATIC_KEYS deployment (no identity provider needed) over mTLS with a
certificate for ``extauthz-headless.extauthz.svc.cluster.local``, the name docs/configuration.md
uses. Envoy reaches it through four clusters, each behind a listener of its own
(tests/e2e/mtls_envoy.yaml):

- ``extauthz``: the transport socket of docs/configuration.md exactly as written there, only its
  file paths pointing at the test's files: checks go through, allowed and denied as the policy
  says, and extauthz logs them;
- ``wrong_san``: the same, matching another name: Envoy refuses extauthz's certificate
  (``ssl.fail_verify_san``) and fails closed with its ``status_on_error``, 503;
- ``no_client_cert``: TLS without Envoy's client certificate: extauthz refuses the handshake, 503;
- ``plaintext``: no TLS at all: 503.

In none of the failing cases does a check reach extauthz (no access line with its request id).
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import claims
from tests.integration.serverproc import ExtauthzProcess, free_port, stop_process
from tests.integration.test_tls import Authority, Issued
from tests.policies import orders
from tests.waiting import stays, wait_until

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

from stack import find_envoy, http_get  # noqa: E402 (examples/ is not a package; needs the path above)

TEMPLATE = Path(__file__).with_name("mtls_envoy.yaml")
DOCS = REPO / "docs" / "configuration.md"
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
# The name in extauthz's certificate, and the directory of Envoy's files, as the docs write them.
SERVER_NAME = "extauthz-headless.extauthz.svc.cluster.local"
DOCS_CLIENT_DIR = "/etc/envoy/extauthz-client"
CLUSTERS = ("extauthz", "wrong_san", "no_client_cert", "plaintext")


def documented_transport_socket() -> dict[str, Any]:
    """The Envoy transport socket shown in docs/configuration.md's TLS section."""
    section = DOCS.read_text().split("### TLS on the check listener", 1)[1].split("\n### ", 1)[0]
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, flags=re.DOTALL)]
    [socket] = [b["transport_socket"] for b in blocks if isinstance(b, dict) and "transport_socket" in b]
    assert socket["typed_config"]["@type"] == UPSTREAM_TLS
    return dict(socket)


def with_client_dir(node: Any, directory: Path) -> Any:
    """``node`` with the docs' directory of Envoy's files replaced by ``directory``."""
    text = yaml.safe_dump(node).replace(DOCS_CLIENT_DIR, str(directory))
    return yaml.safe_load(text)


def transport_sockets(client_dir: Path) -> dict[str, dict[str, Any] | None]:
    documented = with_client_dir(documented_transport_socket(), client_dir)
    context = documented["typed_config"]["common_tls_context"]
    assert context["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": SERVER_NAME}}
    ]
    wrong_san = copy.deepcopy(documented)
    wrong_san["typed_config"]["common_tls_context"]["validation_context"][
        "match_typed_subject_alt_names"
    ] = [{"san_type": "DNS", "matcher": {"exact": "someone-else.extauthz.svc.cluster.local"}}]
    no_client_cert = copy.deepcopy(documented)
    del no_client_cert["typed_config"]["common_tls_context"]["tls_certificates"]
    return {
        "extauthz": documented,
        "wrong_san": wrong_san,
        "no_client_cert": no_client_cert,
        "plaintext": None,
    }


def envoy_config(
    extauthz_port: int, admin_port: int, listen_ports: dict[str, int], client_dir: Path
) -> dict[str, Any]:
    bootstrap = yaml.safe_load(TEMPLATE.read_text())
    [listener] = bootstrap["static_resources"]["listeners"]
    listeners, clusters = [], []
    for name, socket in transport_sockets(client_dir).items():
        text = yaml.safe_dump(listener).replace("LISTENER", name).replace("CLUSTER", name)
        copied = yaml.safe_load(text)
        copied["address"]["socket_address"]["port_value"] = listen_ports[name]
        listeners.append(copied)
        cluster: dict[str, Any] = {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": extauthz_port,
                }}}}]}],
            },
        }  # fmt: skip
        if socket is not None:
            cluster["transport_socket"] = socket
        clusters.append(cluster)
    bootstrap["static_resources"]["listeners"] = listeners
    bootstrap["static_resources"]["clusters"] = clusters
    bootstrap["admin"]["address"]["socket_address"]["port_value"] = admin_port
    return bootstrap


@dataclass
class MtlsStack:
    extauthz: ExtauthzProcess
    ports: dict[str, int]  # Envoy's listener for each cluster
    admin_port: int
    http: httpx.Client

    def request(self, cluster: str, path: str, token: str | None = None) -> tuple[str, httpx.Response]:
        request_id = str(uuid.uuid4())
        headers = {"host": "api.example.com", "x-request-id": request_id}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        url = f"http://127.0.0.1:{self.ports[cluster]}{path}"
        return request_id, self.http.get(url, headers=headers)

    def stat(self, name: str) -> int:
        _, _, body = http_get(f"http://127.0.0.1:{self.admin_port}/stats?filter=^{re.escape(name)}$")
        match = re.search(rf"^{re.escape(name)}: (\d+)$", body.decode(), flags=re.MULTILINE)
        return int(match.group(1)) if match else 0


@pytest.fixture(scope="module")
def mtls_stack(
    tmp_path_factory: pytest.TempPathFactory, rsa_key: Any
) -> Iterator[MtlsStack]:
    workdir = tmp_path_factory.mktemp("mtls")
    ca = Authority("extauthz e2e CA")
    server_dir, client_dir = workdir / "extauthz-tls", workdir / "envoy-client"
    ca.write(server_dir)
    ca.write(client_dir)
    served: Issued = ca.issue("extauthz", server=True, dns=(SERVER_NAME,))
    served.write(server_dir, "tls")
    ca.issue("envoy", client=True).write(client_dir, "tls")

    static = {
        "type": "STATIC_KEYS",
        "keys": [rsa_key.public_jwk],
        "additionalValidationPolicy": {"issuers": ["https://idp.example.com"]},
    }
    config = {
        "server": {
            "tls": {
                "certFile": str(server_dir / "tls.crt"),
                "keyFile": str(server_dir / "tls.key"),
                "clientCaFile": str(server_dir / "ca.crt"),
            }
        },
        "deployments": [orders(static)],
    }
    admin_port = free_port()
    ports = {name: free_port() for name in CLUSTERS}
    with ExtauthzProcess(config, workdir / "extauthz") as extauthz:
        rendered = workdir / "envoy.yaml"
        rendered.write_text(
            yaml.safe_dump(envoy_config(extauthz.port, admin_port, ports, client_dir))
        )
        validated = subprocess.run(
            [find_envoy(), "--mode", "validate", "-c", str(rendered), "--log-level", "warn"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert validated.returncode == 0, validated.stdout + validated.stderr
        log = (workdir / "envoy.log").open("wb")
        envoy = subprocess.Popen(
            [
                find_envoy(), "-c", str(rendered), "--base-id", str(admin_port),
                "--concurrency", "1", "--log-level", "warn",
            ],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:

            def live() -> bool:
                assert envoy.poll() is None, (workdir / "envoy.log").read_text(errors="replace")
                try:
                    status, _, body = http_get(f"http://127.0.0.1:{admin_port}/ready", timeout=1.0)
                except OSError:
                    return False
                return status == 200 and body.strip() == b"LIVE"

            wait_until(live, timeout=60, what="Envoy LIVE")
            with httpx.Client(timeout=15.0) as http:
                yield MtlsStack(extauthz, ports, admin_port, http)
        finally:
            stop_process(envoy)
            log.close()


def test_checks_go_through_envoy_over_mtls(mtls_stack: MtlsStack, rsa_key: Any) -> None:
    request_id, allowed = mtls_stack.request("extauthz", "/orders/1", rsa_key.sign(claims()))
    assert allowed.status_code == 200 and allowed.text == "allowed\n"
    access = wait_until(
        lambda: mtls_stack.extauthz.lines_for(request_id, "access"), timeout=10, what="the access line"
    )
    assert access[0]["decision"] == "allow" and access[0]["path"] == "/orders/1"

    request_id, denied = mtls_stack.request("extauthz", "/orders/1")
    assert denied.status_code == 401 and denied.json()["error"] == "invalid_token"
    [access] = wait_until(
        lambda: mtls_stack.extauthz.lines_for(request_id, "access"), timeout=10, what="the denial's access line"
    )
    assert access["decision"] == "deny" and access["reason"] == "token_missing"

    _, expired = mtls_stack.request("extauthz", "/orders/1", rsa_key.sign(claims(exp=1)))
    assert expired.status_code == 401
    assert mtls_stack.stat("cluster.extauthz.ssl.handshake") >= 1


@pytest.mark.parametrize("cluster", ["wrong_san", "no_client_cert", "plaintext"])
def test_envoy_fails_closed_when_tls_does_not_match(
    mtls_stack: MtlsStack, rsa_key: Any, cluster: str
) -> None:
    """A valid token, but no check can be made: 503, never the upstream, and nothing reaches
    extauthz's policy."""
    request_id, answer = mtls_stack.request(cluster, "/orders/1", rsa_key.sign(claims()))
    assert answer.status_code == 503, answer.text
    assert answer.text != "allowed\n"
    if cluster == "wrong_san":
        # Envoy's own reason: extauthz's certificate does not carry the name it was told to expect.
        assert mtls_stack.stat("cluster.wrong_san.ssl.fail_verify_san") >= 1
    else:
        # extauthz closed the connection: a handshake without a client certificate, or no TLS.
        assert mtls_stack.stat(f"cluster.{cluster}.upstream_cx_destroy_remote") >= 1
    stays(
        lambda: mtls_stack.extauthz.lines_for(request_id) == [],
        seconds=0.5,
        what="no log line for the request",
    )
