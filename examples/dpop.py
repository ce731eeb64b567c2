"""A DPoP client for trying sender-constrained tokens (RFC 9449) against extauthz by hand.

    python examples/dpop.py token --key dpop-key.pem --token-endpoint URL \\
        --client-id ID --client-secret SECRET [--scope S] [--resource R] [--out FILE]
    python examples/dpop.py proof --key dpop-key.pem --method GET --url URL [--token-file FILE]
    python examples/dpop.py thumbprint --key dpop-key.pem

``token`` asks an OAuth token endpoint for a DPoP-bound access token with the
``client_credentials`` grant (RFC 6749 §4.4), sending a proof of ``--key`` (RFC 9449 §5); it
prints the access token, or writes it to ``--out`` (mode 0600). ``proof`` prints one DPoP proof
for a request (``htm``, ``htu``, ``iat``, a new ``jti`` and, with ``--token-file``, ``ath``):
a new one for every request, as extauthz refuses a proof it has seen before. ``thumbprint`` prints
the key's RFC 7638 thumbprint, the ``cnf.jkt`` a token bound to it carries. E.g.::

    python examples/dpop.py token --key k.pem --token-endpoint http://127.0.0.1:3000/token \\
        --client-id dpop-client --client-secret dpop-client-secret \\
        --scope orders.read --resource https://bound.example.com --out t
    curl -H "Authorization: DPoP $(cat t)" \\
        -H "DPoP: $(python examples/dpop.py proof --key k.pem --method GET \\
                     --url http://127.0.0.1:8080/dpop/orders/42 --token-file t)" \\
        http://127.0.0.1:8080/dpop/orders/42

The key is an EC P-256 key (proofs are ES256), made on first use and kept, unencrypted, in the
PEM file ``--key`` names (created with mode 0600): whoever reads it can use the tokens bound to
it. Nothing here prints or logs the private key. The signing and the key are pyjwt's and
cryptography's; only the standard library else (urllib for the token request).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

PROOF_TYPE = "dpop+jwt"  # RFC 9449 §4.2
PROOF_ALGORITHM = "ES256"  # RFC 7518 §3.4: ECDSA with P-256 and SHA-256
NONCE_ERROR = "use_dpop_nonce"  # RFC 9449 §8
NONCE_HEADER = "DPoP-Nonce"
TIMEOUT_SECONDS = 10.0


class DpopError(Exception):
    """What went wrong, said without the key, the secret or a token."""


# --- the key -----------------------------------------------------------------------------------


def load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The EC P-256 private key in ``path`` (PEM), made and written there (mode 0600, never
    overwriting a file) when the file does not exist."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise DpopError(f"{path} does not hold an EC P-256 private key")
        return key
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # O_EXCL: never replace a key that appeared meanwhile; 0600: the key is a credential.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def public_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    """The public half of ``key`` as a JWK (RFC 7517): what a proof's ``jwk`` header carries
    (RFC 9449 §4.2: never the private key)."""
    jwk: dict[str, str] = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    return {member: jwk[member] for member in ("kty", "crv", "x", "y")}


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638 §3: SHA-256 over the required members in lexicographic order, no whitespace;
    base64url. A token bound to the key has it as ``cnf.jkt`` (RFC 9449 §6.1)."""
    members = {m: jwk[m] for m in ("crv", "kty", "x", "y")}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


# --- the proof ---------------------------------------------------------------------------------


def access_token_hash(token: str) -> str:
    """RFC 9449 §4.2 ``ath``: base64url of the SHA-256 of the access token's ASCII."""
    return _b64url(hashlib.sha256(token.encode("ascii")).digest())


