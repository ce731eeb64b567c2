"""`helm test`: extauthz answers its callers, and denies what no deployment allows.

Runs in the extauthz image (its Python, grpcio and the ext_authz messages), as the chart's test
Pod, against the release's Service:

1. gRPC health of envoy.service.auth.v3.Authorization must be SERVING;
2. one CheckRequest without credentials, for EXTAUTHZ_TEST_HOST and EXTAUTHZ_TEST_PATH, must be
   denied with 401 or 403, as a gateway would receive it;
3. with EXTAUTHZ_TEST_HTTP_TARGET (the chart's httpWire), the same request on the HTTP wire must
   be denied too, by extauthz (its x-extauthz-reason header: a proxy's own 403 does not count).

The connection is the callers': TLS when EXTAUTHZ_TEST_TLS_DIR holds the serving Secret (its
ca.crt, else the system's roots, verifies the server; with EXTAUTHZ_TEST_CLIENT_DIR, the tls.crt
and tls.key there are the client certificate), on both wires. Exit 0 when all hold, 1 otherwise,
with one line saying why. Under Istio (EXTAUTHZ_TEST_ISTIO_QUIT), the sidecar is told to exit at
the end, or the Pod would never complete.
"""

from __future__ import annotations

import http.client
import os
import ssl
import sys
import urllib.request
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extauthz._pb.envoy.service.auth.v3 import attribute_context_pb2 as ac
from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc

TIMEOUT_SECONDS = 10.0
DENIED = (401, 403)


def read(directory: str | None, name: str) -> bytes | None:
    if not directory:
        return None
    path = Path(directory) / name
    return path.read_bytes() if path.exists() else None


def channel(target: str) -> grpc.Channel:
    tls_dir = os.environ.get("EXTAUTHZ_TEST_TLS_DIR")
    if not tls_dir:
        return grpc.insecure_channel(target)
    client_dir = os.environ.get("EXTAUTHZ_TEST_CLIENT_DIR")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(tls_dir, "ca.crt"),
        private_key=read(client_dir, "tls.key"),
        certificate_chain=read(client_dir, "tls.crt"),
    )
    return grpc.secure_channel(target, credentials)


def http_connection(target: str) -> http.client.HTTPConnection:
    """A connection to the HTTP wire, with the TLS of the gRPC channel: server.tls serves both."""
    host, _, port = target.rpartition(":")
    tls_dir = os.environ.get("EXTAUTHZ_TEST_TLS_DIR")
    if not tls_dir:
        return http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_SECONDS)
    ca = Path(tls_dir) / "ca.crt"
    context = ssl.create_default_context(cafile=str(ca) if ca.exists() else None)
    client_dir = os.environ.get("EXTAUTHZ_TEST_CLIENT_DIR")
    if client_dir:
        context.load_cert_chain(Path(client_dir) / "tls.crt", Path(client_dir) / "tls.key")
    return http.client.HTTPSConnection(host, int(port), timeout=TIMEOUT_SECONDS, context=context)


def new_request_id() -> str:
    return f"helm-test-{uuid.uuid4()}"


def check_request(host: str, path: str) -> ext.CheckRequest:
    request_id = new_request_id()
    http = ac.AttributeContext.HttpRequest(
        id=request_id,
        method="GET",
        host=host,
        path=path,
        scheme="https",
        protocol="HTTP/1.1",
        headers={
            ":authority": host,
            ":method": "GET",
            ":path": path,
            "x-request-id": request_id,
        },
    )
    return ext.CheckRequest(
        attributes=ac.AttributeContext(request=ac.AttributeContext.Request(http=http))
    )


def run(target: str, host: str, path: str) -> str | None:
    """None when extauthz is SERVING and denies the request; else what went wrong."""
    with channel(target) as connection:
        health = health_pb2_grpc.HealthStub(connection).Check(
            health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization"),
            timeout=TIMEOUT_SECONDS,
        )
        serving = health_pb2.HealthCheckResponse.SERVING
        if health.status != serving:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)
            return f"gRPC health of {target} is {name}, not SERVING"
        stub = ext_grpc.AuthorizationStub(connection)  # type: ignore[no-untyped-call]
        answer = stub.Check(check_request(host, path), timeout=TIMEOUT_SECONDS)
    if answer.status.code == 0:
        return f"GET {host}{path} without credentials was allowed: no deployment should allow it"
    status = answer.denied_response.status.code
    if status not in DENIED:
        return f"GET {host}{path} without credentials was denied with {status}, not 401 or 403"
    print(f"ok: {target} SERVING; GET {host}{path} without credentials denied with {status}")
    return None


def run_http(target: str, host: str, path: str) -> str | None:
    """None when the HTTP wire at ``target`` denies the request; else what went wrong."""
    connection = http_connection(target)
    try:
        # The check as Envoy sends it: the client's method, path and Host, the request id.
        connection.request("GET", path, headers={"Host": host, "x-request-id": new_request_id()})
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    where = f"HTTP wire {target}: GET {host}{path} without credentials"
    if response.status == 200:
        return f"{where} was allowed: no deployment should allow it"
    reason = response.getheader("x-extauthz-reason")
    if response.status not in DENIED or not reason:
        return f"{where} was answered {response.status} without x-extauthz-reason, not by extauthz"
    print(f"ok: {where} denied with {response.status} ({reason})")
    return None


def quit_sidecar() -> None:
    """Ask Istio's sidecar to exit, so that the Pod completes; nothing to do without one."""
    try:
        request = urllib.request.Request("http://127.0.0.1:15020/quitquitquit", method="POST")
        urllib.request.urlopen(request, timeout=5).close()
    except OSError:
        pass


def main() -> int:
    target = os.environ["EXTAUTHZ_TEST_TARGET"]
    http_target = os.environ.get("EXTAUTHZ_TEST_HTTP_TARGET")
    host, path = os.environ["EXTAUTHZ_TEST_HOST"], os.environ["EXTAUTHZ_TEST_PATH"]
    try:
        problem = run(target, host, path)
        if problem is None and http_target:
            problem = run_http(http_target, host, path)
    except grpc.RpcError as error:
        problem = f"{target}: {error.code().name}: {error.details()}"
    except (OSError, http.client.HTTPException) as error:  # ssl.SSLError is an OSError
        problem = f"HTTP wire {http_target}: {type(error).__name__}: {error}"
    finally:
        if os.environ.get("EXTAUTHZ_TEST_ISTIO_QUIT"):
            quit_sidecar()
    if problem is not None:
        print(f"failed: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
