"""The demo behind ``make run``: IdP, extauthz, an echo upstream and Envoy on the demo ports.

    python examples/demo.py [--config examples/demo.yaml]

Ports: Envoy 8080 (admin 9901), extauthz 9001 (admin 9090), IdP 3000, upstream 8081.
Set OTEL_EXPORTER_OTLP_ENDPOINT (an OTLP/gRPC address such as http://127.0.0.1:4317; any other
OTEL_* variable is passed through too) to send the traces of both Envoy and extauthz to a
collector, e.g. Jaeger's OTLP port; one trace then shows Envoy's request span, its ext_authz call,
extauthz's check span and its identity-provider calls. Unset, extauthz does not trace and Envoy
tries 127.0.0.1:4317, quietly failing when nothing listens there. Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import astuple
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stack import (
    DEMO_PORTS,
    REPO,
    Stack,
    StackError,
    accepts_tcp,
    otlp_collector,
    otlp_endpoint_from_env,
)

ISSUER = f"http://127.0.0.1:{DEMO_PORTS.idp}"
ENVOY = f"http://127.0.0.1:{DEMO_PORTS.envoy}"
# The DPoP lines: the demo IdP's client whose tokens are bound to a proof key, the resource its
# tokens are for, and the path of demo.yaml's DPoP-only deployment.
DPOP_CLIENT = "dpop-client"
DPOP_RESOURCE = "https://bound.example.com"
DPOP_PATH = "/dpop/orders/42"


def token_command(variable: str, scope: str) -> str:
    """A shell line that asks the demo IdP for a client_credentials token and stores it."""
    return (
        f"{variable}=$(curl -s -u acme-client:acme-client-secret "
        f"-d grant_type=client_credentials -d resource=https://api.example.com "
        f"-d 'scope={scope}' {ISSUER}/token "
        "| python3 -c 'import json,sys; print(json.load(sys.stdin)[\"access_token\"])')"
    )


def python_command() -> str:
    """How to run this Python (the one with pyjwt and cryptography: the demo's own), as short as
    it can be said from the repository's root."""
    executable = Path(sys.executable)
    return str(executable.relative_to(REPO)) if executable.is_relative_to(REPO) else str(executable)


def dpop_commands(
    workdir: Path, python: str | None = None, *, envoy: str = ENVOY, issuer: str = ISSUER
) -> list[str]:
    """The shell lines of the DPoP pair, run from the repository's root: a DPoP-bound token (key
    and token kept in ``workdir``), one proof, the request with it (200), the same request again
    (the proof replayed: 401). ``envoy`` and ``issuer``: where the demo's Envoy and IdP are."""
    run = f"{python or python_command()} examples/dpop.py"
    key, token = workdir / "dpop-key.pem", workdir / "dpop-token"
    request = (
        f'curl -i -H "Authorization: DPoP $(cat {token})" -H "DPoP: $PROOF" {envoy}{DPOP_PATH}'
    )
    return [
        f"{run} token --key {key} --token-endpoint {issuer}/token --client-id {DPOP_CLIENT} "
        f"--client-secret {DPOP_CLIENT}-secret --scope orders.read --resource {DPOP_RESOURCE} "
        f"--out {token}",
        f"PROOF=$({run} proof --key {key} --method GET --url {envoy}{DPOP_PATH} "
        f"--token-file {token})",
        request,
        request,
    ]


def tracing_hint(env: Mapping[str, str]) -> str | None:
    """The line saying where traces go, when OTEL_EXPORTER_OTLP_ENDPOINT (or the traces-only
    variable) is set; None otherwise."""
    endpoint = otlp_endpoint_from_env(env)
    if not endpoint:
        return None
    host, port = otlp_collector(endpoint)
    hint = (
        f"tracing: Envoy (service envoy-gateway) and extauthz (service "
        f"{env.get('OTEL_SERVICE_NAME') or 'extauthz'}) export OTLP/gRPC spans to "
        f"{endpoint} ({host}:{port})"
    )
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", ""
    )
    if protocol.startswith("http"):
        hint += "; note: Envoy's tracer speaks OTLP/gRPC only, use the collector's gRPC port"
    return hint


def instructions(log_dir: Path, workdir: Path | None = None) -> str:
    """What the demo prints once up; ``workdir`` (default: the logs' parent) keeps the DPoP
    lines' key and token."""
    token, proof, first, again = dpop_commands(workdir or log_dir.parent)
    return f"""
extauthz demo is up. Envoy listens on {ENVOY}. Try:

  # 1. a token with orders.read + orders.write: 200; the upstream echoes the identity headers
  {token_command("TOKEN", "orders.read orders.write")}
  curl -i -H "Authorization: Bearer $TOKEN" {ENVOY}/orders/42

  # 2. no token: 401, www-authenticate: Bearer realm="orders"
  curl -i {ENVOY}/orders/42

  # 3. a token without orders.write creating an order: 403 insufficient_scope
  {token_command("READ_TOKEN", "orders.read")}
  curl -i -X POST -H "Authorization: Bearer $READ_TOKEN" {ENVOY}/orders

  # no token needed under /public (a token, if sent, must still be valid)
  curl -i {ENVOY}/public/hello

  # 4. DPoP (RFC 9449) under /dpop/orders: a token bound to your key (dpop-client; examples/dpop.py
  #    makes the key, gets the token and signs proofs), sent with a new proof: 200
  {token}
  {proof}
  {first}
  #    the same proof again: 401 dpop_proof_invalid (a replay); every request needs a new proof
  {again}

Other demo clients: globex-client (tenant globex: 401 claim_value_mismatch), plain-client (no
tenant: 401 claim_missing); each one's secret is "<client>-secret".
Logs (extauthz JSON lines in extauthz.log):  tail -f {log_dir}/extauthz.log
Ctrl-C to stop.
"""


def _stop_on_sigterm(signum: int, frame: object) -> None:
    # SIGTERM (e.g. from a process manager) stops the demo the same way Ctrl-C does.
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "examples" / "demo.yaml")
    args = parser.parse_args(argv)

    busy = [port for port in astuple(DEMO_PORTS) if accepts_tcp(port)]
    if busy:
        print(f"demo ports already in use: {busy}; is another demo running?", file=sys.stderr)
        return 1

    signal.signal(signal.SIGTERM, _stop_on_sigterm)

    workdir = Path(tempfile.mkdtemp(prefix="extauthz-demo-"))
    stack = Stack(config_template=args.config, ports=DEMO_PORTS, workdir=workdir)
    try:
        print("starting IdP, upstream, extauthz and Envoy...", flush=True)
        hint = tracing_hint(os.environ)
        if hint:
            print(hint, flush=True)
        stack.start()
        print(instructions(stack.log_dir, workdir), flush=True)
        while True:  # watch the processes; a crash ends the demo with its name
            exited = {name: code for name, code in stack.returncodes().items() if code is not None}
            if exited:
                print(f"stopped unexpectedly: {exited}; logs in {stack.log_dir}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    except StackError as exc:
        print(f"demo failed to start: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        return 0
    finally:
        stack.stop()
        print(f"stopped; logs kept in {stack.log_dir}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
