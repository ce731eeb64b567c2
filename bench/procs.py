"""Processes the harness starts, and what /proc says about them.

Every child is started through :class:`Processes`, which stops them all (SIGTERM, then SIGKILL,
children of children included) when the ``with`` block ends, however it ends. Each child also
gets ``PR_SET_PDEATHSIG``, so even a harness killed with SIGKILL does not leave Envoy running.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

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


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free right now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


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


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_get(
    url: str, headers: Mapping[str, str] | None = None, timeout: float = 2.0
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


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


class StartError(RuntimeError):
    pass


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
