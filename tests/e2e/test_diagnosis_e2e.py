"""An operator diagnoses fifteen real failures from extauthz's log alone, through the real Envoy.

A stack of its own (own ports, own demo IdP, ``tests/e2e/diagnosis_policy.yaml``), whose Envoy
gives each check 2 s, and a misbehaving IdP (``FaultyIdp``) that serves the keys from before a
rotation, a discovery document for another issuer, and introspection endpoints that hang, answer
500, answer HTML or refuse extauthz's secret. Each test sends one request as a client would and
reads back, by that request's ``x-request-id``, the ONE line (or the one ``/readyz`` entry) that
says what went wrong: both values that were compared, or the precise cause. Nothing else is
needed, neither the client's token nor a debugger. The last test greps the whole log for every
token, secret and IdP error body the module used.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import SigningKey
from tests.e2e.tokens import claims_of
from tests.integration.faulty_idp import HTML_PAGE, Fault, FaultyIdp
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

from stack import Ports, Stack, StackError, free_ports  # noqa: E402 (examples/ is not a package)

if TYPE_CHECKING:  # the fixture's type; conftest is never imported at run time
    from tests.e2e.conftest import SecretsRegistry

POLICY_TEMPLATE = Path(__file__).with_name("diagnosis_policy.yaml")
# The policy's template origins of the misbehaving IdP and of the port nothing listens on.
FAULTY_ORIGIN = "http://127.0.0.1:3998"
DEAD_ORIGIN = "http://127.0.0.1:3997"
API = "https://api.example.com"
OTHER_API = "https://other.example.com"
ELSEWHERE = "https://elsewhere.example.com"  # the issuer the wrong discovery document names
ENVOY_TIMEOUT = 2.0  # Envoy's ext_authz timeout in this stack (envoy/envoy.yaml says 3 s)
# Fresh every run: nothing secret in the repository, and nothing the log could match by chance.
RIGHT_SECRET = f"diagnosis-right-{secrets.token_hex(8)}"
WRONG_SECRET = f"diagnosis-wrong-{secrets.token_hex(8)}"
ENV = {"DIAGNOSIS_INTROSPECTION_SECRET": RIGHT_SECRET, "DIAGNOSIS_WRONG_SECRET": WRONG_SECRET}
LOG_WAIT_SECONDS = 5.0

IDP_FAILED = "authentication.idpCallFailed"
TOKEN_FAILED = "tokenAuthentication.authenticationFailed"
NO_POLICY = "routing.noMatchingPolicy"
PARSE = "Unable to parse response from Identity Provider"
UNREACHABLE = (
    "Unable to connect to the {endpoint} uri: {uri}, {kind}. Make sure that the URI is "
    "accessible from the network of the authorization service."
)
UNEXPECTED = "Unexpected response from the {endpoint} uri: {uri}, received ({status})."
JWT_SHAPED = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+")
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})")
HTML_MARKER = "IDP-BODY-MARKER"  # in the FaultyIdp's HTML page and in each of its error bodies


def sha256_prefix(token: str) -> str:
    """What a log line calls ``tokenSha256``: the first 8 hex digits of the token's SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


