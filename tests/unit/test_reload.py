"""The config watcher: a changed file is read and validated off the event loop."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path

import pytest
import yaml

from extauthz import reload
from extauthz.config import Config
from extauthz.logs import JsonLogger


def _write(path: Path, prefix: str) -> None:
    path.write_text(yaml.safe_dump({"deployments": [{
        "name": "orders", "pathPrefix": prefix,
        "authentication": {"type": "TOKEN_AUTHENTICATION",
                           "validationPolicy": {"type": "REMOTE_JWKS", "uri": "https://idp.example.com/keys"}},
    }]}))


def test_a_changed_config_is_validated_off_the_loop_while_checks_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.yaml"
    _write(path, "/orders")
    parsing, release = threading.Event(), threading.Event()
    threads: list[threading.Thread] = []
    real = reload.load_config

    def slow_load(p: Path) -> Config:  # a config so large that validating it takes a while
        threads.append(threading.current_thread())
        parsing.set()
        assert release.wait(5)
        return real(p)

    monkeypatch.setattr(reload, "load_config", slow_load)
    applied: list[Config] = []

    async def run() -> tuple[bool, int]:
        watcher = reload.ConfigWatcher(path, applied.append, JsonLogger(stream=io.StringIO()))
        _write(path, "/orders-and-more")
        pending = asyncio.ensure_future(watcher.check_once())
        ticks = 0  # the loop keeps turning while the file is validated
        while not parsing.is_set() or ticks < 10:
            await asyncio.sleep(0.001)
            ticks += 1
        release.set()
        return await pending, ticks

    changed, ticks = asyncio.run(run())
    assert changed and ticks >= 10 and threads[0] is not threading.main_thread()
    assert [c.deployments[0].path_prefix for c in applied] == ["/orders-and-more"]
