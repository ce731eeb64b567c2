"""A real identity provider on loopback that can be told to misbehave, path by path.

Stdlib ``http.server`` in threads, one plain-HTTP listener and one HTTPS listener whose
certificate is self-signed and generated when the server starts (so nothing secret or long-lived
sits in the repository). Both listeners share one route table::

    idp = FaultyIdp(keys=[public_jwk], clients={"extauthz": "s3cret"})
    idp.start()
    idp.introspection("/a/introspect")                     # RFC 7662, tokens from idp.issue()
    idp.jwks("/a/jwks")                                    # the test keys
    idp.discovery("/a/.well-known/openid-configuration", jwks="/a/jwks", introspection="/a/introspect")
    idp.introspection("/b/introspect", fault=Fault.status(500))
    idp.set_fault("/a/jwks", Fault.hang())                 # the control method; None heals it
    idp.count("/a/introspect")                             # requests that reached a path
    idp.stop()                                             # the port now refuses connections

Faults: an HTTP status, a hang past any client timeout, a socket closed without an answer, an
HTML page, any JSON body (``{"active": "yes"}``, with response headers of the test's choice),
any bytes with any status and reason phrase (``Fault.raw``), and a hold that answers normally once the test calls :meth:`FaultyIdp.release` (to gather
concurrent callers). Every request is recorded with its headers and form, so a test can count
calls and see how the client authenticated.

:class:`SilentPort` is the one fault below HTTP: a port that accepts connections and never sends
a byte. An ``https://`` URL on it never completes its TLS handshake (a connect timeout); an
``http://`` one sends its request and never hears back (a read timeout)::

    with SilentPort() as silent:
        silent.url("https", "/jwks")                       # https://127.0.0.1:<port>/jwks
"""

from __future__ import annotations

import base64
import ipaddress
import json
import secrets
import socket
import ssl
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote_plus

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import self_signed

__all__ = ["Fault", "FaultyIdp", "Recorded", "SilentPort"]

HANG_SECONDS = 30.0  # far past any timeoutSeconds a test uses; stop() ends it at once
HOLD_SECONDS = 30.0
HTML_PAGE = b"<html><body><h1>IDP-BODY-MARKER: maintenance</h1></body></html>"


