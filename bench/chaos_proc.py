"""What /proc says about extauthz during a chaos scenario: RSS and its TCP connections over time.

RSS comes from bench/procs.py (:func:`bench.procs.usage`, the process and its children). The
connections are the process's socket file descriptors (``/proc/<pid>/fd`` → ``socket:[inode]``)
looked up in ``/proc/net/tcp`` and ``tcp6``, so "connections to the IdP" counts exactly the
sockets extauthz holds whose remote port is the IdP's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from bench.procs import process_tree, usage

TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


class TcpSocket(NamedTuple):
    local_port: int
    remote_port: int
    state: str
    inode: int


def parse_proc_net_tcp(text: str) -> list[TcpSocket]:
    """The sockets of a ``/proc/net/tcp`` or ``tcp6`` table (header line skipped)."""
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        try:
            local_port = int(f[1].rsplit(":", 1)[1], 16)
            remote_port = int(f[2].rsplit(":", 1)[1], 16)
            inode = int(f[9])
        except (IndexError, ValueError):
            continue
        out.append(TcpSocket(local_port, remote_port, TCP_STATES.get(f[3], f[3]), inode))
    return out


def socket_inodes(pid: int) -> tuple[set[int], int]:
    """The inodes of ``pid``'s sockets, and how many file descriptors it has open."""
    inodes: set[int] = set()
    n = 0
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes, 0
    for fd in entries:
        n += 1
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes, n


def tcp_table() -> list[TcpSocket]:
    out: list[TcpSocket] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as f:
            out.extend(parse_proc_net_tcp(f.read()))
    return out


def connections_to(pids: list[int], remote_port: int) -> tuple[int, int]:
    """(TCP connections of ``pids`` to ``remote_port`` not yet closed, open fds of ``pids``)."""
    inodes: set[int] = set()
    fds = 0
    for pid in pids:
        i, n = socket_inodes(pid)
        inodes |= i
        fds += n
    conns = sum(
        1
        for s in tcp_table()
        if s.inode in inodes and s.remote_port == remote_port and s.state != "LISTEN"
    )
    return conns, fds


class Sample(NamedTuple):
    t: float  # time.time()
    rss_kb: int
    idp_connections: int
    fds: int
    cpu_s: float  # user + system CPU seconds of the process tree so far


@dataclass
class Sampler:
    """Samples the server every ``interval`` seconds on the event loop, until stopped."""

    pid: int
    idp_port: int
    interval: float = 0.25
    samples: list[Sample] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def sample(self) -> Sample | None:
        pids = process_tree(self.pid)
        if not pids:
            return None
        conns, fds = connections_to(pids, self.idp_port)
        use = usage([self.pid])
        s = Sample(time.time(), use.rss_kb, conns, fds, use.cpu_seconds)
        self.samples.append(s)
        return s

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def peak_rss_mb(self, start: float = 0.0, end: float = float("inf")) -> float:
        vals = [s.rss_kb for s in self.samples if start <= s.t <= end]
        return max(vals) / 1024 if vals else float("nan")

    def max_connections(self, start: float = 0.0, end: float = float("inf")) -> int:
        return max((s.idp_connections for s in self.samples if start <= s.t <= end), default=0)

    def max_fds(self, start: float = 0.0, end: float = float("inf")) -> int:
        return max((s.fds for s in self.samples if start <= s.t <= end), default=0)
