"""Sender-constrained tokens: DPoP proofs (RFC 9449) and certificate-bound tokens (RFC 8705).

Each check is a pure function returning a :class:`~extauthz.steps.Step`, like the token checks of
:mod:`extauthz.validation`; the engine runs them after the signature (or introspection) and before
the claims. A proof is parsed as strictly as a token (the same base64url and JSON readers); its
signature is verified by pyjwt's algorithm objects with the public ``jwk`` the proof carries, and
thumbprints are SHA-256 over RFC 7638's canonical members: no cryptography is done here.

Nothing here logs or returns the proof or the token: a step's facts name what was compared (the
method, the URI without query, the clock difference), never a credential.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import math
import re
import string
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote, urlsplit

import jwt
import jwt.algorithms
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .bounded import BoundedCache
from .decision import Denial, Reason
from .steps import Step, checked
from .validation import _b64url, _json_object, numeric_date

if TYPE_CHECKING:
    from .shared_cache import SharedCache

__all__ = [
    "DPOP_TYPE",
    "IAT_WINDOW_SECONDS",
    "REPLAYED_JTI_MESSAGE",
    "Proof",
    "ReplayCache",
    "access_token_hash",
    "binding_step",
    "certificate_sha256",
    "jwk_thumbprint",
    "proof_steps",
    "remember_in_fleet",
    "xfcc_sha256",
]

DPOP_TYPE = "dpop+jwt"  # RFC 9449 §4.2
IAT_WINDOW_SECONDS = 60.0  # beyond maxClockSkewInSeconds, either way
MAX_PROOF_BYTES = 8 * 1024
MAX_JTI_CHARS = 256
MAX_REMEMBERED_JTIS = 65_536
# What a replayed proof is denied with, whichever memory saw its jti (this replica's, the fleet's).
REPLAYED_JTI_MESSAGE = "The DPoP proof's 'jti' was seen before: a replayed proof."

_ALGORITHMS = jwt.algorithms.get_default_algorithms()
# Proof keys by (alg, RFC 7638 thumbprint): clients keep their DPoP key for many requests.
_PROOF_KEYS: BoundedCache[tuple[str, str], Any] = BoundedCache(4096, 0, lru=True)
_PERCENT_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")  # RFC 3986 §2.3
# RFC 7638 §3.2: the required members of each key type, the only ones the thumbprint covers.
_THUMBPRINT_MEMBERS = {
    "RSA": ("e", "kty", "n"),
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
}
# RFC 7517 §4 / RFC 7518 §6: members only a private (or symmetric) key has.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521", "ES256K": "secp256k1"}
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def access_token_hash(token: str) -> str:
    """RFC 9449 §4.2 ``ath``: base64url of the SHA-256 of the access token's ASCII."""
    return _b64url_encode(hashlib.sha256(token.encode("ascii", "replace")).digest())


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str | None:
    """RFC 7638 JWK thumbprint (SHA-256, base64url) of a public key, or None when the key type
    is unknown or a required member is missing or not a string."""
    members = _THUMBPRINT_MEMBERS.get(jwk.get("kty"))  # type: ignore[arg-type]
    if members is None or any(not isinstance(jwk.get(m), str) for m in members):
        return None
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return _b64url_encode(hashlib.sha256(canonical.encode("utf-8")).digest())


def _key_type_fits(alg: str, jwk: Mapping[str, Any]) -> bool:
    """The ``jwk``'s type (and curve) is the one ``alg`` signs with (RFC 7518 §3.1)."""
    kty = jwk.get("kty")
    if alg.startswith(("RS", "PS")):
        return kty == "RSA"
    if alg in _EC_CURVES:
        return kty == "EC" and jwk.get("crv") == _EC_CURVES[alg]
    if alg in ("EdDSA", "Ed25519", "Ed448"):
        return kty == "OKP" and jwk.get("crv") in ("Ed25519", "Ed448")
    return False


class Proof(NamedTuple):
    """A DPoP proof whose signature verified: what the later checks read (never the proof)."""

    claims: Mapping[str, Any]
    thumbprint: str
    alg: str


