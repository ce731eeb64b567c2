"""The real stack for the end-to-end tests: oidc-provider, extauthz, an echo upstream and Envoy.

Started once per session on free ports with ``tests/e2e/policy.yaml`` (examples/stack.py does the
work). The tests skip, saying why, only when node or npm is missing; anything else that keeps
the stack from starting is an error with the failing process's log tail.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

from stack import Ports, Stack  # noqa: E402 (examples/ is not a package; needs the path above)

POLICY_TEMPLATE = Path(__file__).with_name("policy.yaml")
API = "https://api.example.com"
OTHER_API = "https://other.example.com"
LOG_WAIT_SECONDS = 5.0
# extauthz's introspection client secrets (policy.yaml reads them with clientSecretEnv). The
# values are the demo IdP's throw-away client secrets (examples/idp/server.mjs).
INTROSPECTION_ENV = {
    "E2E_INTROSPECTION_SECRET": "extauthz-secret",
    "E2E_INTROSPECTION_POST_SECRET": "extauthz-post-secret",
    "E2E_INTROSPECTION_WRONG_SECRET": "not-the-extauthz-secret",
}


def wait_until(condition: Callable[[], Any], *, timeout: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy and return that, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def unverified_claims(token: str) -> dict[str, Any]:
    """A JWT's payload, read without checking it (the tests only need to know what they sent)."""
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


@dataclass
class IdP:
    """The demo oidc-provider: client_credentials tokens for the demo clients."""

    issuer: str
    http: httpx.Client

    def token(
        self, client_id: str, *, resource: str = API, scope: str = "orders.read orders.write"
    ) -> str:
        response = self.http.post(
            f"{self.issuer}/token",
            auth=(client_id, f"{client_id}-secret"),
            data={"grant_type": "client_credentials", "resource": resource, "scope": scope},
        )
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token


@dataclass
class Call:
    """One request through Envoy, with the x-request-id the test chose for it."""

    request_id: str
    response: httpx.Response


@dataclass
class Gateway:
    """Envoy's listener, the way a client reaches the API."""

    base_url: str
    http: httpx.Client

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Call:
        request_id = str(uuid.uuid4())  # a UUID: Envoy keeps it and extauthz logs it as requestId
        sent = {"x-request-id": request_id, **(headers or {})}
        if token is not None:
            sent["authorization"] = f"Bearer {token}"
        return Call(request_id, self.http.request(method, f"{self.base_url}{path}", headers=sent))


@dataclass
class Logs:
    """extauthz's stdout, one JSON object per line."""

    stack: Stack

    def find(self, request_id: str, event: str) -> dict[str, Any]:
        """The line with this ``requestId`` and ``event``, waiting for it to be written."""

        def line() -> dict[str, Any] | None:
            for record in self.stack.extauthz_log_lines():
                if record.get("requestId") == request_id and record.get("event") == event:
                    return record
            return None

        found: dict[str, Any] = wait_until(
            line, timeout=LOG_WAIT_SECONDS, what=f"log line event={event!r} requestId={request_id}"
        )
        return found

    def text(self) -> str:
        """Everything extauthz wrote, stdout and stderr."""
        return "".join(
            path.read_text(errors="replace")
            for path in (
                self.stack.log_dir / "extauthz.log",
                self.stack.log_dir / "extauthz.stderr.log",
            )
            if path.exists()
        )


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"e2e tests need {' and '.join(missing)} to run the demo IdP (examples/idp)")
    workdir = tmp_path_factory.mktemp("stack")
    with Stack(
        config_template=POLICY_TEMPLATE,
        ports=Ports.free(),
        workdir=workdir,
        listen_address="127.0.0.1",
        env={**os.environ, **INTROSPECTION_ENV},
    ) as running:
        yield running


@pytest.fixture(scope="session")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0) as client:
        yield client


@pytest.fixture(scope="session")
def idp(stack: Stack, http: httpx.Client) -> IdP:
    return IdP(stack.issuer, http)


@pytest.fixture(scope="session")
def gateway(stack: Stack, http: httpx.Client) -> Gateway:
    return Gateway(stack.envoy_url, http)


@pytest.fixture(scope="session")
def logs(stack: Stack) -> Logs:
    return Logs(stack)


@pytest.fixture
def expired_token(idp: IdP) -> str:
    """A valid acme token (2 s lifetime) whose ``exp`` passed more than a second ago."""
    token = idp.token("short-lived", scope="orders.read")
    exp = unverified_claims(token)["exp"]
    wait_until(lambda: time.time() > exp + 1, timeout=10, what="the short-lived token to expire")
    return token
