"""Sender-constrained tokens end to end: the real oidc-provider issues DPoP-bound (RFC 9449) and
certificate-bound (RFC 8705) tokens, a real Envoy with a TLS listener that requires client
certificates passes them on, and extauthz decides, on both wires.

The PKI is a test CA (``Authority``, python ``cryptography``): Envoy's server certificate and two
client certificates, alice's and bob's. The listener's TLS settings are envoy/mtls.yaml's
``transport_socket``, its file paths pointed at the test's files, put on the listener of the
stack's Envoy (examples/stack.py, ``envoy_replacements``):

- ``grpc``: envoy/envoy.yaml, with envoy/mtls.yaml's ``include_peer_certificate: true`` (the
  check carries the client certificate in ``attributes.source.certificate``);
- ``http``: envoy/http-wire.yaml as shipped, which sets ``x-forwarded-client-cert`` (its
  ``Hash``) and forwards it with ``dpop`` and ``x-forwarded-proto``.

Both stacks share one IdP (examples/idp/server.mjs) and run tests/e2e/sender_constraint_policy.yaml.
The IdP is plain HTTP, so it reads the client certificate a token is bound to from the
``x-client-cert`` header the test sets (a demo shortcut, see server.mjs). DPoP proofs are signed
with pyjwt over an EC P-256 key from ``cryptography``; their ``htu`` is
``https://<authority><path>``, the URI the client sent the request to.

Every token, proof and client secret used here is recorded in ``secrets_registry``, and the last
test looks for them in the extauthz logs and exported spans of these stacks.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import shutil
import ssl
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from jwt.algorithms import ECAlgorithm

# envoy/mtls.yaml's certificate files, and the test file written for each.
from tests.e2e.test_envoy_examples import EXAMPLE_FILES, walk
from tests.e2e.test_secrets_e2e import find_leaks, log_lines, needles, span_texts
from tests.e2e.tokens import claims_of
from tests.integration.test_tls import Authority, Issued
from tests.waiting import stays, wait_until

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

from stack import WIRES, Ports, Stack  # noqa: E402 (examples/ is not a package; needs the path above)

if TYPE_CHECKING:  # the fixtures' types; conftest is never imported at run time
    from tests.e2e.conftest import SecretsRegistry
    from tests.otlp_receiver import OtlpReceiver

POLICY = Path(__file__).with_name("sender_constraint_policy.yaml")
MTLS_EXAMPLE = REPO / "envoy" / "mtls.yaml"
HTTP_WIRE_EXAMPLE = REPO / "envoy" / "http-wire.yaml"
# The demo IdP's sender-constrained clients and resources (examples/idp/server.mjs).
DPOP_CLIENT, MTLS_CLIENT = "dpop-client", "mtls-client"
JWT_API, OPAQUE_API = "https://bound.example.com", "https://bound-opaque.example.com"
RESOURCES = {"jwt": JWT_API, "opaque": OPAQUE_API}
CLIENT_CERT_HEADER = "x-client-cert"  # where the demo IdP reads a token request's certificate
# extauthz's introspection client secret (the policy's clientSecretEnv): the demo IdP's value.
ENV = {"E2E_INTROSPECTION_SECRET": "extauthz-secret", "OTEL_BSP_SCHEDULE_DELAY": "100"}
CLIENT_SECRETS = {f"{client}-secret" for client in (DPOP_CLIENT, MTLS_CLIENT, "extauthz")}
# Text of envoy/envoy.yaml and envoy/http-wire.yaml, each there once: the listener's filter chain,
# where the TLS transport socket goes; the gRPC wire's ext_authz setting that mtls.yaml changes.
FILTER_CHAIN = "      filter_chains:\n        - filters:\n"
PEER_CERTIFICATE = "include_peer_certificate: false"
REQUEST_ID = "generate_request_id: true\n"  # in the connection manager, where its settings go
DOWNSTREAM_TLS = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)
EXT_AUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)


def only(nodes: Iterator[dict[str, Any]]) -> dict[str, Any]:
    [node] = list(nodes)
    return node


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


# -- the client side: certificates and DPoP keys ---------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """The test CA, Envoy's server certificate and the clients' certificates, as files."""

    directory: Path
    ca: Authority
    clients: dict[str, Issued]

    def client_files(self, name: str) -> tuple[Path, Path]:
        return self.directory / f"{name}.crt", self.directory / f"{name}.key"

    def context(self, client: str | None) -> ssl.SSLContext:
        """A TLS client context that trusts the test CA and presents ``client``'s certificate
        (none for None)."""
        context = ssl.create_default_context(cafile=str(self.directory / "ca.crt"))
        if client is not None:
            cert, key = self.client_files(client)
            context.load_cert_chain(str(cert), str(key))
        return context


def certificate_header(issued: Issued) -> str:
    """The URL-encoded PEM the demo IdP reads from x-client-cert."""
    return quote(issued.cert_pem.decode("ascii"), safe="")


def certificate_sha256(issued: Issued) -> bytes:
    """SHA-256 of the certificate's DER: RFC 8705 §3.1's cnf x5t#S256 (base64url), XFCC's Hash
    (hex)."""
    return hashlib.sha256(issued.certificate.public_bytes(Encoding.DER)).digest()


@dataclass(frozen=True)
class ProofKey:
    """A DPoP key (EC P-256, proofs signed ES256 by pyjwt) and the proofs it makes."""

    private: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls) -> ProofKey:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @property
    def jwk(self) -> dict[str, str]:
        public: dict[str, str] = json.loads(ECAlgorithm.to_jwk(self.private.public_key()))
        return public

    @property
    def thumbprint(self) -> str:
        """RFC 7638: SHA-256 of the required members, sorted, no whitespace (cnf.jkt)."""
        members = {name: self.jwk[name] for name in ("crv", "kty", "x", "y")}
        canonical = json.dumps(members, separators=(",", ":"), sort_keys=True)
        return _b64url(hashlib.sha256(canonical.encode()).digest())

    def proof(self, method: str, url: str, token: str | None = None) -> str:
        """RFC 9449 §4.2: a new proof (new ``jti``) for ``method`` and ``url`` (query dropped),
        with ``ath`` when ``token`` is given."""
        claims: dict[str, Any] = {
            "htm": method,
            "htu": url.split("?", 1)[0],
            "iat": int(time.time()),
            "jti": str(uuid.uuid4()),
        }
        if token is not None:
            claims["ath"] = _b64url(hashlib.sha256(token.encode("ascii")).digest())
        headers = {"typ": "dpop+jwt", "jwk": self.jwk}
        return jwt.encode(claims, self.private, algorithm="ES256", headers=headers)


# -- the IdP and the gateway -----------------------------------------------------------------------


@dataclass
class BoundIdP:
    """The demo oidc-provider's token endpoint for the sender-constrained clients."""

    issuer: str
    http: httpx.Client
    registry: SecretsRegistry

    def _token(self, client: str, resource: str, headers: dict[str, str]) -> str:
        response = self.http.post(
            f"{self.issuer}/token",
            auth=(client, f"{client}-secret"),
            data={"grant_type": "client_credentials", "resource": resource, "scope": "orders.read"},
            headers=headers,
        )
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return self.registry.token(token)

    def dpop_token(self, key: ProofKey, resource: str) -> str:
        """A token bound to ``key`` (RFC 9449 §5: the token request carries a proof of it)."""
        proof = self.registry.token(key.proof("POST", f"{self.issuer}/token"))
        return self._token(DPOP_CLIENT, resource, {"dpop": proof})

    def certificate_token(self, client: Issued, resource: str) -> str:
        """A token bound to ``client``'s certificate (RFC 8705 §3)."""
        return self._token(MTLS_CLIENT, resource, {CLIENT_CERT_HEADER: certificate_header(client)})


