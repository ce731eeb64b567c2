"""The image checks catch a broken image: each is run against an image built wrong on purpose
and must fail there, while test_image.py runs the same check on the image `make image` built,
where it must pass.

Each broken image is a few lines built FROM the real one (its layers are reused, so a build
takes a second or two): one that runs as root, two that write to their filesystem before
starting extauthz (where the chart's read-only root refuses it, and in the /tmp it mounts), and
one that ignores SIGTERM (a shell as PID 1 that runs extauthz as its child and ignores the
signal itself, as an image with a wrapper script and no exec does).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.container.checks import (
    GRACE_SECONDS,
    check_image_config,
    check_runs_hardened,
    check_sigterm_drains,
)
from tests.container.conftest import (
    IMAGE,
    Engine,
    logs,
    skip_module_without_an_engine,
    start,
)
from tests.integration.faulty_idp import FaultyIdp

skip_module_without_an_engine()

# From SIGTERM to /readyz 503 for a broken image: the real one flips at once, and whether it
# would flip later does not matter here, since it must still be running afterwards.
DEAF_NOT_READY_SECONDS = 5.0


def wrapped_in(script: str) -> str:
    """A Containerfile line running ``script`` with /bin/sh as the entrypoint; the image's CMD
    (``serve --config ...``) and the test's arguments arrive as ``"$@"``."""
    return "ENTRYPOINT " + json.dumps(["/bin/sh", "-c", script, "extauthz"])


BROKEN = {
    # The user the image's config names: root.
    "root": "USER 0",
    # State written under /opt before extauthz starts: the read-only root refuses it.
    "writes-opt": wrapped_in('echo started > /opt/extauthz/state && exec extauthz "$@"'),
    # State written to the /tmp the engine (or the chart) mounts writable: it takes the write.
    "writes-tmp": wrapped_in('echo started > /tmp/extauthz.state && exec extauthz "$@"'),
    # extauthz as the child of a shell that ignores SIGTERM: the signal reaches PID 1 only.
    "ignores-sigterm": wrapped_in("trap '' TERM; extauthz \"$@\" & wait"),
}


@pytest.fixture(scope="module")
def broken_image(
    engine: Engine, image: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], str]]:
    """``broken_image(name)``: the tag of BROKEN[name] built FROM the real image (once), removed
    when the module is done."""
    built: dict[str, str] = {}
    run = uuid.uuid4().hex[:8]

    def build(name: str) -> str:
        if name not in built:
            context = tmp_path_factory.mktemp(f"broken-{name}")
            (context / "Containerfile").write_text(f"FROM {IMAGE}\n{BROKEN[name]}\n")
            tag = f"localhost/extauthz-broken-{name}:{run}"
            engine.client.images.build(
                path=str(context), dockerfile="Containerfile", tag=tag, pull=False, rm=True
            )
            built[name] = tag
        return built[name]

    yield build
    for tag in built.values():
        with contextlib.suppress(docker.errors.NotFound):
            engine.client.images.remove(tag, force=True)


def started_and_hardened(image: str, policy: Path, env: dict[str, str]) -> None:
    """test_image.py's hardening check on ``image``, started as its fixture starts the real one."""
    container, _ = start(policy, env, image=image)
    try:
        check_runs_hardened(container.get_wrapped_container())
    finally:
        container.stop()


def test_an_image_that_runs_as_root_fails_the_config_check(
    engine: Engine, broken_image: Callable[[str], str]
) -> None:
    config = engine.client.images.get(broken_image("root")).attrs["Config"]
    with pytest.raises(AssertionError, match="10001:10001"):
        check_image_config(config)


def test_an_image_that_writes_to_its_root_does_not_start_read_only(
    broken_image: Callable[[str], str], policy: Path, container_env: dict[str, str]
) -> None:
    with pytest.raises(AssertionError, match="before /readyz answered 200") as failed:
        started_and_hardened(broken_image("writes-opt"), policy, container_env)
    assert "Read-only file system" in str(failed.value)


def test_an_image_that_writes_to_tmp_fails_the_hardening_check(
    engine: Engine,
    broken_image: Callable[[str], str],
    policy: Path,
    container_env: dict[str, str],
) -> None:
    # podman mounts a writable /tmp under --read-only, where the write lands and the check
    # finds it; Docker mounts none, and then the container cannot start.
    found = r"'extauthz\.state'" if engine.name == "podman" else "before /readyz answered 200"
    with pytest.raises(AssertionError, match=found):
        started_and_hardened(broken_image("writes-tmp"), policy, container_env)


def test_an_image_that_ignores_sigterm_fails_the_drain_check(
    broken_image: Callable[[str], str],
    policy: Path,
    container_env: dict[str, str],
    idp: FaultyIdp,
) -> None:
    container, ports = start(
        policy,
        container_env,
        ["--grace-seconds", str(GRACE_SECONDS)],
        image=broken_image("ignores-sigterm"),
    )
    try:
        with pytest.raises(AssertionError, match="/readyz 503 after SIGTERM"):
            check_sigterm_drains(container, ports, idp, not_ready_seconds=DEAF_NOT_READY_SECONDS)
        # Not slow to stop: it did not hear the signal at all.
        wrapped = container.get_wrapped_container()
        wrapped.reload()
        assert wrapped.status == "running", logs(container)
    finally:
        container.stop()
