"""Instructions per check under callgrind: a measure that does not drift with the machine.

    python -m bench.instructions                       # extauthz of this tree, and the floor
    python -m bench.instructions --tree /path/to/other/checkout --label before

Each server runs under ``valgrind --tool=callgrind`` and is called straight over gRPC (no Envoy)
with the same cached RS256 token from 16 concurrent streams. Callgrind counts the instructions
the process executes in user space, whatever else the machine does; the kernel's socket work,
the same for every server, is not in it. Each dump holds the instructions since the previous
one, so the figure per check is the second dump (``--checks`` checks, after ``--warm`` of them)
divided by ``--checks``: start-up and the first sight of the token are left out.

Needs Debian's ``valgrind`` (``apt-get install -y valgrind``). About a minute per server.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import yaml

from bench.keys import AUDIENCE, ISSUER, BenchKeys, claims
from bench.procs import RESULTS, ROOT
from examples.stack import accepts_tcp, free_ports
from extauthz._pb.envoy.service.auth.v3 import attribute_context_pb2 as ac
from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc

STREAMS = 16


def _config(keys: BenchKeys) -> dict[str, object]:
    return {
        "deployments": [
            {
                "name": "items",
                "pathPrefix": "/items",
                "authentication": {
                    "type": "TOKEN_AUTHENTICATION",
                    "validationPolicy": {
                        "type": "STATIC_KEYS",
                        "keys": [keys.rsa.public_jwk],
                        "additionalValidationPolicy": {
                            "issuers": [ISSUER],
                            "audiences": [AUDIENCE],
                        },
                    },
                },
                "routes": [
                    {
                        "path": "/",
                        "methods": ["GET"],
                        "authorization": {"type": "ANY_OF", "allowedScope": ["items.read"]},
                    }
                ],
                "headersFromClaims": {"x-auth-subject": "sub"},
            }
        ]
    }


def _request(token: str) -> ext.CheckRequest:
    http = ac.AttributeContext.HttpRequest(
        method="GET",
        host="api.bench.example",
        path="/items",
        headers={"authorization": f"Bearer {token}", "x-request-id": str(uuid.uuid4())},
    )
    attributes = ac.AttributeContext(request=ac.AttributeContext.Request(http=http))
    return ext.CheckRequest(attributes=attributes)


def _send(stub: ext_grpc.AuthorizationStub, request: ext.CheckRequest, n: int) -> None:
    def one_stream(count: int) -> None:
        for _ in range(count):
            response = stub.Check(request, timeout=30)
            if response.status.code != 0:
                raise RuntimeError(f"the check was denied: {response.status.message}")

    with ThreadPoolExecutor(STREAMS) as pool:
        share = [n // STREAMS + (1 if i < n % STREAMS else 0) for i in range(STREAMS)]
        list(pool.map(one_stream, share))


def _total_instructions(out: Path) -> int:
    """The instruction total of the newest callgrind dump in ``out``'s directory."""
    dumps = sorted(out.parent.glob(out.name + "*"), key=lambda p: p.stat().st_mtime)
    text = dumps[-1].read_text(errors="replace")
    m = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.MULTILINE)
    if m is None:
        raise RuntimeError(f"no instruction total in {dumps[-1]}")
    return int(m.group(1))


def _dump(pid: int) -> None:
    """Ask callgrind to write what it counted since the last dump, and start counting again."""
    subprocess.run(
        ["callgrind_control", "--dump", str(pid)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1)  # callgrind writes the dump from the server's own threads, soon after


def measure(argv: list[str], cwd: Path, work: Path, *, warm: int, checks: int, token: str) -> float:
    """Instructions per check of the server started by ``argv`` (``{port}`` filled in)."""
    port, admin = free_ports(2)
    out = work / f"callgrind.{uuid.uuid4().hex[:8]}"
    command = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p",
        *(a.format(port=port, admin=admin) for a in argv),
    ]  # fmt: skip
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not accepts_tcp(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server under callgrind did not start: {command}")
            time.sleep(0.5)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ext_grpc.AuthorizationStub(channel)  # type: ignore[no-untyped-call]
            request = _request(token)
            _send(stub, request, warm)
            _dump(proc.pid)
            _send(stub, request, checks)
            _dump(proc.pid)
            measured = _total_instructions(out)
        return measured / checks
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose extauthz runs")
    p.add_argument("--label", default="extauthz")
    p.add_argument("--warm", type=int, default=2000)
    p.add_argument("--checks", type=int, default=2000)
    p.add_argument("--event-loop", default="uvloop", choices=["uvloop", "asyncio"])
    p.add_argument("--no-floor", action="store_true", help="measure extauthz only")
    args = p.parse_args(argv)
    work = RESULTS / "tmp"
    work.mkdir(parents=True, exist_ok=True)
    keys = BenchKeys.generate()
    token = keys.rsa.sign(claims("callgrind"))
    config = work / "instructions.yaml"
    config.write_text(yaml.safe_dump(_config(keys)))
    python = sys.executable
    servers = [
        (
            args.label,
            args.tree,
            [python, "-m", "extauthz", "serve", "--config", str(config),
             "--listen", "127.0.0.1:{port}", "--admin-listen", "127.0.0.1:{admin}",
             "--event-loop", args.event_loop],
        ),
    ]  # fmt: skip
    if not args.no_floor:
        floor = [python, "-m", "bench.floor_server", "--listen", "127.0.0.1:{port}"]
        servers.append(("floor (asyncio)", ROOT, floor))
    for label, cwd, command in servers:
        per_check = measure(command, cwd, work, warm=args.warm, checks=args.checks, token=token)
        print(f"{label}: {per_check:,.0f} instructions per check")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