def basic_credential(client_id: str, secret: str) -> str:
    """RFC 7617 (the FaultyIdp also reads RFC 6749's form-urlencoded parts; these need none)."""
    return base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def parse_rfc3339(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass
class Call:
    """One request through Envoy, with the x-request-id the test chose for it."""

    request_id: str
    response: httpx.Response
    seconds: float  # as the client measured it


@dataclass
class Diagnosis:
    """The module's stack, its misbehaving IdP, and what an operator reads: the log, /readyz."""

    stack: Stack
    faulty: FaultyIdp
    http: httpx.Client
    rotated_key: SigningKey  # the key the IdP signs with since the rotation (not in its JWKS)
    old_key: SigningKey  # the key its JWKS still serves
    registry: SecretsRegistry
    tokens: set[str] = field(default_factory=set)  # every token the module sent or was issued
    short_lived: str = ""  # a demo token with a 2 s lifetime, issued as the stack came up

    def token(self, client_id: str, *, resource: str = API, scope: str = "orders.read") -> str:
        """A client_credentials token from the demo IdP (each client's secret: <id>-secret)."""
        response = self.http.post(
            f"{self.stack.issuer}/token",
            auth=(client_id, f"{client_id}-secret"),
            data={"grant_type": "client_credentials", "resource": resource, "scope": scope},
        )
        assert response.status_code == 200, response.text
        return self.remember(response.json()["access_token"])

    def signed(self, key: SigningKey) -> str:
        """A JWT of the misbehaving IdP, signed with ``key``, valid for five minutes."""
        now = int(time.time())
        claims = {"iss": self.faulty.url, "aud": API, "sub": "rotated-client", "iat": now}
        return self.remember(key.sign({**claims, "exp": now + 300}))

    def opaque(self) -> str:
        """A random opaque token (only introspection could say what it is)."""
        return self.remember(secrets.token_urlsafe(32))

    def remember(self, token: str) -> str:
        self.tokens.add(token)
        self.registry.token(token)  # the session's secrets audit looks for it too
        return token

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Call:
        request_id = str(uuid.uuid4())  # a UUID: Envoy keeps it and extauthz logs it
        sent = {"x-request-id": request_id, **(headers or {})}
        if token is not None:
            sent["authorization"] = f"Bearer {token}"
        started = time.monotonic()
        response = self.http.request(method, f"{self.stack.envoy_url}{path}", headers=sent)
        return Call(request_id, response, time.monotonic() - started)

    def line(self, call: Call, event: str) -> dict[str, Any]:
        """The request's one line with this ``event``. The access line comes after a check's
        execution line, so once it is there, every line of the check is."""

        def lines() -> list[dict[str, Any]] | None:
            mine = [
                r for r in self.stack.extauthz_log_lines() if r.get("requestId") == call.request_id
            ]
            return mine if any(r.get("event") == "access" for r in mine) else None

        mine = wait_until(
            lines, timeout=LOG_WAIT_SECONDS, what=f"the access line of {call.request_id}"
        )
        found = [r for r in mine if r.get("event") == event]
        assert len(found) == 1, (event, mine)
        return found[0]

    def lines(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.stack.extauthz_log_lines() if r.get("event") == event]

    def text(self) -> str:
        """Everything extauthz wrote, stdout and stderr."""
        logs = self.stack.log_dir
        paths = (logs / "extauthz.log", logs / "extauthz.stderr.log")
        return "".join(p.read_text(errors="replace") for p in paths if p.exists())

    def provider(self, uri: str) -> dict[str, Any]:
        """The /readyz entry of the IdP endpoint at ``uri`` (admin port)."""
        url = f"http://127.0.0.1:{self.stack.ports.extauthz_admin}/readyz"
        providers = self.http.get(url).json()["providers"]
        (entry,) = [p for p in providers if p["uri"] == uri]
        return dict(entry)


@pytest.fixture(scope="module")
def diag(
    tmp_path_factory: pytest.TempPathFactory, secrets_registry: SecretsRegistry
) -> Iterator[Diagnosis]:
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"e2e tests need {' and '.join(missing)} to run the demo IdP (examples/idp)")
    old_key = SigningKey("kid-before-rotation", "ES256", ec.generate_private_key(ec.SECP256R1()))
    rotated_key = SigningKey("kid-after-rotation", "ES256", ec.generate_private_key(ec.SECP256R1()))
    secrets_registry.secrets.update(ENV.values())
    faulty = FaultyIdp(keys=[old_key.public_jwk], clients={"extauthz": RIGHT_SECRET}, tls=False)
    with faulty:
        faulty.jwks("/rotated/jwks")
        faulty.discovery(
            "/other-issuer/.well-known/openid-configuration", jwks="/rotated/jwks", issuer=ELSEWHERE
        )
        faulty.introspection("/hang/introspect", fault=Fault.hang())
        faulty.introspection("/slow/introspect", fault=Fault.hang())
        faulty.introspection("/500/introspect", fault=Fault.status_code(500))
        faulty.introspection("/html/introspect", fault=Fault.html())
        faulty.introspection("/creds/introspect")
        (dead_port,) = free_ports(1)  # free a moment ago: nothing listens there
        # No trace export: this stack's checks are about the log.
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        with (
            Stack(
                config_template=POLICY_TEMPLATE,
                ports=Ports.free(),
                workdir=tmp_path_factory.mktemp("diagnosis-stack"),
                listen_address="127.0.0.1",
                env={**env, **ENV},
                config_replacements={
                    FAULTY_ORIGIN: faulty.url,
                    DEAD_ORIGIN: f"http://127.0.0.1:{dead_port}",
                },
                envoy_replacements={"timeout: 3s": f"timeout: {ENVOY_TIMEOUT:g}s"},
            ) as stack,
            httpx.Client(timeout=10.0) as http,
        ):
            diagnosis = Diagnosis(stack, faulty, http, rotated_key, old_key, secrets_registry)
            # Issued now, so that it has expired by the time its test runs, without a wait.
            diagnosis.short_lived = diagnosis.token("short-lived")
            yield diagnosis


