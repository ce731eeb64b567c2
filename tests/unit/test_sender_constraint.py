"""Sender-constrained tokens through the real Engine: DPoP (RFC 9449) and mTLS-bound (RFC 8705).

The IdP is FakeIdp; requests are built as the wires lift them (tests/check_requests.py, and the
gRPC lift itself, server.lift_request, for the client certificate).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import uuid
from typing import Any
from urllib.parse import quote

import jwt
import jwt.algorithms
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from bench.signing import SigningKey
from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from extauthz.answers import AnswerCache
from extauthz.config import Config, parse_config
from extauthz.decision import Decision, Reason, www_authenticate
from extauthz.dpop import access_token_hash, jwk_thumbprint
from extauthz.engine import CheckInput, Engine
from extauthz.server import lift_request
from extauthz.steps import Trace
from tests.check_requests import check_input, check_request
from tests.conftest import claims, self_signed
from tests.fake_idp import FakeIdp
from tests.policies import orders

HOST = "api.example.com"
URI = f"https://{HOST}/orders/42"
PROOF_KEY = ec.generate_private_key(ec.SECP256R1())
PROOF_JWK: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(PROOF_KEY.public_key()))
JKT = jwk_thumbprint(PROOF_JWK)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def config(mode: str, validation: dict[str, Any] | None = None) -> Config:
    validation = validation or {"type": "STATIC_KEYS", "keys": []}
    deployment = orders(validation, authentication={"senderConstraint": mode}, hosts=[HOST])
    return parse_config({"deployments": [deployment]})


def jwt_engine(rsa_key: SigningKey, mode: str) -> Engine:
    idp = FakeIdp([rsa_key.public_jwk])
    return idp.engine(config(mode, {"type": "REMOTE_JWKS", "uri": "https://idp.example.com/jwks"}))


def proof(token: str, *, method: str = "GET", htu: str = URI, **claims_: Any) -> str:
    body = {"htm": method, "htu": htu, "iat": int(time.time()), "jti": str(uuid.uuid4()),
            "ath": access_token_hash(token), **claims_}
    return jwt.encode(body, PROOF_KEY, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": PROOF_JWK})


def dpop_request(token: str, header: str | None, *, scheme: str = "DPoP", method: str = "GET",
                 url_scheme: str = "https") -> CheckInput:
    headers = {"authorization": f"{scheme} {token}", "x-request-id": "r"}
    if header is not None:
        headers["dpop"] = header
    req = check_input("/orders/42", method=method, host=HOST, headers=headers)
    return req._replace(scheme=url_scheme)


def check(engine: Engine, req: CheckInput) -> Decision:
    return asyncio.run(engine.check(req))


def assert_dpop_denial(d: Decision, words: str) -> None:
    assert d.reason is Reason.DPOP_PROOF_INVALID, (d.reason, d.message)
    assert words in d.message, d.message
    challenge = www_authenticate(d)
    assert challenge is not None and challenge.startswith('DPoP realm="orders", error="invalid_dpop_proof", algs="')
    assert "ES256" in challenge and "RS256" in challenge


def assert_no_credential(d: Decision, *secrets: str) -> None:
    text = d.message + repr(d.log_fields)
    for secret in secrets:
        assert secret not in text


# -- DPoP ---------------------------------------------------------------------------------------


def test_a_dpop_bound_token_with_its_proof_is_allowed(rsa_key: SigningKey) -> None:
    engine = jwt_engine(rsa_key, "DPOP")
    token = rsa_key.sign(claims(cnf={"jkt": JKT}))
    d = check(engine, dpop_request(token, proof(token)))
    assert d.allowed, d.message


def test_the_same_proof_twice_is_a_replay(rsa_key: SigningKey) -> None:
    engine = jwt_engine(rsa_key, "DPOP")
    token = rsa_key.sign(claims(cnf={"jkt": JKT}))
    header = proof(token)
    assert check(engine, dpop_request(token, header)).allowed
    d = check(engine, dpop_request(token, header))
    assert_dpop_denial(d, "'jti'")
    assert_no_credential(d, header, token)


def test_the_answer_cache_never_gives_a_dpop_answer_again(rsa_key: SigningKey) -> None:
    engine = jwt_engine(rsa_key, "DPOP")
    answers = AnswerCache(engine)
    token = rsa_key.sign(claims(cnf={"jkt": JKT}))
    header = proof(token)
    assert asyncio.run(answers.check(dpop_request(token, header))).allowed
    d = asyncio.run(answers.check(dpop_request(token, header)))
    assert d.reason is Reason.DPOP_PROOF_INVALID


@pytest.mark.parametrize(
    ("name", "make", "words"),
    [
        ("missing proof", lambda t: None, "no DPoP proof"),
        ("two proofs", lambda t: f"{proof(t)},{proof(t)}", "more than one"),
        ("wrong htm", lambda t: proof(t, method="POST"), "'htm'"),
        ("htu with query", lambda t: proof(t, htu=URI + "?x=1"), "'htu'"),
        ("htu of another host", lambda t: proof(t, htu="https://other.example.com/orders/42"), "'htu'"),
        ("stale iat", lambda t: proof(t, iat=int(time.time()) - 3600), "'iat'"),
        ("proof for another token", lambda t: proof("another.access.token"), "'ath'"),
    ],
)
def test_a_bad_proof_is_denied(rsa_key: SigningKey, name: str, make: Any, words: str) -> None:
    engine = jwt_engine(rsa_key, "DPOP")
    token = rsa_key.sign(claims(cnf={"jkt": JKT}))
    header = make(token)
    d = check(engine, dpop_request(token, header))
    assert_dpop_denial(d, words)
    assert_no_credential(d, token, *(header.split(",") if header else ()))


def test_failure_fields_name_what_was_compared(rsa_key: SigningKey) -> None:
    engine = jwt_engine(rsa_key, "DPOP")
    token = rsa_key.sign(claims(cnf={"jkt": JKT}))
    d = check(engine, dpop_request(token, proof(token, method="POST")))
    fields = dict(d.log_fields)
    assert fields["htm"] == "POST" and fields["method"] == "GET"
    d = check(engine, dpop_request(token, proof(token, htu="https://other.example.com/orders/42?q=s")))
    fields = dict(d.log_fields)
    assert fields["htuExpected"] == URI and "q=s" not in repr(fields)
    d = check(engine, dpop_request(token, proof(token, iat=int(time.time()) - 3600)))
    assert dict(d.log_fields)["iatSkewSeconds"] >= 3599


def test_a_token_bound_to_another_key_is_a_binding_mismatch(rsa_key: SigningKey) -> None:
    engine = jwt_engine(rsa_key, "DPOP")
    token = rsa_key.sign(claims(cnf={"jkt": b64(hashlib.sha256(b"other").digest())}))
    d = check(engine, dpop_request(token, proof(token)))
    assert d.reason is Reason.TOKEN_BINDING_MISMATCH and "'jkt'" in d.message
    assert www_authenticate(d) == 'Bearer realm="orders", error="invalid_token"'


def test_a_token_without_cnf_is_a_binding_mismatch(rsa_key: SigningKey) -> None:
    engine = jwt_engine(rsa_key, "DPOP")
    token = rsa_key.sign(claims())
    d = check(engine, dpop_request(token, proof(token)))
    assert d.reason is Reason.TOKEN_BINDING_MISMATCH and "'cnf'" in d.message


def test_a_dpop_bound_token_sent_as_bearer_is_refused(rsa_key: SigningKey) -> None:
    engine = jwt_engine(rsa_key, "DPOP")
    token = rsa_key.sign(claims(cnf={"jkt": JKT}))
    d = check(engine, dpop_request(token, proof(token), scheme="Bearer"))
    assert d.reason is Reason.TOKEN_BINDING_MISMATCH and "DPoP" in d.message
    d = check(jwt_engine(rsa_key, "DPOP_OR_MTLS"), dpop_request(token, None, scheme="Bearer"))
    assert d.reason is Reason.TOKEN_BINDING_MISMATCH


def test_the_dpop_scheme_is_not_a_credential_without_a_constraint(rsa_key: SigningKey) -> None:
    token = rsa_key.sign(claims(cnf={"jkt": JKT}))
    d = check(jwt_engine(rsa_key, "NONE"), dpop_request(token, proof(token)))
    assert d.reason is Reason.TOKEN_MISSING


def test_the_htu_scheme_is_the_one_envoy_saw(rsa_key: SigningKey) -> None:
    engine = jwt_engine(rsa_key, "DPOP")
    token = rsa_key.sign(claims(cnf={"jkt": JKT}))
    d = check(engine, dpop_request(token, proof(token), url_scheme="http"))
    assert d.reason is Reason.DPOP_PROOF_INVALID and "'htu'" in d.message
    # No scheme known: no URI to match, fail closed.
    d = check(engine, dpop_request(token, proof(token), url_scheme=""))
    assert d.reason is Reason.DPOP_PROOF_INVALID


def test_dpop_checks_come_before_the_claims(rsa_key: SigningKey) -> None:
    """An expired token with a bad proof: the proof is checked first."""
    engine = jwt_engine(rsa_key, "DPOP")
    token = rsa_key.sign(claims(cnf={"jkt": JKT}, exp=int(time.time()) - 3600))
    d = check(engine, dpop_request(token, proof(token, method="PUT")))
    assert d.reason is Reason.DPOP_PROOF_INVALID


def test_explain_shows_each_dpop_step(rsa_key: SigningKey) -> None:
    engine = jwt_engine(rsa_key, "DPOP")
    token = rsa_key.sign(claims(cnf={"jkt": JKT}))
    trace = Trace(keep_going=True)
    asyncio.run(engine.check(dpop_request(token, proof(token)), trace))
    names = [s.name for s in trace.steps]
    start = names.index("dpop")
    assert names[start:start + 7] == ["dpop", "dpop htm", "dpop htu", "dpop iat", "dpop jti", "dpop ath", "cnf jkt"]
    assert names.index("signature") < start < names.index("exp")


def test_an_introspected_dpop_token_is_checked_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXTAUTHZ_TEST_SECRET", "s")
    introspection = {"type": "REMOTE_INTROSPECTION", "uri": "https://idp.example.com/introspect",
                     "clientDetails": {"clientId": "c", "clientSecretEnv": "EXTAUTHZ_TEST_SECRET"}}
    idp = FakeIdp()
    idp.answer = {"active": True, "scope": "orders.read", "exp": int(time.time()) + 3600, "cnf": {"jkt": JKT}}
    engine = idp.engine(config("DPOP", introspection))
    token = "opaque-token-1"
    assert check(engine, dpop_request(token, proof(token))).allowed
    d = check(engine, dpop_request(token, proof("opaque-token-2")))
    assert d.reason is Reason.DPOP_PROOF_INVALID and "'ath'" in d.message
    idp.answer = {"active": True, "scope": "orders.read", "exp": int(time.time()) + 3600}
    d = check(idp.engine(config("DPOP", introspection)), dpop_request(token, proof(token)))
    assert d.reason is Reason.TOKEN_BINDING_MISMATCH


# -- mTLS ---------------------------------------------------------------------------------------


def _certificate() -> tuple[str, bytes]:
    cert = self_signed(ec.generate_private_key(ec.SECP256R1()), "client")
    pem = quote(cert.public_bytes(Encoding.PEM).decode(), safe="")
    return pem, hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()


def grpc_input(token: str, certificate: str) -> CheckInput:
    request = check_request("/orders/42", host=HOST, token=token, request_id="r")
    request.attributes.source.certificate = certificate
    request.attributes.request.http.scheme = "https"
    lifted, _ = lift_request(request)
    return lifted


def test_an_mtls_bound_token_with_its_certificate_is_allowed(rsa_key: SigningKey) -> None:
    pem, digest = _certificate()
    engine = jwt_engine(rsa_key, "MTLS")
    token = rsa_key.sign(claims(cnf={"x5t#S256": b64(digest)}))
    assert check(engine, grpc_input(token, pem)).allowed


def test_another_certificate_or_none_is_a_binding_mismatch(rsa_key: SigningKey) -> None:
    pem, digest = _certificate()
    other, _ = _certificate()
    engine = jwt_engine(rsa_key, "MTLS")
    token = rsa_key.sign(claims(cnf={"x5t#S256": b64(digest)}))
    d = check(engine, grpc_input(token, other))
    assert d.reason is Reason.TOKEN_BINDING_MISMATCH and "x5t#S256" in d.message
    assert www_authenticate(d) == 'Bearer realm="orders", error="invalid_token"'
    d = check(engine, grpc_input(token, ""))
    assert d.reason is Reason.TOKEN_BINDING_MISMATCH and "certificate" in d.message
    unbound = rsa_key.sign(claims())
    assert check(engine, grpc_input(unbound, pem)).reason is Reason.TOKEN_BINDING_MISMATCH


def test_the_http_wire_certificate_hash_is_compared_as_bytes(rsa_key: SigningKey) -> None:
    _, digest = _certificate()
    engine = jwt_engine(rsa_key, "MTLS")
    token = rsa_key.sign(claims(cnf={"x5t#S256": b64(digest)}))
    req = check_input("/orders/42", host=HOST, token=token)
    assert check(engine, req._replace(client_certificate_sha256=digest)).allowed
    wrong = hashlib.sha256(b"x").digest()
    assert check(engine, req._replace(client_certificate_sha256=wrong)).reason is Reason.TOKEN_BINDING_MISMATCH


def test_dpop_or_mtls_accepts_either_and_refuses_no_cnf(rsa_key: SigningKey) -> None:
    pem, digest = _certificate()
    engine = jwt_engine(rsa_key, "DPOP_OR_MTLS")
    mtls = rsa_key.sign(claims(cnf={"x5t#S256": b64(digest)}))
    assert check(engine, grpc_input(mtls, pem)).allowed
    dpop = rsa_key.sign(claims(cnf={"jkt": JKT}))
    assert check(engine, dpop_request(dpop, proof(dpop))).allowed
    bare = rsa_key.sign(claims())
    d = check(engine, grpc_input(bare, pem))
    assert d.reason is Reason.TOKEN_BINDING_MISMATCH and "'cnf'" in d.message


def test_lift_request_keeps_the_scheme_and_certificate() -> None:
    request = ext.CheckRequest()
    request.attributes.request.http.scheme = "https"
    request.attributes.source.certificate = "pem"
    lifted, _ = lift_request(request)
    assert lifted.scheme == "https" and lifted.client_certificate == "pem"
    assert lifted.client_certificate_sha256 is None


# -- on the HTTP wire: x-forwarded-proto, Host and x-forwarded-client-cert as Envoy sets them ------


def _wire_config(rsa_key: SigningKey, mode: str) -> Config:
    static = {"type": "STATIC_KEYS", "keys": [rsa_key.public_jwk]}
    return config(mode, static)


def test_dpop_on_the_http_wire(rsa_key: SigningKey) -> None:
    from tests.unit.test_http_wire import http_request, parsed, run

    token = rsa_key.sign(claims(cnf={"jkt": JKT}))
    answers: list[tuple[int, list[tuple[str, str]], bytes]] = []

    async def test(wires: Any) -> None:
        for headers in (
            {"authorization": f"DPoP {token}", "dpop": proof(token), "x-forwarded-proto": "https"},
            {"authorization": f"DPoP {token}", "dpop": proof(token)},  # no scheme: no htu
            {"authorization": f"Bearer {token}", "x-forwarded-proto": "https"},
        ):
            (raw,) = await wires.send(http_request("/orders/42", headers))
            answers.append(parsed(raw))

    run(_wire_config(rsa_key, "DPOP"), test)
    assert answers[0][0] == 200
    status, headers, _ = answers[1]
    assert status == 401 and ("x-extauthz-reason", "dpop_proof_invalid") in headers
    challenge = dict(headers)["www-authenticate"]
    assert challenge.startswith('DPoP realm="orders", error="invalid_dpop_proof", algs="')
    status, headers, _ = answers[2]
    assert status == 401 and ("x-extauthz-reason", "token_binding_mismatch") in headers


def test_mtls_on_the_http_wire(rsa_key: SigningKey) -> None:
    from tests.unit.test_http_wire import http_request, parsed, run

    _, digest = _certificate()
    token = rsa_key.sign(claims(cnf={"x5t#S256": b64(digest)}))
    statuses: list[int] = []

    async def test(wires: Any) -> None:
        for xfcc in (
            f'Hash={digest.hex()};Subject="CN=client"',
            f"Hash={hashlib.sha256(b'x').hexdigest()}",
            f"Hash={digest.hex()},Hash={digest.hex()}",
            None,
        ):
            headers = {"authorization": f"Bearer {token}"}
            if xfcc is not None:
                headers["x-forwarded-client-cert"] = xfcc
            (raw,) = await wires.send(http_request("/orders/42", headers))
            statuses.append(parsed(raw)[0])

    run(_wire_config(rsa_key, "MTLS"), test)
    assert statuses == [200, 401, 401, 401]


@pytest.mark.parametrize(("mode", "challenge"), [
    ("DPOP", 'DPoP realm="orders", algs="ES256 ES256K ES384 ES512 EdDSA PS256 PS384 PS512 RS256 RS384 RS512"'),
    ("DPOP_OR_MTLS", 'Bearer realm="orders"'),  # a Bearer token over mTLS is as welcome
])
def test_a_request_without_a_token_is_challenged_with_the_scheme_the_resource_takes(
    rsa_key: SigningKey, mode: str, challenge: str
) -> None:
    """RFC 9449 §7.1: a DPoP-only resource answers a request without credentials with the DPoP
    scheme and the proof algorithms it accepts, without an error code (RFC 6750 §3.1)."""
    decision = check(jwt_engine(rsa_key, mode), check_input("/orders/42", host=HOST, headers={"x-request-id": "r"}))
    assert decision.reason is Reason.TOKEN_MISSING
    assert www_authenticate(decision) == challenge
