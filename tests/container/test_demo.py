"""The demo in the container: `make run`'s stack with extauthz as the image instead of a
process on the host, started as the README tells users to (``docker run --read-only --user
10001:10001 --cap-drop ALL --security-opt no-new-privileges`` with examples/demo.yaml mounted
read-only at /etc/extauthz/config.yaml), must answer the curl lines the demo prints as the demo
does: the status, ``x-extauthz-reason``, the challenge, and the identity headers at the upstream.

examples/stack.py starts the rest as for `make run`: the demo IdP (node oidc-provider from
examples/idp), the echo upstream and Envoy from envoy/envoy.yaml, on free ports (so demo.yaml is
mounted as rendered for them: its IdP origin points at the IdP's port, nothing else changes).
The container runs from the engine's own command line, with the host's network. Without node or
npm the module skips (under CI=true it fails).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from tests.container.checks import check_runs_hardened
from tests.container.conftest import (
    CONFIG_IN_CONTAINER,
    IMAGE,
    REPO,
    UID,
    Engine,
    skip_module_without_an_engine,
    unavailable,
)
from tests.waiting import wait_until

sys.path.insert(0, str(REPO / "examples"))
import demo
import dpop as dpop_client  # examples/dpop.py, which the demo's DPoP lines run
from stack import Ports, Stack, http_get, render_extauthz_config

skip_module_without_an_engine()

DEMO_CONFIG = REPO / "examples" / "demo.yaml"
API = "https://api.example.com"  # the resource the demo's tokens are for
READY_SECONDS = 60.0


@dataclass
class Demo:
    stack: Stack
    http: httpx.Client
    container: Any  # the docker SDK's, of the container serving the demo

    def token(self, client: str, scope: str) -> str:
        """A client_credentials token, asked for as demo.py's ``token_command`` line asks."""
        response = self.http.post(
            f"{self.stack.issuer}/token",
            auth=(client, f"{client}-secret"),
            data={"grant_type": "client_credentials", "resource": API, "scope": scope},
        )
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token

    def request(
        self, method: str, path: str, token: str | None = None, proof: str | None = None
    ) -> httpx.Response:
        """The request with a bearer token, or with a DPoP-bound one and its ``proof``."""
        headers = {} if token is None else {"authorization": f"Bearer {token}"}
        if token is not None and proof is not None:
            headers = {"authorization": f"DPoP {token}", "dpop": proof}
        return self.http.request(method, f"{self.stack.envoy_url}{path}", headers=headers)


def container_argv(cli: str, name: str, config: Path) -> list[str]:
    """The README's ``docker run`` line (ports aside: the container shares the host's network,
    and the Stack names them) up to the image; the Stack appends ``serve --config ...``."""
    return [
        cli,
        "run",
        "--rm",
        "--name",
        name,
        "--pull=never",
        "--network=host",
        "--read-only",
        "--user",
        f"{UID}:{UID}",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        # As conftest's ULIMITS, for the same reason: these machines refuse podman's defaults.
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "-v",
        f"{config}:{CONFIG_IN_CONTAINER}:ro",
        IMAGE,
    ]


@pytest.fixture(scope="module")
def demo_stack(
    engine: Engine, image: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Demo]:
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        unavailable(f"the demo needs {' and '.join(missing)} to run its IdP (examples/idp)")
    cli = shutil.which(engine.name)
    if cli is None:
        unavailable(f"no {engine.name} command to run the image as the README does")
    assert cli is not None
    ports = Ports.free()
    workdir = tmp_path_factory.mktemp("demo")
    config = workdir / "demo.yaml"
    config.write_text(render_extauthz_config(DEMO_CONFIG.read_text(), ports))
    config.chmod(0o644)  # readable by UID 10001 through the bind mount
    name = f"extauthz-demo-{uuid.uuid4().hex[:8]}"
    stack = Stack(
        config_path=config,
        ports=ports,
        workdir=workdir,
        listen_address="127.0.0.1",
        extauthz_argv=container_argv(cli, name, config),
        extauthz_config_arg=CONFIG_IN_CONTAINER,
    )
    try:
        stack.start()
        admin = f"http://127.0.0.1:{ports.extauthz_admin}/readyz"
        # Ready once it holds the IdP's keys (its warm start): the first request then decides.
        wait_until(
            lambda: _status(admin) == 200, timeout=READY_SECONDS, what=f"{name}'s {admin} 200"
        )
        with httpx.Client(timeout=10.0) as http:
            yield Demo(stack, http, engine.client.containers.get(name))
    finally:
        # Killed, not drained: how the image stops is test_image.py's, and the demo's
        # drainSeconds would add seconds here. `run --rm` then removes it.
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            engine.client.containers.get(name).kill()
        stack.stop()
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            engine.client.containers.get(name).remove(force=True)