def assert_denied(call: Call, status: int, reason: str) -> None:
    """What the client got: the status, the reason and its own request id, from extauthz."""
    response = call.response
    assert response.status_code == status, response.text
    assert response.headers.get("x-extauthz-reason") == reason, response.headers
    assert response.headers.get("x-request-id") == call.request_id


def assert_compared(line: dict[str, Any], token: str, reason: str, **compared: Any) -> None:
    """A token failure line: its reason, the token's hash (never the token) and both sides."""
    assert line["reason"] == reason, line
    assert line["tokenSha256"] == sha256_prefix(token), line
    assert {k: line.get(k) for k in compared} == compared, line
    assert token not in json.dumps(line)


# -- 401 and 403: what the token carried against what the policy wants ---------------------------


def test_1_issuer_with_a_trailing_slash(diag: Diagnosis) -> None:
    """The deployment trusts the demo issuer written with a trailing slash: the line shows the
    token's iss beside the configured one, one character apart."""
    token = diag.token("acme-client")
    call = diag.request("GET", "/slash/1", token=token)
    assert_denied(call, 401, "issuer_mismatch")
    line = diag.line(call, TOKEN_FAILED)
    issuer = diag.stack.issuer
    assert_compared(line, token, "issuer_mismatch", tokenIss=issuer, issuers=[f"{issuer}/"])
    assert line["message"] == "JWT token not issued by the configured issuers.", line
    assert (line["deployment"], line["route"]) == ("slash", "default"), line


def test_2_token_for_another_audience(diag: Diagnosis) -> None:
    """The client asked its token for another resource: its aud beside the audiences."""
    token = diag.token("acme-client", resource=OTHER_API)
    call = diag.request("GET", "/api/42", token=token)
    assert_denied(call, 401, "audience_mismatch")
    line = diag.line(call, TOKEN_FAILED)
    assert_compared(line, token, "audience_mismatch", tokenAud=[OTHER_API], audiences=[API])
    assert (line["deployment"], line["route"]) == ("api", "get-order"), line


def test_4_scope_not_granted(diag: Diagnosis) -> None:
    """A read-only token creating an order: 403, the scopes granted beside those required."""
    token = diag.token("acme-client", scope="orders.read")
    call = diag.request("POST", "/api", token=token)
    assert_denied(call, 403, "insufficient_scope")
    line = diag.line(call, TOKEN_FAILED)
    assert_compared(
        line,
        token,
        "insufficient_scope",
        tokenScopes=["orders.read"],
        requiredScopes=["orders.write"],
    )
    assert (line["deployment"], line["route"]) == ("api", "create-order"), line


def test_5_rotated_key(diag: Diagnosis) -> None:
    """The IdP signs with a new key its JWKS does not serve yet: the token's kid, the kids that
    JWKS holds, and which JWKS it was."""
    token = diag.signed(diag.rotated_key)
    call = diag.request("GET", "/rotated/1", token=token)
    assert_denied(call, 401, "key_not_found")
    line = diag.line(call, TOKEN_FAILED)
    assert_compared(
        line,
        token,
        "key_not_found",
        kid=diag.rotated_key.kid,
        knownKids=[diag.old_key.kid],
        jwksUri=f"{diag.faulty.url}/rotated/jwks",
    )
    assert line["message"] == f"No key matches the token's kid '{diag.rotated_key.kid}'.", line


