"""Every Envoy config in the repository is one the real Envoy accepts; and the HTTP wire's makes
the real Envoy send the check extauthz reads (docs/wires.md), and use its answer as meant."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench import configs
from bench.keys import BenchKeys

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

from stack import (  # noqa: E402 (examples/ is not a package)
    ENVOY_TEMPLATES,
    HTTP_WIRE_TEMPLATE,
    WIRES,
    Ports,
    find_envoy,
    free_ports,
    http_get,
    render_envoy_config,
)

from tests.e2e.test_envoy_examples import with_test_files  # noqa: E402
from tests.integration.serverproc import stop_process  # noqa: E402
from tests.waiting import wait_until  # noqa: E402

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
def test_envoy_accepts_config(config: Path, tmp_path: Path) -> None:
    """envoy --mode validate accepts the file as written (the certificate files it names, which
    Envoy reads, replaced by test ones)."""
    result = envoy_validate(with_test_files(config, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("wire", WIRES)
def test_envoy_accepts_config_rendered_for_tests(tmp_path: Path, wire: str) -> None:
    """The copy examples/stack.py renders with other ports is valid too, and uses those ports
    (extauthz's on the wire Envoy asks on: gRPC for envoy/envoy.yaml, HTTP for
    envoy/http-wire.yaml)."""
    ports = Ports.free()
    rendered = render_envoy_config(ENVOY_TEMPLATES[wire].read_text(), ports, "127.0.0.1", wire=wire)
    extauthz = ports.extauthz if wire == "grpc" else ports.extauthz_http
    for port in (ports.envoy, extauthz, ports.upstream, ports.envoy_admin):
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


# -- what the real Envoy does with envoy/http-wire.yaml ----------------------------------------


class Recorder(BaseHTTPRequestHandler):
    """Records each request it gets, as extauthz or as the upstream would see it. As extauthz it
    allows with an identity header and a header to remove (or denies a path with "deny")."""

    protocol_version = "HTTP/1.1"
    seen: list[dict[str, Any]]
    as_extauthz: bool

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.seen.append(
            {"method": self.command, "path": self.path, "headers": headers, "body": body}
        )
        self.send_response(403 if "deny" in self.path else 200)
        if self.as_extauthz:
            self.send_header("x-auth-subject", "from-extauthz")
            self.send_header("x-envoy-auth-headers-to-remove", "x-auth-tenant")
        self.send_header("content-length", "0")
        self.end_headers()

    do_GET = do_POST = _answer  # noqa: N815 (the stdlib's names)

    def log_message(self, format: str, *args: object) -> None:
        pass  # the tests read what was recorded, not a log


class Recording:
    """A Recorder listening on loopback ``port`` in a thread; ``seen`` what it got."""

    def __init__(self, port: int, *, as_extauthz: bool) -> None:
        self.seen: list[dict[str, Any]] = []
        handler = type("Handler", (Recorder,), {"seen": self.seen, "as_extauthz": as_extauthz})
        self.server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Recording:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def http_wire_envoy(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[int, Recording, Recording]]:
    """The real Envoy on envoy/http-wire.yaml, with recorders in place of extauthz and of the
    upstream: its port and the two recordings."""
    ports = Ports.free()
    workdir = tmp_path_factory.mktemp("http-wire-envoy")
    config = workdir / "envoy.yaml"
    config.write_text(
        render_envoy_config(
            HTTP_WIRE_TEMPLATE.read_text(),
            ports,
            "127.0.0.1",
            otlp_endpoint=f"127.0.0.1:{free_ports(1)[0]}",  # nobody listens: spans are dropped
            wire="http",
        )
    )
    with (
        Recording(ports.extauthz_http, as_extauthz=True) as extauthz,
        Recording(ports.upstream, as_extauthz=False) as upstream,
        (workdir / "envoy.log").open("wb") as log,
    ):
        envoy = subprocess.Popen(
            [find_envoy(), "-c", str(config), "--base-id", str(ports.envoy_admin),
             "--concurrency", "1", "--log-level", "warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:

            def live() -> bool:
                assert envoy.poll() is None, (workdir / "envoy.log").read_text()
                try:
                    status, _, body = http_get(
                        f"http://127.0.0.1:{ports.envoy_admin}/ready", timeout=1.0
                    )
                except OSError:
                    return False
                return status == 200 and body.strip() == b"LIVE"

            wait_until(live, timeout=30, what="Envoy LIVE on envoy/http-wire.yaml")
            yield ports.envoy, extauthz, upstream
        finally:
            stop_process(envoy)


def through(port: int, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> int:
    """The status a client gets from Envoy on ``port``."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body or None, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


CLIENT = {
    "x-request-id": "3f1c7c8e-5d2a-4e0b-9a51-2b7f8f0e6d11",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "b3": "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
    "authorization": "Bearer a.b.c",
    "x-extauthz-deployment": "forged",
    "x-extauthz-route": "forged",
    "x-auth-subject": "forged",
    "x-auth-tenant": "forged",
    "cookie": "session=not-for-extauthz",
}


def test_http_wire_envoy_names_the_route_s_deployment_and_forwards_only_what_extauthz_reads(
    http_wire_envoy: tuple[int, Recording, Recording],
) -> None:
    """/orders: the check carries x-extauthz-deployment: orders (the route's own http_service),
    never the client's copy, the request id and trace context and not the rest, the deadline,
    no body; the upstream gets extauthz's identity header in place of the client's, and not the
    header extauthz had removed."""
    port, extauthz, upstream = http_wire_envoy
    assert through(port, "POST", "/orders/7?x=1", CLIENT, body=b'{"secret": "body"}') == 200
    [check] = extauthz.seen[-1:]
    assert (check["method"], check["path"], check["body"]) == ("POST", "/orders/7?x=1", b"")
    headers = check["headers"]
    assert headers["x-extauthz-deployment"] == "orders"
    assert "x-extauthz-route" not in headers
    assert headers["x-request-id"] == CLIENT["x-request-id"]
    assert headers["authorization"] == CLIENT["authorization"]
    assert "traceparent" in headers and "b3" in headers
    assert headers["x-envoy-expected-rq-timeout-ms"] == "3000"  # server_uri's timeout
    assert not {"cookie", "x-auth-subject", "x-auth-tenant"} & set(headers)
    got = upstream.seen[-1]["headers"]
    assert got["x-auth-subject"] == "from-extauthz"
    assert "x-auth-tenant" not in got


def test_http_wire_envoy_leaves_other_routes_to_extauthz_s_selection(
    http_wire_envoy: tuple[int, Recording, Recording],
) -> None:
    """Another route: no x-extauthz-deployment (the client's copy is not forwarded either), the
    identity headers as on /orders; /healthz is not checked; a denial is passed on."""
    port, extauthz, upstream = http_wire_envoy
    assert through(port, "GET", "/public/x", CLIENT) == 200
    headers = extauthz.seen[-1]["headers"]
    assert "x-extauthz-deployment" not in headers and "x-extauthz-route" not in headers
    assert upstream.seen[-1]["headers"]["x-auth-subject"] == "from-extauthz"
    checks = len(extauthz.seen)
    assert through(port, "GET", "/healthz", {}) == 200
    assert len(extauthz.seen) == checks
    assert through(port, "GET", "/public/deny", {}) == 403
