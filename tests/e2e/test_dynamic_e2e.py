"""DYNAMIC_AUTHENTICATION through real Envoy with real identity providers (docs/configuration.md,
"Several identity providers"): the session's demo IdP is the company's, a second oidc-provider
the partner's, and a third one, started with the company's issuer name but its own keys, plays a
forger. Each IdP's own tokens are allowed; a token signed by the forger claiming the company's
``iss`` is denied; the partner's IdP down gives 500 to the partner's tokens only."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from stack import IDP_DIR, Ports, Stack, accepts_tcp, ensure_idp_dependencies, free_ports, http_get

from tests.e2e.conftest import INTROSPECTION_ENV, IdP, Logs
from tests.waiting import wait_until

POLICY = Path(__file__).with_name("dynamic_policy.yaml")
PARTNER_TEMPLATE_ORIGIN = "127.0.0.1:3998"


class IdpProcess:
    """One more demo oidc-provider (examples/idp) on ``port``, advertising ``issuer``."""

    def __init__(self, port: int, workdir: Path, issuer: str | None = None) -> None:
        node = shutil.which("node")
        assert node is not None
        ensure_idp_dependencies()
        self.issuer = issuer or f"http://127.0.0.1:{port}"
        self.port = port
        env = {**os.environ, "IDP_PORT": str(port), "IDP_ISSUER": self.issuer}
        self.log = (workdir / f"idp-{port}.log").open("wb")
        self.popen = subprocess.Popen(
            [node, str(IDP_DIR / "server.mjs")], cwd=IDP_DIR, env=env, stdout=self.log, stderr=self.log
        )
        url = f"http://127.0.0.1:{port}/.well-known/openid-configuration"

        def answers() -> bool:
            try:
                return http_get(url, timeout=1.0)[0] == 200
            except OSError:
                return False

        wait_until(answers, timeout=30.0, what=f"the IdP on port {port}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log.close()


@pytest.fixture(scope="module")
def partner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdpProcess]:
    process = IdpProcess(free_ports(1)[0], tmp_path_factory.mktemp("partner-idp"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def forger(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdpProcess]:
    """Calls itself the company's issuer, signs with keys of its own."""
    process = IdpProcess(free_ports(1)[0], tmp_path_factory.mktemp("forger-idp"), issuer=stack.issuer)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def dynamic_stack(stack: Stack, partner: IdpProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ports = dataclasses.replace(Ports.free(), idp=stack.ports.idp)
    with Stack(
        config_template=POLICY,
        ports=ports,
        workdir=tmp_path_factory.mktemp("dynamic-stack"),
        listen_address="127.0.0.1",
        env={**os.environ, **INTROSPECTION_ENV},
        config_replacements={PARTNER_TEMPLATE_ORIGIN: f"127.0.0.1:{partner.port}"},
        start_idp=False,
    ) as running:
        yield running


def get(http: httpx.Client, stack: Stack, token: str, rid: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}", "x-request-id": rid}
    return http.get(f"{stack.envoy_url}/orders/1", headers=headers)


def test_each_idp_s_tokens_are_allowed_and_the_forgers_are_not(
    dynamic_stack: Stack, idp: IdP, partner: IdpProcess, forger: IdpProcess, http: httpx.Client
) -> None:
    logs = Logs(dynamic_stack)
    company_token = idp.token("acme-client")
    partner_token = IdP(partner.issuer, http, idp.registry).token("acme-client")
    forged = IdP(f"http://127.0.0.1:{forger.port}", http, idp.registry).token("acme-client")
    # The forger's tokens carry the company's iss, verbatim (it calls itself that).
    assert forger.issuer == idp.issuer

    allowed = get(http, dynamic_stack, company_token, "dyn-company")
    assert allowed.status_code == 200, allowed.text
    assert logs.find("dyn-company", "access")["authServer"] == idp.issuer

    allowed = get(http, dynamic_stack, partner_token, "dyn-partner")
    assert allowed.status_code == 200, allowed.text
    assert logs.find("dyn-partner", "access")["authServer"] == partner.issuer

    denied = get(http, dynamic_stack, forged, "dyn-forged")
    assert denied.status_code == 401
    assert denied.headers["x-extauthz-reason"] in ("key_not_found", "signature_invalid")
    assert logs.find("dyn-forged", "access")["authServer"] == idp.issuer

    unknown = get(http, dynamic_stack, company_token[:-4] + "AAAA", "dyn-garbled")
    assert unknown.status_code == 401


def test_the_partner_idp_down_fails_only_the_partner_s_tokens(
    dynamic_stack: Stack, idp: IdP, partner: IdpProcess, http: httpx.Client
) -> None:
    logs = Logs(dynamic_stack)
    partner_idp = IdP(partner.issuer, http, idp.registry)
    fresh_partner_token = partner_idp.token("acme-client")
    company_token = idp.token("acme-client")
    partner.stop()
    wait_until(lambda: not accepts_tcp(partner.port), timeout=5.0, what="the partner IdP gone")
    time.sleep(1.5)  # past the partner's 1 s document lifetime (dynamic_policy.yaml)
    down = get(http, dynamic_stack, fresh_partner_token, "dyn-partner-down")
    assert down.status_code == 500 and down.headers["x-extauthz-reason"] == "idp_call_failed"
    failure = logs.find("dyn-partner-down", "authentication.idpCallFailed")
    assert failure["authServer"] == partner.issuer and failure["endpoint"] in ("discovery", "jwks_uri")
    still = get(http, dynamic_stack, company_token, "dyn-company-still")
    assert still.status_code == 200, still.text