def test_6_claim_value_mismatch_names_the_claim_not_its_value(diag: Diagnosis) -> None:
    """globex's token where tenant must be acme: the claim's name, and with logClaimValues off
    neither the token's value nor the expected ones."""
    token = diag.token("globex-client")
    call = diag.request("GET", "/api/42", token=token)
    assert_denied(call, 401, "claim_value_mismatch")
    line = diag.line(call, TOKEN_FAILED)
    assert_compared(line, token, "claim_value_mismatch", claim="tenant")
    assert "claimValue" not in line and "expectedValues" not in line, line
    text = json.dumps(line)
    assert "globex" not in text and "acme" not in text, line


@pytest.mark.parametrize(
    ("headers", "message", "found"),
    [
        pytest.param(
            lambda token: {"authorization": f"Token {token}"},
            "No token was found in the 'authorization' header: it carries a 'Token' credential,"
            " not 'Bearer'.",
            {"foundScheme": "Token"},
            id="7-wrong-scheme",
        ),
        pytest.param(
            lambda token: {"x-access-token": token},
            "No token was found in the 'authorization' header; the request has 'x-access-token'"
            " instead.",
            {"foundHeaders": ["x-access-token"]},
            id="8-another-header",
        ),
    ],
)
def test_7_8_a_token_sent_the_wrong_way(
    diag: Diagnosis, headers: Any, message: str, found: dict[str, Any]
) -> None:
    """A valid token, sent with another scheme or in another header: token_missing, and the
    message says what the request carried instead, by name, never the value."""
    token = diag.token("acme-client")
    call = diag.request("GET", "/api/42", headers=headers(token))
    assert_denied(call, 401, "token_missing")
    line = diag.line(call, TOKEN_FAILED)
    assert (line["reason"], line["message"]) == ("token_missing", message), line
    assert {k: line.get(k) for k in found} == found, line
    text = json.dumps(line)
    assert token not in text and token.split(".")[2] not in text


def test_9_no_route_of_the_deployment_matches(diag: Diagnosis) -> None:
    """DELETE under /api: the deployment was chosen, none of its routes takes that method; the
    line keeps the deployment and lists the routes it tried."""
    call = diag.request("DELETE", "/api/42", token=diag.token("acme-client"))
    assert_denied(call, 403, "no_matching_policy")
    line = diag.line(call, NO_POLICY)
    assert line["message"] == "No deployment or route policy matches DELETE /api/42.", line
    assert line["deployment"] == "api", line
    # As the routes are written, below the deployment's pathPrefix.
    assert line["routesTried"] == ["GET /{id}", "POST /"], line
    assert "nearestPrefixes" not in line, line
    assert diag.line(call, "access")["deployment"] == "api"


# -- 500 idp_call_failed: which endpoint, and exactly why ----------------------------------------


def idp_failure(diag: Diagnosis, call: Call, deployment: str, endpoint: str) -> dict[str, Any]:
    """The request's idpCallFailed line, after checking what the client got."""
    assert_denied(call, 500, "idp_call_failed")
    line = diag.line(call, IDP_FAILED)
    assert (line["reason"], line["deployment"], line["endpoint"]) == (
        "idp_call_failed",
        deployment,
        endpoint,
    ), line
    return line


def test_10_dead_port(diag: Diagnosis) -> None:
    """A JWKS URI on a port nothing listens on: CONNECTION_REFUSED with that URI."""
    token = diag.token("acme-client")
    call = diag.request("GET", "/dead/1", token=token)
    line = idp_failure(diag, call, "dead", "jwks_uri")
    uri = diag.stack.config_replacements[DEAD_ORIGIN] + "/jwks"
    assert line["uri"] == uri, line
    assert line["message"] == UNREACHABLE.format(
        endpoint="jwks_uri", uri=uri, kind="CONNECTION_REFUSED"
    ), line
    assert line["tokenSha256"] == sha256_prefix(token), line