def _invalid(message: str) -> Denial:
    return Denial(Reason.DPOP_PROOF_INVALID, message)


def _fail(name: str, message: str, **facts: Any) -> Step:
    return checked(name, _invalid(message), facts=tuple(facts.items()))


def _parse_proof(header: str | None, allowed: frozenset[str]) -> Proof | Step:
    """RFC 9449 §4.3 steps 1 to 7: one well-formed JWT, ``typ``, ``alg``, a public ``jwk`` of
    the algorithm's key type, and a signature that ``jwk`` verifies. A failure is the step."""
    if header is None:
        return _fail("dpop", "The request has no DPoP proof header.")
    if "," in header:
        # Two DPoP headers joined by the proxy (RFC 9110 §5.3): RFC 9449 §4.3 allows one.
        return _fail("dpop", "The request has more than one DPoP proof header.")
    proof = header.strip()
    if len(proof) > MAX_PROOF_BYTES:
        return _fail("dpop", f"The DPoP proof is longer than {MAX_PROOF_BYTES} bytes.")
    if proof.count(".") != 2:
        return _fail("dpop", "The DPoP proof is not a JWT in compact serialization.")
    head_b64, payload_b64, signature_b64 = proof.split(".")
    head_raw, payload_raw = _b64url(head_b64), _b64url(payload_b64)
    signature = _b64url(signature_b64)
    head = _json_object(head_raw) if head_raw is not None else None
    claims = _json_object(payload_raw) if payload_raw is not None else None
    if head is None or claims is None or not signature:
        return _fail("dpop", "The DPoP proof's parts are not base64url JSON and a signature.")
    typ = head.get("typ")
    if typ != DPOP_TYPE:
        return _fail("dpop typ", "The DPoP proof's 'typ' is not 'dpop+jwt'.", typ=_text(typ))
    if "crit" in head:  # RFC 7515 §4.1.11: no extension is understood
        return _fail("dpop typ", "The DPoP proof lists critical extensions we do not support.")
    alg = head.get("alg")
    algorithms = sorted(allowed)
    if not isinstance(alg, str) or alg not in allowed or alg not in _ALGORITHMS:
        # The policy's algorithms are asymmetric only: 'none' and HMAC never pass (§4.3 step 5).
        return _fail(
            "dpop alg",
            "The DPoP proof's 'alg' is not among the allowed algorithms.",
            alg=_text(alg),
            allowedAlgorithms=algorithms,
        )
    jwk = head.get("jwk")
    if not isinstance(jwk, dict):
        return _fail("dpop jwk", "The DPoP proof has no 'jwk' header.")
    if _PRIVATE_MEMBERS.intersection(jwk):
        # RFC 9449 §4.3 step 7: the jwk must not contain a private key.
        return _fail("dpop jwk", "The DPoP proof's 'jwk' holds a private or symmetric key.")
    if not _key_type_fits(alg, jwk):
        return _fail(
            "dpop jwk",
            f"The DPoP proof's 'jwk' is not a key for algorithm '{alg}'.",
            kty=_text(jwk.get("kty")),
            alg=alg,
        )
    thumbprint = jwk_thumbprint(jwk)
    if thumbprint is None:
        return _fail("dpop jwk", "The DPoP proof's 'jwk' is not a complete public key.")
    algorithm = _ALGORITHMS[alg]
    try:
        # The thumbprint names exactly the key's public members (RFC 7638 §3.2): the same
        # thumbprint is the same key, whose object is made once (a third of a proof's cost).
        key = _PROOF_KEYS.get((alg, thumbprint))
        if key is None:
            key = algorithm.from_jwk(json.dumps(jwk))
            _PROOF_KEYS.put((alg, thumbprint), key, 0)
        verified = algorithm.verify(f"{head_b64}.{payload_b64}".encode(), key, signature)
    except (ValueError, TypeError, KeyError, jwt.InvalidKeyError):
        return _fail("dpop jwk", "The DPoP proof's 'jwk' is not a usable public key.")
    if not verified:
        return _fail("dpop signature", "The DPoP proof's signature does not verify.", alg=alg)
    return Proof(claims, thumbprint, alg)


