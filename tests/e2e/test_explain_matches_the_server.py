"""`extauthz explain` gives the server's answer, for every reason code the e2e policy can produce.

What this proves: for a corpus of requests that covers every reason code of the decision table
that ``tests/e2e/policy.yaml`` can produce, with JWTs and opaque tokens, allowed and denied, the
real server's answer and ``extauthz explain --json``'s are the same: the HTTP status (an allow is
the upstream's 200), the ``x-extauthz-reason``, and the deployment and route extauthz's access
line names for that request id; and explain says its decision is exact (computed by the engine,
not guessed). Every request goes through the real Envoy with the shipped ``envoy/envoy.yaml``,
except a path not in normal form (``request_ambiguous``): Envoy would normalize it, so that one
goes straight over gRPC to the stack's extauthz. Each explain is a subprocess run the way an
operator runs it: the config file the stack's extauthz serves, the same environment (the
introspection client secrets), the token in a file (never on the command line), the request's
method, host and path, and ``--deployment`` exactly when Envoy's route for the path names one in
its ext_authz ``context_extensions``.

Every disagreement is collected and reported at once, as a table. Reason codes no request of the
corpus can produce are listed, with why, in ``NOT_IN_THE_CORPUS``; the policy has no deployment
that reads the token from a query parameter, so the corpus has no such request.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import yaml

from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from extauthz.decision import Reason
from tests.check_requests import check_request
from tests.conftest import SigningKey
from tests.e2e.conftest import INTROSPECTION_ENV
from tests.e2e.tokens import (
    header_of,
    opaque_token,
    revoked_token,
    tamper_signature,
    until_expired,
    with_header,
)
from tests.integration.serverproc import run_extauthz

if TYPE_CHECKING:  # the fixtures' types
    from stack import Stack

    from tests.e2e.conftest import Gateway, IdP, Logs, SecretsRegistry

API = "https://api.example.com"
OTHER_API = "https://other.example.com"
ALLOWED = "allowed"  # what a case built to be allowed is built for (an allow has no reason)
EXPLAIN_WORKERS = 6
EXPLAIN_TIMEOUT_SECONDS = 30
EXPIRY_WAIT_SECONDS = 10

# Reason codes of the decision table that no request of this corpus produces, and why.
NOT_IN_THE_CORPUS: dict[Reason, str] = {
    Reason.TOKEN_MISSING: (
        "this corpus replays tokens; requests without one (another scheme, another header, "
        "none) are replayed with explain --header and compared with the engine in "
        "tests/unit/test_explain_request.py"
    ),
    Reason.TOKEN_NOT_YET_VALID: (
        "the demo IdP's access tokens carry no nbf, and every JWT deployment of the policy trusts "
        "only the IdP's keys: a token signed here with a future nbf fails on its kid first "
        "(the 'signed by a key the IdP never published' case, key_not_found)"
    ),
    Reason.INTERNAL_ERROR: "a bug in extauthz, which no request is meant to produce",
    Reason.DPOP_PROOF_INVALID: (
        "the e2e policy has no sender-constrained deployment: the demo IdP issues no DPoP-bound "
        "tokens in this setup; the proofs are checked through the real engine, the gRPC lift "
        "and the HTTP wire in tests/unit/test_dpop.py and test_sender_constraint.py"
    ),
    Reason.TOKEN_BINDING_MISMATCH: (
        "the same: no certificate- or DPoP-bound token in this corpus; the cnf bindings are "
        "checked in tests/unit/test_sender_constraint.py"
    ),
}


# -- the corpus --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One request of the corpus, and the reason code it is built to produce."""

    name: str
    built_for: str  # a reason code, or ALLOWED
    method: str
    path: str
    token: str = field(repr=False)  # never in a repr or an assertion message
    over_grpc: bool = False  # straight to extauthz, not through Envoy

    @property
    def request(self) -> str:
        return f"{self.method} {self.path}" + (" (gRPC)" if self.over_grpc else "")


