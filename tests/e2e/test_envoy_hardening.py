"""The HTTP connection manager hardening of the shipped envoy/envoy.yaml, through the real stack.

Envoy, extauthz and the echo upstream are the e2e stack's (examples/stack.py renders envoy.yaml
with free ports and nothing else changed). Requests are sent with ``http.client`` so that the
request target goes out byte for byte, like ``curl --path-as-is``. Whether a request reached the
upstream is read from the upstream's own log (``upstream GET <path> <status>``, one line per
request, written before the upstream sends its answer): each request carries a unique ``probe``
query parameter, which Envoy's path normalization leaves alone, so its line is found by that.
The echo upstream (Python's http.server) itself collapses a leading ``//``, so for what Envoy
forwarded the tests also read extauthz's access line: the check carries the very ``:path`` that
Envoy's router then sends upstream.

- ``x_auth_subject``: CGI/WSGI servers read it as ``X-Auth-Subject``, an identity header that
  extauthz removes only under its real (dashed) name. Envoy refuses the request (400) before the
  check, so it never reaches the upstream.
- Paths that are not in normal form (``..``, ``%2e%2e``, ``%2F``, ``//``) under ``/public``, the
  anonymous deployment, all resolve to ``/orders/1``, which needs a token. Envoy normalizes or
  redirects each one before its route and the check are chosen, so without a token none of them
  reaches the upstream, and with one the upstream receives the normalized path.
"""

from __future__ import annotations

import http.client
import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # the fixtures' types; conftest is never imported at run time
    from stack import Stack

    from tests.e2e.conftest import IdP, Logs

HOST = "api.example.com"
NORMALIZED = "/orders/1"  # what every raw path below means, under the `orders` deployment

# What Envoy does with each raw path under envoy/envoy.yaml's settings (Envoy 1.40):
#   "forward": normalize_path / merge_slashes rewrite it and route the result (`/orders/1`);
#   "redirect": the path had %2F, so Envoy answers 307 with Location `/orders/1` (+ the query).
RAW_PATHS = {
    "/public/../orders/1": "forward",
    "/public/%2e%2e/orders/1": "forward",
    "/public/..%2Forders/1": "redirect",
    "/public/.%2e/orders/1": "forward",
    "//orders/1": "forward",
    "/orders%2F1": "redirect",
}


@dataclass(frozen=True)
class Answer:
    status: int
    location: str | None
    body: bytes


def send_as_is(port: int, target: str, headers: dict[str, str]) -> Answer:
    """One GET whose request target is sent exactly as written (no client-side normalization)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
        connection.putheader("host", HOST)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return Answer(response.status, response.getheader("location"), response.read())
    finally:
        connection.close()


def probe_target(path: str) -> tuple[str, str]:
    """``path`` with a unique query parameter, and that parameter, to find it upstream."""
    probe = f"probe={uuid.uuid4().hex}"
    return f"{path}?{probe}", probe


def upstream_paths(stack: Stack, probe: str) -> list[str]:
    """The request targets the echo upstream logged for this probe (none if it was not reached).

    The upstream writes its line before it answers, and the answer came back through Envoy
    before this is read, so a request that reached it is always in the log by now."""
    log = stack.log_dir / "upstream.stderr.log"
    return [line.split()[2] for line in log.read_text().splitlines() if probe in line]


def request_headers(token: str | None = None) -> dict[str, str]:
    headers = {"x-request-id": str(uuid.uuid4())}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return headers


def assert_checked_as_normalized(logs: Logs, headers: dict[str, str]) -> None:
    """extauthz was asked about the normalized path (query dropped in its log), under `orders`."""
    line = logs.find(headers["x-request-id"], "access")
    assert (line["path"], line["deployment"]) == (NORMALIZED, "orders"), line


# -- headers with underscores ------------------------------------------------------------------


def test_underscore_identity_header_is_rejected_by_envoy(stack: Stack) -> None:
    """``x_auth_subject: mallory`` gets Envoy's 400 and never reaches the upstream."""
    target, probe = probe_target("/public/whoami")
    answer = send_as_is(
        stack.ports.envoy, target, {**request_headers(), "x_auth_subject": "mallory"}
    )
    assert answer.status == 400, answer
    assert upstream_paths(stack, probe) == []


def test_dashed_identity_header_is_replaced_by_extauthz(stack: Stack) -> None:
    """The control: the same anonymous request with the dashed name does reach the upstream (so
    the probe would have been seen above), without the client's value."""
    target, probe = probe_target("/public/whoami")
    answer = send_as_is(
        stack.ports.envoy, target, {**request_headers(), "x-auth-subject": "mallory"}
    )
    assert answer.status == 200, answer
    assert upstream_paths(stack, probe) == [target]
    echoed = json.loads(answer.body)
    assert "x-auth-subject" not in echoed["headers"]


# -- paths that are not in normal form ---------------------------------------------------------


@pytest.mark.parametrize("raw", RAW_PATHS)
def test_path_not_in_normal_form_never_reaches_the_upstream_anonymously(
    stack: Stack, logs: Logs, raw: str
) -> None:
    """Anonymously (what /public allows), every raw path is normalized or redirected to
    /orders/1 by Envoy, which needs a token: the upstream is never reached."""
    target, probe = probe_target(raw)
    headers = request_headers()
    answer = send_as_is(stack.ports.envoy, target, headers)
    if RAW_PATHS[raw] == "redirect":
        assert (answer.status, answer.location) == (307, f"{NORMALIZED}?{probe}"), answer
    else:
        assert answer.status == 401, answer  # extauthz, on the `orders` deployment
        assert json.loads(answer.body)["reason"] == "token_missing"
        assert_checked_as_normalized(logs, headers)
    assert upstream_paths(stack, probe) == []


@pytest.mark.parametrize("raw", RAW_PATHS)
def test_path_not_in_normal_form_reaches_the_upstream_normalized(
    stack: Stack, idp: IdP, logs: Logs, raw: str
) -> None:
    """With a token for /orders, the upstream receives exactly the normalized path, never the
    raw one, or (redirected) nothing until the client follows the redirect."""
    target, probe = probe_target(raw)
    headers = request_headers(idp.token("acme-client"))
    answer = send_as_is(stack.ports.envoy, target, headers)
    reached = upstream_paths(stack, probe)
    if RAW_PATHS[raw] == "redirect":
        assert (answer.status, answer.location) == (307, f"{NORMALIZED}?{probe}"), answer
        assert reached == []
    else:
        assert answer.status == 200, answer
        assert_checked_as_normalized(logs, headers)
        assert reached == [f"{NORMALIZED}?{probe}"]
        assert json.loads(answer.body)["path"] == f"{NORMALIZED}?{probe}"
