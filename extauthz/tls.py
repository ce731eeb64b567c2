"""TLS, and mTLS, on the check listener (``server.tls``), with the certificate rotated in place.

A check carries the client's ``Authorization`` header and cookies, so on a network others share
it travels over TLS (RFC 8446; gRPC negotiates TLS 1.2 or 1.3 and ALPN ``h2``, RFC 7301). With
``clientCaFile`` the listener also asks for a client certificate and refuses a handshake whose
certificate does not chain to that CA or is out of its validity period (RFC 5280 §6): only Envoy,
holding such a certificate, may ask extauthz anything.

Rotation: cert-manager and Kubernetes Secret volumes replace the files atomically (a symlink
swap), days before the old certificate expires. gRPC core calls the fetcher given
to ``grpc.dynamic_ssl_server_credentials`` before every new handshake; :class:`CertificateFiles`
answers it with a ``stat`` of each file and reads them again only when one changed, so a new
connection gets the new certificate without a restart, and connections already open keep the one
they were set up with (a certificate is only presented during the handshake, RFC 8446 §4.4.2).
Files that are half written, mismatched or unreadable are not served: the previous certificate
keeps serving and one ``server.tlsReloadFailed`` line says why; ``server.tlsReloaded`` says when a
new certificate is served. At start the same problems refuse to start (a ``ConfigError``: the
``server.configInvalid`` line names the ``server.tls`` key), so a listener never comes up without
a usable certificate. The key is parsed to be checked and handed to gRPC; it is never logged:
messages name the files and the certificate's serial number and validity only.

The cryptography is gRPC's (BoringSSL) and the ``cryptography`` package's; nothing here does any.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .config import Config, ConfigError, TlsFiles
from .logs import JsonLogger

__all__ = [
    "RELOADED_EVENT",
    "RELOAD_FAILED_EVENT",
    "CertificateFiles",
    "TlsMaterial",
    "add_check_port",
    "http_ssl_context",
    "load_material",
    "warn_if_tls_changed",
]

RELOADED_EVENT = "server.tlsReloaded"
RELOAD_FAILED_EVENT = "server.tlsReloadFailed"
LOADED_EVENT = "server.tlsLoaded"
NEEDS_RESTART_EVENT = "config.tlsNeedsRestart"

# (level, event, fields): a log line, written on the event loop's thread.
Report = Callable[[str, str, dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """The bytes of ``server.tls``'s files, checked to be usable together."""

    chain: bytes
    key: bytes = field(repr=False)  # a repr (a traceback, a debugger) must not show it
    client_ca: bytes | None = None
    serial_number: str = ""  # the leaf certificate's, in upper-case hex
    not_after: str = ""  # RFC 3339

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.key, self.chain)], self.client_ca)

    def same_files(self, other: TlsMaterial) -> bool:
        return (self.chain, self.key, self.client_ca) == (other.chain, other.key, other.client_ca)

    def describe(self) -> dict[str, str]:
        return {"serialNumber": self.serial_number, "notAfter": self.not_after}


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError([f"server.tls.{key}: cannot read {path}: {exc.strerror}"]) from None
    if not data.strip():
        raise ConfigError([f"server.tls.{key}: {path} is empty"])
    return data