def corpus(idp: IdP, stranger_key: SigningKey) -> list[Case]:
    """Every request whose answer does not depend on waiting for a token to expire."""
    genuine = idp.token("acme-client", scope="orders.read")
    real_kid = header_of(genuine)["kid"]
    now = int(time.time())
    claims = {"iss": idp.issuer, "aud": API, "sub": "stranger", "tenant": "acme"}
    stranger = stranger_key.sign(
        {**claims, "scope": "orders.read", "iat": now, "nbf": now + 300, "exp": now + 900}
    )
    return [
        # JWTs (the orders deployment: discovery, issuer, audience, tenant, per-route scopes)
        Case("valid JWT, read route", ALLOWED, "GET", "/orders/42", genuine),
        Case("valid JWT, write route", ALLOWED, "POST", "/orders", idp.token("acme-client")),
        Case("valid JWT, public deployment", ALLOWED, "GET", "/public/hello", genuine),
        Case("valid JWT, legacy deployment", ALLOWED, "GET", "/legacy/1", genuine),
        Case("valid JWT, discovery with introspection", ALLOWED, "GET", "/discovered/a", genuine),
        Case("wrong issuer", "issuer_mismatch", "GET", "/wrong-issuer/x", genuine),
        Case(
            "token for another resource",
            "audience_mismatch",
            "GET",
            "/orders/42",
            idp.token("acme-client", resource=OTHER_API, scope="orders.read"),
        ),
        Case(
            "client without a tenant",
            "claim_missing",
            "GET",
            "/orders/42",
            idp.token("plain-client", scope="orders.read"),
        ),
        Case(
            "client of another tenant",
            "claim_value_mismatch",
            "GET",
            "/orders/42",
            idp.token("globex-client", scope="orders.read"),
        ),
        Case(
            "client of another tenant, legacy deployment",
            "claim_value_mismatch",
            "GET",
            "/legacy/1",
            idp.token("globex-client", scope="orders.read"),
        ),
        Case(
            "read-only token on the write route", "insufficient_scope", "POST", "/orders", genuine
        ),
        Case(
            "tampered signature",
            "signature_invalid",
            "GET",
            "/orders/42",
            tamper_signature(genuine),
        ),
        Case(
            "tampered signature, anonymous access allowed",
            "signature_invalid",
            "GET",
            "/public/hello",
            tamper_signature(genuine),
        ),
        Case(
            "kid the IdP's JWKS does not have",
            "key_not_found",
            "GET",
            "/orders/42",
            with_header(genuine, kid="rotated-away"),
        ),
        Case(
            "signed by a key the IdP never published, not valid for 5 minutes",
            "key_not_found",
            "GET",
            "/orders/42",
            stranger,
        ),
        Case(
            "HMAC algorithm",
            "algorithm_not_allowed",
            "GET",
            "/orders/42",
            with_header(genuine, alg="HS256"),
        ),
        Case(
            "algorithm the IdP's RS256 key cannot verify",
            "algorithm_not_allowed",
            "GET",
            "/orders/42",
            with_header(genuine, alg="PS256", kid=real_kid),
        ),
        Case("not a JWT", "token_malformed", "GET", "/orders/42", "abc.def"),
        # Opaque tokens (introspection at the demo IdP, or at one that answers 500)
        Case("active opaque token", ALLOWED, "GET", "/opaque/42", opaque_token(idp)),
        Case(
            "active opaque token, discovery with introspection",
            ALLOWED,
            "GET",
            "/discovered/c",
            opaque_token(idp),
        ),
        Case("revoked opaque token", "token_inactive", "GET", "/opaque/42", revoked_token(idp)),
        Case(
            "opaque token the IdP never issued",
            "token_inactive",
            "GET",
            "/opaque/42",
            "made-up-" + uuid.uuid4().hex,
        ),
        Case(
            "opaque token for another resource",
            "audience_mismatch",
            "GET",
            "/opaque-wrong-audience/1",
            opaque_token(idp),
        ),
        Case(
            "opaque token of another tenant",
            "claim_value_mismatch",
            "GET",
            "/opaque/1",
            opaque_token(idp, "globex-client"),
        ),
        Case(
            "read-only opaque token on the write route",
            "insufficient_scope",
            "POST",
            "/opaque",
            opaque_token(idp),
        ),
        Case(
            "introspection endpoint answers 500",
            "idp_call_failed",
            "GET",
            "/idp-down/1",
            opaque_token(idp),
        ),
        Case(
            "introspection credentials the IdP refuses",
            "idp_call_failed",
            "GET",
            "/opaque-bad-client/1",
            opaque_token(idp),
        ),
        # Routing
        Case("path no deployment covers", "no_matching_policy", "GET", "/nowhere/1", genuine),
        Case(
            "method no route of the named deployment has",
            "no_matching_policy",
            "DELETE",
            "/orders/42",
            genuine,
        ),
        Case(
            "dot segment",
            "request_ambiguous",
            "GET",
            "/public/../orders/42",
            genuine,
            over_grpc=True,
        ),
        Case("empty segment", "request_ambiguous", "GET", "/opaque//1", genuine, over_grpc=True),
    ]


