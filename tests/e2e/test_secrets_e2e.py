"""No token and no client secret in any log line or exported span of the whole e2e run.

``tests/e2e/conftest.py`` runs this module after every other test of the session, and records in
``secrets_registry`` every token the ``idp`` fixture issues and every token sent through the
``gateway`` (other tests of ours add theirs). The audit reads every extauthz log (stdout and
stderr) that any e2e stack of this session wrote, and every span the session's OTLP receiver got
from Envoy and extauthz, and looks for:

* each recorded token, and for a JWT its signature alone (the part that makes it a credential);
* each client secret of the run, alone and as an HTTP Basic credential;
* anything shaped like a JWT, a ``Bearer`` or a ``Basic`` credential, whoever issued it.

It first sends a small mix of its own (an allowed JWT, an allowed opaque token that extauthz
introspects with its client secret, a forged JWT, an IdP failure) so that it never audits nothing,
and waits until those requests' spans arrived, so that everything exported before them has too.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

from tests.e2e.test_explain_e2e import OWN_STACK_ENV  # the explain stack's client secrets
from tests.otlp_receiver import ReceivedSpan
from tests.waiting import wait_until

if TYPE_CHECKING:  # the fixtures' types; conftest is never imported at run time
    from stack import Stack

    from tests.e2e.conftest import Gateway, IdP, SecretsRegistry
    from tests.otlp_receiver import OtlpReceiver

T = TypeVar("T")

# The introspecting clients of the demo IdP, each with every secret the run gave it.
INTROSPECTION_CLIENTS = ("extauthz", "extauthz-post")


def _is_basic_credential(value: str) -> bool:
    """``Basic <base64 of user:password>``, not the word Basic before a long word."""
    try:
        decoded = base64.b64decode(value.split()[-1], validate=True).decode()
    except ValueError:
        return False
    return ":" in decoded and decoded.isprintable()


# Shapes of credentials, whoever issued them: a JWS (compact form), a Bearer or Basic value.
CREDENTIAL_SHAPES: dict[str, tuple[re.Pattern[str], Callable[[str], bool]]] = {
    "JWT-shaped string": (
        re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+"),
        lambda _: True,
    ),
    "Bearer credential": (re.compile(r"Bearer\s+[A-Za-z0-9._~+/-]{20,}=*"), lambda _: True),
    "Basic credential": (re.compile(r"Basic\s+[A-Za-z0-9+/]{8,}=*"), _is_basic_credential),
}
SPAN_WAIT_SECONDS = 10.0
MIN_TOKEN_LENGTH = 8


@dataclass(frozen=True)
class Leak:
    where: str  # file and line number, or span
    what: str  # a label, never the secret itself

    def __str__(self) -> str:
        return f"{self.what} in {self.where}"


def fingerprint(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:8]


def needles(tokens: Iterable[str], client_secrets: Iterable[str]) -> dict[str, str]:
    """What must not appear, each with a label that does not reveal it."""
    found: dict[str, str] = {}
    for token in tokens:
        if len(token) < MIN_TOKEN_LENGTH:  # e.g. "x": it would match ordinary text
            continue
        found[token] = f"token {fingerprint(token)}"
        parts = token.split(".")
        if len(parts) == 3 and len(parts[2]) >= 16:
            found[parts[2]] = f"signature of token {fingerprint(token)}"
    for secret in client_secrets:
        found[secret] = f"client secret {fingerprint(secret)}"
        for client in (*INTROSPECTION_CLIENTS, secret.removesuffix("-secret")):
            basic = base64.b64encode(f"{client}:{secret}".encode()).decode()
            found[basic] = f"Basic credential {client}:<secret {fingerprint(secret)}>"
    return found


def find_leaks(haystacks: Mapping[str, str], forbidden: Mapping[str, str]) -> list[Leak]:
    leaks = []
    for where, text in haystacks.items():
        for value, label in forbidden.items():
            if value in text:
                leaks.append(Leak(where, label))
        for label, (shape, really) in CREDENTIAL_SHAPES.items():
            if any(really(match.group()) for match in shape.finditer(text)):
                leaks.append(Leak(where, label))
    return leaks


def log_lines(paths: Iterable[Path]) -> dict[str, str]:
    """Every line of these files, keyed by file and line number."""
    lines = {}
    for path in paths:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            lines[f"{path}:{number}"] = line
    return lines


def span_texts(spans: Iterable[ReceivedSpan]) -> dict[str, str]:
    """Each span's name, attributes and events (keys and values), as text."""
    return {
        f"span {s.service} {s.name!r} {s.trace_id}/{s.span_id}": repr(
            (s.name, s.attributes, s.events)
        )
        for s in spans
    }


# -- the audit can find what it looks for ----------------------------------------------------------