def _certificates(data: bytes, path: str, key: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError([f"server.tls.{key}: {path} holds no PEM certificate"]) from None


def _spki(public_key: Any) -> bytes:
    der: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def load_material(files: TlsFiles, now: datetime.datetime | None = None) -> TlsMaterial:
    """Read and check ``files``: a PEM chain whose first certificate is in date and holds the
    public key of the PEM (unencrypted) private key, and the client CA's PEM certificates.
    ConfigError lists what is wrong, by ``server.tls`` key; never the key's content."""
    chain = _read(files.cert_file, "certFile")
    key_pem = _read(files.key_file, "keyFile")
    client_ca = (
        None if files.client_ca_file is None else _read(files.client_ca_file, "clientCaFile")
    )
    leaf = _certificates(chain, files.cert_file, "certFile")[0]
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, NotImplementedError):
        # TypeError: the key is encrypted, and nobody is there to type its password. The
        # library's own message is left out: it is not needed to say what to fix.
        raise ConfigError(
            [f"server.tls.keyFile: {files.key_file} holds no unencrypted PEM private key"]
        ) from None
    errors = []
    if _spki(private_key.public_key()) != _spki(leaf.public_key()):
        # What a half-rotated pair looks like: the new certificate beside the old key.
        errors.append(
            f"server.tls.keyFile: {files.key_file} is not the key of the first certificate"
            f" in {files.cert_file}"
        )
    now = now or datetime.datetime.now(datetime.UTC)
    not_after = leaf.not_valid_after_utc
    if not_after <= now:
        # Every client refuses it (RFC 5280 §4.1.2.5); saying so beats a handshake error.
        errors.append(
            f"server.tls.certFile: the certificate in {files.cert_file} expired at"
            f" {not_after.isoformat()}"
        )
    if client_ca is not None:
        assert files.client_ca_file is not None
        _certificates(client_ca, files.client_ca_file, "clientCaFile")
    if errors:
        raise ConfigError(errors)
    return TlsMaterial(
        chain=chain,
        key=key_pem,
        client_ca=client_ca,
        serial_number=format(leaf.serial_number, "X"),
        not_after=not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def _paths(files: TlsFiles) -> tuple[str, ...]:
    return tuple(p for p in (files.cert_file, files.key_file, files.client_ca_file) if p)


_Signature = tuple[tuple[int, int, int, int, int] | None, ...]


def _signature(files: TlsFiles) -> _Signature:
    """What changes when a file is replaced or written: device, inode (a Kubernetes Secret
    volume swaps a symlink, so the inode changes), size and the two times, in nanoseconds. A
    file that cannot be reached counts as a state of its own (None)."""
    out: list[tuple[int, int, int, int, int] | None] = []
    for path in _paths(files):
        try:
            s = os.stat(path)  # through symlinks, as the files are read
        except OSError:
            out.append(None)
            continue
        out.append((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns))
    return tuple(out)


class CertificateFiles:
    """``server.tls``'s files as gRPC's certificate configuration fetcher sees them.

    Built once at start (ConfigError if the files are not usable). gRPC core then calls the
    instance, on one of its own threads, before each new TLS handshake: the answer is None
    (serve what you serve) unless a file changed since the last call and the new files are
    usable together, in which case it is their configuration.
    """

    def __init__(self, files: TlsFiles, report: Report | None = None) -> None:
        self.files = files
        self._report: Report = report or (lambda level, event, fields: None)
        self._lock = threading.Lock()  # gRPC may call from several threads at once
        # Taken before reading: a change while reading is then seen at the next call.
        self._seen = _signature(files)
        self.material = load_material(files)
        self._failure: str | None = None  # the last failure logged, until files work again

    @property
    def require_client_certificate(self) -> bool:
        return self.files.client_ca_file is not None

    def credentials(self) -> grpc.ServerCredentials:
        # The stubs type the fetcher as never returning None; gRPC documents None as "keep the
        # current configuration", which is what most calls answer.
        fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], self)
        return grpc.dynamic_ssl_server_credentials(
            self.material.configuration(),
            fetcher,
            require_client_authentication=self.require_client_certificate,
        )

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        if _signature(self.files) == self._seen:  # on every new connection: a stat per file
            return None
        with self._lock:
            signature = _signature(self.files)  # again: another thread may have seen it first
            if signature == self._seen:
                return None
            self._seen = signature
            try:
                material = load_material(self.files)
            except ConfigError as exc:
                self._failed(exc.errors)
                return None
            except Exception as exc:  # noqa: BLE001 (fail closed: keep the certificate served)
                self._failed([f"server.tls: unexpected {type(exc).__name__}"])
                return None
            self._failure = None
            if material.same_files(self.material):  # touched or restored, not changed
                return None
            try:
                configuration = material.configuration()
            except Exception as exc:  # noqa: BLE001 (gRPC refused it: keep the one served)
                self._failed([f"server.tls: gRPC refused the files ({type(exc).__name__})"])
                return None
            previous, self.material = self.material, material
            self._report(
                "INFO",
                RELOADED_EVENT,
                {
                    "message": "The TLS files changed: new connections get the certificate"
                    f" with serial number {material.serial_number}, valid until"
                    f" {material.not_after} (it was {previous.serial_number}).",
                    "certFile": self.files.cert_file,
                    "clientCaFile": self.files.client_ca_file,
                    **material.describe(),
                },
            )
            return configuration

    def _failed(self, errors: list[str]) -> None:
        # Once per problem: every new connection asks, and a file being written passes
        # through several states that fail alike.
        text = "; ".join(errors)
        if text == self._failure:
            return
        self._failure = text
        self._report(
            "ERROR",
            RELOAD_FAILED_EVENT,
            {
                "message": "The TLS files changed but cannot be used; the certificate with"
                f" serial number {self.material.serial_number} keeps serving.",
                "errors": errors,
                "certFile": self.files.cert_file,
                "keyFile": self.files.key_file,
                "clientCaFile": self.files.client_ca_file,
            },
        )


