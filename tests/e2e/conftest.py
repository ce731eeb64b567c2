"""The real stack for the end-to-end tests: oidc-provider, extauthz, an echo upstream and Envoy.

Started once per session on free ports with ``tests/e2e/policy.yaml`` (examples/stack.py does the
work). The tests skip, saying why, only when node or npm is missing; anything else that keeps
the stack from starting is an error with the failing process's log tail.

Envoy asks extauthz on the gRPC wire there. ``http_stack`` is the same stack on the HTTP wire
(``envoy/http-wire.yaml``, docs/wires.md), sharing ``stack``'s IdP so that one token is good on
both. A module marked ``both_wires`` runs each test that uses ``gateway`` or ``logs`` once per
wire (ids ``[grpc]``, ``[http]``): the ``wire`` fixture picks the stack behind them. A test of
such a module that asserts what only the gRPC wire has is marked ``grpc_only(reason)``: its HTTP
run is skipped with that reason. Everything else runs on the gRPC wire, as before.

Both Envoy and extauthz export their traces to a real OTLP/gRPC receiver (``otlp``) started
before the stack, and the ``idp-down`` deployment introspects at a real misbehaving IdP
(``faulty_idp``) whose endpoint answers 500. Every token the ``idp`` fixture issues and every
token sent through the ``gateway`` is recorded in ``secrets_registry``;
``test_secrets_e2e.py`` runs last and greps every extauthz log and every exported span for them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

from stack import WIRES, Ports, Stack  # noqa: E402 (examples/ is not a package; needs the path above)

from tests.e2e.tokens import claims_of, until_expired  # noqa: E402
from tests.integration.faulty_idp import Fault, FaultyIdp  # noqa: E402
from tests.otlp_receiver import OtlpReceiver  # noqa: E402
from tests.waiting import wait_until  # noqa: E402

POLICY_TEMPLATE = Path(__file__).with_name("policy.yaml")
API = "https://api.example.com"
OTHER_API = "https://other.example.com"
LOG_WAIT_SECONDS = 5.0
# How long after its exp an expired token is handed out again: well inside the skew deployment's
# maxClockSkewInSeconds (60), where it must still pass.
EXPIRED_REUSE_SECONDS = 30.0
# policy.yaml's template origin of the misbehaving IdP (faulty_idp), replaced by its real address.
FAULTY_IDP_ORIGIN = "http://127.0.0.1:3999"
FAULTY_INTROSPECTION = "/introspect-500"  # answers 500 to every call
# extauthz's spans leave within 0.1 s (Envoy's: flush_interval_ms in envoy/envoy.yaml).
TRACING_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "100"}
# extauthz's introspection client secrets (policy.yaml reads them with clientSecretEnv). The
# values are the demo IdP's throw-away client secrets (examples/idp/server.mjs).
INTROSPECTION_ENV = {
    "E2E_INTROSPECTION_SECRET": "extauthz-secret",
    "E2E_INTROSPECTION_POST_SECRET": "extauthz-post-secret",
    "E2E_INTROSPECTION_WRONG_SECRET": "not-the-extauthz-secret",
}


@dataclass
class SecretsRegistry:
    """Every token and client secret the e2e run used: what no log line or span may contain."""

    tokens: set[str] = field(default_factory=set)
    secrets: set[str] = field(default_factory=set)

    def token(self, value: str) -> str:
        self.tokens.add(value)
        return value


@dataclass
class IdP:
    """The demo oidc-provider: client_credentials tokens for the demo clients."""

    issuer: str
    http: httpx.Client
    registry: SecretsRegistry | None = None  # records every token handed out

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
        if self.registry is not None:
            self.registry.token(token)
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
    registry: SecretsRegistry | None = None  # records every token sent

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        request_id: str | None = None,
    ) -> Call:
        """``request_id`` (a UUID: Envoy keeps it and extauthz logs it as requestId) is a new
        one unless given: the same request sent on both wires carries the same id."""
        request_id = request_id or str(uuid.uuid4())
        sent = {"x-request-id": request_id, **(headers or {})}
        if token is not None:
            sent["authorization"] = f"Bearer {token}"
            if self.registry is not None and token:
                self.registry.token(token)
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
def stack(
    tmp_path_factory: pytest.TempPathFactory, otlp: OtlpReceiver, faulty_idp: FaultyIdp
) -> Iterator[Stack]:
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"e2e tests need {' and '.join(missing)} to run the demo IdP (examples/idp)")
    workdir = tmp_path_factory.mktemp("stack")
    with Stack(
        config_template=POLICY_TEMPLATE,
        ports=Ports.free(),
        workdir=workdir,
        listen_address="127.0.0.1",
        env={**os.environ, **INTROSPECTION_ENV, **TRACING_ENV},
        otlp_endpoint=otlp.endpoint,  # Envoy's and extauthz's spans
        config_replacements={FAULTY_IDP_ORIGIN: faulty_idp.url},
    ) as running:
        yield running


@pytest.fixture(scope="session")
def http_stack(
    stack: Stack,
    tmp_path_factory: pytest.TempPathFactory,
    otlp: OtlpReceiver,
    faulty_idp: FaultyIdp,
) -> Iterator[Stack]:
    """``stack`` on the HTTP wire: the same policy, environment and trace receiver, and
    ``stack``'s IdP (not started again), so that the same token is good on both wires."""
    ports = dataclasses.replace(Ports.free(), idp=stack.ports.idp)
    with Stack(
        config_template=POLICY_TEMPLATE,
        ports=ports,
        workdir=tmp_path_factory.mktemp("http-stack"),
        listen_address="127.0.0.1",
        env={**os.environ, **INTROSPECTION_ENV, **TRACING_ENV},
        otlp_endpoint=otlp.endpoint,
        config_replacements={FAULTY_IDP_ORIGIN: faulty_idp.url},
        wire="http",
        start_idp=False,
    ) as running:
        yield running


