"""server.tls on the HTTP wire's listener too: mTLS with the same files as gRPC, and a rotated
certificate served to the next connection without a restart (docs/configuration.md, TLS)."""

from __future__ import annotations

import socket
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.integration.serverproc import ExtauthzProcess, free_port
from tests.integration.test_tls import Issued, Pki, make_pki, policy, tls_config  # noqa: F401 (policy: a fixture)
from tests.waiting import wait_until


@pytest.fixture
def own_pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")  # this test rotates the server certificate: its own files


@pytest.fixture
def server(own_pki: Pki, policy: dict[str, Any], tmp_path: Path) -> Iterator[tuple[ExtauthzProcess, int]]:
    port = free_port()
    args = ["--http-listen", f"127.0.0.1:{port}"]
    with ExtauthzProcess(tls_config(policy, own_pki.tls()), tmp_path / "server", args=args) as running:
        yield running, port


def context(pki: Pki, client: Issued | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
    if client is not None:
        with tempfile.TemporaryDirectory() as directory:
            cert, key = client.write(Path(directory), "client")
            ctx.load_cert_chain(cert, key)
    return ctx


def ask(port: int, ctx: ssl.SSLContext) -> tuple[bytes, int]:
    """One check over TLS: the response's status line, and the serial of the server's certificate."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"GET /orders/1 HTTP/1.1\r\nhost: api.example.com\r\nx-request-id: t-1\r\n\r\n")
        answer = tls.recv(65536)
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return answer.split(b"\r\n", 1)[0], x509.load_der_x509_certificate(der).serial_number


def refused(port: int, ctx: ssl.SSLContext) -> bool:
    """No HTTP answer: the handshake failed (with TLS 1.3 the client learns it at its first
    read: an alert, or the connection closed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /orders/1 HTTP/1.1\r\nhost: api.example.com\r\n\r\n")
            return not tls.recv(65536).startswith(b"HTTP/")
    except (ssl.SSLError, OSError):
        return True


def test_mtls_on_the_http_wire_and_a_rotated_certificate(own_pki: Pki, server: tuple[ExtauthzProcess, int]) -> None:
    _, port = server
    status, serial = ask(port, context(own_pki, own_pki.client))
    assert status == b"HTTP/1.1 401 Unauthorized" and serial == own_pki.server.serial
    for stranger in (None, own_pki.foreign_client, own_pki.expired_client):
        assert refused(port, context(own_pki, stranger))
    rotated = own_pki.ca.issue("extauthz", server=True)
    own_pki.serve(rotated)
    assert wait_until(lambda: ask(port, context(own_pki, own_pki.client))[1] == rotated.serial,
                      timeout=10, what="the rotated certificate served")  # fmt: skip