def after_expiry(expired: str) -> list[Case]:
    """The requests with a token past its exp (no clock skew, and a minute of it)."""
    return [
        Case("expired JWT", "token_expired", "GET", "/orders/42", expired),
        Case("expired JWT within the clock skew", ALLOWED, "GET", "/skew/anything", expired),
    ]


# -- Envoy's routes: which deployment a path's route names ---------------------------------------


def _route_matches(match: Mapping[str, str], path: str) -> bool:
    if "path" in match:
        return path == match["path"]
    if "path_separated_prefix" in match:
        prefix = match["path_separated_prefix"]
        return path == prefix or path.startswith(prefix + "/")
    if "prefix" in match:
        return path.startswith(match["prefix"])
    raise AssertionError(f"a route match this test does not read: {dict(match)}")


def deployment_named_by_envoy(envoy_config: Path, path: str) -> str | None:
    """The ``deployment`` of the ext_authz ``context_extensions`` of Envoy's route for ``path``
    (the first route that matches, as Envoy chooses), or None when that route names none."""
    config = yaml.safe_load(envoy_config.read_text())
    (listener,) = config["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (manager,) = chain["filters"]
    (host,) = manager["typed_config"]["route_config"]["virtual_hosts"]
    for route in host["routes"]:
        if _route_matches(route["match"], path):
            ext_authz = route.get("typed_per_filter_config", {}).get(
                "envoy.filters.http.ext_authz", {}
            )
            assert not ext_authz.get("disabled"), f"{path}: Envoy's route does not check it"
            named: str | None = (
                ext_authz.get("check_settings", {}).get("context_extensions", {}).get("deployment")
            )
            return named
    raise AssertionError(f"{path}: no route of Envoy's")


# -- the two answers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerAnswer:
    request_id: str
    status: int
    reason: str | None  # x-extauthz-reason; None when allowed


@dataclass(frozen=True)
class ExplainAnswer:
    returncode: int
    decision: Mapping[str, Any]
    problem: str = ""  # what went wrong when explain gave no decision


def ask_the_server(case: Case, gateway: Gateway, extauthz: Any, host: str) -> ServerAnswer:
    """The case's request through Envoy, or straight over gRPC; the answer the client got."""
    if not case.over_grpc:
        call = gateway.request(case.method, case.path, token=case.token)
        response = call.response
        reason = response.headers.get("x-extauthz-reason")
        return ServerAnswer(call.request_id, response.status_code, reason)
    request_id = str(uuid.uuid4())
    checked = extauthz.Check(
        check_request(
            case.path, token=case.token, method=case.method, host=host, request_id=request_id
        ),
        timeout=10,
    )
    if checked.status.code == 0:
        return ServerAnswer(request_id, 200, None)
    denied = checked.denied_response
    headers = {h.header.key: h.header.value for h in denied.headers}
    return ServerAnswer(request_id, int(denied.status.code), headers.get("x-extauthz-reason"))


def run_explain(
    case: Case,
    config: Path,
    host: str,
    deployment: str | None,
    token_dir: Path,
    env: Mapping[str, str],
) -> ExplainAnswer:
    """``extauthz explain --json`` for the case's request, as a subprocess."""
    token_file = token_dir / f"{uuid.uuid4().hex}.token"
    token_file.write_text(case.token + "\n")
    token_file.chmod(0o600)
    argv = ["explain", "--config", str(config)]
    argv += ["--token-file", str(token_file), "--method", case.method, "--host", host]
    argv += ["--path", case.path, "--json"]
    if deployment is not None:
        argv += ["--deployment", deployment]
    done = run_extauthz(*argv, env=env, timeout=EXPLAIN_TIMEOUT_SECONDS)
    if case.token in done.stdout or case.token in done.stderr:
        return ExplainAnswer(done.returncode, {}, "explain printed the token")
    if done.returncode not in (0, 1):
        return ExplainAnswer(done.returncode, {}, f"exit {done.returncode}: {done.stderr.strip()}")
    try:
        decision: dict[str, Any] = json.loads(done.stdout)["decision"]
    except (ValueError, KeyError):
        return ExplainAnswer(done.returncode, {}, "no JSON decision on standard output")
    return ExplainAnswer(done.returncode, decision)


def shown(value: Any) -> str:
    return "(none)" if value in ("", None) else str(value)


def disagreements(
    case: Case, server: ServerAnswer, access: Mapping[str, Any], explained: ExplainAnswer
) -> list[tuple[str, str, str, str]]:
    """``(case, what, server, explain)`` rows where the two answers differ, and a row when the
    server's answer is not the one the case was built for (the corpus no longer covers it)."""
    rows: list[tuple[str, str, str, str]] = []

    def differ(what: str, ours: Any, theirs: Any) -> None:
        if ours != theirs:
            rows.append((case.name, what, shown(ours), shown(theirs)))

    d = explained.decision
    allowed = d.get("allowed")
    server_reason = server.reason if server.reason is not None else ALLOWED
    explain_reason = ALLOWED if allowed is True else d.get("reason")
    if server_reason != case.built_for:
        rows.append(
            (
                case.name,
                f"reason (built for {case.built_for})",
                server_reason,
                shown(explain_reason),
            )
        )
    if explained.problem:
        rows.append((case.name, "explain failed", "-", explained.problem))
        return rows
    differ("exit code", 0 if server.status == 200 else 1, explained.returncode)
    differ("status", server.status, 200 if allowed is True else d.get("status"))
    differ("reason", server_reason, explain_reason)
    differ("access line deployment", access.get("deployment"), d.get("deployment") or "")
    differ("access line route", access.get("route"), d.get("route") or "")
    differ("access line status", access.get("status"), server.status)
    differ("exact", True, d.get("exact"))
    return rows


def table(rows: list[tuple[str, str, str, str]], cases: Mapping[str, Case]) -> str:
    header = ("case", "request", "what", "server", "explain")
    lines = [(name, cases[name].request, what, ours, theirs) for name, what, ours, theirs in rows]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, tuple("-" * w for w in widths), *lines]
    )


