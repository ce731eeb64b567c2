"""(a) the floor: a do-nothing ``grpc.aio`` ext_authz server that allows everything.

    python -m bench.floor_server --listen 127.0.0.1:P

Each Check answers an empty ``CheckResponse`` (status code 0: OK, so Envoy lets the request
through). No logging, no parsing, no metrics: whatever extauthz costs beyond this is ours.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc

from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc

_OK = ext.CheckResponse()


class FloorAuthorization(ext_grpc.AuthorizationServicer):
    async def Check(  # noqa: N802 (the generated servicer's name)
        self,
        request: ext.CheckRequest,
        context: grpc.aio.ServicerContext[ext.CheckRequest, ext.CheckResponse],
    ) -> ext.CheckResponse:
        return _OK


async def serve(listen: str) -> None:
    server = grpc.aio.server()
    ext_grpc.add_AuthorizationServicer_to_server(FloorAuthorization(), server)  # type: ignore[no-untyped-call]
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"cannot listen on {listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description="do-nothing ext_authz server (the bench floor)")
    p.add_argument("--listen", default="127.0.0.1:9101")
    asyncio.run(serve(p.parse_args().listen))


if __name__ == "__main__":
    main()
