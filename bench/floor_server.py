"""The floors: do-nothing ext_authz servers that allow everything, one per wire.

    python -m bench.floor_server --listen 127.0.0.1:P [--wire grpc|http] [--event-loop uvloop]

- ``--wire grpc`` (a): a ``grpc.aio`` server whose Check answers an empty ``CheckResponse``
  (status code 0: OK, so Envoy lets the request through).
- ``--wire http`` (e): Envoy's HTTP ext_authz protocol (``http_service``) on an
  ``asyncio.Protocol`` over ``httptools``, built like extauthz's HTTP wire
  (``extauthz/http_wire.py``): each request is parsed and answered ``200`` with no header but
  its ``content-length: 0``, in order, on a keep-alive connection. The parser reports only the
  end of each request: reading the method, path and headers into Python is work a real server
  does and this one does not, as the gRPC floor never looks at the CheckRequest's fields.

Both run on the event loop extauthz runs on by default, uvloop (``--event-loop auto``), so that
extauthz ÷ floor compares extauthz's own work and not two event loops (uvloop takes about a third
off a ``grpc.aio`` call: bench/README.md). No logging, no parsing beyond the wire's, no metrics:
whatever extauthz costs beyond this is ours.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable
from typing import cast

import grpc
import httptools

from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from extauthz.cli import loop_factory

WIRES = ("grpc", "http")
EVENT_LOOPS = ("uvloop", "asyncio")

_OK = ext.CheckResponse()
# An allow on the HTTP wire: what extauthz's HTTP wire answers, without the identity headers.
HTTP_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
_HTTP_BAD = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"


class FloorAuthorization(ext_grpc.AuthorizationServicer):
    async def Check(  # noqa: N802 (the generated servicer's name)
        self,
        request: ext.CheckRequest,
        context: grpc.aio.ServicerContext[ext.CheckRequest, ext.CheckResponse],
    ) -> ext.CheckResponse:
        return _OK


class FloorHttpConnection(asyncio.Protocol):
    """One keep-alive connection from Envoy: every request answered 200 as soon as it has been
    read, in the order they came (pipelined ones too: each answer is written when its request
    ends). httptools calls only the callbacks this class has: here, the end of a request."""

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.write(_HTTP_BAD)
                self._transport.close()
                self._transport = None

    def on_message_complete(self) -> None:
        transport = self._transport
        if transport is None:
            return
        transport.write(HTTP_OK)
        if not self._parser.should_keep_alive():
            transport.close()
            self._transport = None


def _hostport(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve_grpc(listen: str) -> None:
    server = grpc.aio.server()
    ext_grpc.add_AuthorizationServicer_to_server(FloorAuthorization(), server)  # type: ignore[no-untyped-call]
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"cannot listen on {listen}")
    await server.start()
    await _until_signalled()
    await server.stop(0.5)


async def serve_http(listen: str) -> None:
    """Listen as extauthz's HTTP wire does (SO_REUSEPORT, backlog 1024)."""
    host, port = _hostport(listen)
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(
            FloorHttpConnection, host, port, reuse_port=True, backlog=1024
        )
    except OSError as exc:
        raise SystemExit(f"cannot listen on {listen}: {exc.strerror}") from exc
    await _until_signalled()
    server.close()


def event_loop(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop (what extauthz's ``--event-loop auto`` picks when it is installed; an error
    when it is not, rather than a floor quietly on another loop), or None for asyncio's own."""
    return loop_factory(choice)


def main() -> None:
    p = argparse.ArgumentParser(description="do-nothing ext_authz server (the bench floors)")
    p.add_argument("--listen", default="127.0.0.1:9101")
    p.add_argument("--wire", choices=WIRES, default="grpc")
    p.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default="uvloop",
        help="uvloop (default: extauthz's loop) or asyncio's own, for comparison",
    )
    args = p.parse_args()
    serve = serve_grpc if args.wire == "grpc" else serve_http
    with asyncio.Runner(loop_factory=event_loop(args.event_loop)) as runner:
        runner.run(serve(args.listen))


if __name__ == "__main__":
    main()
