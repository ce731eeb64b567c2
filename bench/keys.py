"""Key material and tokens for one bench run, generated fresh (never stored in the repo).

The same public keys go to the harness IdP's JWKS (extauthz fetches them: ``REMOTE_JWKS``) and
inline into Envoy's ``jwt_authn`` ``local_jwks``, so (b) and (c) verify exactly the same tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bench.signing import SigningKey

ISSUER = "https://idp.bench.example"
AUDIENCE = "https://api.bench.example"
SCOPE = "items.read"
CLIENT_ID = "bench-client"
CLIENT_SECRET_ENV = "BENCH_IDP_CLIENT_SECRET"


def claims(sub: str, *, now: float | None = None, lifetime: int = 3 * 3600) -> dict[str, Any]:
    """A claim set every bench policy accepts (issuer, audience, scope), valid for ``lifetime``."""
    t = int(now if now is not None else time.time())
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": sub,
        "scope": SCOPE,
        "client_id": CLIENT_ID,
        "iat": t,
        "nbf": t - 60,
        "exp": t + lifetime,
    }


@dataclass
class BenchKeys:
    rsa: SigningKey
    ec: SigningKey
    _cache: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def generate(cls) -> BenchKeys:
        return cls(
            rsa=SigningKey("bench-rs", "RS256", rsa.generate_private_key(65537, 2048)),
            ec=SigningKey("bench-es", "ES256", ec.generate_private_key(ec.SECP256R1())),
        )

    @property
    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.rsa.public_jwk, self.ec.public_jwk]}

    def rs256(self, sub: str = "user-0") -> str:
        return self.rsa.sign(claims(sub))

    def es256(self, sub: str = "user-0") -> str:
        return self.ec.sign(claims(sub))

    def expired_rs256(self) -> str:
        """Signed correctly, expired an hour ago: a denial on the ``exp`` check for (b) and (c)."""
        return self.rsa.sign(claims("user-expired", now=time.time() - 3 * 3600 - 3600))

    def distinct_rs256(self, n: int) -> list[str]:
        """``n`` valid RS256 tokens that differ in ``sub`` (and so in signature)."""
        return [self.rsa.sign(claims(f"user-{i}")) for i in range(n)]
