"""Live config reload under load, through the real Envoy.

A stack of its own (own ports, own IdP) whose extauthz serves a config mounted the way the kubelet
mounts a ConfigMap (``tests/configmap.py``: one directory per version, the ``..data`` symlink
swapped atomically, ``config.yaml -> ..data/config.yaml`` the path extauthz was given).

Background threads send checks through Envoy without a pause while the test swaps the volume to a
second valid policy, then to an invalid one. Every check is classified by when it ran relative to
the server's ``config.reloaded`` log line; each must get exactly the old policy's answer before
and the new one's after (only a check in flight at that instant may get either, but still exactly
one of the two), none may fail, and the invalid file must leave the second policy serving.
"""

from __future__ import annotations

import datetime
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

from stack import Ports, Stack, render_extauthz_config  # noqa: E402 (examples/ is not a package)

from tests.configmap import ConfigMapVolume  # noqa: E402
from tests.waiting import wait_until  # noqa: E402

if TYPE_CHECKING:  # the fixtures' types; conftest is never imported at run time
    from tests.e2e.conftest import SecretsRegistry
    from tests.otlp_receiver import OtlpReceiver

API = "https://api.example.com"
THREADS = 2
MIN_CHECKS_PER_PHASE = 40
LOAD_LIMIT_SECONDS = 45.0  # the load stops by itself even if the test goes wrong
LOAD_LIMIT_CHECKS = 50_000
RELOAD_WAIT_SECONDS = 10.0  # the server polls the file every second

# Both policies are templates for the demo IdP origin, rendered like tests/e2e/policy.yaml.
# Envoy's /orders route names the deployment `orders` in context_extensions; /reports reaches
# extauthz through the catch-all route and is selected by path.
JWKS_AUTH = """
    authentication:
      type: TOKEN_AUTHENTICATION
      validationPolicy:
        type: REMOTE_JWKS
        uri: http://127.0.0.1:3000/jwks
        additionalValidationPolicy:
          issuers: [http://127.0.0.1:3000]
          audiences: [https://api.example.com]"""



def policy(get_order_scope: str, *more: str) -> str:
    """The orders deployment, whose GET /orders/{id} needs ``get_order_scope``, and ``more``."""
    orders = f"""
  - name: orders
    pathPrefix: /orders{JWKS_AUTH}
    routes:
      - name: get-order
        path: /{{id}}
        methods: [GET]
        authorization: {{type: ANY_OF, allowedScope: [{get_order_scope}]}}"""
    return "deployments:" + orders + "".join(more) + "\n"


REPORTS = f"""
  - name: reports
    pathPrefix: /reports{JWKS_AUTH}"""
POLICY_V1 = policy("orders.read")
# v2: reading an order now needs orders.write, and a new deployment serves /reports.
POLICY_V2 = policy("orders.write", REPORTS)

# v3 does not validate: an inline client secret and a misspelt key.
INLINE_SECRET = "extauthz-secret"
POLICY_INVALID = f"""
deployments:
  - name: orders
    pathPrefix: /orders
    authentication:
      type: TOKEN_AUTHENTICATION
      validationPolicy:
        type: REMOTE_INTROSPECTION
        uri: http://127.0.0.1:3000/token/introspection
        clientDetails: {{clientId: extauthz, clientSecret: {INLINE_SECRET}}}
  - name: reports
    pathPrefx: /reports{JWKS_AUTH}
"""
INVALID_ERRORS = [
    "deployments[0].authentication.validationPolicy.clientDetails.clientSecret: "
    "an inline client secret is refused: use clientSecretFile or clientSecretEnv",
    "deployments[1].pathPrefix: Field required",
    "deployments[1].pathPrefx: unknown key",
]

# What a token with scope orders.read (and nothing else) gets on each path: (status, reason).
PATHS = ("/orders/42", "/reports/daily")
OLD = {"/orders/42": (200, None), "/reports/daily": (403, "no_matching_policy")}
NEW = {"/orders/42": (403, "insufficient_scope"), "/reports/daily": (200, None)}


