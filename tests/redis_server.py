"""A real ``redis-server`` for the shared cache (``server.sharedCache``): one harness for the
integration tests, the end-to-end fleet test and the bench's fleet scenario (bench/fleet.py).

    server = RedisServer(find_redis_server(), workdir).start()   # a free loopback port, a password
    server.uri, server.password, server.client().keys("*")
    server.kill()                                                 # SIGKILL: gone, nothing saved
    server.start()                                                # again, same port and password

A test module that imports ``redis_server_fixture`` has the ``redis_server`` fixture
(``tls_redis_server_fixture``: ``tls_redis_server``, for ``rediss://``). redis-server must be installed (the Debian
package ``redis-server``, which container/host-setup.sh installs as root on Debian): without it
the fixtures skip, except under CI=true or as root on Debian, where they fail, since there they
must run.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from extauthz.shared_cache import SharedCache
from tests.integration.serverproc import free_port
from tests.waiting import wait_until

__all__ = [
    "REDIS_MISSING",
    "RedisServer",
    "find_redis_server",
    "redis_binary",
    "redis_server_fixture",
    "tls_redis_server_fixture",
]

REDIS_MISSING = "redis-server is not installed (Debian: apt-get install redis-server)"
IN_CI = os.environ.get("CI") == "true"
ROOT_ON_DEBIAN = os.geteuid() == 0 and shutil.which("apt-get") is not None


def find_redis_server() -> str | None:
    """The ``redis-server`` on PATH, if any: the one the tests and the bench run."""
    return shutil.which("redis-server")


class RedisServer:
    """``redis-server`` on a free loopback port with a random password and no persistence;
    :meth:`kill` and :meth:`start` again on the same port."""

    def __init__(self, binary: str, workdir: Path, *, tls: bool = False) -> None:
        self.binary, self.workdir = binary, workdir
        self.port = free_port()
        self.password = secrets.token_urlsafe(24)
        self.proc: subprocess.Popen[bytes] | None = None
        self.cert: Path | None = None
        self.key: Path | None = None
        if tls:  # a self-signed certificate for 127.0.0.1; TLS only, no plain port
            from tests.integration.faulty_idp import self_signed_certificate

            self.cert, self.key = self_signed_certificate(workdir)

    @property
    def uri(self) -> str:
        return f"{'rediss' if self.cert else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        if self.cert is not None:
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            ports += ["--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key)]
        else:
            ports = ["--port", str(self.port)]
        self.proc = subprocess.Popen(
            [
                self.binary, *ports, "--bind", "127.0.0.1",
                "--requirepass", self.password, "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir),
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(self._answers, timeout=10, what="redis-server answering PING")
        return self

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        if self.cert is not None:
            return redis.Redis(
                port=self.port, password=self.password, socket_timeout=2,
                ssl=True, ssl_ca_certs=str(self.cert),
            )  # fmt: skip
        return redis.Redis(port=self.port, password=self.password, socket_timeout=2)

    def kill(self) -> None:
        """SIGKILL, as an OOM kill or a lost node: no shutdown, nothing saved."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


def redis_binary() -> str:
    """The redis-server the fixtures run; skips the test without one, fails it where it must
    run (CI=true, or root on Debian, where container/host-setup.sh installs it)."""
    binary = find_redis_server()
    if binary is None:
        if IN_CI or ROOT_ON_DEBIAN:
            pytest.fail(f"{REDIS_MISSING}; container/host-setup.sh installs it", pytrace=False)
        pytest.skip(REDIS_MISSING)
    return binary


@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(redis_binary(), tmp_path).start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(name="tls_redis_server")
def tls_redis_server_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(redis_binary(), tmp_path, tls=True).start()
    try:
        yield server
    finally:
        server.kill()


def fleet_keys(signing_key: bytes, client: Any = None) -> SharedCache:
    """The fleet's keys and seals (:class:`SharedCache` over ``client``, or none at all): what a
    test needs to find a token's entry, or write one, as an operator with the key could."""
    return SharedCache(
        client,
        signing_key,
        timeout_seconds=1,
        display_uri="",
        report=lambda *_: None,
        count=lambda *_: None,
    )