@dataclass(frozen=True)
class Fault:
    """How a path misbehaves instead of doing its job."""

    kind: str  # status | hang | close | html | json | raw | hold
    status: int = 200
    body: Any = None
    reason: str | None = None  # the reason phrase of a raw answer
    headers: tuple[tuple[str, str], ...] = ()  # response headers sent with a json answer

    @classmethod
    def status_code(cls, status: int) -> Fault:
        """Answer with this HTTP status and a small JSON error body."""
        return cls("status", status=status, body={"error": "IDP-BODY-MARKER"})

    @classmethod
    def hang(cls) -> Fault:
        """Read the request, then never answer (until the server stops)."""
        return cls("hang")

    @classmethod
    def close(cls) -> Fault:
        """Read the request, then close the connection without a byte of answer."""
        return cls("close")

    @classmethod
    def html(cls) -> Fault:
        """200 with an HTML page, as a login portal or a proxy error page would."""
        return cls("html")

    @classmethod
    def json(cls, body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Fault:
        """200 (or ``status``) with this JSON body (and these response headers), whatever was
        asked and whoever asked it."""
        return cls("json", status=status, body=body, headers=tuple((headers or {}).items()))

    @classmethod
    def raw(cls, status: int, body: bytes, reason: str) -> Fault:
        """``status`` with exactly these bytes as a JSON body, and a reason phrase of the IdP's own
        (any text, where a well-behaved server sends the standard one)."""
        return cls("raw", status=status, body=body, reason=reason)

    @classmethod
    def hold(cls) -> Fault:
        """Answer normally, but only once :meth:`FaultyIdp.release` is called."""
        return cls("hold")


@dataclass(frozen=True)
class Recorded:
    """One request as the IdP received it."""

    path: str
    method: str
    headers: Mapping[str, str]  # lower-case names
    form: Mapping[str, str]


@dataclass
class _Route:
    role: str  # introspection | jwks | discovery
    fault: Fault | None = None
    jwks_path: str | None = None
    introspection_path: str | None = None
    issuer: str | None = None
    clients: Mapping[str, str] | None = None  # who may introspect here; None: the IdP's clients


@dataclass
class _State:
    routes: dict[str, _Route] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    gate: threading.Event = field(default_factory=threading.Event)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: no stale pooled sockets

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        idp = self.server.idp
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        form = {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}
        path = self.path.split("?", 1)[0]
        headers = {k.lower(): v for k, v in self.headers.items()}
        with idp.state.lock:
            idp.state.requests.append(Recorded(path, self.command, headers, form))
            route = idp.state.routes.get(path)
        if route is None:
            self._send_json(404, {"error": "not_found"})
            return
        fault = route.fault
        if fault is not None and fault.kind == "hold":
            if not idp.state.gate.wait(HOLD_SECONDS) or idp.state.stopping.is_set():
                return
            fault = None
        if fault is None:
            self._answer(route, headers, form)
        elif fault.kind == "status":
            self._send_json(fault.status, fault.body)
        elif fault.kind == "hang":
            idp.state.stopping.wait(HANG_SECONDS)
            self.close_connection = True  # and never a byte of answer
        elif fault.kind == "close":
            self.close_connection = True
        elif fault.kind == "html":
            self._send(200, "text/html; charset=utf-8", HTML_PAGE)
        elif fault.kind == "json":
            self._send_json(fault.status, fault.body, dict(fault.headers))
        elif fault.kind == "raw":
            self._send(fault.status, "application/json", fault.body, reason=fault.reason)
        else:  # pragma: no cover (a typo in a test)
            raise ValueError(fault.kind)

    def _answer(self, route: _Route, headers: Mapping[str, str], form: Mapping[str, str]) -> None:
        idp = self.server.idp
        if route.role == "jwks":
            self._send_json(200, {"keys": list(idp.keys)})
        elif route.role == "discovery":
            doc: dict[str, Any] = {
                "issuer": route.issuer or idp.issuer,
                "jwks_uri": idp.url + (route.jwks_path or "/jwks"),
            }
            if route.introspection_path is not None:
                doc["introspection_endpoint"] = idp.url + route.introspection_path
            self._send_json(200, doc)
        elif route.role == "introspection":
            if self.command != "POST":
                self._send_json(405, {"error": "invalid_request"})
            elif not idp.authenticates(headers, form, route.clients):
                self._send_json(
                    401,
                    {"error": "invalid_client", "error_description": "IDP-BODY-MARKER: who are you?"},
                    extra={"www-authenticate": 'Basic realm="faulty-idp", error="invalid_client"'},
                )
            else:
                self._send_json(200, idp.introspect(form.get("token", "")))
        else:  # pragma: no cover
            raise ValueError(route.role)

    def _send_json(self, status: int, body: Any, extra: Mapping[str, str] | None = None) -> None:
        self._send(status, "application/json", json.dumps(body).encode(), extra)

    def _send(
        self,
        status: int,
        content_type: str,
        body: bytes,
        extra: Mapping[str, str] | None = None,
        *,
        reason: str | None = None,
    ) -> None:
        self.send_response(status, HTTPStatus(status).phrase if reason is None else reason)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, idp: FaultyIdp, tls: ssl.SSLContext | None) -> None:
        self.idp = idp
        self.tls = tls
        super().__init__(("127.0.0.1", 0), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        try:
            # In the connection's own thread, so a client that rejects the certificate (as it
            # should) costs that thread only.
            conn = self.tls.wrap_socket(request, server_side=True)
        except OSError:
            return
        try:
            super().finish_request(conn, client_address)
        finally:
            conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client hanging up mid-answer is what half of these tests do


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A fresh P-256 certificate for 127.0.0.1 and localhost, signed by its own key."""
    key = ec.generate_private_key(ec.SECP256R1())
    hosts = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = self_signed(
        key,
        "faulty-idp.test",
        (x509.SubjectAlternativeName(hosts), False),
        (x509.BasicConstraints(ca=True, path_length=None), True),
    )
    cert_path, key_path = directory / "idp-cert.pem", directory / "idp-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class FaultyIdp:
    """The IdP: routes, opaque tokens it has issued, and the clients allowed to introspect."""

    def __init__(
        self,
        *,
        keys: list[dict[str, Any]] | None = None,
        clients: Mapping[str, str] | None = None,
        tls: bool = True,
    ) -> None:
        self.keys = list(keys or [])
        self.clients = dict(clients or {})
        self.state = _State()
        self._tokens: dict[str, dict[str, Any]] = {}
        self._want_tls = tls
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        self.url = ""
        self.https_url = ""
        self.ca_file: Path | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FaultyIdp:
        """Listen (once: on a started IdP, nothing happens); the IdP."""
        if self._servers:
            return self
        plain = _Server(self, None)
        self._servers.append(plain)
        self.url = f"http://127.0.0.1:{plain.server_address[1]}"
        if self._want_tls:
            self._tmp = tempfile.TemporaryDirectory(prefix="faulty-idp-")
            cert, key = self_signed_certificate(Path(self._tmp.name))
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(cert, key)
            secure = _Server(self, ctx)
            self._servers.append(secure)
            self.https_url = f"https://127.0.0.1:{secure.server_address[1]}"
            self.ca_file = cert
        for server in self._servers:
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop answering: in-flight hangs and holds end, and the ports refuse connections."""
        self.state.stopping.set()
        self.state.gate.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> FaultyIdp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def issuer(self) -> str:
        return self.url

    # -- routes and the control method -----------------------------------------------------

    def introspection(
        self, path: str, *, fault: Fault | None = None, clients: Mapping[str, str] | None = None
    ) -> str:
        """An RFC 7662 endpoint at ``path`` for the IdP's clients (or these, client id to secret);
        returns its plain-HTTP URL."""
        return self._route(path, _Route("introspection", fault, clients=clients))

    def jwks(self, path: str, *, fault: Fault | None = None) -> str:
        return self._route(path, _Route("jwks", fault))

    def discovery(
        self,
        path: str,
        *,
        jwks: str,
        introspection: str | None = None,
        issuer: str | None = None,
        fault: Fault | None = None,
    ) -> str:
        """A discovery document naming ``jwks`` and ``introspection`` (paths on this server)."""
        return self._route(path, _Route("discovery", fault, jwks, introspection, issuer))

    def _route(self, path: str, route: _Route) -> str:
        with self.state.lock:
            self.state.routes[path] = route
        return self.url + path

    def set_fault(self, path: str, fault: Fault | None) -> None:
        """Make ``path`` misbehave from now on (``None``: do its job again)."""
        with self.state.lock:
            self.state.routes[path].fault = fault
        if fault is not None and fault.kind == "hold":
            self.state.gate.clear()

    def release(self) -> None:
        """Let held requests answer."""
        self.state.gate.set()

    # -- what it saw -----------------------------------------------------------------------

    def requests(self, path: str) -> list[Recorded]:
        with self.state.lock:
            return [r for r in self.state.requests if r.path == path]

    def count(self, path: str) -> int:
        return len(self.requests(path))

    # -- tokens and clients ----------------------------------------------------------------

    def issue(self, claims: Mapping[str, Any]) -> str:
        """A new opaque token that introspects as active with ``claims``."""
        token = secrets.token_urlsafe(32)
        with self.state.lock:
            self._tokens[token] = dict(claims)
        return token

    def revoke(self, token: str) -> None:
        with self.state.lock:
            self._tokens.pop(token, None)

    def introspect(self, token: str) -> dict[str, Any]:
        with self.state.lock:
            claims = self._tokens.get(token)
        return {"active": False} if claims is None else {"active": True, **claims}

    def authenticates(
        self,
        headers: Mapping[str, str],
        form: Mapping[str, str],
        clients: Mapping[str, str] | None = None,
    ) -> bool:
        """client_secret_basic (RFC 6749 §2.3.1, form-urlencoded parts) or client_secret_post, of
        one of ``clients`` (by default the IdP's)."""
        auth = headers.get("authorization", "")
        if auth.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(auth[6:], validate=True).decode()
            except ValueError:
                return False
            user, _, password = decoded.partition(":")
            client_id, secret = unquote_plus(user), unquote_plus(password)
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        expected = (self.clients if clients is None else clients).get(client_id)
        return expected is not None and secrets.compare_digest(expected, secret)


class SilentPort:
    """A loopback port that accepts every connection, reads nothing and answers nothing, until
    :meth:`stop` closes them all."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._listener.settimeout(0.05)  # so that the accepting thread sees stop() soon
        self.port = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def url(self, scheme: str, path: str) -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def accepted(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return len(self._held)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._held.append(conn)

    def start(self) -> SilentPort:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            for conn in self._held:
                conn.close()

    def __enter__(self) -> SilentPort:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