@pytest.fixture(scope="session")
def wire(request: pytest.FixtureRequest) -> str:
    """The wire Envoy asks extauthz on, behind ``gateway`` and ``logs``: a ``both_wires``
    module's tests get each in turn, every other test gRPC."""
    return str(getattr(request, "param", "grpc"))


@pytest.fixture(scope="session")
def wire_stack(wire: str, request: pytest.FixtureRequest) -> Stack:
    """The stack of ``wire``; the HTTP one starts only when a test asks for it."""
    found: Stack = request.getfixturevalue("stack" if wire == "grpc" else "http_stack")
    return found


@pytest.fixture(scope="session")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0) as client:
        yield client


@pytest.fixture(scope="session")
def idp(stack: Stack, http: httpx.Client, secrets_registry: SecretsRegistry) -> IdP:
    return IdP(stack.issuer, http, secrets_registry)


@pytest.fixture(scope="session")
def gateway(wire_stack: Stack, http: httpx.Client, secrets_registry: SecretsRegistry) -> Gateway:
    return Gateway(wire_stack.envoy_url, http, secrets_registry)


@pytest.fixture(scope="session")
def logs(wire_stack: Stack) -> Logs:
    return Logs(wire_stack)


@pytest.fixture(scope="session")
def gateways(
    stack: Stack, http_stack: Stack, http: httpx.Client, secrets_registry: SecretsRegistry
) -> dict[str, Gateway]:
    """Envoy on each wire, for a test that sends the same request through both."""
    return {
        wire: Gateway(running.envoy_url, http, secrets_registry)
        for wire, running in (("grpc", stack), ("http", http_stack))
    }


# -- both wires ------------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "both_wires: run each test using the gateway or logs fixtures once per wire (gRPC, HTTP)",
    )
    config.addinivalue_line(
        "markers",
        "grpc_only(reason): in a both_wires module, a test of what only the gRPC wire has; "
        "its HTTP run is skipped with the reason",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``wire`` parametrized (session scope: each stack started once) for the tests of a
    ``both_wires`` module that reach a stack through ``gateway`` or ``logs``."""
    if "wire" not in metafunc.fixturenames or not metafunc.definition.get_closest_marker(
        "both_wires"
    ):
        return
    grpc_only = metafunc.definition.get_closest_marker("grpc_only")
    params: list[Any] = list(WIRES)
    if grpc_only is not None:
        reason = grpc_only.kwargs.get("reason") or (grpc_only.args or ("",))[0]
        if not reason:
            raise pytest.UsageError(f"{metafunc.definition.nodeid}: grpc_only needs a reason")
        params = [
            pytest.param(w, marks=pytest.mark.skip(reason=f"gRPC wire only: {reason}"))
            if w != "grpc"
            else w
            for w in WIRES
        ]
    metafunc.parametrize("wire", params, indirect=True, scope="session")


@pytest.fixture(scope="session")
def expired_tokens() -> list[str]:
    """The expired tokens ``expired_token`` handed out, the newest last."""
    return []


@pytest.fixture
def expired_token(idp: IdP, expired_tokens: list[str]) -> str:
    """A valid acme token (2 s lifetime) whose ``exp`` passed more than a second ago, and at
    most EXPIRED_REUSE_SECONDS ago: one is given to several tests (each wire's), since waiting
    for one to expire takes seconds."""
    if (
        expired_tokens
        and time.time() < claims_of(expired_tokens[-1])["exp"] + EXPIRED_REUSE_SECONDS
    ):
        return expired_tokens[-1]
    expired_tokens.append(until_expired(idp.token("short-lived", scope="orders.read")))
    return expired_tokens[-1]


# -- tracing, the misbehaving IdP and the secrets audit ---------------------------------
# The demo IdP's clients (examples/idp/server.mjs); each one's secret is "<client>-secret".
DEMO_CLIENTS = (
    "acme-client",
    "globex-client",
    "plain-client",
    "short-lived",
    "extauthz",
    "extauthz-post",
    "dpop-client",
    "mtls-client",
)


@pytest.fixture(scope="session")
def secrets_registry() -> SecretsRegistry:
    """The tokens and client secrets of the whole e2e run; test_secrets_e2e.py audits them."""
    registry = SecretsRegistry()
    registry.secrets.update(f"{client}-secret" for client in DEMO_CLIENTS)
    registry.secrets.update(INTROSPECTION_ENV.values())
    return registry


@pytest.fixture(scope="session")
def otlp() -> Iterator[OtlpReceiver]:
    """A real OTLP/gRPC receiver for the whole session: the e2e stacks export their spans here."""
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def failing_introspection(faulty_idp: FaultyIdp) -> str:
    """The URL of faulty_idp's introspection endpoint that answers 500 (``idp-down``'s)."""
    return faulty_idp.url + FAULTY_INTROSPECTION


@pytest.fixture(scope="session")
def faulty_idp() -> Iterator[FaultyIdp]:
    """A real IdP whose introspection endpoint answers 500 (the ``idp-down`` deployment)."""
    with FaultyIdp(
        clients={"extauthz": INTROSPECTION_ENV["E2E_INTROSPECTION_SECRET"]}, tls=False
    ) as idp:
        idp.introspection(FAULTY_INTROSPECTION, fault=Fault.status_code(500))
        yield idp


@pytest.hookimpl(trylast=True)  # after pytest grouped the tests by wire
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The secrets audit runs after every other test, so that it sees the whole run."""
    audit = [item for item in items if item.path.name == "test_secrets_e2e.py"]
    if audit:
        items[:] = [item for item in items if item.path.name != "test_secrets_e2e.py"] + audit
