"""extauthz as a user runs it, for integration tests: ``python -m extauthz serve`` in a subprocess.

    with ExtauthzProcess(config_dict, tmp_path, env={"SECRET": "..."}) as server:
        checked = server.check(token, path="/orders/1")
        checked.allowed, checked.http_status, checked.headers, checked.body
        server.send(check_request_message)               # a CheckRequest as given
        server.line(checked.request_id, "access")       # waits for the JSON log line
        server.metric("extauthz_idp_requests_total", endpoint="jwks_uri", outcome="ok")
        server.stop()                                    # SIGTERM and the drain: the exit status

``separate_stderr=True`` keeps stderr apart from the JSON log lines on stdout (the security suite
looks for tracebacks there); ``args`` go on the ``serve`` command line; ``workers=2`` starts two
worker processes on the one port (and waits until both have started); ``config_file`` serves a
file the test laid out itself (a symlink into a ConfigMap-like directory, say) instead of writing
``config``. ``run_extauthz("check-config", path)`` runs any other command to its exit.

Free loopback ports, a config written to a file, start-up and log lines waited on with deadlines.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml

from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from tests.check_requests import check_request
from tests.prometheus_text import sample_sum
from tests.waiting import wait_until

__all__ = [
    "Checked",
    "ExtauthzProcess",
    "closed_port",
    "extauthz_env",
    "free_port",
    "run_extauthz",
    "stop_process",
]

ROOT = Path(__file__).resolve().parents[2]


def extauthz_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment extauthz runs in from the tests: this checkout importable, unbuffered."""
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", **(extra or {})}