def _status(url: str) -> int | None:
    try:
        return http_get(url, timeout=1.0)[0]
    except OSError:
        return None


@dataclass(frozen=True)
class Answer:
    """What a request through Envoy gets: the status, the reason extauthz gives, the
    challenge, and the identity headers the upstream echoes (when it is reached)."""

    status: int
    reason: str | None = None
    www_authenticate: str | None = None
    identity: dict[str, str] | None = None


IDENTITY_HEADERS = ("x-auth-subject", "x-auth-tenant")


def answer_of(response: httpx.Response) -> Answer:
    identity = None
    if response.status_code == 200:
        echoed = response.json()["headers"]
        identity = {name: echoed[name] for name in IDENTITY_HEADERS if name in echoed}
    return Answer(
        response.status_code,
        response.headers.get("x-extauthz-reason"),
        response.headers.get("www-authenticate"),
        identity,
    )


@dataclass(frozen=True)
class Line:
    """One thing the demo tells users to try: the text it prints for it, the request (with a
    token of ``client`` for ``scope``, or none), and the answer `make run` gives."""

    printed: tuple[str, ...]
    method: str
    path: str
    client: str | None
    scope: str
    expected: Answer


E = demo.ENVOY  # the demo's Envoy, as its lines print it
LINES = {
    "1-token-200": Line(
        (
            demo.token_command("TOKEN", "orders.read orders.write"),
            f'curl -i -H "Authorization: Bearer $TOKEN" {E}/orders/42',
        ),
        "GET",
        "/orders/42",
        "acme-client",
        "orders.read orders.write",
        Answer(200, identity={"x-auth-subject": "acme-client", "x-auth-tenant": "acme"}),
    ),
    "2-no-token-401": Line(
        (f"curl -i {E}/orders/42", 'no token: 401, www-authenticate: Bearer realm="orders"'),
        "GET",
        "/orders/42",
        None,
        "",
        Answer(401, "token_missing", 'Bearer realm="orders"'),
    ),
    "3-scope-403": Line(
        (
            demo.token_command("READ_TOKEN", "orders.read"),
            f'curl -i -X POST -H "Authorization: Bearer $READ_TOKEN" {E}/orders',
            "403 insufficient_scope",
        ),
        "POST",
        "/orders",
        "acme-client",
        "orders.read",
        Answer(
            403,
            "insufficient_scope",
            'Bearer realm="orders", error="insufficient_scope", scope="orders.write"',
        ),
    ),
    "public-no-token-200": Line(
        (f"curl -i {E}/public/hello",),
        "GET",
        "/public/hello",
        None,
        "",
        Answer(200, identity={}),
    ),
    "public-token-200": Line(
        # demo.yaml: a token sent to /public must be valid, and its subject reaches the upstream.
        (f"curl -i {E}/public/hello",),
        "GET",
        "/public/hello",
        "acme-client",
        "orders.read",
        Answer(200, identity={"x-auth-subject": "acme-client"}),
    ),
    "globex-wrong-tenant-401": Line(
        ("globex-client (tenant globex: 401 claim_value_mismatch)",),
        "GET",
        "/orders/42",
        "globex-client",
        "orders.read",
        Answer(401, "claim_value_mismatch", None),
    ),
    "plain-no-tenant-401": Line(
        ("plain-client (no tenant: 401 claim_missing)",),
        "GET",
        "/orders/42",
        "plain-client",
        "orders.read",
        Answer(401, "claim_missing", None),
    ),
}