def _text(value: Any, limit: int = 64) -> Any:
    """A value read from a proof header, made safe to log (short, printable)."""
    if not isinstance(value, str):
        return None if value is None else type(value).__name__
    cleaned = "".join(c if c.isprintable() else "?" for c in value[:limit])
    return cleaned + ("…" if len(value) > limit else "")


def _normal_path(path: str) -> str:
    """A path in RFC 3986 §6.2.2 normal form: percent-encoded unreserved characters decoded, the
    other escapes in upper case (§6.2.2.2), dot segments removed (§6.2.2.3, §5.2.4). So a proof
    for the URL the client called matches the path Envoy normalized before the check."""
    if "%" in path:
        path = _PERCENT_ESCAPE.sub(_normal_escape, path)
    if "." not in path:
        return path or "/"
    segments = path.split("/")
    kept: list[str] = []
    for segment in segments[1:]:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    normal = "/" + "/".join(kept)
    if segments[-1] in (".", "..") and not normal.endswith("/"):
        normal += "/"  # "/a/b/.." is "/a/"
    return normal


def _normal_escape(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else f"%{match.group(1).upper()}"


def _normal_uri(uri: str) -> str | None:
    """An HTTP URI in RFC 3986 §6.2.2-6.2.3 normal form for comparison (lower-case scheme and
    host, no default port, an empty path as "/", the path as :func:`_normal_path` makes it), or
    None when it is not an absolute http(s) URI. Query and fragment must already be gone."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.username is not None:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None or str(port) == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    return f"{scheme}://{netloc}{_normal_path(parts.path)}"


class ReplayCache:
    """The ``jti`` values of proofs accepted within their ``iat`` window, per process, bounded
    (RFC 9449 §11.1). Keyed by SHA-256 of the proof key's thumbprint and the ``jti``, never the
    proof. Full of live entries, it refuses new proofs rather than forget one (fail closed)."""

    def __init__(self, max_entries: int = MAX_REMEMBERED_JTIS, clock: Any = time.monotonic) -> None:
        self._max = max_entries
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # key → forget after (monotonic)
        self._clock = clock

    @staticmethod
    def key(thumbprint: str, jti: str) -> bytes:
        return hashlib.sha256(f"{thumbprint}\x00{jti}".encode("utf-8", "replace")).digest()

    def _expire(self) -> None:
        now = self._clock()
        while self._seen:
            first, until = next(iter(self._seen.items()))
            if until > now:
                break
            del self._seen[first]

    def seen(self, key: bytes) -> bool:
        self._expire()
        return key in self._seen

    def full(self) -> bool:
        self._expire()
        return len(self._seen) >= self._max

    def remember(self, key: bytes, lifetime: float) -> bool:
        """Remember ``key`` for ``lifetime`` seconds; False when it was already there or the
        memory is full of live entries."""
        self._expire()
        if key in self._seen or len(self._seen) >= self._max:
            return False
        # Entries all live as long (the window), so insertion order is expiry order.
        self._seen[key] = self._clock() + lifetime
        return True

    def __len__(self) -> int:
        return len(self._seen)


def proof_steps(
    header: str | None,
    *,
    token: str,
    method: str,
    htu: str,
    allowed: frozenset[str],
    skew: float,
    now: float,
    replay: ReplayCache,
) -> tuple[list[Step], Proof | None]:
    """The DPoP proof's checks (RFC 9449 §4.3), in order: the proof itself (form, ``typ``,
    ``alg``, ``jwk``, signature), then ``htm``, ``htu``, ``iat``, ``jti`` and ``ath``. Returns
    the steps up to the first failure, and the proof when every one passed. ``htu`` is the URI
    the request was sent to, as Envoy saw it, without query and fragment. The ``jti`` is only
    looked up here: :meth:`ReplayCache.remember` records it once the whole check has passed."""
    parsed = _parse_proof(header, allowed)
    if isinstance(parsed, Step):
        return [parsed], None
    steps = [checked("dpop", None, actual=parsed.alg, facts=(("alg", parsed.alg),))]
    claims = parsed.claims

    htm = claims.get("htm")
    if htm != method:
        facts = (("htm", _text(htm)), ("method", method))
        denial = _invalid("The DPoP proof's 'htm' is not the request method.")
        steps.append(checked("dpop htm", denial, actual=_text(htm), expected=method, facts=facts))
        return steps, None
    steps.append(checked("dpop htm", None, actual=htm, expected=method))

    sent = claims.get("htu")
    expected = _normal_uri(htu)
    normal = None
    if isinstance(sent, str) and "?" not in sent and "#" not in sent:
        normal = _normal_uri(sent)
    if normal is None or expected is None or normal != expected:
        shown = (
            _text(sent.split("?", 1)[0].split("#", 1)[0], 256) if isinstance(sent, str) else None
        )
        facts = (("htuSent", shown), ("htuExpected", expected or htu))
        why = (
            "has a query or fragment"
            if isinstance(sent, str) and ("?" in sent or "#" in sent)
            else "is not the request URI"
        )
        denial = _invalid(f"The DPoP proof's 'htu' {why}.")
        steps.append(checked("dpop htu", denial, actual=shown, expected=expected, facts=facts))
        return steps, None
    steps.append(checked("dpop htu", None, actual=normal, expected=expected))

    window = skew + IAT_WINDOW_SECONDS
    iat = numeric_date(claims.get("iat"))
    if iat is None or not math.isfinite(iat) or abs(now - iat) > window:
        difference = None if iat is None else round(now - iat, 3)
        iat_facts: tuple[tuple[str, Any], ...] = (
            ("iatSkewSeconds", difference),
            ("windowSeconds", window),
            ("now", now),
        )
        message = (
            "The DPoP proof has no numeric 'iat'."
            if iat is None
            else f"The DPoP proof's 'iat' is {abs(difference or 0):g} s from now, outside "
            f"the {window:g} s window."
        )
        steps.append(checked("dpop iat", _invalid(message), actual=iat, facts=iat_facts))
        return steps, None
    steps.append(
        checked("dpop iat", None, actual=iat, facts=(("iatSkewSeconds", round(now - iat, 3)),))
    )

    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_CHARS:
        denial = _invalid("The DPoP proof has no usable 'jti'.")
        steps.append(checked("dpop jti", denial))
        return steps, None
    if replay.seen(ReplayCache.key(parsed.thumbprint, jti)):
        denial = _invalid(REPLAYED_JTI_MESSAGE)
        steps.append(checked("dpop jti", denial, facts=(("jtiReplayed", True),)))
        return steps, None
    if replay.full():
        denial = _invalid("The DPoP replay memory is full; the proof cannot be checked.")
        steps.append(checked("dpop jti", denial, facts=(("jtiReplayed", False),)))
        return steps, None
    steps.append(checked("dpop jti", None))

    ath = claims.get("ath")
    if not isinstance(ath, str) or not hmac.compare_digest(ath, access_token_hash(token)):
        denial = _invalid("The DPoP proof's 'ath' is not the hash of this access token.")
        steps.append(checked("dpop ath", denial, facts=(("athPresent", isinstance(ath, str)),)))
        return steps, None
    steps.append(checked("dpop ath", None))
    return steps, parsed


def remember(replay: ReplayCache, proof: Proof, skew: float) -> bool:
    """Record an accepted proof's ``jti`` for as long as its ``iat`` could still pass."""
    jti = proof.claims["jti"]
    return replay.remember(ReplayCache.key(proof.thumbprint, jti), _jti_lifetime(skew))


