"""Load with Debian ``wrk`` and the latency math.

``wrk`` runs ``bench/wrk/bench.lua``, whose ``done()`` writes a JSON summary with the whole
latency histogram (one count per microsecond value), so percentiles (p50, p99, p99.9) are
computed here by :func:`percentile`, the same way for every backend.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench.procs import die_with_parent

LUA = Path(__file__).resolve().parent / "wrk" / "bench.lua"


def percentile(histogram: Sequence[Sequence[int]], p: float) -> float:
    """The ``p``-th percentile (0 < p <= 100) of a histogram of ``[value, count]`` pairs: the
    smallest value with at least ``p`` % of the samples at or below it (nearest rank). NaN when
    the histogram is empty."""
    if not 0 < p <= 100:
        raise ValueError("p must be in (0, 100]")
    pairs = sorted((int(v), int(c)) for v, c in histogram if c > 0)
    total = sum(c for _, c in pairs)
    if total == 0:
        return math.nan
    rank = math.ceil(p / 100.0 * total)
    seen = 0
    for value, count in pairs:
        seen += count
        if seen >= rank:
            return float(value)
    return float(pairs[-1][0])


def merge_histograms(histograms: Iterable[Sequence[Sequence[int]]]) -> list[list[int]]:
    merged: dict[int, int] = {}
    for h in histograms:
        for v, c in h:
            merged[int(v)] = merged.get(int(v), 0) + int(c)
    return [[v, merged[v]] for v in sorted(merged)]


@dataclass
class Load:
    """What to send: see the header of bench/wrk/bench.lua for the modes."""

    mode: str = "fixed"  # fixed | rotate | unique | paths
    token: str = ""
    token_file: str | None = None
    path_file: str | None = None  # mode paths: the paths asked for, one per line, rotated
    proof_file: str | None = None  # mode dpop: DPoP proofs, one per line, each sent once
    delay_ms: float = 0.0
    stop_after: int = 0  # per wrk thread

    def env(self) -> dict[str, str]:
        env = {
            "BENCH_MODE": self.mode,
            "BENCH_TOKEN": self.token,
            "BENCH_NONCE": uuid.uuid4().hex[:10],  # unique tokens never repeat across runs
            "BENCH_DELAY_MS": f"{self.delay_ms:g}",
            "BENCH_STOP_AFTER": str(self.stop_after),
        }
        if self.token_file:
            env["BENCH_TOKEN_FILE"] = self.token_file
        if self.path_file:
            env["BENCH_PATH_FILE"] = self.path_file
        if self.proof_file:
            env["BENCH_PROOF_FILE"] = self.proof_file
        return env


@dataclass
class WrkResult:
    requests: int
    seconds: float
    errors: dict[str, int]
    histogram: list[list[int]] = field(repr=False)
    wrk_latency_us: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def latency_ms(self, p: float) -> float:
        return percentile(self.histogram, p) / 1000.0

    @property
    def socket_errors(self) -> int:
        return sum(v for k, v in self.errors.items() if k != "status")

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> WrkResult:
        return cls(
            requests=int(summary["requests"]),
            seconds=int(summary["duration_us"]) / 1e6,
            errors={k: int(v) for k, v in summary["errors"].items()},
            histogram=[[int(v), int(c)] for v, c in summary.get("histogram", [])],
            wrk_latency_us=summary.get("wrk_latency_us", {}),
        )


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("wrk is not installed: apt-get install -y wrk (make bench does this)")
    return found


def wrk_command(
    url: str, *, connections: int, seconds: float, threads: int = 1, timeout_s: float = 5.0
) -> list[str]:
    threads = max(1, min(threads, connections))
    return [
        wrk_binary(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={timeout_s:g}s",
        "-s",
        str(LUA),
        url,
    ]


class RunningWrk:
    """A wrk run started in the background (:func:`start_wrk`); :meth:`result` (or, in an event
    loop, :meth:`finished`) waits for it. wrk's own output goes to ``log`` when given (appended),
    else into the error raised when wrk fails."""

    def __init__(
        self,
        cmd: list[str],
        env: Mapping[str, str],
        out_path: Path,
        seconds: float,
        log: Path | None = None,
    ) -> None:
        self.out_path = out_path
        self.seconds = seconds
        self.log = log
        self.deadline = time.monotonic() + seconds + 30
        self.stopped = False
        output: IO[str] | int = open(log, "a") if log else subprocess.PIPE  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                cmd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                text=True,
                preexec_fn=die_with_parent,  # the harness is single-threaded
            )
        finally:
            if not isinstance(output, int):
                output.close()

    def stop(self) -> None:
        """End the run early: SIGINT, on which wrk still writes its summary."""
        if not self.stopped and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.stopped = True

    def result(self, until: Callable[[], bool] | None = None) -> WrkResult:
        """Wait for wrk (killed if it overstays its duration by 30 s) and read its summary.
        With ``until``, polled every 0.25 s, wrk is stopped early once ``until()`` is true."""
        try:
            while self.running():
                if until is not None and not self.stopped and until():
                    self.stop()
                time.sleep(0.25 if until is not None else 0.05)
            return self.summary()
        finally:
            self.close()

    async def finished(self) -> WrkResult:
        """:meth:`result` without blocking the event loop."""
        try:
            while self.running():
                await asyncio.sleep(0.1)
            return self.summary()
        finally:
            self.close()

    def running(self) -> bool:
        if self.proc.poll() is not None:
            return False
        if time.monotonic() > self.deadline:
            raise RuntimeError(f"wrk overstayed {self.seconds} s by 30 s")
        return True

    def summary(self) -> WrkResult:
        """The summary of the run that has ended (bench.lua's JSON)."""
        if self.proc.returncode != 0 or self.out_path.stat().st_size == 0:
            output = self.proc.stdout.read() if self.proc.stdout else f"see {self.log}"
            raise RuntimeError(f"wrk failed ({self.proc.returncode}): {output}")
        return WrkResult.from_summary(json.loads(self.out_path.read_text(encoding="utf-8")))

    def close(self) -> None:
        """Kill wrk if it still runs; remove its summary file."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.out_path.unlink(missing_ok=True)


def start_wrk(
    url: str,
    load: Load,
    *,
    connections: int,
    seconds: float,
    threads: int = 1,
    workdir: Path | None = None,
    log: Path | None = None,
) -> RunningWrk:
    """Start one bounded wrk run and return at once; ``.result()`` waits for it (killed if it
    overstays its duration by 30 s), a load may run beside it meanwhile."""
    with tempfile.NamedTemporaryFile(
        "r", suffix=".json", dir=workdir, delete=False, encoding="utf-8"
    ) as out:
        out_path = Path(out.name)
    cmd = wrk_command(url, connections=connections, seconds=seconds, threads=threads)
    # Mode dpop shares its proofs out among wrk's threads (as wrk_command clamps them).
    used = max(1, min(threads, connections))
    env = {**os.environ, **load.env(), "BENCH_OUT": str(out_path), "BENCH_THREADS": str(used)}
    return RunningWrk(cmd, env, out_path, seconds, log)