def run_extauthz(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``python -m extauthz <args>`` as an operator runs it, to its exit; stdout and stderr kept."""
    return subprocess.run(
        [sys.executable, "-m", "extauthz", *args],
        capture_output=True,
        text=True,
        env=extauthz_env(env),
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> int | None:
    """SIGTERM, wait up to ``timeout`` seconds for the drain, then kill; the exit status."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def closed_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    return free_port()


@dataclass
class Checked:
    """One CheckRequest and what came back."""

    request_id: str
    response: ext.CheckResponse
    seconds: float  # round trip, as the client measured it

    @property
    def allowed(self) -> bool:
        return self.response.status.code == 0 and self.response.HasField("ok_response")

    @property
    def grpc_code(self) -> int:
        return int(self.response.status.code)

    @property
    def http_status(self) -> int:
        return int(self.response.denied_response.status.code)

    @property
    def headers(self) -> dict[str, str]:
        """The denied response's headers."""
        return {h.header.key: h.header.value for h in self.response.denied_response.headers}

    @property
    def upstream_headers(self) -> dict[str, str]:
        """Headers an allow adds for the upstream."""
        return {h.header.key: h.header.value for h in self.response.ok_response.headers}

    @property
    def body(self) -> Any:
        return json.loads(self.response.denied_response.body)


class ExtauthzProcess:
    def __init__(
        self,
        config: Mapping[str, Any] | None,
        workdir: Path,
        *,
        config_file: Path | None = None,
        workers: int = 1,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
        separate_stderr: bool = False,
        grace_seconds: float = 1.0,
        args: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        if config_file is None:
            assert config is not None, "a config to write, or a config_file to serve"
            config_file = workdir / "extauthz.yaml"
            # No drain unless the test asks for one: each stop would otherwise wait the default 5 s
            # of NOT_SERVING that a fleet needs and a test of something else does not.
            server = {"drainSeconds": 0, **dict(config.get("server") or {})}
            config_file.write_text(yaml.safe_dump({**dict(config), "server": server}, sort_keys=False))
        self.config_path = config_file
        self.log_path = workdir / "extauthz.log"
        self.stderr_path = workdir / "extauthz.stderr.log" if separate_stderr else None
        self.workers = workers
        worker_args = ["--workers", str(workers)] if workers != 1 else []
        self._args = ["--grace-seconds", f"{grace_seconds:g}", *worker_args, *args]
        self.port, self.admin_port = free_port(), free_port()
        self._env = extauthz_env(env)
        self._start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None
        self.stub: Any = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> ExtauthzProcess:
        """Start the server; return once every worker has logged server.started."""
        err_path = self.stderr_path
        with self.log_path.open("wb") as out, (err_path or Path(os.devnull)).open("wb") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "extauthz", "serve",
                    "--config", str(self.config_path),
                    "--listen", f"127.0.0.1:{self.port}",
                    "--admin-listen", f"127.0.0.1:{self.admin_port}",
                    *self._args,
                ],
                stdout=out, stderr=err if err_path else subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=self._env, cwd=self.workdir,
            )
        proc = self.proc
        wait_until(
            lambda: proc.poll() is not None or len(self.events("server.started")) >= self.workers,
            timeout=self._start_timeout,
            what=f"extauthz server.started ({self.workers} worker(s))",
        )
        if proc.poll() is not None:
            raise AssertionError(f"extauthz exited ({proc.returncode}):\n{self.text()}")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = ext_grpc.AuthorizationStub(self.channel)  # type: ignore[no-untyped-call]
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and the drain; the exit status."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        return stop_process(self.proc, timeout)

    def __enter__(self) -> ExtauthzProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- checks ----------------------------------------------------------------------------

    def check(
        self,
        token: str | None = None,
        *,
        path: str = "/",
        method: str = "GET",
        host: str = "api.example.com",
        headers: Mapping[str, str] | None = None,
        timeout: float = 20.0,
    ) -> Checked:
        request_id = f"it-{uuid.uuid4()}"
        req = check_request(
            path, token=token, method=method, host=host, headers=headers, request_id=request_id
        )
        started = time.perf_counter()
        response = self.stub.Check(req, timeout=timeout)
        return Checked(request_id, response, time.perf_counter() - started)

    def send(
        self,
        request: ext.CheckRequest,
        timeout: float = 10.0,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> ext.CheckResponse:
        """One CheckRequest exactly as given (with this gRPC metadata, as Envoy sends it)."""
        response: ext.CheckResponse = self.stub.Check(request, timeout=timeout, metadata=metadata)
        return response

    def check_many(
        self, requests: Iterable[tuple[str | None, str]], *, timeout: float = 20.0
    ) -> list[tuple[str, Future[Any]]]:
        """Send ``(token, path)`` checks all at once; each with its request id and future."""
        out = []
        for token, path in requests:
            request_id = f"it-{uuid.uuid4()}"
            req = check_request(path, token=token, request_id=request_id)
            out.append((request_id, self.stub.Check.future(req, timeout=timeout)))
        return out

    # -- logs ------------------------------------------------------------------------------

    def text(self) -> str:
        """Standard output (and standard error, unless kept apart)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    stdout = text

    def stderr(self) -> str:
        """Standard error when kept apart (``separate_stderr``), else ""."""
        path = self.stderr_path
        return path.read_text(errors="replace") if path is not None and path.exists() else ""

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.text().splitlines():
            if raw.startswith("{"):
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue  # a line still being written
                if isinstance(record, dict):
                    out.append(record)
        return out

    def events(self, event: str) -> list[dict[str, Any]]:
        """Every line of this event, in the order written."""
        return [line for line in self.lines() if line.get("event") == event]

    def lines_for(self, request_id: str, event: str | None = None) -> list[dict[str, Any]]:
        return [
            line for line in self.lines()
            if line.get("requestId") == request_id and (event is None or line.get("event") == event)
        ]

    def line(self, request_id: str, event: str, *, timeout: float = 10.0) -> dict[str, Any]:
        """The one line with this requestId and event, once it has been written."""
        found = wait_until(
            lambda: self.lines_for(request_id, event),
            timeout=timeout,
            what=f"log line {event} for {request_id}",
        )
        assert len(found) == 1, found
        return found[0]

    # -- admin -----------------------------------------------------------------------------

    def admin(self, page: str) -> tuple[int, str]:
        """GET ``/<page>`` on the admin listener: the status and the body."""
        url = f"http://127.0.0.1:{self.admin_port}/{page}"
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status), str(r.read().decode())

    def metrics_text(self) -> str:
        return self.admin("metrics")[1]

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` whose labels include ``labels`` (0 when there is
        none yet): a label the test does not name (``wire``) is summed over."""
        return sample_sum(self.metrics_text(), name, **labels)


def http_json(url: str) -> tuple[int, Any] | None:
    """An admin page's status and JSON body (an error status too); None while nothing listens."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())
    except OSError:
        return None
