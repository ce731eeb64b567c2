"""A JWT signing key and its public JWK, for the bench (bench/keys.py) and the tests' fixtures
(tests/conftest.py); a DPoP proof key, for the bench's DPoP scenario.

Only PyJWT and cryptography: nothing of extauthz and nothing else of the bench, so the tests
that sign tokens depend on this class alone.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.algorithms import ECAlgorithm, RSAAlgorithm


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str  # RS*, PS* (an RSA key) or ES* (an EC key)
    private: Any

    @property
    def public_jwk(self) -> dict[str, Any]:
        algo: Any = RSAAlgorithm if self.alg.startswith(("RS", "PS")) else ECAlgorithm
        jwk: dict[str, Any] = json.loads(algo.to_jwk(self.private.public_key()))
        jwk.update(kid=self.kid, alg=self.alg, use="sig")
        return jwk

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        """``claims`` signed with this key; ``header`` adds to (or overrides) ``{"kid": kid}``."""
        return jwt.encode(
            claims, self.private, algorithm=self.alg, headers={"kid": self.kid, **header}
        )


@dataclass(frozen=True)
class ProofKey:
    """A DPoP proof key (RFC 9449): EC P-256, proofs signed ES256 with the public ``jwk`` in
    their header; :attr:`jkt` is what a token bound to it carries as ``cnf.jkt``."""

    private: Any

    @property
    def public_jwk(self) -> dict[str, str]:
        jwk: dict[str, str] = json.loads(ECAlgorithm.to_jwk(self.private.public_key()))
        return {m: jwk[m] for m in ("kty", "crv", "x", "y")}

    @property
    def jkt(self) -> str:
        """RFC 7638 thumbprint: SHA-256 over the required members, sorted, no whitespace."""
        canonical = json.dumps(self.public_jwk, separators=(",", ":"), sort_keys=True)
        return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())

    def proofs(self, token: str, method: str, htu: str, n: int, *, iat: int) -> list[str]:
        """``n`` proofs for requests ``method`` ``htu`` carrying ``token``, each with its own
        ``jti`` (RFC 9449 §4.2), all issued at ``iat``."""
        header = {"typ": "dpop+jwt", "jwk": self.public_jwk}
        ath = _b64url(hashlib.sha256(token.encode("ascii")).digest())
        claims = {"htm": method, "htu": htu, "iat": iat, "ath": ath}
        return [
            jwt.encode({**claims, "jti": uuid.uuid4().hex}, self.private, "ES256", header)
            for _ in range(n)
        ]


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