def _jti_lifetime(skew: float) -> float:
    return 2 * (skew + IAT_WINDOW_SECONDS)


async def remember_in_fleet(
    shared: SharedCache, proof: Proof, skew: float, now: float
) -> bool | None:
    """Record an accepted proof's ``jti`` in the fleet's shared cache as well (``SET NX``): one
    replica's memory does not see a proof replayed to another (RFC 9449 §11.1). False when
    another replica recorded it first (a replay); None when the shared cache cannot say, and
    this replica's own memory alone has decided."""
    digest = ReplayCache.key(proof.thumbprint, proof.claims["jti"])
    key = shared.key_for_digest("dpop", "", digest)
    return await shared.add("dpop", key, now + _jti_lifetime(skew))


def _mismatch(name: str, message: str, **facts: Any) -> Step:
    return checked(name, Denial(Reason.TOKEN_BINDING_MISMATCH, message), facts=tuple(facts.items()))


def binding_step(
    claims: Mapping[str, Any],
    *,
    proof: Proof | None,
    certificate_sha256: bytes | None,
) -> Step:
    """The token's ``cnf`` against what the client proved it holds: ``jkt`` (RFC 9449 §6.1)
    against the proof key's thumbprint, or ``x5t#S256`` (RFC 8705 §3.1) against the SHA-256 of
    the client certificate. With a proof, the proof key is what the token must name; with a
    certificate only, the certificate."""
    cnf = claims.get("cnf")
    if not isinstance(cnf, dict) or not cnf:
        return _mismatch(
            "cnf", "The token has no 'cnf' confirmation: it is not sender-constrained."
        )
    if proof is not None:
        jkt = cnf.get("jkt")
        if not isinstance(jkt, str) or not hmac.compare_digest(jkt, proof.thumbprint):
            return _mismatch(
                "cnf jkt",
                "The token's 'cnf' 'jkt' is not the thumbprint of the DPoP proof's key.",
                jktPresent=isinstance(jkt, str),
                proofJkt=proof.thumbprint,
            )
        return checked("cnf jkt", None, actual=proof.thumbprint)
    x5t = cnf.get("x5t#S256")
    bound = _b64url(x5t) if isinstance(x5t, str) else None
    if certificate_sha256 is None:
        return _mismatch(
            "cnf x5t#S256",
            "The token is certificate-bound, but the request came without a client certificate."
            if bound is not None
            else "The token's 'cnf' has no 'x5t#S256' and the request no client certificate.",
            certificatePresent=False,
        )
    if bound is None or not hmac.compare_digest(bound, certificate_sha256):
        return _mismatch(
            "cnf x5t#S256",
            "The token's 'cnf' 'x5t#S256' is not the client certificate's SHA-256.",
            x5tPresent=bound is not None,
            certificateSha256=_b64url_encode(certificate_sha256),
        )
    return checked("cnf x5t#S256", None, actual=_b64url_encode(certificate_sha256))