def target_uri(url: str) -> str:
    """RFC 9449 §4.2 ``htu``: the request's URI without query and fragment."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DpopError(f"not an absolute http(s) URL: {url!r}")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path or "/", "", ""))


def proof_claims(
    method: str,
    url: str,
    *,
    token: str | None = None,
    nonce: str | None = None,
    now: float | None = None,
    jti: str | None = None,
) -> dict[str, Any]:
    """The claims of one proof (RFC 9449 §4.2): ``htm``, ``htu``, ``iat``, a new ``jti``; ``ath``
    when it goes with an access token (to a resource, §7), ``nonce`` when the server gave one."""
    claims: dict[str, Any] = {
        "htm": method.upper(),
        "htu": target_uri(url),
        "iat": int(time.time() if now is None else now),
        "jti": jti or str(uuid.uuid4()),
    }
    if token is not None:
        claims["ath"] = access_token_hash(token)
    if nonce is not None:
        claims["nonce"] = nonce
    return claims


def sign_proof(key: ec.EllipticCurvePrivateKey, claims: Mapping[str, Any]) -> str:
    """The proof JWT: ``typ`` dpop+jwt, ES256, the public ``jwk`` in its header (§4.2)."""
    header = {"typ": PROOF_TYPE, "jwk": public_jwk(key)}
    return jwt.encode(dict(claims), key, algorithm=PROOF_ALGORITHM, headers=header)


def make_proof(key: ec.EllipticCurvePrivateKey, method: str, url: str, **claims: Any) -> str:
    """A new proof for one request (:func:`proof_claims`' arguments)."""
    return sign_proof(key, proof_claims(method, url, **claims))


# --- the token request -------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenRequest:
    """What to ask a token endpoint for, with the ``client_credentials`` grant."""

    endpoint: str
    client_id: str
    client_secret: str
    scope: str | None = None
    resource: str | None = None  # RFC 8707 resource indicator

    def form(self) -> bytes:
        fields = {"grant_type": "client_credentials"}
        if self.scope:
            fields["scope"] = self.scope
        if self.resource:
            fields["resource"] = self.resource
        return urllib.parse.urlencode(fields).encode("ascii")

    def basic_auth(self) -> str:
        # RFC 6749 §2.3.1: client_secret_basic form-urlencodes the id and secret first.
        quote = urllib.parse.quote_plus
        pair = f"{quote(self.client_id)}:{quote(self.client_secret)}"
        return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")

    def http_request(self, proof: str) -> urllib.request.Request:
        return urllib.request.Request(
            self.endpoint,
            data=self.form(),
            method="POST",
            headers={
                "Authorization": self.basic_auth(),
                "Content-Type": "application/x-www-form-urlencoded",
                "Accept": "application/json",
                "DPoP": proof,
            },
        )


@dataclass(frozen=True)
class Answer:
    """A token endpoint's answer: status, the ``DPoP-Nonce`` header, the JSON body."""

    status: int
    nonce: str | None
    body: Mapping[str, Any]


Send = Callable[[urllib.request.Request], Answer]


def send(request: urllib.request.Request) -> Answer:
    """POST the token request; an HTTP error status is an answer too (its JSON error body)."""
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            status, headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, headers, raw = error.code, error.headers, error.read()
    except (urllib.error.URLError, OSError) as error:
        raise DpopError(f"token endpoint {request.full_url}: {error}") from None
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        body = {}
    return Answer(status, headers.get(NONCE_HEADER), body if isinstance(body, dict) else {})


def request_token(key: ec.EllipticCurvePrivateKey, request: TokenRequest, send: Send = send) -> str:
    """A DPoP-bound access token: the token request with a proof of ``key`` (RFC 9449 §5); once
    more with the server's nonce when it answers ``use_dpop_nonce`` (§8). A token the server did
    not bind (``token_type`` other than DPoP, §5.1) is refused: it would work for anyone."""
    nonce: str | None = None
    for _ in range(2):
        proof = make_proof(key, "POST", request.endpoint, nonce=nonce)
        answer = send(request.http_request(proof))
        error = answer.body.get("error")
        if answer.status == 400 and error == NONCE_ERROR and answer.nonce and nonce is None:
            nonce = answer.nonce
            continue
        break
    if answer.status != 200:
        described = answer.body.get("error_description")
        raise DpopError(
            f"token endpoint answered {answer.status} {error or ''}"
            + (f": {described}" if isinstance(described, str) else "")
        )
    token = answer.body.get("access_token")
    token_type = answer.body.get("token_type")
    if not isinstance(token, str) or not token:
        raise DpopError("the token endpoint's answer has no access_token")
    if not isinstance(token_type, str) or token_type.lower() != "dpop":
        raise DpopError(
            f"the token endpoint issued a {token_type!r} token, not a DPoP-bound one: is DPoP "
            "enabled for this client?"
        )
    return token


# --- the command line --------------------------------------------------------------------------


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(text + "\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dpop.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    key_help = "PEM file of the EC P-256 proof key (made, mode 0600, when missing)"

    token = commands.add_parser("token", help="get a DPoP-bound token (client_credentials)")
    token.add_argument("--key", type=Path, required=True, help=key_help)
    token.add_argument("--token-endpoint", required=True)
    token.add_argument("--client-id", required=True)
    token.add_argument(
        "--client-secret",
        default=os.environ.get("DPOP_CLIENT_SECRET"),
        help="the client's secret (default: $DPOP_CLIENT_SECRET)",
    )
    token.add_argument("--scope")
    token.add_argument("--resource", help="RFC 8707 resource indicator (the token's audience)")
    token.add_argument("--out", type=Path, help="write the token here (0600) instead of stdout")

    proof = commands.add_parser("proof", help="print a new DPoP proof for one request")
    proof.add_argument("--key", type=Path, required=True, help=key_help)
    proof.add_argument("--method", required=True)
    proof.add_argument("--url", required=True, help="the request URL (query and fragment dropped)")
    proof.add_argument("--token-file", type=Path, help="the access token the request carries (ath)")
    proof.add_argument("--nonce", help="a nonce the server gave (DPoP-Nonce)")

    thumb = commands.add_parser("thumbprint", help="print the key's RFC 7638 thumbprint (jkt)")
    thumb.add_argument("--key", type=Path, required=True, help=key_help)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        key = load_or_create_key(args.key)
        if args.command == "thumbprint":
            print(thumbprint(public_jwk(key)))
        elif args.command == "proof":
            token = None
            if args.token_file is not None:
                token = args.token_file.read_text(encoding="ascii").strip()
            print(make_proof(key, args.method, args.url, token=token, nonce=args.nonce))
        else:
            if not args.client_secret:
                raise DpopError("no client secret: --client-secret or $DPOP_CLIENT_SECRET")
            request = TokenRequest(
                args.token_endpoint, args.client_id, args.client_secret, args.scope, args.resource
            )
            access_token = request_token(key, request)
            if args.out is not None:
                _write_private(args.out, access_token)
            else:
                print(access_token)
    except (DpopError, OSError, ValueError) as error:
        print(f"dpop.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