@dataclass(frozen=True)
class Check:
    """One request through Envoy, timed on the wall clock the server's log lines use."""

    path: str
    request_id: str
    started: float
    finished: float
    status: int | None = None
    reason: str | None = None
    error: str | None = None

    @property
    def outcome(self) -> tuple[int | None, str | None]:
        return self.status, self.reason


class Load:
    """Threads that send checks through Envoy back to back until stopped (or a limit is hit)."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url
        self.token = token
        self.checks: list[Check] = []  # list.append is atomic
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(THREADS)]

    def __enter__(self) -> Load:
        self._deadline = time.monotonic() + LOAD_LIMIT_SECONDS
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self, n: int) -> None:
        with httpx.Client(timeout=10.0) as client:
            i = n
            while (
                not self._stop.is_set()
                and time.monotonic() < self._deadline
                and len(self.checks) < LOAD_LIMIT_CHECKS
            ):
                path = PATHS[i % len(PATHS)]
                i += 1
                request_id = str(uuid.uuid4())
                headers = {"authorization": f"Bearer {self.token}", "x-request-id": request_id}
                started = time.time()
                try:
                    response = client.get(f"{self.base_url}{path}", headers=headers)
                except httpx.HTTPError as exc:  # a connection error is a failed check
                    self.checks.append(
                        Check(path, request_id, started, time.time(), error=repr(exc))
                    )
                    continue
                finished = time.time()
                reason = response.headers.get("x-extauthz-reason")
                self.checks.append(
                    Check(path, request_id, started, finished, response.status_code, reason)
                )

    def count_started_after(self, moment: float) -> int:
        return sum(1 for check in list(self.checks) if check.started > moment)


def log_time(line: dict[str, Any]) -> float:
    """A log line's ``ts`` (RFC 3339, milliseconds, truncated) as epoch seconds."""
    parsed = datetime.datetime.strptime(line["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")
    return parsed.replace(tzinfo=datetime.UTC).timestamp()


@pytest.fixture
def configmap_stack(
    tmp_path: Path, otlp: OtlpReceiver, http: httpx.Client
) -> Iterator[tuple[Stack, ConfigMapVolume]]:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("e2e tests need node and npm to run the demo IdP (examples/idp)")
    ports = Ports.free()
    volume = ConfigMapVolume(tmp_path / "configmap")
    volume.write(render_extauthz_config(POLICY_V1, ports))
    with Stack(
        config_path=volume.path,
        ports=ports,
        workdir=tmp_path / "stack",
        listen_address="127.0.0.1",
        env={**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "100"},
        otlp_endpoint=otlp.endpoint,  # its spans are part of the run's secrets audit too
    ) as stack:
        yield stack, volume


def read_token(stack: Stack, http: httpx.Client, registry: SecretsRegistry) -> str:
    """A token from this stack's IdP with scope orders.read only."""
    response = http.post(
        f"{stack.issuer}/token",
        auth=("acme-client", "acme-client-secret"),
        data={"grant_type": "client_credentials", "resource": API, "scope": "orders.read"},
    )
    assert response.status_code == 200, response.text
    return registry.token(response.json()["access_token"])


def test_symlink_swap_under_load_changes_policy_atomically_and_invalid_file_keeps_it(
    configmap_stack: tuple[Stack, ConfigMapVolume],
    http: httpx.Client,
    secrets_registry: SecretsRegistry,
) -> None:
    stack, volume = configmap_stack
    token = read_token(stack, http, secrets_registry)
    secrets_registry.secrets.add(INLINE_SECRET)

    def lines(event: str) -> list[dict[str, Any]]:
        return [line for line in stack.extauthz_log_lines() if line.get("event") == event]

    def first(event: str) -> dict[str, Any] | None:
        found = lines(event)
        return found[0] if found else None

    def enough_after(moment: float) -> bool | None:
        return True if load.count_started_after(moment) >= MIN_CHECKS_PER_PHASE else None

    with Load(stack.envoy_url, token) as load:
        wait_until(lambda: enough_after(0.0), timeout=20, what="checks on the first policy")

        # 1. A valid new policy, swapped in while checks keep arriving.
        volume.write(render_extauthz_config(POLICY_V2, stack.ports))
        reloaded = wait_until(
            lambda: first("config.reloaded"), timeout=RELOAD_WAIT_SECONDS, what="config.reloaded"
        )
        swapped_at = log_time(reloaded)
        wait_until(
            lambda: enough_after(swapped_at), timeout=20, what="checks on the second policy"
        )

        # 2. An invalid file: logged with its errors, and the second policy keeps serving.
        volume.write(render_extauthz_config(POLICY_INVALID, stack.ports))
        failed = wait_until(
            lambda: first("config.reloadFailed"),
            timeout=RELOAD_WAIT_SECONDS,
            what="config.reloadFailed",
        )
        failed_at = log_time(failed)
        wait_until(
            lambda: enough_after(failed_at), timeout=20, what="checks after the invalid file"
        )

    checks = list(load.checks)
    assert stack.returncodes()["extauthz"] is None, "extauthz kept running"

    # No check failed: no connection error, no 5xx, only the two policies' answers.
    errors = [c for c in checks if c.error is not None]
    assert errors == [], f"{len(errors)} checks failed to connect, e.g. {errors[:3]}"
    server_errors = [c for c in checks if c.status is not None and c.status >= 500]
    assert server_errors == [], f"{len(server_errors)} checks got a 5xx, e.g. {server_errors[:3]}"

    # No check got the wrong policy. ts has whole milliseconds, truncated: the swap happened in
    # [swapped_at, swapped_at + 1 ms). The server swaps and logs in one step of its event loop,
    # so a check that ended before it ran on the old policy, one that started after on the new.
    before = [c for c in checks if c.finished < swapped_at]
    after = [c for c in checks if c.started >= swapped_at + 0.001]
    in_flight = [c for c in checks if c not in before and c not in after]
    wrong_before = [c for c in before if c.outcome != OLD[c.path]]
    wrong_after = [c for c in after if c.outcome != NEW[c.path]]
    neither = [c for c in in_flight if c.outcome not in (OLD[c.path], NEW[c.path])]
    assert wrong_before == [], f"{len(wrong_before)} checks before the swap missed the old policy"
    assert wrong_after == [], f"{len(wrong_after)} checks after the swap missed the new policy"
    assert neither == [], f"checks in flight at the swap matched neither policy: {neither}"
    # Each thread has at most one check in flight at any instant (two around a millisecond).
    assert len(in_flight) <= 2 * THREADS, in_flight
    for phase, subset in (("before", before), ("after", after)):
        for path in PATHS:
            assert sum(c.path == path for c in subset) >= 5, f"too few {path} checks {phase}"

    # The invalid file: every error with its YAML path, the old (second) policy kept.
    assert failed["level"] == "ERROR"
    assert failed["config"] == str(volume.path)
    assert sorted(failed["errors"]) == sorted(INVALID_ERRORS)
    assert INLINE_SECRET not in str(failed)
    after_failure = [c for c in checks if c.started > failed_at]
    assert len(after_failure) >= MIN_CHECKS_PER_PHASE
    assert all(c.outcome == NEW[c.path] for c in after_failure)
    assert len(lines("config.reloaded")) == 1, "only the valid file was applied"

    # Each check's access line agrees with what the client saw (and names the deployment).
    sample = [*before[-10:], *after[:10], *after_failure[-10:]]

    def access_lines() -> dict[str, dict[str, Any]] | None:
        got = {line["requestId"]: line for line in lines("access")}
        return got if all(c.request_id in got for c in sample) else None

    access = wait_until(
        access_lines, timeout=5, what="the access lines of the sampled checks"
    )
    for check in sample:
        line = access[check.request_id]
        assert line["status"] == check.status
        expected_deployment = "reports" if check.path.startswith("/reports") else "orders"
        if check.outcome != OLD["/reports/daily"]:
            assert line["deployment"] == expected_deployment
