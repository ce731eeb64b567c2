"""DPoP proofs (RFC 9449 §4.3) and the cnf binding (RFC 9449 §6, RFC 8705 §3): an attack corpus.

Every proof is made with pyjwt from keys generated here; each case is denied with the reason and
a message that names the failed check, and never carries the proof or the token.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import jwt
import jwt.algorithms
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from extauthz.decision import Reason
from extauthz.dpop import (
    ReplayCache,
    access_token_hash,
    binding_step,
    certificate_sha256,
    jwk_thumbprint,
    proof_steps,
    remember,
    xfcc_sha256,
)

NOW = 1_800_000_000.0
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzdmMifQ.c2lnbmF0dXJl"  # the shape is all that matters
HTU = "https://api.example.com/orders/1"
ALLOWED = frozenset({"ES256", "RS256", "PS256", "EdDSA"})

EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC_JWK: dict[str, Any] = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_KEY.public_key()))
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_JWK: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key()))


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def proof(
    *,
    key: Any = EC_KEY,
    jwk: dict[str, Any] | None = None,
    alg: str = "ES256",
    typ: str | None = "dpop+jwt",
    token: str = TOKEN,
    drop: tuple[str, ...] = (),
    **claims: Any,
) -> str:
    body: dict[str, Any] = {
        "htm": "GET",
        "htu": HTU,
        "iat": int(NOW),
        "jti": str(uuid.uuid4()),
        "ath": access_token_hash(token),
    }
    body.update(claims)
    for name in drop:
        body.pop(name)
    headers: dict[str, Any] = {"jwk": EC_JWK if jwk is None else jwk}
    if typ is not None:
        headers["typ"] = typ
    return jwt.encode(body, key, algorithm=alg, headers=headers)


def run(header: str | None, *, method: str = "GET", htu: str = HTU, token: str = TOKEN,
        replay: ReplayCache | None = None, now: float = NOW) -> tuple[list[Any], Any]:
    return proof_steps(
        header, token=token, method=method, htu=htu, allowed=ALLOWED, skew=0.0, now=now,
        replay=replay if replay is not None else ReplayCache(),
    )


def denied(header: str | None, **kwargs: Any) -> tuple[str, str]:
    steps, accepted = run(header, **kwargs)
    assert accepted is None
    failed = steps[-1]
    assert failed.denial is not None and failed.denial.reason is Reason.DPOP_PROOF_INVALID
    message = failed.denial.message
    if header:
        assert header not in message and header not in repr(failed.facts)
    assert TOKEN not in message and TOKEN not in repr(failed.facts)
    return failed.name, message


def test_a_good_proof_passes_every_check() -> None:
    steps, accepted = run(proof())
    assert accepted is not None and all(s.denial is None for s in steps)
    assert [s.name for s in steps] == ["dpop", "dpop htm", "dpop htu", "dpop iat", "dpop jti", "dpop ath"]
    assert accepted.thumbprint == jwk_thumbprint(EC_JWK)


def _hs256() -> str:
    return jwt.encode({"htm": "GET", "htu": HTU, "iat": int(NOW), "jti": "x", "ath": access_token_hash(TOKEN)},
                      "secret-secret-secret-secret-1234", algorithm="HS256",
                      headers={"typ": "dpop+jwt", "jwk": {"kty": "oct", "k": b64(b"secret")}})


def _alg_none() -> str:
    head = b64(json.dumps({"typ": "dpop+jwt", "alg": "none", "jwk": EC_JWK}).encode())
    body = b64(json.dumps({"htm": "GET", "htu": HTU, "iat": int(NOW), "jti": "x"}).encode())
    return f"{head}.{body}."


def _private_jwk() -> str:
    private = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_KEY))
    return proof(jwk=private)


def _bad_signature() -> str:
    head, _body, sig = proof().split(".")
    other = proof(htm="POST").split(".")[1]
    return f"{head}.{other}.{sig}"


def _tampered_base64() -> str:
    head, body, sig = proof().split(".")
    return f"{head}.{body}+.{sig}"


CASES: dict[str, tuple[Callable[[], str | None], dict[str, Any], str, str]] = {
    # name: (make the DPoP header, run() arguments, failed step, words in the message)
    "missing DPoP header": (lambda: None, {}, "dpop", "no DPoP proof"),
    "two DPoP headers joined": (lambda: f"{proof()},{proof()}", {}, "dpop", "more than one"),
    "alg none": (_alg_none, {}, "dpop", "signature"),
    "HMAC alg": (_hs256, {}, "dpop alg", "'alg'"),
    "alg not allowed (ES384)": (
        lambda: proof(key=ec.generate_private_key(ec.SECP384R1()), alg="ES384",
                      jwk=json.loads(jwt.algorithms.ECAlgorithm.to_jwk(
                          ec.generate_private_key(ec.SECP384R1()).public_key()))),
        {}, "dpop alg", "'alg'"),
    "private jwk": (_private_jwk, {}, "dpop jwk", "private"),
    "wrong typ": (lambda: proof(typ="JWT"), {}, "dpop typ", "'typ'"),
    "no typ": (lambda: proof(typ=None), {}, "dpop typ", "'typ'"),
    "jwk of another key type than alg": (lambda: proof(jwk=RSA_JWK), {}, "dpop jwk", "ES256"),
    "jwk of another key (signature)": (
        lambda: proof(jwk=json.loads(jwt.algorithms.ECAlgorithm.to_jwk(
            ec.generate_private_key(ec.SECP256R1()).public_key()))),
        {}, "dpop signature", "signature"),
    "no jwk": (lambda: jwt.encode({"htm": "GET"}, EC_KEY, algorithm="ES256", headers={"typ": "dpop+jwt"}),
               {}, "dpop jwk", "'jwk'"),
    "bad signature": (_bad_signature, {}, "dpop signature", "signature"),
    "bad base64": (_tampered_base64, {}, "dpop", "base64url"),
    "extra dots": (lambda: proof() + ".x", {}, "dpop", "compact"),
    "missing htm": (lambda: proof(drop=("htm",)), {}, "dpop htm", "'htm'"),
    "wrong htm": (lambda: proof(htm="POST"), {}, "dpop htm", "'htm'"),
    "htu with a query": (lambda: proof(htu=HTU + "?a=1"), {}, "dpop htu", "query"),
    "htu of another host": (lambda: proof(htu="https://evil.example.com/orders/1"), {}, "dpop htu", "'htu'"),
    "htu of another path": (lambda: proof(htu="https://api.example.com/orders/2"), {}, "dpop htu", "'htu'"),
    "htu over http": (lambda: proof(htu="http://api.example.com/orders/1"), {}, "dpop htu", "'htu'"),
    "stale iat": (lambda: proof(iat=int(NOW) - 61), {}, "dpop iat", "window"),
    "future iat": (lambda: proof(iat=int(NOW) + 61), {}, "dpop iat", "window"),
    "iat not a number": (lambda: proof(iat="now"), {}, "dpop iat", "'iat'"),
    "missing jti": (lambda: proof(drop=("jti",)), {}, "dpop jti", "'jti'"),
    "wrong ath": (lambda: proof(ath=access_token_hash("another.token.x")), {}, "dpop ath", "'ath'"),
    "missing ath": (lambda: proof(drop=("ath",)), {}, "dpop ath", "'ath'"),
    "a proof for another token": (lambda: proof(token="eyJ.another.token"), {}, "dpop ath", "'ath'"),
    "too long": (lambda: proof(pad="x" * 9000), {}, "dpop", "longer"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_attack_is_denied(name: str) -> None:
    make, kwargs, step, words = CASES[name]
    failed, message = denied(make(), **kwargs)
    assert failed == step, (name, failed, message)
    assert words in message, (name, message)


def test_a_replayed_jti_is_denied() -> None:
    replay = ReplayCache()
    header = proof()
    _steps, accepted = run(header, replay=replay)
    assert accepted is not None
    assert remember(replay, accepted, 0.0)
    name, message = denied(header, replay=replay)
    assert name == "dpop jti" and "seen before" in message


def test_the_replay_memory_refuses_when_full() -> None:
    replay = ReplayCache(max_entries=1)
    _, first = run(proof(), replay=replay)
    assert remember(replay, first, 0.0)
    name, message = denied(proof(), replay=replay)
    assert name == "dpop jti" and "full" in message


def test_the_replay_memory_forgets_after_the_window() -> None:
    clock = [0.0]
    replay = ReplayCache(max_entries=1, clock=lambda: clock[0])
    header = proof()
    _, accepted = run(header, replay=replay)
    assert remember(replay, accepted, 0.0)
    clock[0] = 121.0
    assert len(replay) == 1 and not replay.full() and len(replay) == 0


def test_htu_is_compared_in_normal_form() -> None:
    assert run(proof(htu="HTTPS://API.example.com:443/orders/1"))[1] is not None
    assert run(proof(), htu="https://api.example.com:443/orders/1")[1] is not None


def test_the_failure_facts_name_what_was_compared() -> None:
    steps, _ = run(proof(htm="POST"))
    assert dict(steps[-1].facts) == {"htm": "POST", "method": "GET"}
    steps, _ = run(proof(htu="https://evil.example.com/x?secret=1"))
    facts = dict(steps[-1].facts)
    assert facts["htuExpected"] == HTU and "secret" not in repr(facts)
    steps, _ = run(proof(iat=int(NOW) - 100))
    assert dict(steps[-1].facts)["iatSkewSeconds"] == 100


def test_rsa_and_pss_proofs_pass() -> None:
    assert run(proof(key=RSA_KEY, jwk=RSA_JWK, alg="RS256"))[1] is not None
    assert run(proof(key=RSA_KEY, jwk=RSA_JWK, alg="PS256"))[1] is not None


def test_jkt_binding() -> None:
    _, accepted = run(proof())
    good = {"cnf": {"jkt": jwk_thumbprint(EC_JWK)}}
    assert binding_step(good, proof=accepted, certificate_sha256=None).denial is None
    wrong = {"cnf": {"jkt": jwk_thumbprint(RSA_JWK)}}
    step = binding_step(wrong, proof=accepted, certificate_sha256=None)
    assert step.denial is not None and step.denial.reason is Reason.TOKEN_BINDING_MISMATCH
    assert "'jkt'" in step.denial.message
    none = binding_step({}, proof=accepted, certificate_sha256=None)
    assert none.denial is not None and "no 'cnf'" in none.denial.message


def test_thumbprint_is_rfc7638() -> None:
    # RFC 7638 §3.1's example key and thumbprint.
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECP"
        "ebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY3"
        "68QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4"
        "lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def _certificate() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")])
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2040, 1, 1)).sign(key, hashes.SHA256())
    )


def test_x5t_binding_from_envoy_certificate_and_xfcc() -> None:
    from urllib.parse import quote

    cert = _certificate()
    der = cert.public_bytes(Encoding.DER)
    digest = hashlib.sha256(der).digest()
    pem = quote(cert.public_bytes(Encoding.PEM).decode(), safe="")
    assert certificate_sha256(pem) == digest
    assert certificate_sha256("not a certificate") is None
    assert xfcc_sha256(f'Hash={digest.hex()};Subject="CN=client"') == digest
    assert xfcc_sha256(f"Hash={digest.hex()},Hash={digest.hex()}") is None  # two certificates
    bound = {"cnf": {"x5t#S256": b64(digest)}}
    assert binding_step(bound, proof=None, certificate_sha256=digest).denial is None
    other = binding_step(bound, proof=None, certificate_sha256=hashlib.sha256(b"x").digest())
    assert other.denial is not None and "x5t#S256" in other.denial.message
    absent = binding_step(bound, proof=None, certificate_sha256=None)
    assert absent.denial is not None and absent.denial.reason is Reason.TOKEN_BINDING_MISMATCH


def test_now_is_real_time_in_seconds() -> None:
    # The engine passes its wall clock; a proof made now passes with the real time.
    now = time.time()
    assert run(proof(iat=int(now)), now=now)[1] is not None


@pytest.mark.parametrize(
    ("signed", "seen"),
    [
        ("https://api.example.com/orders/%7E", "https://api.example.com/orders/~"),
        ("https://api.example.com/orders/%7e", "https://api.example.com/orders/~"),
        ("https://api.example.com/orders/x/../1", "https://api.example.com/orders/1"),
        ("https://api.example.com/orders/./1", "https://api.example.com/orders/1"),
        ("https://api.example.com/orders/1/..", "https://api.example.com/orders/"),
        ("https://API.example.com:443/orders/%2f", "https://api.example.com/orders/%2F"),
    ],
)
def test_htu_is_compared_after_rfc_3986_normalization(signed: str, seen: str) -> None:
    """RFC 9449 §4.3 (RFC 3986 §6.2.2): the URL the client signed, before Envoy normalized it,
    matches the path extauthz sees."""
    steps, accepted = run(proof(htu=signed), htu=seen)
    assert accepted is not None and all(step.denial is None for step in steps), steps


@pytest.mark.parametrize(
    ("signed", "seen"),
    [
        ("https://api.example.com/orders/%2F1", "https://api.example.com/orders//1"),
        ("https://api.example.com/orders/1", "https://api.example.com/orders/2"),
        ("https://api.example.com/x/../orders/1", "https://api.example.com/x/orders/1"),
    ],
)
def test_normalization_never_makes_two_resources_one(signed: str, seen: str) -> None:
    steps, _ = run(proof(htu=signed), htu=seen)
    assert any(step.denial is not None and step.name == "dpop htu" for step in steps), steps
