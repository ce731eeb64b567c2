"""`extauthz explain` on tokens from the real oidc-provider, checked against the real server.

Each test makes one token fail one check, runs ``explain`` with the stack's rendered config and
the request's path, method and host, and asserts two things: the failing check's line shows both
values, and the decision explain prints is the one extauthz returns through Envoy for the same
token and request (status, ``x-extauthz-reason``, ``www-authenticate`` and the execution-log
message of that request's ``x-request-id``).

The request can also be replayed as the client sent it (``--request``, a captured HTTP/1.1
request head): a credential with another scheme, in another header, or none at all, is denied
``token_missing`` by explain exactly as by the server through Envoy.

Most cases use the shared stack (``tests/e2e/policy.yaml``). A second, smaller stack started here
covers what that policy has no deployment for: ``nbf`` (a token signed with a static key generated
by the test), the presence-only and optional ``verifyClaims`` modes, and introspection.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from extauthz.cli import main
from tests.conftest import SigningKey
from tests.e2e.conftest import Call, Gateway, IdP, Logs
from tests.e2e.tokens import header_of, tamper_signature, until_expired, with_header
from tests.integration.serverproc import run_extauthz

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

from stack import Ports, Stack  # noqa: E402 (examples/ is not a package; needs the path above)

API = "https://api.example.com"
OTHER_API = "https://other.example.com"
OPAQUE_API = "https://opaque.example.com"
STATIC_ISSUER = "https://explain-e2e.example.com"
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

    @property
    def failing(self) -> list[str]:
        """The checks that FAIL, in the order shown."""
        return [c["check"] for c in self.data["checks"] if c["result"] == "FAIL"]


def token_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / f"token-{uuid.uuid4().hex}"
    path.write_text(token + "\n")
    return path


def explain_argv(stack: Stack, token_path: Path, path: str, deployment: str | None) -> list[str]:
    """`extauthz explain` on the stack's rendered config, the token in a file."""
    argv = ["explain", "--config", str(stack.workdir / "extauthz.yaml")]
    argv += ["--token-file", str(token_path), "--path", path]
    return argv + (["--deployment", deployment] if deployment is not None else [])


@dataclass
class Explainer:
    """explain as an operator runs it, and the same request through the stack's Envoy."""

    http: httpx.Client
    tmp_path: Path
    capsys: pytest.CaptureFixture[str]

    def explain(
        self, stack: Stack, token: str, path: str, *, deployment: str | None = None, offline: bool = False
    ) -> Explained:
        """`extauthz explain` for a GET of ``path`` through the stack's Envoy, once as text and once
        with --json; neither prints the token."""
        argv = explain_argv(stack, token_file(self.tmp_path, token), path, deployment)
        argv += ["--method", "GET", "--host", f"127.0.0.1:{stack.ports.envoy}"]
        argv += ["--offline"] if offline else []
        self.capsys.readouterr()
        code = main(argv)
        text = self.capsys.readouterr().out
        assert main([*argv, "--json"]) == code
        data = json.loads(self.capsys.readouterr().out)
        for part in token.split("."):
            assert part not in text and part not in json.dumps(data)  # the token is never printed
        return Explained(code, text, data)

    def replay(self, stack: Stack, head: str, deployment: str) -> Explained:
        """`extauthz explain --request FILE` on a captured request head, as text and --json;
        neither prints a header value."""
        captured = self.tmp_path / f"request-{uuid.uuid4().hex}.http"
        captured.write_text(head)
        argv = ["explain", "--config", str(stack.workdir / "extauthz.yaml")]
        argv += ["--request", str(captured), "--deployment", deployment]
        self.capsys.readouterr()
        code = main(argv)
        text = self.capsys.readouterr().out
        assert main([*argv, "--json"]) == code
        data = json.loads(self.capsys.readouterr().out)
        for line in head.splitlines()[1:]:
            value = line.partition(":")[2].strip()
            for part in value.split(" "):
                if len(part) >= 8 and not part.startswith("127.0.0.1"):
                    assert part not in text and part not in json.dumps(data)
        return Explained(code, text, data)

    def as_the_server(
        self, stack: Stack, token: str, path: str, *, deployment: str | None = None
    ) -> Explained:
        """explain's report, once the same request through Envoy got the decision it prints."""
        result = self.explain(stack, token, path, deployment=deployment)
        call = Gateway(stack.envoy_url, self.http).request("GET", path, token=token)
        assert_same_decision(result, call, Logs(stack))
        return result