@dataclass
class Gateway:
    """Envoy's TLS listener on one wire, reached with each client certificate."""

    stack: Stack
    clients: dict[str, httpx.Client]  # client certificate name → an HTTPS client presenting it
    registry: SecretsRegistry

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.stack.ports.envoy}{path}"

    def get(
        self,
        path: str,
        *,
        cert: str,
        token: str | None = None,
        scheme: str = "Bearer",
        proof: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[str, httpx.Response]:
        """GET ``path`` presenting ``cert``'s client certificate: the request id and the answer.
        The id is Envoy's: at the edge (use_remote_address) it replaces a client's x-request-id.
        A denial returns it; the upstream echoes it for an allow."""
        sent = dict(headers or {})
        if token is not None:
            sent["authorization"] = f"{scheme} {self.registry.token(token)}"
        if proof is not None:
            sent["dpop"] = self.registry.token(proof)
        answer = self.clients[cert].get(self.url(path), headers=sent)
        if answer.status_code == 200:
            return answer.json()["headers"]["x-request-id"], answer
        return answer.headers["x-request-id"], answer

    def failure_line(self, request_id: str) -> dict[str, Any]:
        """extauthz's execution line for a denied request: the one that says what failed."""

        def line() -> dict[str, Any] | None:
            for record in self.stack.extauthz_log_lines():
                if (
                    record.get("requestId") == request_id
                    and record.get("event") != "access"
                    and "reason" in record
                ):
                    return record
            return None

        found: dict[str, Any] = wait_until(line, timeout=5, what=f"the failure line {request_id}")
        return found


def denied(response: httpx.Response, reason: str) -> None:
    assert response.status_code == 401, (response.status_code, response.text)
    assert response.headers["x-extauthz-reason"] == reason, response.text


def allowed(response: httpx.Response, subject: str) -> None:
    assert response.status_code == 200, (response.status_code, response.text)
    assert response.json()["headers"]["x-auth-subject"] == subject


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("sender-pki")
    ca = Authority("extauthz sender-constraint e2e CA")
    ca.write(directory)
    ca.issue("envoy", server=True).write(directory, "server")
    clients = {name: ca.issue(name, client=True) for name in ("alice", "bob")}
    for name, issued in clients.items():
        issued.write(directory, name)
    return Pki(directory, ca, clients)


def example_listener_tls(pki: Pki) -> dict[str, Any]:
    """envoy/mtls.yaml's listener transport socket, its files the test's."""
    text = MTLS_EXAMPLE.read_text()
    for path, name in EXAMPLE_FILES.items():
        assert text.count(path) == 1, path
        text = text.replace(path, str(pki.directory / name))
    [listener] = yaml.safe_load(text)["static_resources"]["listeners"]
    [chain] = listener["filter_chains"]
    socket: dict[str, Any] = chain["transport_socket"]
    assert socket["typed_config"]["@type"] == DOWNSTREAM_TLS
    return socket


def envoy_replacements(wire: str, pki: Pki) -> dict[str, str]:
    """The stack's Envoy config of ``wire`` behind envoy/mtls.yaml's TLS listener; on the gRPC
    wire with mtls.yaml's include_peer_certificate."""
    example = yaml.safe_load(MTLS_EXAMPLE.read_text())
    manager = only(n for n in walk(example) if n.get("@type") == HCM)
    socket = json.dumps(example_listener_tls(pki))
    # The scheme of the check (htu's) is the connection's: x-forwarded-proto and an HTTP/1.1
    # :scheme at the edge, an HTTP/2 client's :scheme overwritten; else Envoy keeps a client's.
    scheme = "".join(
        f"{' ' * 16}{name}: {json.dumps(manager[name])}\n"
        for name in ("use_remote_address", "scheme_header_transformation")
    )
    replacements = {
        FILTER_CHAIN: f"      filter_chains:\n        - transport_socket: {socket}\n"
        "          filters:\n",
        REQUEST_ID: f"{REQUEST_ID}{scheme}",
    }
    if wire == "grpc":
        peer = only(n for n in walk(example) if n.get("@type") == EXT_AUTHZ)
        replacements[PEER_CERTIFICATE] = (
            f"include_peer_certificate: {json.dumps(peer['include_peer_certificate'])}"
        )
    return replacements


@pytest.fixture(scope="module")
def stacks(
    pki: Pki,
    tmp_path_factory: pytest.TempPathFactory,
    otlp: OtlpReceiver,
    secrets_registry: SecretsRegistry,
) -> Iterator[dict[str, Stack]]:
    """The gRPC wire's stack (with the IdP) and the HTTP wire's (sharing that IdP)."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        message = f"needs {' and '.join(missing)} to run the demo IdP (examples/idp)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    secrets_registry.secrets.update(CLIENT_SECRETS)
    env = {**os.environ, **ENV}
    grpc_ports = Ports.free()
    running: dict[str, Stack] = {}
    try:
        for wire in WIRES:
            ports = grpc_ports if wire == "grpc" else dataclasses.replace(
                Ports.free(), idp=grpc_ports.idp
            )  # fmt: skip
            stack = Stack(
                config_template=POLICY,
                ports=ports,
                workdir=tmp_path_factory.mktemp(f"sender-{wire}"),
                listen_address="127.0.0.1",
                env=env,
                otlp_endpoint=otlp.endpoint,
                envoy_replacements=envoy_replacements(wire, pki),
                wire=wire,
                start_idp=wire == "grpc",
            )
            stack.start()
            running[wire] = stack
        yield running
    finally:
        for stack in reversed(running.values()):
            stack.stop()


@pytest.fixture(scope="module")
def bound_idp(stacks: dict[str, Stack], secrets_registry: SecretsRegistry) -> Iterator[BoundIdP]:
    with httpx.Client(timeout=10.0) as http:
        yield BoundIdP(stacks["grpc"].issuer, http, secrets_registry)


@pytest.fixture(scope="module")
def tls_clients(pki: Pki) -> Iterator[dict[str, httpx.Client]]:
    """An HTTPS client per client certificate (alice, bob)."""
    clients = {name: httpx.Client(verify=pki.context(name), timeout=10.0) for name in pki.clients}
    try:
        yield clients
    finally:
        for client in clients.values():
            client.close()


@pytest.fixture(scope="module", params=WIRES)
def tls_gateway(
    request: pytest.FixtureRequest,
    stacks: dict[str, Stack],
    tls_clients: dict[str, httpx.Client],
    secrets_registry: SecretsRegistry,
) -> Gateway:
    return Gateway(stacks[request.param], tls_clients, secrets_registry)


@pytest.fixture(scope="module")
def dpop_key() -> ProofKey:
    return ProofKey.generate()


@pytest.fixture(scope="module")
def dpop_tokens(bound_idp: BoundIdP, dpop_key: ProofKey) -> dict[str, str]:
    """A DPoP-bound JWT and opaque token, bound to ``dpop_key``."""
    return {kind: bound_idp.dpop_token(dpop_key, resource) for kind, resource in RESOURCES.items()}


@pytest.fixture(scope="module")
def certificate_tokens(bound_idp: BoundIdP, pki: Pki) -> dict[str, str]:
    """A JWT and an opaque token bound to alice's certificate."""
    alice = pki.clients["alice"]
    return {
        kind: bound_idp.certificate_token(alice, resource) for kind, resource in RESOURCES.items()
    }


# -- what the IdP issued ---------------------------------------------------------------------


def test_the_idp_binds_tokens_to_the_proof_key_and_the_certificate(
    bound_idp: BoundIdP,
    dpop_key: ProofKey,
    pki: Pki,
    dpop_tokens: dict[str, str],
    certificate_tokens: dict[str, str],
) -> None:
    """The JWTs carry cnf.jkt (the proof key's RFC 7638 thumbprint) and cnf.x5t#S256 (alice's
    certificate's SHA-256); the introspection answers of the opaque ones carry the same cnf."""
    assert claims_of(dpop_tokens["jwt"])["cnf"] == {"jkt": dpop_key.thumbprint}
    alice = {"x5t#S256": _b64url(certificate_sha256(pki.clients["alice"]))}
    assert claims_of(certificate_tokens["jwt"])["cnf"] == alice
    for token, cnf in (
        (dpop_tokens["opaque"], {"jkt": dpop_key.thumbprint}),
        (certificate_tokens["opaque"], alice),
    ):
        assert token.count(".") != 2, "an opaque token"
        answer = bound_idp.http.post(
            f"{bound_idp.issuer}/token/introspection",
            auth=("extauthz", ENV["E2E_INTROSPECTION_SECRET"]),
            data={"token": token},
        ).json()
        assert answer["active"] is True and answer["cnf"] == cnf


# -- DPoP (RFC 9449) -----------------------------------------------------------------------------


def test_dpop_bound_jwt_with_a_fresh_proof_passes_once(
    tls_gateway: Gateway, dpop_key: ProofKey, dpop_tokens: dict[str, str]
) -> None:
    """A fresh proof for https://<authority><path> passes; the same proof again is a replay."""
    token = dpop_tokens["jwt"]
    proof = dpop_key.proof("GET", tls_gateway.url("/dpop/1"), token)
    _, first = tls_gateway.get(
        "/dpop/1?page=2", cert="alice", token=token, scheme="DPoP", proof=proof
    )
    allowed(first, DPOP_CLIENT)
    request_id, replayed = tls_gateway.get(
        "/dpop/1?page=2", cert="alice", token=token, scheme="DPoP", proof=proof
    )
    denied(replayed, "dpop_proof_invalid")
    assert replayed.headers["www-authenticate"].startswith('DPoP realm="dpop"')
    assert 'error="invalid_dpop_proof"' in replayed.headers["www-authenticate"]
    line = tls_gateway.failure_line(request_id)
    assert line["message"] == "The DPoP proof's 'jti' was seen before: a replayed proof."


def test_dpop_proof_of_another_key_is_a_binding_mismatch(
    tls_gateway: Gateway, dpop_tokens: dict[str, str]
) -> None:
    """A valid proof, but of a key the token is not bound to (RFC 9449 §6.1: cnf.jkt)."""
    token = dpop_tokens["jwt"]
    other = ProofKey.generate().proof("GET", tls_gateway.url("/dpop/1"), token)
    _, answer = tls_gateway.get("/dpop/1", cert="alice", token=token, scheme="DPoP", proof=other)
    denied(answer, "token_binding_mismatch")


def test_dpop_bound_jwt_as_bearer_without_proof_is_refused(
    tls_gateway: Gateway, dpop_tokens: dict[str, str]
) -> None:
    """RFC 9449 §7.1: a DPoP-bound token is never a bearer token."""
    _, answer = tls_gateway.get("/dpop/1", cert="alice", token=dpop_tokens["jwt"])
    denied(answer, "token_binding_mismatch")


def test_dpop_htu_is_the_https_uri_envoy_saw(
    tls_gateway: Gateway, dpop_key: ProofKey, dpop_tokens: dict[str, str]
) -> None:
    """A proof for http:// (the same authority and path) does not match a request Envoy got over
    TLS, even with the client claiming x-forwarded-proto: http (Envoy sets it from the
    connection); the failure line says which URI was expected."""
    token = dpop_tokens["jwt"]
    plain = tls_gateway.url("/dpop/1").replace("https://", "http://", 1)
    request_id, answer = tls_gateway.get(
        "/dpop/1",
        cert="alice",
        token=token,
        scheme="DPoP",
        proof=dpop_key.proof("GET", plain, token),
        headers={"x-forwarded-proto": "http"},
    )
    denied(answer, "dpop_proof_invalid")
    assert tls_gateway.failure_line(request_id)["htuExpected"] == tls_gateway.url("/dpop/1")


@pytest.mark.parametrize("called", ["/dpop/%7E", "/dpop/x/../1"])
def test_dpop_htu_of_the_url_the_client_called_before_envoy_normalized_it(
    tls_gateway: Gateway, dpop_key: ProofKey, dpop_tokens: dict[str, str], called: str
) -> None:
    """The client calls /dpop/%7E (or /dpop/x/../1) and signs that URL; Envoy forwards /dpop/~
    (/dpop/1). Both are the same URI after syntax-based normalization, which RFC 9449 §4.3 says
    a server SHOULD apply before comparing htu: the proof should pass."""
    token = dpop_tokens["jwt"]
    url = httpx.URL(tls_gateway.url("/")).copy_with(raw_path=called.encode())
    proof = tls_gateway.registry.token(dpop_key.proof("GET", tls_gateway.url(called), token))
    headers = {"authorization": f"DPoP {token}", "dpop": proof}
    answer = tls_gateway.clients["alice"].get(url, headers=headers)
    allowed(answer, DPOP_CLIENT)


def test_dpop_bound_opaque_token_is_checked_from_introspection(
    tls_gateway: Gateway, dpop_key: ProofKey, dpop_tokens: dict[str, str]
) -> None:
    """The IdP's introspection answer carries cnf.jkt: a proof of that key passes, another key's
    does not."""
    token = dpop_tokens["opaque"]
    url = tls_gateway.url("/dpop-opaque/1")
    proof = dpop_key.proof("GET", url, token)
    _, answer = tls_gateway.get(
        "/dpop-opaque/1", cert="bob", token=token, scheme="DPoP", proof=proof
    )
    allowed(answer, DPOP_CLIENT)
    other = ProofKey.generate().proof("GET", url, token)
    _, answer = tls_gateway.get(
        "/dpop-opaque/1", cert="bob", token=token, scheme="DPoP", proof=other
    )
    denied(answer, "token_binding_mismatch")


# -- certificate-bound tokens (RFC 8705) ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["jwt", "opaque"])
def test_certificate_bound_token_passes_with_its_certificate_only(
    tls_gateway: Gateway, certificate_tokens: dict[str, str], kind: str
) -> None:
    """The token bound to alice's certificate: through alice's TLS connection, 200; through
    bob's, 401 token_binding_mismatch."""
    path = "/mtls/1" if kind == "jwt" else "/mtls-opaque/1"
    token = certificate_tokens[kind]
    _, answer = tls_gateway.get(path, cert="alice", token=token)
    allowed(answer, MTLS_CLIENT)
    request_id, answer = tls_gateway.get(path, cert="bob", token=token)
    denied(answer, "token_binding_mismatch")
    assert tls_gateway.failure_line(request_id)["message"] == (
        "The token's 'cnf' 'x5t#S256' is not the client certificate's SHA-256."
    )


def test_a_client_sent_certificate_header_binds_nothing(
    tls_gateway: Gateway, pki: Pki, certificate_tokens: dict[str, str]
) -> None:
    """Bob sends alice's token with an x-forwarded-client-cert naming alice's certificate: Envoy
    replaces it (SANITIZE_SET) or drops it, and extauthz compares bob's."""
    alice = pki.clients["alice"]
    digest = certificate_sha256(alice).hex()
    forged = {"x-forwarded-client-cert": f"Hash={digest};Cert={certificate_header(alice)}"}
    _, answer = tls_gateway.get(
        "/mtls/1", cert="bob", token=certificate_tokens["jwt"], headers=forged
    )
    denied(answer, "token_binding_mismatch")


def test_either_binding_where_both_are_accepted(
    tls_gateway: Gateway,
    dpop_key: ProofKey,
    dpop_tokens: dict[str, str],
    certificate_tokens: dict[str, str],
) -> None:
    """DPOP_OR_MTLS: the DPoP-bound token with its proof, the certificate-bound one over alice's
    connection; the certificate-bound one over bob's is refused."""
    token = dpop_tokens["jwt"]
    proof = dpop_key.proof("GET", tls_gateway.url("/either/1"), token)
    _, answer = tls_gateway.get("/either/1", cert="bob", token=token, scheme="DPoP", proof=proof)
    allowed(answer, DPOP_CLIENT)
    _, answer = tls_gateway.get("/either/1", cert="alice", token=certificate_tokens["jwt"])
    allowed(answer, MTLS_CLIENT)
    _, answer = tls_gateway.get("/either/1", cert="bob", token=certificate_tokens["jwt"])
    denied(answer, "token_binding_mismatch")


def test_no_client_certificate_no_request(tls_gateway: Gateway, pki: Pki) -> None:
    """The listener requires a client certificate: without one the handshake fails, and
    extauthz is never asked."""
    path = f"/mtls/{uuid.uuid4()}"
    with (
        httpx.Client(verify=pki.context(None), timeout=10.0) as anonymous,
        pytest.raises(httpx.TransportError),
    ):
        anonymous.get(tls_gateway.url(path))
    stays(
        lambda: all(r.get("path") != path for r in tls_gateway.stack.extauthz_log_lines()),
        seconds=0.5,
        what="no log line for the request",
    )


# -- the shipped Envoy configs say what the tests run --------------------------------------------


def test_the_examples_forward_what_sender_constrained_tokens_need() -> None:
    """envoy/mtls.yaml requires client certificates from a CA, sends the certificate in the
    check and makes the scheme the connection's; envoy/http-wire.yaml sets x-forwarded-client-cert and forwards it, dpop and
    x-forwarded-proto."""
    mtls = yaml.safe_load(MTLS_EXAMPLE.read_text())
    tls = only(n for n in walk(mtls) if n.get("@type") == DOWNSTREAM_TLS)
    assert tls["require_client_certificate"] is True
    assert tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"]
    assert only(n for n in walk(mtls) if n.get("@type") == EXT_AUTHZ)["include_peer_certificate"]
    # The scheme of the check (htu's) is the connection's, whatever a client claims in
    # x-forwarded-proto (HTTP/1.1) or :scheme (HTTP/2).
    manager = only(n for n in walk(mtls) if n.get("@type") == HCM)
    assert manager["use_remote_address"] is True
    assert manager["scheme_header_transformation"] == {"scheme_to_overwrite": "https"}
    http_wire = yaml.safe_load(HTTP_WIRE_EXAMPLE.read_text())
    for document in (mtls, http_wire):
        assert (
            only(n for n in walk(document) if n.get("@type") == HCM)["forward_client_cert_details"]
            == "SANITIZE_SET"
        )
    ext_authz = only(n for n in walk(http_wire) if n.get("@type") == EXT_AUTHZ)
    forwarded = {p["exact"] for p in ext_authz["allowed_headers"]["patterns"]}
    assert {"dpop", "x-forwarded-proto", "x-forwarded-client-cert"} <= forwarded


# -- nothing secret in the logs and spans ----------------------------------------------------------


def test_no_token_proof_or_secret_in_the_logs_or_spans(
    stacks: dict[str, Stack],
    tls_gateway: Gateway,
    otlp: OtlpReceiver,
    secrets_registry: SecretsRegistry,
    dpop_tokens: dict[str, str],
    certificate_tokens: dict[str, str],
) -> None:
    """After every case above: no token, DPoP proof or client secret in either extauthz's log
    (stdout, stderr) or in any span exported so far."""
    # Our own last request, so that there is something to wait for.
    request_id, answer = tls_gateway.get("/mtls/1", cert="alice", token=certificate_tokens["jwt"])
    assert answer.status_code == 200

    def exported() -> list[Any] | None:
        spans = otlp.snapshot()
        ours = {s.attributes.get("extauthz.request_id") for s in spans if s.service == "extauthz"}
        return spans if request_id in ours else None

    spans = wait_until(exported, timeout=10, what="extauthz's span of the last request")
    paths = [
        path
        for stack in stacks.values()
        for path in (stack.extauthz_log, stack.log_dir / "extauthz.stderr.log")
        if path.exists()
    ]
    lines = log_lines(paths)
    used = {*dpop_tokens.values(), *certificate_tokens.values()}
    assert used <= secrets_registry.tokens
    leaks = find_leaks(
        {**lines, **span_texts(spans)}, needles(secrets_registry.tokens, CLIENT_SECRETS)
    )
    assert leaks == [], "\n".join(map(str, leaks[:50]))
