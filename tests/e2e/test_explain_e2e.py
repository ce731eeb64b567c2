"""`extauthz explain` on tokens from the real oidc-provider, checked against the real server.

Each test makes one token fail one check, runs ``explain`` with the stack's rendered config and
the request's path, method and host, and asserts two things: the failing check's line shows both
values, and the decision explain prints is the one extauthz returns through Envoy for the same
token and request (status, ``x-extauthz-reason``, ``www-authenticate`` and the execution-log
message of that request's ``x-request-id``).

Most cases use the shared stack (``tests/e2e/policy.yaml``). A second, smaller stack started here
covers what that policy has no deployment for: ``nbf`` (a token signed with a static key generated
by the test), the presence-only and optional ``verifyClaims`` modes, and introspection.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import yaml

from extauthz.cli import main
from tests.conftest import SigningKey

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

from stack import Ports, Stack  # noqa: E402 (examples/ is not a package; needs the path above)

if TYPE_CHECKING:  # the fixtures' types; conftest is never imported at run time
    from tests.e2e.conftest import IdP

API = "https://api.example.com"
OTHER_API = "https://other.example.com"
OPAQUE_API = "https://opaque.example.com"
STATIC_ISSUER = "https://explain-e2e.example.com"
INVALID_TOKEN = 'Bearer realm="{realm}", error="invalid_token"'
# Secrets of the demo IdP's throw-away introspection client (examples/idp/server.mjs).
OWN_STACK_ENV = {"EXPLAIN_E2E_SECRET": "extauthz-secret", "EXPLAIN_E2E_WRONG": "not-the-secret"}


# -- running explain and the same request through Envoy ------------------------------------------


@dataclass
class Explained:
    code: int
    text: str
    data: dict[str, Any]

    def line(self, check: str) -> str:
        """The printed line of one check, column padding collapsed to two spaces."""
        for text in self.text.splitlines():
            name, _, rest = text.partition("  ")
            if name == check:
                return f"{check}  {rest.strip()}"
        raise AssertionError(f"no {check!r} line in:\n{self.text}")

    @property
    def decision(self) -> dict[str, Any]:
        decision: dict[str, Any] = self.data["decision"]
        return decision


@dataclass
class Call:
    request_id: str
    response: httpx.Response


def token_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / f"token-{uuid.uuid4().hex}"
    path.write_text(token + "\n")
    return path


def explain(
    stack: Stack,
    token: str,
    path: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    *,
    method: str = "GET",
    deployment: str | None = None,
) -> Explained:
    """`extauthz explain` on the rendered config, once as text and once with --json."""
    argv = [
        "explain",
        "--config",
        str(stack.workdir / "extauthz.yaml"),
        "--token-file",
        str(token_file(tmp_path, token)),
        "--path",
        path,
        "--method",
        method,
        "--host",
        f"127.0.0.1:{stack.ports.envoy}",
    ]
    if deployment is not None:
        argv += ["--deployment", deployment]
    capsys.readouterr()
    code = main(argv)
    text = capsys.readouterr().out
    assert main([*argv, "--json"]) == code
    data = json.loads(capsys.readouterr().out)
    for part in token.split("."):
        assert part not in text and part not in json.dumps(data)  # the token is never printed
    return Explained(code, text, data)


def through_envoy(
    stack: Stack, http: httpx.Client, token: str, path: str, method: str = "GET"
) -> Call:
    request_id = str(uuid.uuid4())
    response = http.request(
        method,
        f"{stack.envoy_url}{path}",
        headers={"x-request-id": request_id, "authorization": f"Bearer {token}"},
    )
    return Call(request_id, response)


def log_line(stack: Stack, request_id: str, event: str, timeout: float = 5.0) -> dict[str, Any]:
    """extauthz's log line for this request and event, waiting for it to be written."""
    deadline = time.monotonic() + timeout
    while True:
        for record in stack.extauthz_log_lines():
            if record.get("requestId") == request_id and record.get("event") == event:
                return record
        if time.monotonic() > deadline:
            pytest.fail(f"no log line event={event!r} requestId={request_id}")
        time.sleep(0.05)


