"""examples/dpop.py, the DPoP client the README and the demo tell users to try: what it prints is
what extauthz's own checks (extauthz.dpop) accept, and it never prints the private key.

The token request is tested with its answers given (no IdP): the proof it sends, the client's
credentials, the nonce round (RFC 9449 §8) and the refusal of a token that is not DPoP-bound.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import stat
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from extauthz.dpop import ReplayCache, binding_step, proof_steps, remember

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("dpop_example", REPO / "examples" / "dpop.py")
assert _spec is not None and _spec.loader is not None
dpop_example = importlib.util.module_from_spec(_spec)
sys.modules["dpop_example"] = dpop_example
_spec.loader.exec_module(dpop_example)

URL = "http://127.0.0.1:8080/dpop/orders/42"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJkcG9wLWNsaWVudCJ9.c2ln"  # stands for an access token
ENDPOINT = "http://127.0.0.1:3000/token"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert dpop_example.main(list(argv)) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    assert err == ""
    return out.strip()


def check(
    proof: str,
    *,
    method: str = "GET",
    htu: str = URL,
    token: str = TOKEN,
    replay: ReplayCache | None = None,
) -> tuple[list[Any], Any]:
    """extauthz's checks of one proof, as the engine runs them (skew 0, now)."""
    return proof_steps(
        proof,
        token=token,
        method=method,
        htu=htu,
        allowed=frozenset({"ES256", "RS256"}),
        skew=0.0,
        now=time.time(),
        replay=replay if replay is not None else ReplayCache(),
    )


def private_values(key_file: Path) -> list[str]:
    """The private key as it could leak: its PEM body, and its scalar as a JWK ``d``."""
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    d = key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
    pem_body = "".join(key_file.read_text().splitlines()[1:-1])
    return [pem_body, base64.urlsafe_b64encode(d).rstrip(b"=").decode()]


def test_a_printed_proof_passes_extauthz_checks_and_binds_to_the_printed_thumbprint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, token_file = tmp_path / "k.pem", tmp_path / "t"
    token_file.write_text(TOKEN + "\n")
    proof = run(
        capsys,
        "proof",
        "--key",
        str(key),
        "--method",
        "GET",
        "--url",
        URL,
        "--token-file",
        str(token_file),
    )
    jkt = run(capsys, "thumbprint", "--key", str(key))
    steps, accepted = check(proof)
    assert accepted is not None, [s for s in steps if s.denial is not None]
    assert [s.name for s in steps] == [
        "dpop",
        "dpop htm",
        "dpop htu",
        "dpop iat",
        "dpop jti",
        "dpop ath",
    ]
    assert (
        binding_step({"cnf": {"jkt": jkt}}, proof=accepted, certificate_sha256=None).denial is None
    )


def test_the_key_is_made_once_kept_0600_and_reused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "k.pem"
    first = run(capsys, "thumbprint", "--key", str(key))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert run(capsys, "thumbprint", "--key", str(key)) == first
    proof = run(capsys, "proof", "--key", str(key), "--method", "GET", "--url", URL)
    jwk = jwt.get_unverified_header(proof)["jwk"]
    assert dpop_example.thumbprint(jwk) == first


def test_it_never_prints_the_private_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, token_file = tmp_path / "k.pem", tmp_path / "t"
    token_file.write_text(TOKEN)
    printed = [
        run(capsys, "thumbprint", "--key", str(key)),
        run(
            capsys,
            "proof",
            "--key",
            str(key),
            "--method",
            "POST",
            "--url",
            URL,
            "--token-file",
            str(token_file),
        ),
    ]
    header = jwt.get_unverified_header(printed[1])
    assert set(header["jwk"]) == {"kty", "crv", "x", "y"}  # RFC 9449 §4.2: no private member
    decoded = [
        json.dumps(header),
        json.dumps(jwt.decode(printed[1], options={"verify_signature": False})),
    ]
    for secret in private_values(key):
        for text in [*printed, *decoded]:
            assert secret not in text


def test_a_file_that_is_not_an_ec_p256_key_is_refused_without_showing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "k.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    assert dpop_example.main(["thumbprint", "--key", str(key)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "bm90IGEga2V5" not in err and err.startswith("dpop.py: ")


def test_htu_has_no_query_or_fragment_and_the_proof_still_matches_the_request(
    tmp_path: Path,
) -> None:
    key = dpop_example.load_or_create_key(tmp_path / "k.pem")
    proof = dpop_example.make_proof(key, "get", URL + "?page=2#top", token=TOKEN)
    claims = jwt.decode(proof, options={"verify_signature": False})
    assert claims["htu"] == URL and claims["htm"] == "GET"
    assert check(proof)[1] is not None


def test_each_proof_is_new_and_a_replayed_one_is_refused(tmp_path: Path) -> None:
    key = dpop_example.load_or_create_key(tmp_path / "k.pem")
    replay = ReplayCache()
    proof = dpop_example.make_proof(key, "GET", URL, token=TOKEN)
    other = dpop_example.make_proof(key, "GET", URL, token=TOKEN)
    assert (
        jwt.decode(proof, options={"verify_signature": False})["jti"]
        != jwt.decode(other, options={"verify_signature": False})["jti"]
    )
    steps, accepted = check(proof, replay=replay)
    assert accepted is not None and remember(replay, accepted, 0.0)
    steps, accepted = check(proof, replay=replay)
    assert accepted is None and "seen before" in (steps[-1].denial.message)
    assert check(other, replay=replay)[1] is not None