def test_the_audit_finds_planted_tokens_and_secrets(tmp_path: Path) -> None:
    """The same functions the audit uses report a token, a JWT's signature, a secret, a Basic
    credential and an unregistered JWT, in a log file and in a span's attributes and events."""
    jwt_like = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"
    opaque = secrets.token_urlsafe(32)
    forbidden = needles([jwt_like, opaque], ["acme-client-secret"])
    log = tmp_path / "planted.log"  # not named like a stack's log: the audit below reads those
    log.write_text(
        '{"event": "access", "requestId": "r1"}\n'
        f'{{"event": "x", "detail": "{opaque}"}}\n'
        '{"event": "y", "sig": "c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"}\n'
        '{"event": "z", "note": "acme-client-secret"}\n'
        '{"event": "w", "message": "Basic authentication with client_secret_basic failed"}\n'
    )
    basic = base64.b64encode(b"extauthz:acme-client-secret").decode()
    span = ReceivedSpan(
        service="extauthz",
        name="idp.introspection",
        trace_id="1" * 32,
        span_id="2" * 16,
        parent_span_id="",
        kind=3,
        attributes={"http.request.header.authorization": [f"Basic {basic}"]},
        events=[("exception", {"exception.message": f"bad token {jwt_like}"})],
    )
    leaks = {
        str(leak) for leak in find_leaks({**log_lines([log]), **span_texts([span])}, forbidden)
    }
    where = f"{log}:"
    assert f"token {fingerprint(opaque)} in {where}2" in leaks
    assert f"signature of token {fingerprint(jwt_like)} in {where}3" in leaks
    assert f"client secret {fingerprint('acme-client-secret')} in {where}4" in leaks
    in_span = {leak.split(" in span ")[0] for leak in leaks if " in span " in leak}
    assert f"Basic credential extauthz:<secret {fingerprint('acme-client-secret')}>" in in_span
    assert {"Basic credential", "JWT-shaped string", f"token {fingerprint(jwt_like)}"} <= in_span
    for clean in (1, 5):  # no false alarm on a clean line, nor on the word "Basic"
        assert not any(leak.endswith(f"{where}{clean}") for leak in leaks), clean
    # And nothing of the secret itself in what a failure would print.
    assert not any(opaque in leak or "acme-client-secret" in leak for leak in leaks)


# -- the audit of the whole run (runs last) ---------------------------------------------------------


def test_no_token_or_client_secret_in_any_log_line_or_span_of_the_run(
    stack: Stack,
    idp: IdP,
    gateway: Gateway,
    otlp: OtlpReceiver,
    secrets_registry: SecretsRegistry,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # A mix of our own, so that there is always something to audit.
    jwt = idp.token("acme-client", scope="orders.read")
    opaque = idp.token("acme-client", resource="https://opaque.example.com", scope="orders.read")
    forged = jwt.rsplit(".", 1)[0] + "." + secrets.token_urlsafe(256)[:342]
    calls = {
        "allowed JWT": (gateway.request("GET", "/orders/1", token=jwt), 200),
        "allowed opaque token": (gateway.request("GET", "/opaque/1", token=opaque), 200),
        "forged JWT": (gateway.request("GET", "/orders/1", token=forged), 401),
        "IdP failure": (
            gateway.request("GET", "/idp-down/1", token=secrets.token_urlsafe(32)),
            500,
        ),
    }
    for what, (call, status) in calls.items():
        assert call.response.status_code == status, (what, call.response.text)

    # Every span those requests made arrived: Envoy's (tagged with the x-request-id) and
    # extauthz's. Both exporters send in order, so what they made earlier in the run arrived too.
    request_ids = {call.request_id for call, _ in calls.values()}

    def exported() -> list[ReceivedSpan] | None:
        spans = otlp.snapshot()
        envoy = {
            s.attributes.get("guid:x-request-id") for s in spans if s.service == "envoy-gateway"
        }
        ours = {s.attributes.get("extauthz.request_id") for s in spans if s.service == "extauthz"}
        return spans if request_ids <= envoy and request_ids <= ours else None

    spans = wait_until(
        exported, timeout=SPAN_WAIT_SECONDS, what="the audit's own spans from Envoy and extauthz"
    )

    # Every extauthz log of every e2e stack of this session (the shared one, the explain and
    # reload tests' own), waiting until the shared one wrote the access lines of our requests.
    def extauthz_logs() -> dict[str, str] | None:
        paths = sorted(tmp_path_factory.getbasetemp().glob("**/logs/extauthz*.log"))
        lines = log_lines(paths)
        logged = {rid for rid in request_ids if any(rid in line for line in lines.values())}
        return lines if stack.extauthz_log in paths and logged == request_ids else None

    lines = wait_until(
        extauthz_logs, timeout=5, what="the access lines of the audit's own requests"
    )

    client_secrets = {*secrets_registry.secrets, *OWN_STACK_ENV.values()}
    forbidden = needles(secrets_registry.tokens, client_secrets)
    assert {jwt, opaque, forged} <= secrets_registry.tokens, "the registry records what was used"
    # Envoy's ingress and egress spans and extauthz's check span, at least, for each request.
    assert len(lines) >= len(calls) and len(spans) >= 3 * len(calls)

    leaks = find_leaks({**lines, **span_texts(spans)}, forbidden)
    assert leaks == [], (
        f"{len(leaks)} leaks in {len(lines)} log lines and {len(spans)} spans, "
        f"looking for {len(secrets_registry.tokens)} tokens and {len(client_secrets)} secrets:\n"
        + "\n".join(map(str, leaks[:50]))
    )
