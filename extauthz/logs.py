"""JSON log lines on stdout (docs/logs.md), with redaction in one place.

Every line has ``ts`` (RFC 3339 UTC), ``level``, ``event`` and ``requestId``. Tokens, secrets,
``Authorization`` values and IdP response bodies are never passed in; :func:`token_hash` is the
only way a token may be named.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
from contextvars import ContextVar
from typing import IO, Any

__all__ = ["JsonLogger", "current_request_id", "current_trace_id", "rfc3339", "token_hash"]

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}
_DRY_RUN = ',"dryRun":true'
# The access line's path beyond this is cut and marked with its length.
MAX_LOGGED_PATH_CHARS = 2048

current_request_id: ContextVar[str | None] = ContextVar("current_request_id", default=None)
current_trace_id: ContextVar[str | None] = ContextVar("current_trace_id", default=None)


def rfc3339(epoch: float | None = None) -> str:
    """``2026-11-22T10:00:00.123Z``; the second part is formatted once per second."""
    global _second, _second_text
    t = time.time() if epoch is None else epoch
    second = int(t)
    if second != _second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        if epoch is not None:
            return text + _MILLIS[int((t - second) * 1000)]
        _second, _second_text = second, text
    return _second_text + _MILLIS[int((t - second) * 1000)]


_second = -1
_second_text = ""
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))


def token_hash(token: str) -> str:
    """The first 8 hex characters of the token's SHA-256: enough to tell tokens apart in logs."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


class JsonLogger:
    """One JSON object per line. With ``autoflush`` off (the server), lines are buffered and the
    owner calls :meth:`flush` on a short timer, so a check does not pay for a write syscall."""

    def __init__(
        self, stream: IO[str] | None = None, level: str = "INFO", *, autoflush: bool = True
    ) -> None:
        self._stream = stream
        self.level = LEVELS.get(level, 20)
        self.autoflush = autoflush
        self._pending: list[str] = []

    def set_level(self, level: str) -> None:
        self.level = LEVELS.get(level, 20)

    def flush(self) -> None:
        stream = self._stream or sys.stdout
        if self._pending:
            text, self._pending = "".join(self._pending), []
            fd = _fileno(stream)
            if fd is None:
                stream.write(text)
            else:
                stream.flush()
                _write_whole_lines(fd, text.encode())
        stream.flush()

    def log(self, level: str, event: str, /, **fields: Any) -> None:
        if LEVELS[level] < self.level:
            return
        request_id = fields.pop("requestId", None) or current_request_id.get() or str(uuid.uuid4())
        line = {"ts": rfc3339(), "level": level, "event": event, "requestId": request_id}
        trace_id = current_trace_id.get()
        if trace_id is not None:
            line["traceId"] = trace_id
        line.update((k, v) for k, v in fields.items() if v is not None)
        self._write(json.dumps(line, separators=(",", ":"), default=str))

    def _write(self, text: str) -> None:
        if not self.autoflush:
            self._pending.append(text + "\n")
            return
        stream = self._stream or sys.stdout
        stream.write(text + "\n")
        stream.flush()

    def access(
        self,
        request_id: str,
        deployment: str,
        route: str,
        method: str,
        path: str,
        status: int,
        decision: str,
        reason: str,
        latency_ms: float,
        idp_calls: int,
        dry_run: bool = False,
        auth_server: str = "",
    ) -> None:
        """The per-check access line, formatted without a dict: it is on every check's path.
        ``dry_run``: allowed by a DRY_RUN deployment, ``reason`` being the would-be denial's.
        ``auth_server``: the DYNAMIC_AUTHENTICATION server that verified the token."""
        if self.level > 20:
            return
        trace_id = current_trace_id.get()
        trace = f',"traceId":"{trace_id}"' if trace_id else ""
        q = _quote
        if len(path) > MAX_LOGGED_PATH_CHARS:
            # A client chooses the path: one request must not write 60 KB to the log.
            path = f"{path[:MAX_LOGGED_PATH_CHARS]}... ({len(path)} characters)"
        tail = _DRY_RUN if dry_run else ""
        if auth_server:
            tail += f',"authServer":{q(auth_server)}'
        self._write(
            f'{{"ts":"{rfc3339()}","level":"INFO","event":"access","requestId":{q(request_id)}'
            f'{trace},"deployment":{q(deployment)},"route":{q(route)},"method":{q(method)},'
            f'"path":{q(path)},"status":{status},"decision":"{decision}","reason":"{reason}",'
            f'"latencyMs":{latency_ms},"idpCalls":{idp_calls}{tail}}}'
        )

    def info(self, event: str, /, **fields: Any) -> None:
        self.log("INFO", event, **fields)

    def warning(self, event: str, /, **fields: Any) -> None:
        self.log("WARNING", event, **fields)

    def error(self, event: str, /, **fields: Any) -> None:
        self.log("ERROR", event, **fields)


def _fileno(stream: IO[str]) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


# A pipe write of at most PIPE_BUF bytes is atomic, so workers sharing stdout (`--workers N`)
# never interleave inside a line when each write holds whole lines and stays under it.
_PIPE_BUF = 4096


def _write_whole_lines(fd: int, data: bytes) -> None:
    start = 0
    while start < len(data):
        end = start + _PIPE_BUF
        if end < len(data):
            cut = data.rfind(b"\n", start, end)
            if cut >= start:
                end = cut + 1
            else:  # a single line longer than PIPE_BUF: write it whole
                newline = data.find(b"\n", end)
                end = len(data) if newline == -1 else newline + 1
        view = memoryview(data)[start:end]
        while view:
            written = os.write(fd, view)
            view = view[written:]
        start = end


_quote = json.encoder.encode_basestring_ascii  # the C string encoder json.dumps itself uses
