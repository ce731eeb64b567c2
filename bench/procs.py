"""Processes the harness starts, and what /proc says about them.

Every child is started through :class:`Processes`, which stops them all (SIGTERM, then SIGKILL,
children of children included) when the ``with`` block ends, however it ends. Each child also
gets ``PR_SET_PDEATHSIG``, so even a harness killed with SIGKILL does not leave Envoy running.
Envoy and extauthz are started the same way for the bench (bench/run.py) and the chaos scenarios
(bench/chaos.py): :func:`start_envoy`, :func:`start_extauthz`. Finding Envoy, free ports and the
``extauthz serve`` arguments are the demo stack's (examples/stack.py), so there is one of each.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import yaml

from examples.stack import StackError, accepts_tcp, find_envoy, free_ports, http_get, serve_args

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
_PR_SET_PDEATHSIG = 1


# --- /proc -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    utime: int  # clock ticks
    stime: int
    rss_pages: int


def parse_stat(text: str) -> ProcStat:
    """One ``/proc/<pid>/stat`` line (the command name may hold spaces and parentheses)."""
    pid = int(text[: text.index("(")].strip())
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15, rss 24 (man 5 proc).
    return ProcStat(pid, int(rest[1]), int(rest[11]), int(rest[12]), int(rest[21]))


def read_stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return parse_stat(f.read())
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return None


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = read_stat(int(entry))
            if st is not None:
                children.setdefault(st.ppid, []).append(st.pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid == root and read_stat(pid) is None:
            continue
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


@dataclass(frozen=True)
class Usage:
    """CPU seconds (user + system) and RSS of a set of processes at one moment."""

    cpu_seconds: float
    rss_kb: int
    pids: tuple[int, ...]
    per_pid_cpu: dict[int, float] = field(default_factory=dict)


def usage(roots: Iterable[int]) -> Usage:
    """The processes under ``roots`` (each root and its descendants, e.g. ``--workers``)."""
    ticks, rss, pids, per_pid = 0, 0, [], {}
    for root in roots:
        for pid in process_tree(root):
            st = read_stat(pid)
            if st is not None:
                ticks += st.utime + st.stime
                rss += st.rss_pages * PAGE_KB
                pids.append(pid)
                per_pid[pid] = (st.utime + st.stime) / CLK_TCK
    return Usage(ticks / CLK_TCK, rss, tuple(pids), per_pid)


def cpu_split(before: Usage, after: Usage) -> list[float]:
    """CPU seconds each process used between two readings, largest first (with ``--workers``,
    how evenly the checks were spread)."""
    return sorted(
        (round(after.per_pid_cpu[p] - before.per_pid_cpu.get(p, 0.0), 3) for p in after.pids),
        reverse=True,
    )


def count_listening(proc_net_tcp: str, port: int) -> int:
    """Sockets in LISTEN state (``0A``) on ``port`` in a ``/proc/net/tcp`` or ``tcp6`` table.
    With SO_REUSEPORT each process has its own, so this counts the workers listening."""
    n = 0
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A" and fields[1].endswith(f":{port:04X}"):
            n += 1
    return n


def listening_sockets(port: int) -> int:
    """How many sockets listen on ``port`` (IPv4 and IPv6; grpc listens on a v4-mapped IPv6
    socket)."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                n += count_listening(f.read(), port)
        except OSError:
            pass
    return n


# --- starting and stopping -----------------------------------------------------------------------


def free_port_run(n: int, attempts: int = 50) -> int:
    """A first port P with P..P+n-1 all free (for servers on consecutive ports)."""
    for _ in range(attempts):
        base = free_ports(1)[0]
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no run of {n} free ports found")


def die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the harness dies, however it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def run_workdir(results: Path, prefix: str) -> Path:
    """Make a fresh work dir under ``results/tmp`` and let SIGTERM unwind the run.

    SIGTERM becomes SystemExit, so every ``with Processes()`` block on the way out stops what it
    started: a harness stopped from outside leaves nothing running.
    """

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    results.joinpath("tmp").mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=results / "tmp"))


