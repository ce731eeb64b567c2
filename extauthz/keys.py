"""Verification keys: JWKs and PEM keys parsed once into a :class:`KeySet` (no network here).

pyjwt and cryptography do all the parsing; this module only decides which key may verify which
algorithm, so that a key can never be used with an algorithm it was not made for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

__all__ = ["KeySet", "VerificationKey", "keyset_from_jwks", "keyset_from_static"]

_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGS_BY_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "secp256k1": "ES256K"}
_EC_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521",
                   "secp256k1": "secp256k1"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str | None
    key: Any  # a cryptography public key object
    algorithms: frozenset[str]


@dataclass(frozen=True, slots=True)
class KeySet:
    keys: tuple[VerificationKey, ...]
    skipped: int = 0  # keys present in the source that cannot verify any allowed algorithm

    def candidates(self, kid: str | None, alg: str) -> list[VerificationKey]:
        """Keys that may verify ``alg``: the one named by ``kid``, or every key when no kid."""
        return [k for k in self.keys if alg in k.algorithms and (kid is None or k.kid == kid)]

    def has_kid(self, kid: str) -> bool:
        return any(k.kid == kid for k in self.keys)


def _algorithms_for_jwk(jwk: Mapping[str, Any]) -> frozenset[str]:
    if "alg" in jwk:
        return frozenset({str(jwk["alg"])})
    kty = jwk.get("kty")
    if kty == "RSA":
        return _RSA_ALGS
    if kty == "EC":
        alg = _EC_ALGS_BY_CURVE.get(str(jwk.get("crv")))
        return frozenset({alg}) if alg else frozenset()
    if kty == "OKP" and jwk.get("crv") in ("Ed25519", "Ed448"):
        return frozenset({"EdDSA"})
    return frozenset()


def _algorithms_for_key(key: Any) -> frozenset[str]:
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGS
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGS_BY_CURVE.get(_EC_CURVE_NAMES.get(key.curve.name, ""))
        return frozenset({alg}) if alg else frozenset()
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    return frozenset()


def _usable_for_signatures(jwk: Mapping[str, Any]) -> bool:
    if jwk.get("use", "sig") != "sig":
        return False
    ops = jwk.get("key_ops")
    return ops is None or (isinstance(ops, list) and "verify" in ops)


def keyset_from_jwks(jwks: Iterable[Mapping[str, Any]], allowed: frozenset[str]) -> KeySet:
    """Parse JWKs; keys that are malformed, private, for encryption or for no allowed algorithm
    are skipped (counted in ``skipped``), never fatal: one odd key must not hide the others."""
    out: list[VerificationKey] = []
    skipped = 0
    for jwk in jwks:
        if not isinstance(jwk, Mapping) or not _usable_for_signatures(jwk) or "d" in jwk:
            skipped += 1
            continue
        algs = _algorithms_for_jwk(jwk) & allowed
        if not algs:
            skipped += 1
            continue
        try:
            parsed = jwt.PyJWK(dict(jwk), algorithm=next(iter(algs)))
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            skipped += 1
            continue
        kid = jwk.get("kid")
        out.append(VerificationKey(str(kid) if kid is not None else None, parsed.key, algs))
    return KeySet(tuple(out), skipped)


def _load_pem(text: str) -> Any:
    data = text.encode()
    if b"BEGIN CERTIFICATE" in data:
        return x509.load_pem_x509_certificate(data).public_key()
    return serialization.load_pem_public_key(data)


def keyset_from_static(keys: Iterable[Mapping[str, Any]], allowed: frozenset[str]) -> KeySet:
    """Keys written in the config: JWKs, or ``{kid, format: PEM, key}``.

    Raises ValueError naming the key when one cannot be used: a typo in a static key is a config
    error, not something to discover at the first request.
    """
    jwks: list[Mapping[str, Any]] = []
    pems: list[VerificationKey] = []
    for i, k in enumerate(keys):
        if k.get("format") == "PEM":
            try:
                key = _load_pem(str(k["key"]))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"keys[{i}]: not a PEM public key or certificate") from exc
            algs = _algorithms_for_key(key) & allowed
            if not algs:
                raise ValueError(f"keys[{i}]: key type fits none of the allowed algorithms")
            kid = k.get("kid")
            pems.append(VerificationKey(str(kid) if kid is not None else None, key, algs))
        else:
            jwk = {name: v for name, v in k.items() if name != "format"}
            one = keyset_from_jwks([jwk], allowed)
            if not one.keys:
                raise ValueError(f"keys[{i}]: not a usable public JWK for the allowed algorithms")
            jwks.append(jwk)
    return KeySet(keyset_from_jwks(jwks, allowed).keys + tuple(pems))
