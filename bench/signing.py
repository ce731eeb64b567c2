"""A JWT signing key and its public JWK, for the bench (bench/keys.py) and the tests' fixtures
(tests/conftest.py).

Only PyJWT and cryptography: nothing of extauthz and nothing else of the bench, so the tests
that sign tokens depend on this class alone.
"""

from __future__ import annotations

import json
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