def assert_same_decision(result: Explained, call: Call, stack: Stack) -> None:
    """What explain printed is what the server answered through Envoy."""
    d = result.decision
    response = call.response
    assert d["exact"] is True, d["note"]
    if d["allowed"]:
        assert result.code == 0
        assert response.status_code == 200, response.text
        assert result.line("decision").startswith("decision  ALLOW  ")
        return
    assert result.code == 1
    assert response.status_code == d["status"], response.text
    assert response.headers.get("x-extauthz-reason") == d["reason"]
    assert response.headers.get("www-authenticate") == d["wwwAuthenticate"]
    assert response.json()["error"] == d["error"]
    line = log_line(stack, call.request_id, d["log"]["event"])
    for field, value in d["log"].items():  # reason, message, and e.g. endpoint
        if field != "event":
            assert line[field] == value, (field, line)
    # ...and the text report says the same.
    assert result.line("decision").startswith("decision  DENY  ")
    assert result.line("status") == f"status  {d['status']}"
    assert result.line("reason") == f"reason  {d['reason']}"
    assert (
        result.line("www-authenticate") == f"www-authenticate  {d['wwwAuthenticate'] or '(none)'}"
    )
    log = result.line("log")
    assert log.startswith(f"log  {d['log']['event']}") and log.endswith(f": {d['log']['message']}")


def failing(result: Explained) -> list[str]:
    return [c["check"] for c in result.data["checks"] if c["result"] == "FAIL"]


def with_kid(token: str, kid: str) -> str:
    """The same JWT with another ``kid`` in its header (the signature no longer matters)."""
    head, payload, signature = token.split(".")
    header = b64json(head)
    header["kid"] = kid
    raw = json.dumps(header, separators=(",", ":")).encode()
    return ".".join([base64.urlsafe_b64encode(raw).rstrip(b"=").decode(), payload, signature])


def tamper_signature(token: str) -> str:
    head, payload, signature = token.split(".")
    middle = len(signature) // 2  # not the last character, whose low bits are only padding
    flipped = "A" if signature[middle] != "A" else "B"
    return ".".join([head, payload, signature[:middle] + flipped + signature[middle + 1 :]])


