"""The admin HTTP listener (CONTRACT.md §6): /healthz, /readyz, /metrics.

A few fixed GET endpoints do not justify a web framework; this is a minimal HTTP/1.1 responder
on asyncio streams that closes each connection after one answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["AdminServer"]


class AdminServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        readiness: Callable[[], tuple[bool, dict[str, Any]]],
        *,
        before_scrape: Callable[[], None] = lambda: None,
    ) -> None:
        self._registry = registry
        self._readiness = readiness
        self._before_scrape = before_scrape
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._handle, host, port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _route(self, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            return 200, "application/json", b'{"status":"ok"}'
        if path == "/readyz":
            ready, detail = self._readiness()
            body = json.dumps({"ready": ready, **detail}, default=str).encode()
            return (200 if ready else 503), "application/json", body
        if path == "/metrics":
            self._before_scrape()
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        return 404, "application/json", b'{"error":"not_found"}'

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.decode("latin-1").split()
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, ctype, body = 405, "application/json", b'{"error":"method_not_allowed"}'
            else:
                status, ctype, body = self._route(parts[1].split("?", 1)[0])
            head = (
                f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                f"content-type: {ctype}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (body if parts and parts[0] != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