def test_extauthz_is_the_image_run_as_the_readme_says(demo_stack: Demo) -> None:
    """What answers below is the container, demo.yaml mounted read-only, hardened as
    test_image.py checks the image is."""
    container = demo_stack.container
    check_runs_hardened(container)
    assert container.attrs["Config"]["Image"].endswith(IMAGE)
    # Listening where Envoy asks (no other extauthz is started).
    assert f"127.0.0.1:{demo_stack.stack.ports.extauthz}" in container.attrs["Args"]
    (mount,) = [m for m in container.attrs["Mounts"] if m["Destination"] == CONFIG_IN_CONTAINER]
    assert mount["RW"] is False
    assert Path(mount["Source"]).read_text() == render_extauthz_config(
        DEMO_CONFIG.read_text(), demo_stack.stack.ports
    )


def test_the_demo_prints_these_lines() -> None:
    """Each request below is one the demo prints (so a changed demo changes this test)."""
    printed = " ".join(demo.instructions(Path("logs")).split())  # as wrapped, or not
    missing = [
        text
        for line in LINES.values()
        for text in line.printed
        if " ".join(text.split()) not in printed
    ]
    assert missing == [], printed
    # The DPoP pair (key and token kept beside the logs): the token, a proof, the request with
    # it, and the very same request again.
    token, proof, first, again = demo.dpop_commands(Path("."))
    assert first == again and "--client-id dpop-client" in token and "--token-file" in proof
    for text in (token, proof, first):
        assert text in printed, printed
    assert printed.count(first) == 2
    assert "the same proof again: 401 dpop_proof_invalid" in printed


def test_the_image_answers_the_dpop_pair_as_make_run_does(demo_stack: Demo, tmp_path: Path) -> None:
    """The demo's DPoP lines, as examples/dpop.py runs them against this stack's IdP and Envoy:
    a token of dpop-client bound to a new key, a proof for the request, the request allowed
    (its identity at the upstream), the same proof again a replay: 401 dpop_proof_invalid with
    the DPoP challenge."""
    key = dpop_client.load_or_create_key(tmp_path / "dpop-key.pem")
    request = dpop_client.TokenRequest(
        f"{demo_stack.stack.issuer}/token",
        demo.DPOP_CLIENT,
        f"{demo.DPOP_CLIENT}-secret",
        "orders.read",
        demo.DPOP_RESOURCE,
    )
    token = dpop_client.request_token(key, request)
    url = f"{demo_stack.stack.envoy_url}{demo.DPOP_PATH}"
    proof = dpop_client.make_proof(key, "GET", url, token=token)
    first = demo_stack.request("GET", demo.DPOP_PATH, token, proof)
    assert answer_of(first) == Answer(
        200, identity={"x-auth-subject": "dpop-client", "x-auth-tenant": "acme"}
    ), first.text
    again = answer_of(demo_stack.request("GET", demo.DPOP_PATH, token, proof))
    assert again == Answer(
        401,
        "dpop_proof_invalid",
        'DPoP realm="dpop-orders", error="invalid_dpop_proof", algs="ES256 RS256"',
    )
    # A new proof is a new request: allowed again.
    fresh = dpop_client.make_proof(key, "GET", url, token=token)
    assert demo_stack.request("GET", demo.DPOP_PATH, token, fresh).status_code == 200


@pytest.mark.parametrize("name", list(LINES))
def test_the_image_answers_the_demos_lines_as_make_run_does(demo_stack: Demo, name: str) -> None:
    line = LINES[name]
    token = None if line.client is None else demo_stack.token(line.client, line.scope)
    response = demo_stack.request(line.method, line.path, token)
    answer = answer_of(response)
    expected = line.expected
    if expected.www_authenticate is None and expected.status == 401:
        # The demo exposes detailed errors: the challenge carries a description that says
        # which claim; its start is what a client acts on.
        assert (answer.www_authenticate or "").startswith('Bearer realm="orders"'), answer
        answer = Answer(answer.status, answer.reason, None, answer.identity)
    assert answer == expected, json.dumps(dict(response.headers), indent=1)