def _reporter(logger: JsonLogger) -> Report:
    """Log lines from gRPC's threads, written by the event loop's: the logger's buffer has one
    writer."""
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None

    def report(level: str, event: str, fields: dict[str, Any]) -> None:
        write = functools.partial(logger.log, level, event, **fields)
        if loop is None:
            write()
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is exiting
            loop.call_soon_threadsafe(write)

    return report


def add_check_port(
    server: grpc.aio.Server, listen: str, files: TlsFiles | None, logger: JsonLogger
) -> int:
    """Bind the check listener on ``listen``: plain gRPC without ``server.tls``, else TLS (mTLS
    with ``clientCaFile``) whose files are re-read when they change. The port; 0 when the
    address cannot be bound (the caller logs ``server.listenFailed``). ConfigError when the TLS
    files are not usable: the server must not start."""
    certificates = None if files is None else CertificateFiles(files, _reporter(logger))
    try:
        if certificates is None:
            return server.add_insecure_port(listen)
        port = server.add_secure_port(listen, certificates.credentials())
    except RuntimeError:  # what gRPC raises when it cannot bind; its reason went to stderr
        return 0
    clients = (
        f"required, from the CA in {certificates.files.client_ca_file}"
        if certificates.require_client_certificate
        else "not asked for"
    )
    logger.info(
        LOADED_EVENT,
        message=f"TLS on {listen}; client certificates {clients}.",
        listen=listen,
        certFile=certificates.files.cert_file,
        clientCaFile=certificates.files.client_ca_file,
        **certificates.material.describe(),
    )
    return port


def _ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """A server context over ``files`` (TLS 1.2 or later; client certificates required and
    verified against ``clientCaFile`` when it is set)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.cert_file, files.key_file)
    if files.client_ca_file is not None:
        context.load_verify_locations(cafile=files.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def http_ssl_context(files: TlsFiles, logger: JsonLogger) -> ssl.SSLContext:
    """``server.tls`` for the HTTP wire's listener, rotated as the gRPC listener's is: at each
    new connection's ClientHello (the SNI callback, which OpenSSL calls with or without a server
    name) the files are looked at, and a changed, usable set is served from that connection on.
    ConfigError when the files are not usable at start."""
    # Its own CertificateFiles: each listener must see a change for itself.
    certificates = CertificateFiles(files, _reporter(logger))
    listening = _ssl_context(files)
    served = [listening]  # until the files change, the listening context serves

    def on_hello(connection: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _: Any) -> None:
        if certificates() is not None:  # changed, and checked to be usable together
            # Replaced again while being read: the next connection tries again.
            with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                served[0] = _ssl_context(files)
        if connection.context is not served[0]:
            connection.context = served[0]

    listening.sni_callback = on_hello
    return listening


def warn_if_tls_changed(logger: JsonLogger, old: Config, new: Config) -> None:
    """After a config reload: the listener is bound at start, so a changed ``server.tls`` (other
    paths, TLS switched on or off, mTLS on or off) applies at the next start. The files named
    by the running settings are still re-read when they change."""
    if old.server.tls == new.server.tls:
        return
    logger.warning(
        NEEDS_RESTART_EVENT,
        message="server.tls changed in the config file; the check listener keeps its TLS"
        " settings until extauthz restarts (the certificate files it uses are still re-read"
        " when they change).",
        config=new.source,
    )