def b64json(part: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return data


def claims_of(token: str) -> dict[str, Any]:
    return b64json(token.split(".")[1])


# -- the shared stack (tests/e2e/policy.yaml) -----------------------------------------------------


@pytest.fixture(scope="module")
def expired(idp: IdP) -> str:
    """One short-lived acme token (2 s lifetime), waited on until its exp is a second past."""
    token: str = idp.token("short-lived", scope="orders.read")
    exp = claims_of(token)["exp"]
    deadline = time.monotonic() + 10
    while time.time() <= exp + 1:
        assert time.monotonic() < deadline, "the short-lived token did not expire"
        time.sleep(0.05)
    return token


def test_aud(
    stack: Stack, idp: IdP, http: httpx.Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A genuine token for another API: aud FAIL with both values; 401 audience_mismatch."""
    token = idp.token("acme-client", resource=OTHER_API, scope="orders.read")
    result = explain(stack, token, "/orders/42", tmp_path, capsys, deployment="orders")
    assert result.line("aud") == f'aud  FAIL  token: ["{OTHER_API}"]  policy audiences: ["{API}"]'
    assert failing(result) == ["aud"]
    assert result.decision["reason"] == "audience_mismatch"
    assert_same_decision(result, through_envoy(stack, http, token, "/orders/42"), stack)


def test_iss(
    stack: Stack, idp: IdP, http: httpx.Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = idp.token("acme-client")
    result = explain(stack, token, "/wrong-issuer/x", tmp_path, capsys)
    assert result.line("iss") == (
        f'iss  FAIL  token: "{stack.issuer}"  policy issuers: ["https://not-this-idp.example.com"]'
    )
    assert result.decision["reason"] == "issuer_mismatch"
    assert_same_decision(result, through_envoy(stack, http, token, "/wrong-issuer/x"), stack)


def test_exp(
    stack: Stack,
    expired: str,
    http: httpx.Client,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = explain(stack, expired, "/orders/42", tmp_path, capsys, deployment="orders")
    line = result.line("exp")
    assert line.startswith("exp  FAIL  20") and "Z, expired " in line and "(skew 0s, now " in line
    assert result.decision["reason"] == "token_expired"
    assert_same_decision(result, through_envoy(stack, http, expired, "/orders/42"), stack)


def test_exp_within_clock_skew(
    stack: Stack,
    expired: str,
    http: httpx.Client,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The same expired token where maxClockSkewInSeconds is 60: PASS, saying it is the skew."""
    result = explain(stack, expired, "/skew/anything", tmp_path, capsys)
    line = result.line("exp")
    assert line.startswith("exp  PASS  20") and line.endswith("ago, within the skew of 60s")
    assert_same_decision(result, through_envoy(stack, http, expired, "/skew/anything"), stack)


def test_claim_value_mismatch(
    stack: Stack, idp: IdP, http: httpx.Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """verifyClaims with values, required: globex's tenant is not acme."""
    token = idp.token("globex-client", scope="orders.read")
    result = explain(stack, token, "/orders/42", tmp_path, capsys, deployment="orders")
    assert result.line("claim tenant") == (
        'claim tenant  FAIL  token: "globex"  expected one of: ["acme"] (required)'
    )
    assert result.decision["reason"] == "claim_value_mismatch"
    assert_same_decision(result, through_envoy(stack, http, token, "/orders/42"), stack)


def test_required_claim_missing(
    stack: Stack, idp: IdP, http: httpx.Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """verifyClaims with values, required: plain-client's token has no tenant."""
    token = idp.token("plain-client", scope="orders.read")
    result = explain(stack, token, "/orders/42", tmp_path, capsys, deployment="orders")
    assert result.line("claim tenant") == (
        'claim tenant  FAIL  token: (absent)  expected one of: ["acme"] (required)'
    )
    assert result.decision["reason"] == "claim_missing"
    assert_same_decision(result, through_envoy(stack, http, token, "/orders/42"), stack)


def test_scope(
    stack: Stack, idp: IdP, http: httpx.Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """GET /orders/{id} needs orders.read; a token with only orders.write gets 403."""
    token = idp.token("acme-client", scope="orders.write")
    result = explain(stack, token, "/orders/42", tmp_path, capsys, deployment="orders")
    assert result.line("scope") == (
        'scope  FAIL  token: ["orders.write"]  route requires any of: ["orders.read"]'
    )
    assert result.decision["wwwAuthenticate"] == (
        'Bearer realm="orders", error="insufficient_scope", scope="orders.read"'
    )
    assert_same_decision(result, through_envoy(stack, http, token, "/orders/42"), stack)


def test_signature(
    stack: Stack, idp: IdP, http: httpx.Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tamper_signature(idp.token("acme-client", scope="orders.read"))
    result = explain(stack, token, "/orders/42", tmp_path, capsys, deployment="orders")
    assert result.line("kid").startswith("kid  PASS  token kid: ")
    assert result.line("signature").startswith("signature  FAIL  JWT signature verification failed")
    assert failing(result) == ["signature"]
    assert "WITHOUT a verified signature" in result.text  # the claims below are still shown
    assert_same_decision(result, through_envoy(stack, http, token, "/orders/42"), stack)


def test_unknown_kid(
    stack: Stack, idp: IdP, http: httpx.Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A kid the IdP's JWKS does not have (as after a key rotation): key_not_found, with the
    kids the JWKS does have."""
    genuine = idp.token("acme-client", scope="orders.read")
    real_kid = b64json(genuine.split(".")[0])["kid"]
    token = with_kid(genuine, "rotated-away")
    result = explain(stack, token, "/orders/42", tmp_path, capsys, deployment="orders")
    assert result.line("kid").startswith(
        f'kid  FAIL  token kid: "rotated-away"  known kids: ["{real_kid}"]'
    )
    assert result.decision["reason"] == "key_not_found"
    assert_same_decision(result, through_envoy(stack, http, token, "/orders/42"), stack)


def test_valid_token_is_allowed(
    stack: Stack, idp: IdP, http: httpx.Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = idp.token("acme-client", scope="orders.read")
    result = explain(stack, token, "/orders/42", tmp_path, capsys, deployment="orders")
    assert failing(result) == []
    assert result.decision["upstreamHeaders"] == {
        "x-auth-subject": "acme-client",
        "x-auth-tenant": "acme",
    }
    assert_same_decision(result, through_envoy(stack, http, token, "/orders/42"), stack)


def test_offline_says_the_signature_was_not_checked(
    stack: Stack, idp: IdP, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--offline with remote keys: the same failing line, the decision marked inexact."""
    token = idp.token("acme-client", resource=OTHER_API, scope="orders.read")
    config, tokens = stack.workdir / "extauthz.yaml", token_file(tmp_path, token)
    argv = ["explain", "--config", str(config), "--token-file", str(tokens), "--path", "/orders/42"]
    code = main([*argv, "--deployment", "orders", "--offline", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 1
    checks = {c["check"]: c["result"] for c in data["checks"]}
    assert (checks["kid"], checks["signature"], checks["aud"]) == ("SKIP", "SKIP", "FAIL")
    assert data["decision"]["exact"] is False
    assert "WITHOUT the signature check" in data["decision"]["note"]
    assert data["decision"]["reason"] == "audience_mismatch"


def test_explain_runs_as_a_command(stack: Stack, idp: IdP, tmp_path: Path) -> None:
    """`python -m extauthz explain` as an operator runs it: exit 1 for a denial."""
    token = idp.token("acme-client", resource=OTHER_API, scope="orders.read")
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    config, tokens = stack.workdir / "extauthz.yaml", token_file(tmp_path, token)
    argv = ["explain", "--config", str(config), "--token-file", str(tokens), "--path", "/orders/42"]
    argv += ["--deployment", "orders"]
    done = subprocess.run(
        [sys.executable, "-m", "extauthz", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": pythonpath},
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"^aud +FAIL  token: ", done.stdout, re.M)
    assert token not in done.stdout + done.stderr


# -- a stack of our own, for what the shared policy does not have --------------------------------


def own_policy(static_key: dict[str, Any]) -> dict[str, Any]:
    """Written for the demo IdP origin 127.0.0.1:3000, like tests/e2e/policy.yaml."""
    idp = "http://127.0.0.1:3000"

    def token_auth(validation: dict[str, Any]) -> dict[str, Any]:
        return {"type": "TOKEN_AUTHENTICATION", "validationPolicy": validation}

    return {
        "deployments": [
            {
                "name": "static-keys",
                "pathPrefix": "/static",
                "authentication": token_auth(
                    {
                        "type": "STATIC_KEYS",
                        "keys": [static_key],
                        "additionalValidationPolicy": {
                            "issuers": [STATIC_ISSUER],
                            "audiences": [API],
                        },
                    }
                ),
            },
            {
                "name": "claim-modes",
                "pathPrefix": "/claims",
                "authentication": token_auth(
                    {
                        "type": "REMOTE_JWKS",
                        "uri": f"{idp}/jwks",
                        "additionalValidationPolicy": {
                            "issuers": [idp],
                            "audiences": [API],
                            "verifyClaims": [
                                {"key": "email_verified", "isRequired": True},  # presence only
                                {"key": "tenant", "values": ["acme"], "isRequired": False},
                            ],
                        },
                    }
                ),
            },
            {
                "name": "opaque",
                "pathPrefix": "/opaque",
                "authentication": token_auth(
                    {
                        "type": "REMOTE_DISCOVERY",
                        "uri": f"{idp}/.well-known/openid-configuration",
                        "clientDetails": {
                            "clientId": "extauthz",
                            "clientSecretEnv": "EXPLAIN_E2E_SECRET",
                        },
                        "additionalValidationPolicy": {
                            "issuers": [idp],
                            "audiences": [OPAQUE_API],
                        },
                    }
                ),
            },
            {
                "name": "bad-client",
                "pathPrefix": "/bad-client",
                "authentication": token_auth(
                    {
                        "type": "REMOTE_INTROSPECTION",
                        "uri": f"{idp}/token/introspection",
                        "clientDetails": {
                            "clientId": "extauthz",
                            "clientSecretEnv": "EXPLAIN_E2E_WRONG",
                        },
                    }
                ),
            },
        ]
    }


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory, rsa_key: SigningKey) -> Iterator[Stack]:
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"e2e tests need {' and '.join(missing)} to run the demo IdP (examples/idp)")
    workdir = tmp_path_factory.mktemp("explain-stack")
    template = workdir / "policy.yaml"
    template.write_text(yaml.safe_dump(own_policy(rsa_key.public_jwk)))
    with Stack(
        config_template=template,
        ports=Ports.free(),
        workdir=workdir,
        listen_address="127.0.0.1",
        env={**os.environ, **OWN_STACK_ENV},
    ) as running:
        yield running


@pytest.fixture
def own_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """explain reads the introspection client secret from the environment, like the server."""
    for name, value in OWN_STACK_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def own_token(own_stack: Stack) -> Iterator[Callable[..., str]]:
    with httpx.Client(timeout=10) as client:

        def token(client_id: str, resource: str = API, scope: str = "orders.read") -> str:
            response = client.post(
                f"{own_stack.issuer}/token",
                auth=(client_id, f"{client_id}-secret"),
                data={"grant_type": "client_credentials", "resource": resource, "scope": scope},
            )
            assert response.status_code == 200, response.text
            value: str = response.json()["access_token"]
            return value

        yield token


def test_nbf(
    own_stack: Stack,
    rsa_key: SigningKey,
    http: httpx.Client,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A token not valid for another five minutes (signed with the deployment's static key)."""
    now = int(time.time())
    early = {"iss": STATIC_ISSUER, "aud": API, "sub": "early", "iat": now, "nbf": now + 300}
    token = rsa_key.sign({**early, "exp": now + 900})
    result = explain(own_stack, token, "/static/x", tmp_path, capsys)
    assert re.fullmatch(
        r"nbf  FAIL  \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ, valid in (4m5\ds|5m) \(skew 0s, now \S+Z\)",
        result.line("nbf"),
    ), result.line("nbf")
    assert result.line("signature") == f'signature  PASS  verified with key "{rsa_key.kid}" (RS256)'
    assert failing(result) == ["nbf"]
    assert result.decision["reason"] == "token_not_yet_valid"
    assert_same_decision(result, through_envoy(own_stack, http, token, "/static/x"), own_stack)


def test_presence_only_claim(
    own_stack: Stack,
    own_token: Callable[..., str],
    http: httpx.Client,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """verifyClaims with isRequired and no values: presence only. plain-client has neither
    email_verified (FAIL) nor tenant (PASS: that rule is optional)."""
    token = own_token("plain-client")
    result = explain(own_stack, token, "/claims/1", tmp_path, capsys)
    assert result.line("claim email_verified") == (
        "claim email_verified  FAIL  token: (absent)  required (presence only)"
    )
    assert result.line("claim tenant") == (
        'claim tenant  PASS  token: (absent)  expected one of: ["acme"] '
        "(optional: checked only when present)"
    )
    assert result.decision["reason"] == "claim_missing"
    assert_same_decision(result, through_envoy(own_stack, http, token, "/claims/1"), own_stack)


def test_optional_claim_with_a_wrong_value(
    own_stack: Stack,
    own_token: Callable[..., str],
    http: httpx.Client,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """verifyClaims with isRequired false: checked only when present. globex's tenant is."""
    token = own_token("globex-client")
    result = explain(own_stack, token, "/claims/1", tmp_path, capsys)
    assert result.line("claim email_verified") == (
        "claim email_verified  PASS  token: true  required (presence only)"
    )
    assert result.line("claim tenant") == (
        'claim tenant  FAIL  token: "globex"  expected one of: ["acme"] '
        "(optional: checked only when present)"
    )
    assert result.decision["reason"] == "claim_value_mismatch"
    assert_same_decision(result, through_envoy(own_stack, http, token, "/claims/1"), own_stack)


def test_opaque_token_is_introspected(
    own_stack: Stack,
    own_token: Callable[..., str],
    own_env: None,
    http: httpx.Client,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = own_token("acme-client", resource=OPAQUE_API)
    result = explain(own_stack, token, "/opaque/1", tmp_path, capsys)
    assert result.line("introspection").startswith('introspection  PASS  {"active": true}')
    assert (
        result.line("aud")
        == f'aud  PASS  token: ["{OPAQUE_API}"]  policy audiences: ["{OPAQUE_API}"]'
    )
    assert_same_decision(result, through_envoy(own_stack, http, token, "/opaque/1"), own_stack)


def test_inactive_opaque_token(
    own_stack: Stack,
    own_env: None,
    http: httpx.Client,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = "made-up-" + uuid.uuid4().hex
    result = explain(own_stack, token, "/opaque/1", tmp_path, capsys)
    assert result.line("introspection") == (
        'introspection  FAIL  IdP answer: {"active": false}  expected: {"active": true}'
    )
    assert result.decision["reason"] == "token_inactive"
    assert_same_decision(result, through_envoy(own_stack, http, token, "/opaque/1"), own_stack)


def test_introspection_with_refused_credentials_is_the_500(
    own_stack: Stack,
    own_token: Callable[..., str],
    own_env: None,
    http: httpx.Client,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The "500 during authentication" of the troubleshooting guide: the IdP refuses the
    introspection client's credentials; explain names the endpoint and the 401."""
    token = own_token("acme-client", resource=OPAQUE_API)
    result = explain(own_stack, token, "/bad-client/1", tmp_path, capsys)
    message = (
        f"Unexpected response from the introspection_endpoint uri: {own_stack.issuer}"
        "/token/introspection, received (401, Unauthorized)."
    )
    assert result.line("introspection") == f"introspection  FAIL  {message}"
    assert result.decision["status"] == 500 and result.decision["log"]["message"] == message
    assert_same_decision(result, through_envoy(own_stack, http, token, "/bad-client/1"), own_stack)