def test_a_proof_for_another_request_or_token_is_refused(tmp_path: Path) -> None:
    key = dpop_example.load_or_create_key(tmp_path / "k.pem")
    proof = dpop_example.make_proof(key, "GET", URL, token=TOKEN)
    assert check(proof, method="POST")[0][-1].name == "dpop htm"
    assert check(proof, htu="http://127.0.0.1:8080/dpop/orders/43")[0][-1].name == "dpop htu"
    assert check(proof, token=TOKEN + "x")[0][-1].name == "dpop ath"


# -- the token request --------------------------------------------------------------------------


def header(request: urllib.request.Request, name: str) -> str:
    value = request.get_header(name)
    assert value is not None, name
    return value


class Endpoint:
    """A token endpoint's answers, in turn; records the requests."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.requests: list[urllib.request.Request] = []

    def __call__(self, request: urllib.request.Request) -> Any:
        self.requests.append(request)
        return self.answers.pop(0)

    def proof_claims(self, i: int) -> dict[str, Any]:
        proof = header(self.requests[i], "Dpop")
        assert jwt.get_unverified_header(proof)["typ"] == "dpop+jwt"
        claims: dict[str, Any] = jwt.decode(proof, options={"verify_signature": False})
        return claims


REQUEST = dpop_example.TokenRequest(
    ENDPOINT, "dpop client", "s3cret&=", "orders.read", "https://api.example.com"
)


def ok(token_type: str = "DPoP") -> Any:
    return dpop_example.Answer(200, None, {"access_token": "at", "token_type": token_type})


def test_the_token_request_carries_a_proof_for_the_token_endpoint(tmp_path: Path) -> None:
    key = dpop_example.load_or_create_key(tmp_path / "k.pem")
    endpoint = Endpoint(ok())
    assert dpop_example.request_token(key, REQUEST, send=endpoint) == "at"
    (request,) = endpoint.requests
    assert request.get_method() == "POST" and request.full_url == ENDPOINT
    claims = endpoint.proof_claims(0)
    # RFC 9449 §5: htm and htu of the token request; no ath (no access token yet), no nonce.
    assert claims["htm"] == "POST" and claims["htu"] == ENDPOINT
    assert "ath" not in claims and "nonce" not in claims
    assert check(header(request, "Dpop"), method="POST", htu=ENDPOINT)[0][-1].name == "dpop ath"
    form = dict(p.split("=", 1) for p in request.data.decode().split("&"))  # type: ignore[union-attr]
    assert form == {
        "grant_type": "client_credentials",
        "scope": "orders.read",
        "resource": "https%3A%2F%2Fapi.example.com",
    }
    # RFC 6749 §2.3.1: the id and secret are form-urlencoded before base64.
    basic = base64.b64decode(header(request, "Authorization").removeprefix("Basic "))
    assert basic == b"dpop+client:s3cret%26%3D"


def test_the_token_request_is_sent_again_with_the_servers_nonce(tmp_path: Path) -> None:
    key = dpop_example.load_or_create_key(tmp_path / "k.pem")
    endpoint = Endpoint(
        dpop_example.Answer(400, "n-1", {"error": "use_dpop_nonce"}),
        ok(),
    )
    assert dpop_example.request_token(key, REQUEST, send=endpoint) == "at"
    assert "nonce" not in endpoint.proof_claims(0)
    assert endpoint.proof_claims(1)["nonce"] == "n-1"
    assert endpoint.proof_claims(0)["jti"] != endpoint.proof_claims(1)["jti"]


def test_a_second_nonce_demand_is_an_error_not_a_loop(tmp_path: Path) -> None:
    key = dpop_example.load_or_create_key(tmp_path / "k.pem")
    nonce = dpop_example.Answer(400, "n", {"error": "use_dpop_nonce"})
    endpoint = Endpoint(nonce, nonce)
    with pytest.raises(dpop_example.DpopError, match="400 use_dpop_nonce"):
        dpop_example.request_token(key, REQUEST, send=endpoint)
    assert len(endpoint.requests) == 2


def test_a_token_that_is_not_dpop_bound_is_refused(tmp_path: Path) -> None:
    key = dpop_example.load_or_create_key(tmp_path / "k.pem")
    with pytest.raises(dpop_example.DpopError, match="not a DPoP-bound one"):
        dpop_example.request_token(key, REQUEST, send=Endpoint(ok("Bearer")))


def test_an_error_answer_names_the_error_never_the_secret(tmp_path: Path) -> None:
    key = dpop_example.load_or_create_key(tmp_path / "k.pem")
    answer = dpop_example.Answer(401, None, {"error": "invalid_client"})
    with pytest.raises(dpop_example.DpopError) as raised:
        dpop_example.request_token(key, REQUEST, send=Endpoint(answer))
    assert "invalid_client" in str(raised.value) and "s3cret" not in str(raised.value)
