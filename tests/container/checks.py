"""What the image must be and do, as functions: test_image.py asserts them of the image
`make image` built, and test_broken_images.py shows each one failing on an image built wrong
(run as root, writing to its filesystem, deaf to SIGTERM). Each check raises AssertionError
(pytest rewrites the asserts here: tests/container/conftest.py registers this module).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import grpc
import yaml
from stack import http_get  # examples/, on the path conftest set
from testcontainers.core.container import DockerContainer

from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from tests.check_requests import check_request
from tests.conftest import claims
from tests.container.conftest import CHART, UID, ExtauthzPorts, logs
from tests.integration.faulty_idp import Fault, FaultyIdp
from tests.waiting import wait_until

GRACE_SECONDS = 10.0
DRAIN_SECONDS = 1.0  # policy.yaml server.drainSeconds
# From SIGTERM to /readyz 503: it flips at once, the rest is room for a slow machine.
NOT_READY_SECONDS = 15.0

# Inside the container, as the server's user: who PID 1 is, its capabilities, what the server
# left in /tmp (podman mounts a tmpfs there under --read-only, as the chart mounts an emptyDir),
# and whether the root filesystem takes a write.
INSIDE = """
import errno, json, os
status = dict(line.split(":\\t", 1) for line in open("/proc/1/status").read().splitlines() if ":\\t" in line)
in_tmp = sorted(os.listdir("/tmp")) if os.path.isdir("/tmp") else []
writes = {}
for path in ("/probe", "/opt/extauthz/probe", "/etc/extauthz/probe"):
    try:
        open(path, "w").close()
        writes[path] = "written"
    except OSError as exc:
        writes[path] = errno.errorcode[exc.errno]
print(json.dumps({
    "cmdline": open("/proc/1/cmdline", "rb").read().replace(b"\\0", b" ").decode(),
    "uid": status["Uid"].split(), "gid": status["Gid"].split(),
    "capEff": status["CapEff"].strip(), "capPrm": status["CapPrm"].strip(),
    "noNewPrivs": status["NoNewPrivs"].strip(), "writes": writes, "inTmp": in_tmp,
}))
"""


def check_image_config(config: Mapping[str, Any]) -> None:
    """The image's config (``attrs["Config"]``): a numeric non-root user, the entrypoint,
    command and ports the chart expects, SIGTERM to stop, the chart's version."""
    assert config["User"] == f"{UID}:{UID}"  # numeric: runAsNonRoot needs no passwd lookup
    assert config["Entrypoint"] == ["extauthz"]
    assert config["Cmd"] == ["serve", "--config", "/etc/extauthz/config.yaml"]
    assert {"9001/tcp", "9090/tcp"} <= set(config["ExposedPorts"])
    assert config.get("StopSignal") in ("SIGTERM", "15", None)  # None: the engine's SIGTERM
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert config["Labels"]["org.opencontainers.image.version"] == chart["appVersion"]


def check_runs_hardened(container: Any) -> None:
    """A container (the docker SDK's) started hardened and serving: extauthz is PID 1 as
    UID 10001, without capabilities or new privileges, and nothing was or can be written."""
    container.reload()
    assert container.attrs["HostConfig"]["ReadonlyRootfs"] is True
    assert not container.attrs["HostConfig"].get("CapAdd")
    assert container.attrs["Config"]["User"] == f"{UID}:{UID}"
    code, output = container.exec_run(["python3", "-c", INSIDE])
    output = output.decode(errors="replace")
    assert code == 0, output
    inside = json.loads(output)
    assert "/opt/extauthz/bin/extauthz serve" in inside["cmdline"]  # PID 1: SIGTERM reaches it
    assert set(inside["uid"]) == {str(UID)} and set(inside["gid"]) == {str(UID)}
    assert inside["capEff"] == inside["capPrm"] == "0000000000000000"
    assert inside["noNewPrivs"] == "1"
    assert set(inside["writes"].values()) == {"EROFS"}, inside["writes"]
    # It has served since it was ready, and wrote nothing even where it could.
    assert inside["inTmp"] == []


def _readyz(port: int) -> int | None:
    try:
        return http_get(f"http://127.0.0.1:{port}/readyz", timeout=1.0)[0]
    except OSError:
        return None


def check_sigterm_drains(
    container: DockerContainer,
    ports: ExtauthzPorts,
    idp: FaultyIdp,
    *,
    not_ready_seconds: float = NOT_READY_SECONDS,
) -> None:
    """A container started (conftest ``start``) with policy.yaml and ``--grace-seconds
    GRACE_SECONDS``: a check waiting on the IdP when SIGTERM comes is answered after the
    listener closed, and the container then exits 0 within drainSeconds + the grace. /readyz
    must say 503 within ``not_ready_seconds`` of the signal."""
    token = idp.issue(claims(sub="carol"))
    idp.set_fault("/slow-introspect", Fault.hold())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
            stub = ext_grpc.AuthorizationStub(channel)  # type: ignore[no-untyped-call]
            in_flight = stub.Check.future(check_request("/slow/1", token=token), timeout=60)
            try:
                wait_until(
                    lambda: idp.count("/slow-introspect") >= 1,
                    timeout=10,
                    what="the check's introspection call held at the IdP",
                )
                wrapped = container.get_wrapped_container()
                signalled = time.monotonic()
                wrapped.kill(signal="SIGTERM")
                wait_until(
                    lambda: _readyz(ports.admin) == 503,
                    timeout=not_ready_seconds,
                    what="/readyz 503 after SIGTERM",
                )
                wait_until(
                    lambda: '"event":"server.stopping"' in logs(container)[0],
                    timeout=DRAIN_SECONDS + 20,
                    what="server.stopping (the drain over, the grace begun)",
                )
                assert not in_flight.done()
                idp.release()
                answer = in_flight.result(timeout=10)
                assert answer.status.code == grpc.StatusCode.OK.value[0], answer
            finally:
                in_flight.cancel()  # a check still held when a wait failed: not left to the channel
        exit_status = wrapped.wait(timeout=DRAIN_SECONDS + GRACE_SECONDS + 10)["StatusCode"]
        stopped_after = time.monotonic() - signalled
    finally:
        idp.set_fault("/slow-introspect", None)
        idp.release()
    assert exit_status == 0
    assert stopped_after < DRAIN_SECONDS + GRACE_SECONDS