# A client presents the same certificate on every request: each PEM is parsed once (public data).
@functools.lru_cache(maxsize=256)
def certificate_sha256(url_encoded_pem: str) -> bytes | None:
    """SHA-256 of the DER of the client certificate Envoy sends in
    ``attributes.source.certificate`` (URL-encoded PEM); None when absent or unreadable."""
    if not url_encoded_pem:
        return None
    try:
        certificate = x509.load_pem_x509_certificate(unquote(url_encoded_pem).encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return None
    return hashlib.sha256(certificate.public_bytes(Encoding.DER)).digest()


def xfcc_sha256(header: str | None) -> bytes | None:
    """The ``Hash`` element (hex SHA-256 of the DER) of an ``x-forwarded-client-cert`` header
    Envoy set; None when absent, unreadable, or naming more than one certificate (fail closed:
    which one the client presented would be a guess)."""
    if not header:
        return None
    found: list[str] = []
    in_quotes = False
    element: list[str] = []
    for c in header:  # commas separate certificates, except inside a quoted value
        if c == '"':
            in_quotes = not in_quotes
        if c == "," and not in_quotes:
            found.append("".join(element))
            element = []
        else:
            element.append(c)
    found.append("".join(element))
    if len(found) != 1:
        return None
    hashes = [
        value
        for key, _, value in (p.partition("=") for p in found[0].split(";"))
        if key.strip().lower() == "hash"
    ]
    if len(hashes) != 1:
        return None
    try:
        digest = bytes.fromhex(hashes[0].strip())
    except ValueError:
        return None
    return digest if len(digest) == 32 else None