def test_11_a_hanging_idp_is_answered_by_extauthz_within_envoys_deadline(diag: Diagnosis) -> None:
    """timeoutSeconds 5 where Envoy waits 2 s: extauthz cuts the call at the check's deadline and
    answers itself, so the client gets 500 idp_call_failed with its request id (never Envoy's
    bare 503) in under 2 s, and the policy is named once as waiting longer than Envoy does."""
    assert "timeout: 2s" in (diag.stack.workdir / "envoy.yaml").read_text()
    call = diag.request("GET", "/hang/1", token=diag.opaque())
    assert call.seconds < ENVOY_TIMEOUT, call.seconds
    line = idp_failure(diag, call, "hang", "introspection_endpoint")
    uri = f"{diag.faulty.url}/hang/introspect"
    assert (line["uri"], line["detail"]) == (uri, "the check's deadline"), line
    assert line["message"] == UNREACHABLE.format(
        endpoint="introspection_endpoint", uri=uri, kind="TIMEOUT"
    ), line
    assert diag.faulty.count("/hang/introspect") >= 1  # the call did go out, and hung

    cancelled = [
        r for r in diag.lines("server.checkCancelled") if r["requestId"] == call.request_id
    ]
    assert cancelled == [], cancelled  # Envoy did not have to give up on it

    # Once per config (at its first check), however many checks follow.
    diag.line(diag.request("GET", "/api/1"), "access")
    (warning,) = diag.lines("config.timeoutTooLong")
    assert (warning["deployment"], warning["worstCaseSeconds"]) == ("hang", 5), warning
    assert 1.5 <= warning["envoyTimeoutSeconds"] <= ENVOY_TIMEOUT, warning


def test_a_read_timeout_says_so(diag: Diagnosis) -> None:
    """timeoutSeconds 1 within Envoy's 2 s: the IdP took the request and never answered."""
    call = diag.request("GET", "/slow/1", token=diag.opaque())
    line = idp_failure(diag, call, "slow", "introspection_endpoint")
    uri = f"{diag.faulty.url}/slow/introspect"
    assert (line["uri"], line["detail"]) == (uri, "read timeout"), line
    assert 0.9 <= call.seconds < ENVOY_TIMEOUT, call.seconds


@pytest.mark.parametrize(
    ("deployment", "path", "status", "secret"),
    [
        pytest.param(
            "idp-500",
            "/500/introspect",
            "500, Internal Server Error",
            RIGHT_SECRET,
            id="12-idp-500",
        ),
        pytest.param(
            "wrong-secret",
            "/creds/introspect",
            "401, Unauthorized",
            WRONG_SECRET,
            id="14-wrong-secret",
        ),
    ],
)
def test_12_14_the_idp_answers_an_error_status(
    diag: Diagnosis, deployment: str, path: str, status: str, secret: str
) -> None:
    """The IdP's status and its standard phrase, never its error body. For the wrong secret, the
    IdP did check extauthz's credentials (client_secret_basic) and rejected the configured one."""
    call = diag.request("GET", f"/{deployment}/1", token=diag.opaque())
    line = idp_failure(diag, call, deployment, "introspection_endpoint")
    uri = f"{diag.faulty.url}{path}"
    assert line["uri"] == uri, line
    assert line["message"] == UNEXPECTED.format(
        endpoint="introspection_endpoint", uri=uri, status=status
    ), line
    assert HTML_MARKER not in json.dumps(line)
    sent = diag.faulty.requests(path)[-1].headers["authorization"]
    assert sent == f"Basic {basic_credential('extauthz', secret)}"


def test_13_the_idp_answers_html(diag: Diagnosis) -> None:
    """A login portal's page where JSON was due: the parse message, `not JSON`, and not a word of
    the page in the log."""
    call = diag.request("GET", "/html/1", token=diag.opaque())
    line = idp_failure(diag, call, "html", "introspection_endpoint")
    assert (line["message"], line["detail"]) == (PARSE, "not JSON"), line
    assert line["uri"] == f"{diag.faulty.url}/html/introspect", line
    text = diag.text()
    assert HTML_MARKER not in text and "maintenance" not in text
    assert HTML_PAGE.decode() not in text