# -- the test ------------------------------------------------------------------------------------


def test_explain_gives_the_servers_answer_for_every_reason(
    stack: Stack,
    idp: IdP,
    gateway: Gateway,
    logs: Logs,
    secrets_registry: SecretsRegistry,
    rsa_key: SigningKey,
    tmp_path: Path,
) -> None:
    # First, so that it expires while the rest of the corpus is asked.
    short_lived = idp.token("short-lived", scope="orders.read")
    config = stack.config_path or stack.workdir / "extauthz.yaml"
    envoy_config = stack.workdir / "envoy.yaml"
    host = f"127.0.0.1:{stack.ports.envoy}"  # the :authority Envoy passes on, from the Host sent
    env = INTROSPECTION_ENV  # the server's environment: the introspection client secrets

    asked: list[tuple[Case, ServerAnswer, Future[ExplainAnswer]]] = []
    with (
        grpc.insecure_channel(f"127.0.0.1:{stack.ports.extauthz}") as channel,
        ThreadPoolExecutor(EXPLAIN_WORKERS) as pool,
    ):
        extauthz = ext_grpc.AuthorizationStub(channel)  # type: ignore[no-untyped-call]

        def ask(cases: list[Case]) -> None:
            for case in cases:
                secrets_registry.token(case.token)
                answer = ask_the_server(case, gateway, extauthz, host)
                # Over gRPC the request carries no context_extensions: nothing names a deployment.
                named = (
                    None if case.over_grpc else deployment_named_by_envoy(envoy_config, case.path)
                )
                explained = pool.submit(run_explain, case, config, host, named, tmp_path, env)
                asked.append((case, answer, explained))

        ask(corpus(idp, rsa_key))
        ask(after_expiry(until_expired(short_lived, timeout=EXPIRY_WAIT_SECONDS)))
        answers = [(case, answer, explained.result()) for case, answer, explained in asked]

    cases = {case.name: case for case, _, _ in answers}
    assert len(cases) == len(answers), "two cases of the corpus have the same name"
    rows: list[tuple[str, str, str, str]] = []
    covered: set[str] = set()
    for case, answer, explained in answers:
        access = logs.find(answer.request_id, "access")
        rows += disagreements(case, answer, access, explained)
        covered.add(answer.reason or ALLOWED)
    assert not rows, (
        f"{len({row[0] for row in rows})} of {len(cases)} requests: explain and the server "
        f"disagree, or the server's answer is not the one the case was built for\n"
        f"{table(rows, cases)}"
    )

    reasons = {reason.value for reason in Reason}
    out_of_reach = {reason.value for reason in NOT_IN_THE_CORPUS}
    assert not covered & out_of_reach, (
        f"NOT_IN_THE_CORPUS is stale: {sorted(covered & out_of_reach)}"
    )
    missing = reasons - out_of_reach - covered
    assert not missing, f"no request of the corpus produced {sorted(missing)}"
    assert ALLOWED in covered, "no request of the corpus was allowed"
