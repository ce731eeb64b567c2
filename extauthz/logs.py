"""JSON log lines on stdout (CONTRACT.md §4), with redaction in one place.

Every line has ``ts`` (RFC 3339 UTC), ``level``, ``event`` and ``requestId``. Tokens, secrets,
``Authorization`` values and IdP response bodies are never passed in; :func:`token_hash` is the
only way a token may be named.
"""

from __future__ import annotations

import hashlib
import json
import sys
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any

__all__ = ["JsonLogger", "current_request_id", "current_trace_id", "rfc3339", "token_hash"]

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}

current_request_id: ContextVar[str | None] = ContextVar("current_request_id", default=None)
current_trace_id: ContextVar[str | None] = ContextVar("current_trace_id", default=None)


def rfc3339(epoch: float | None = None) -> str:
    dt = datetime.fromtimestamp(epoch, UTC) if epoch is not None else datetime.now(UTC)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def token_hash(token: str) -> str:
    """The first 8 hex characters of the token's SHA-256: enough to tell tokens apart in logs."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


class JsonLogger:
    def __init__(self, stream: IO[str] | None = None, level: str = "INFO") -> None:
        self._stream = stream
        self.level = LEVELS.get(level, 20)

    def set_level(self, level: str) -> None:
        self.level = LEVELS.get(level, 20)

    def log(self, level: str, event: str, /, **fields: Any) -> None:
        if LEVELS[level] < self.level:
            return
        request_id = fields.pop("requestId", None) or current_request_id.get() or str(uuid.uuid4())
        line = {"ts": rfc3339(), "level": level, "event": event, "requestId": request_id}
        trace_id = current_trace_id.get()
        if trace_id is not None:
            line["traceId"] = trace_id
        line.update((k, v) for k, v in fields.items() if v is not None)
        stream = self._stream or sys.stdout
        stream.write(json.dumps(line, separators=(",", ":"), default=str) + "\n")
        stream.flush()

    def info(self, event: str, /, **fields: Any) -> None:
        self.log("INFO", event, **fields)

    def warning(self, event: str, /, **fields: Any) -> None:
        self.log("WARNING", event, **fields)

    def error(self, event: str, /, **fields: Any) -> None:
        self.log("ERROR", event, **fields)