# A process did not start, or did not become ready in time.
StartError = StackError


class Proc:
    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log
        self.admin_url = ""  # extauthz: its admin listener

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.alive():
                raise StartError(
                    f"{self.name} exited ({self.popen.returncode}) before {what}:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise StartError(f"{self.name}: no {what} after {timeout:g}s:\n{self.tail()}")
            time.sleep(0.05)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process, SIGKILL it after ``grace`` seconds, then any descendant left."""
        tree = process_tree(self.pid) if self.alive() else []
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        for pid in tree[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class Processes:
    """Every process of a bench stage; ``with Processes(dir) as procs: procs.start(...)``."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[Proc] = []

    def start(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: str | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        """Start ``cmd``; stderr (and stdout unless ``stdout`` names a file, e.g. /dev/null)
        go to ``<logdir>/<name>.log``."""
        self.logdir.mkdir(parents=True, exist_ok=True)
        log = self.logdir / f"{name}.log"
        err: IO[bytes] = open(log, "wb")  # noqa: SIM115 (handed to the child)
        out: IO[bytes] = open(stdout, "wb") if stdout else err  # noqa: SIM115
        try:
            popen = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                preexec_fn=die_with_parent,  # the harness is single-threaded
            )
        finally:
            err.close()
            if out is not err:
                out.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        while self.procs:
            self.procs.pop().stop()

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- Envoy and extauthz ------------------------------------------------------------------------


def start_envoy(
    procs: Processes, workdir: Path, name: str, boot: dict[str, Any], admin_port: int
) -> Proc:
    """Envoy (``--concurrency 1``) with the bootstrap ``boot``, once LIVE on its /ready."""
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(boot, sort_keys=False), encoding="utf-8")
    envoy = find_envoy()
    base_id = (os.getpid() * 8 + len(procs.procs)) % 4_000_000
    proc = procs.start(
        name,
        [envoy, "-c", str(path), "--concurrency", "1", "--base-id", str(base_id), "-l", "warning"],
    )
    proc.wait_until(
        lambda: (
            http_get(f"http://127.0.0.1:{admin_port}/ready", timeout=0.5)[0] == 200
            if accepts_tcp(admin_port)
            else False
        ),
        30,
        "LIVE on /ready",
    )
    return proc


def start_extauthz(
    procs: Processes,
    name: str,
    config: Path,
    ports: tuple[int, int],
    *,
    options: Sequence[str] = (),
    env: Mapping[str, str],
    stdout: str | None,
    timeout: float,
    listening: Callable[[], bool] = lambda: True,
    what: str = "ready on /readyz",
) -> Proc:
    """``python -m extauthz serve`` with ``config`` on ``ports`` (gRPC, admin), then ``options``;
    returned once ``listening()`` holds and its /readyz answers 200, stopped if it never does."""
    port, admin = ports
    cmd = [sys.executable, "-m", "extauthz", *serve_args(config, port, admin), *options]
    proc = procs.start(name, cmd, env=env, stdout=stdout)
    proc.admin_url = f"http://127.0.0.1:{admin}"
    try:
        proc.wait_until(
            lambda: (
                accepts_tcp(admin)
                and listening()
                and http_get(f"{proc.admin_url}/readyz", timeout=1)[0] == 200
            ),
            timeout,
            what,
        )
    except BaseException:
        procs.stop(proc)
        raise
    return proc


# --- what a run records about where it ran -----------------------------------------------------


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} × {model}, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
    except OSError:
        return ""


def commit() -> str:
    """The commit checked out, with ``+dirty`` when a tracked file differs from it."""
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return _git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")


def envoy_version() -> str:
    """What ``envoy --version`` says after ``version: ``: <sha>/1.40.0/Clean/RELEASE/BoringSSL."""
    out = subprocess.run([find_envoy(), "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip().split("version: ")[-1]