def test_15_discovery_names_another_issuer(diag: Diagnosis) -> None:
    """The discovery document is for another issuer than the deployment's: the detail names both,
    and /readyz shows it as that endpoint's last error, with when and why."""
    uri = f"{diag.faulty.url}/other-issuer/.well-known/openid-configuration"
    detail = (
        f"issuer in the discovery document is '{ELSEWHERE}', the configured issuer is"
        f" '{diag.faulty.url}'"
    )
    before = time.time()
    call = diag.request("GET", "/other-issuer/1", token=diag.signed(diag.old_key))
    after = time.time()
    line = idp_failure(diag, call, "other-issuer", "discovery")
    assert (line["uri"], line["message"], line["detail"]) == (uri, PARSE, detail), line

    error = diag.provider(uri)["lastError"]
    assert (error["message"], error["outcome"], error["detail"]) == (
        PARSE,
        "issuer_mismatch",
        detail,
    ), error
    assert RFC3339.fullmatch(error["at"]), error
    # This check's own fetch (at millisecond precision), not an older one.
    assert diag.line(call, "access")["idpCalls"] == 1
    assert before - 0.01 <= parse_rfc3339(error["at"]) <= after + 0.01, error


# -- 401 once more: a token past its time -------------------------------------------------------


def test_3_expired_token(diag: Diagnosis) -> None:
    """The short-lived client's token, past exp and the second of skew: exp, the server's now and
    the skew, and now is past exp (by more than the skew). It runs after the IdP failures, by
    which time the token issued as the stack came up has expired: no wait in a whole run."""
    token = diag.short_lived
    exp = claims_of(token)["exp"]
    wait_until(lambda: time.time() > exp + 2, timeout=10, what="the short-lived token to expire")
    call = diag.request("GET", "/api/42", token=token)
    assert_denied(call, 401, "token_expired")
    line = diag.line(call, TOKEN_FAILED)
    assert_compared(line, token, "token_expired", exp=exp, skewSeconds=1)
    assert line["message"] == "Validation failed for 'exp' claim.", line
    assert isinstance(line["now"], int | float), line
    assert line["now"] > exp + line["skewSeconds"], line
    assert line["now"] <= time.time() + 1, line  # the server's clock, read at the check


# -- the stack's Envoy replacements ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "count"),
    [("timeout: 9s", 0), ("timeout: 1s", 4)],  # gone from the template; also connect_timeout's
)
def test_an_envoy_replacement_must_occur_exactly_once(tmp_path: Path, old: str, count: int) -> None:
    """A replacement that matches nothing, or more than the one setting meant, fails the start
    before any process runs, rather than leaving Envoy configured otherwise than the test says."""
    stack = Stack(
        config_template=POLICY_TEMPLATE,
        ports=Ports.free(),
        workdir=tmp_path,
        envoy_replacements={"timeout: 3s": "timeout: 2s", old: "timeout: 5s"},
    )
    with pytest.raises(StackError, match=re.escape(f"{old!r} {count} times")):
        stack.start()
    assert stack.returncodes() == {}
    assert not (tmp_path / "envoy.yaml").exists()


# -- what the log never holds ----------------------------------------------------------------------


def test_no_token_secret_or_idp_body_anywhere_in_the_log(diag: Diagnosis) -> None:
    """After every failure above (this test runs last in the module), the whole extauthz log holds
    none of the module's tokens (nor a JWT's signature alone, nor anything shaped like a JWT),
    no client secret (alone or as the Basic credential extauthz sent), and nothing of the IdP's
    error bodies or HTML page."""
    audited = diag.opaque()
    call = diag.request("GET", "/idp-500/audit", token=audited)
    diag.line(call, "access")  # everything before it is written too
    assert {audited, diag.short_lived} <= diag.tokens  # it never audits nothing
    text = diag.text()
    for token in diag.tokens:
        assert token not in text, f"token {sha256_prefix(token)} in the log"
        if token.count(".") == 2:
            assert token.split(".")[2] not in text, f"signature of {sha256_prefix(token)}"
    assert not JWT_SHAPED.search(text)
    # extauthz's introspection secrets, and the demo clients' that got the module its tokens.
    demo = [f"{c}-secret" for c in ("acme-client", "globex-client", "short-lived")]
    for secret in [*ENV.values(), *demo]:
        assert secret not in text, f"client secret {sha256_prefix(secret)} in the log"
        assert basic_credential("extauthz", secret) not in text
    assert HTML_MARKER not in text and "maintenance" not in text