@pytest.fixture
def explainer(http: httpx.Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Explainer:
    return Explainer(http, tmp_path, capsys)


def assert_same_decision(result: Explained, call: Call, logs: Logs) -> None:
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
    line = logs.find(call.request_id, d["log"]["event"])
    for field, value in d["log"].items():  # reason, message, and e.g. endpoint
        # `now` is the instant each check ran: the server's and explain's are not the same one.
        if field not in ("event", "now"):
            assert line[field] == value, (field, line)
    if "now" in d["log"]:
        assert abs(line["now"] - d["log"]["now"]) < 60, line
    # ...and the text report says the same.
    assert result.line("decision").startswith("decision  DENY  ")
    assert result.line("status") == f"status  {d['status']}"
    assert result.line("reason") == f"reason  {d['reason']}"
    assert (
        result.line("www-authenticate") == f"www-authenticate  {d['wwwAuthenticate'] or '(none)'}"
    )
    log = result.line("log")
    assert log.startswith(f"log  {d['log']['event']}") and log.endswith(f": {d['log']['message']}")


# -- the shared stack (tests/e2e/policy.yaml) -----------------------------------------------------


@pytest.fixture(scope="module")
def expired(idp: IdP) -> str:
    """One short-lived acme token (2 s lifetime), waited on until its exp is a second past."""
    return until_expired(idp.token("short-lived", scope="orders.read"))


# (client, resource, scope, the failing check, its line, what the decision says, every FAIL)
ONE_FAILING_CHECK = [
    pytest.param(
        "acme-client", OTHER_API, "orders.read", "aud",
        f'aud  FAIL  token: ["{OTHER_API}"]  policy audiences: ["{API}"]',
        {"reason": "audience_mismatch"}, ["aud"],
        id="aud-a-genuine-token-for-another-api",
    ),
    pytest.param(
        "globex-client", API, "orders.read", "claim tenant",
        'claim tenant  FAIL  token: "globex"  expected one of: ["acme"] (required)',
        {"reason": "claim_value_mismatch"}, None,
        id="claim-value-mismatch-globex-is-not-acme",
    ),
    pytest.param(
        "plain-client", API, "orders.read", "claim tenant",
        'claim tenant  FAIL  token: (absent)  expected one of: ["acme"] (required)',
        {"reason": "claim_missing"}, None,
        id="required-claim-missing-plain-client-has-no-tenant",
    ),
    pytest.param(
        "acme-client", API, "orders.write", "scope",
        'scope  FAIL  token: ["orders.write"]  route requires any of: ["orders.read"]',
        {"wwwAuthenticate": 'Bearer realm="orders", error="insufficient_scope", scope="orders.read"'},
        None,
        id="scope-get-order-needs-orders-read",
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("client", "resource", "scope", "check", "shown", "decided", "failing"), ONE_FAILING_CHECK
)
def test_one_failing_check_is_shown_with_both_values(
    stack: Stack,
    idp: IdP,
    explainer: Explainer,
    client: str,
    resource: str,
    scope: str,
    check: str,
    shown: str,
    decided: dict[str, str],
    failing: list[str] | None,
) -> None:
    """A genuine token that fails one check of the orders deployment (GET /orders/42): the check's
    line shows the token's value and the policy's, and the decision is the server's."""
    token = idp.token(client, resource=resource, scope=scope)
    result = explainer.as_the_server(stack, token, "/orders/42", deployment="orders")
    assert result.line(check) == shown
    if failing is not None:
        assert result.failing == failing
    assert {key: result.decision[key] for key in decided} == decided


def test_iss(stack: Stack, idp: IdP, explainer: Explainer) -> None:
    token = idp.token("acme-client")
    result = explainer.as_the_server(stack, token, "/wrong-issuer/x")
    assert result.line("iss") == (
        f'iss  FAIL  token: "{stack.issuer}"  policy issuers: ["https://not-this-idp.example.com"]'
    )
    assert result.decision["reason"] == "issuer_mismatch"


def test_exp(stack: Stack, expired: str, explainer: Explainer) -> None:
    result = explainer.as_the_server(stack, expired, "/orders/42", deployment="orders")
    line = result.line("exp")
    assert line.startswith("exp  FAIL  20") and "Z, expired " in line and "(skew 0s, now " in line
    assert result.decision["reason"] == "token_expired"


def test_exp_within_clock_skew(stack: Stack, expired: str, explainer: Explainer) -> None:
    """The same expired token where maxClockSkewInSeconds is 60: PASS, saying it is the skew."""
    result = explainer.as_the_server(stack, expired, "/skew/anything")
    line = result.line("exp")
    assert line.startswith("exp  PASS  20") and line.endswith("ago, within the skew of 60s")


def test_signature(stack: Stack, idp: IdP, explainer: Explainer) -> None:
    token = tamper_signature(idp.token("acme-client", scope="orders.read"))
    result = explainer.as_the_server(stack, token, "/orders/42", deployment="orders")
    assert result.line("kid").startswith("kid  PASS  token kid: ")
    assert result.line("signature").startswith("signature  FAIL  JWT signature verification failed")
    assert result.failing == ["signature"]
    assert "WITHOUT a verified signature" in result.text  # the claims below are still shown


def test_unknown_kid(stack: Stack, idp: IdP, explainer: Explainer) -> None:
    """A kid the IdP's JWKS does not have (as after a key rotation): key_not_found, with the
    kids the JWKS does have."""
    genuine = idp.token("acme-client", scope="orders.read")
    real_kid = header_of(genuine)["kid"]
    token = with_header(genuine, kid="rotated-away")
    result = explainer.as_the_server(stack, token, "/orders/42", deployment="orders")
    assert result.line("kid").startswith(
        f'kid  FAIL  token kid: "rotated-away"  known kids: ["{real_kid}"]'
    )
    assert result.decision["reason"] == "key_not_found"


def test_valid_token_is_allowed(stack: Stack, idp: IdP, explainer: Explainer) -> None:
    token = idp.token("acme-client", scope="orders.read")
    result = explainer.as_the_server(stack, token, "/orders/42", deployment="orders")
    assert result.failing == []
    assert result.decision["upstreamHeaders"] == {
        "x-auth-subject": "acme-client",
        "x-auth-tenant": "acme",
    }


def test_offline_says_the_signature_was_not_checked(
    stack: Stack, idp: IdP, explainer: Explainer
) -> None:
    """--offline with remote keys: the same failing line, the decision marked inexact."""
    token = idp.token("acme-client", resource=OTHER_API, scope="orders.read")
    result = explainer.explain(stack, token, "/orders/42", deployment="orders", offline=True)
    assert result.code == 1
    checks = {c["check"]: c["result"] for c in result.data["checks"]}
    assert (checks["kid"], checks["signature"], checks["aud"]) == ("SKIP", "SKIP", "FAIL")
    assert result.decision["exact"] is False
    assert "WITHOUT the signature check" in result.decision["note"]
    assert result.decision["reason"] == "audience_mismatch"


# The request as the client sent it: (id, its headers; "{token}" is a valid orders.read JWT).
AS_SENT = [
    pytest.param({"Authorization": "Token {token}"}, id="another-scheme"),
    pytest.param({"Authorization": "Basic YWNtZTpzZWNyZXQ="}, id="basic"),
    pytest.param({"Authorization": "{token}"}, id="bare-token-without-scheme"),
    pytest.param({"X-Access-Token": "{token}"}, id="another-header"),
    pytest.param({}, id="no-credential"),
    pytest.param({"Authorization": "Bearer {token}"}, id="bearer-allowed"),
]


@pytest.mark.parametrize("headers", AS_SENT)
def test_a_request_replayed_as_sent_gets_the_servers_answer(
    stack: Stack, idp: IdP, explainer: Explainer, headers: dict[str, str]
) -> None:
    """The request through Envoy, then its head, as the client sent it, to `explain --request`:
    the same decision (status, reason, www-authenticate, log line)."""
    token = idp.token("acme-client", scope="orders.read")
    sent = {name: value.format(token=token) for name, value in headers.items()}
    call = Gateway(stack.envoy_url, explainer.http).request("GET", "/orders/42", headers=sent)
    host = f"127.0.0.1:{stack.ports.envoy}"
    lines = ["GET /orders/42 HTTP/1.1", f"Host: {host}", f"X-Request-Id: {call.request_id}"]
    lines += [f"{name}: {value}" for name, value in sent.items()]
    result = explainer.replay(stack, "\r\n".join(lines) + "\r\n\r\n", "orders")
    assert_same_decision(result, call, Logs(stack))
    allowed = "Authorization" in headers and headers["Authorization"].startswith("Bearer ")
    assert result.decision["allowed"] is allowed
    if not allowed:
        assert result.decision["reason"] == "token_missing"
        assert result.data["token"] is None
        assert result.failing == ["token"]


def test_explain_runs_as_a_command(stack: Stack, idp: IdP, tmp_path: Path) -> None:
    """`python -m extauthz explain` as an operator runs it: exit 1 for a denial."""
    token = idp.token("acme-client", resource=OTHER_API, scope="orders.read")
    argv = explain_argv(stack, token_file(tmp_path, token), "/orders/42", "orders")
    done = run_extauthz(*argv)
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
def own_idp(own_stack: Stack, http: httpx.Client) -> IdP:
    return IdP(own_stack.issuer, http)


def test_nbf(own_stack: Stack, rsa_key: SigningKey, explainer: Explainer) -> None:
    """A token not valid for another five minutes (signed with the deployment's static key)."""
    now = int(time.time())
    early = {"iss": STATIC_ISSUER, "aud": API, "sub": "early", "iat": now, "nbf": now + 300}
    token = rsa_key.sign({**early, "exp": now + 900})
    result = explainer.as_the_server(own_stack, token, "/static/x")
    assert re.fullmatch(
        r"nbf  FAIL  \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ, valid in (4m5\ds|5m) \(skew 0s, now \S+Z\)",
        result.line("nbf"),
    ), result.line("nbf")
    assert result.line("signature") == f'signature  PASS  verified with key "{rsa_key.kid}" (RS256)'
    assert result.failing == ["nbf"]
    assert result.decision["reason"] == "token_not_yet_valid"


# verifyClaims on /claims: email_verified is presence only (isRequired, no values), tenant is
# optional (isRequired false: checked only when present). (client, email_verified line, tenant
# line, reason)
CLAIM_MODES = [
    pytest.param(
        "plain-client",
        "claim email_verified  FAIL  token: (absent)  required (presence only)",
        'claim tenant  PASS  token: (absent)  expected one of: ["acme"] '
        "(optional: checked only when present)",
        "claim_missing",
        id="presence-only-claim-absent-optional-claim-absent",
    ),
    pytest.param(
        "globex-client",
        "claim email_verified  PASS  token: true  required (presence only)",
        'claim tenant  FAIL  token: "globex"  expected one of: ["acme"] '
        "(optional: checked only when present)",
        "claim_value_mismatch",
        id="optional-claim-with-a-wrong-value",
    ),
]


@pytest.mark.parametrize(("client", "email_verified", "tenant", "reason"), CLAIM_MODES)
def test_presence_only_and_optional_claims(
    own_stack: Stack,
    own_idp: IdP,
    explainer: Explainer,
    client: str,
    email_verified: str,
    tenant: str,
    reason: str,
) -> None:
    token = own_idp.token(client, scope="orders.read")
    result = explainer.as_the_server(own_stack, token, "/claims/1")
    assert result.line("claim email_verified") == email_verified
    assert result.line("claim tenant") == tenant
    assert result.decision["reason"] == reason


def test_opaque_token_is_introspected(
    own_stack: Stack, own_idp: IdP, own_env: None, explainer: Explainer
) -> None:
    token = own_idp.token("acme-client", resource=OPAQUE_API, scope="orders.read")
    result = explainer.as_the_server(own_stack, token, "/opaque/1")
    assert result.line("introspection").startswith('introspection  PASS  {"active": true}')
    assert (
        result.line("aud")
        == f'aud  PASS  token: ["{OPAQUE_API}"]  policy audiences: ["{OPAQUE_API}"]'
    )


def test_inactive_opaque_token(own_stack: Stack, own_env: None, explainer: Explainer) -> None:
    token = "made-up-" + uuid.uuid4().hex
    result = explainer.as_the_server(own_stack, token, "/opaque/1")
    assert result.line("introspection") == (
        'introspection  FAIL  IdP answer: {"active": false}  expected: {"active": true}'
    )
    assert result.decision["reason"] == "token_inactive"


def test_introspection_with_refused_credentials_is_the_500(
    own_stack: Stack, own_idp: IdP, own_env: None, explainer: Explainer
) -> None:
    """The "500 during authentication" of the troubleshooting guide: the IdP refuses the
    introspection client's credentials; explain names the endpoint and the 401."""
    token = own_idp.token("acme-client", resource=OPAQUE_API, scope="orders.read")
    result = explainer.as_the_server(own_stack, token, "/bad-client/1")
    message = (
        f"Unexpected response from the introspection_endpoint uri: {own_stack.issuer}"
        "/token/introspection, received (401, Unauthorized)."
    )
    assert result.line("introspection") == f"introspection  FAIL  {message}"
    assert result.decision["status"] == 500 and result.decision["log"]["message"] == message
