"""The config watcher: a changed file is applied only once it has settled (the same content read
twice, a poll interval apart), and it is read and validated off the event loop.

The watcher's clock is a fake one that the tests move, and the tests call ``check_once()`` (one
poll) directly: what is asserted is which poll applies what, never how long anything took.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz import reload
from extauthz.config import Config, load_config
from extauthz.logs import JsonLogger
from tests.waiting import wait_until_async

POLL = 1.0  # the watcher's poll interval in these tests (fake seconds)


def _deployment(name: str, prefix: str) -> dict[str, Any]:
    return {
        "name": name, "pathPrefix": prefix,
        "authentication": {"type": "TOKEN_AUTHENTICATION",
                           "validationPolicy": {"type": "REMOTE_JWKS", "uri": "https://idp.example.com/keys"}},
    }  # fmt: skip


def _text(*prefixes: str) -> str:
    """A config with one deployment per path prefix, as YAML text."""
    return yaml.safe_dump(
        {"deployments": [_deployment(p.strip("/") or "root", p) for p in prefixes]},
        sort_keys=False,
    )


def _write(path: Path, prefix: str) -> None:
    path.write_text(_text(prefix))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _prefixes(config: Config) -> list[str]:
    return [d.path_prefix for d in config.deployments]


def _watcher(
    path: Path, applied: list[Config], clock: Callable[[], float], log: io.StringIO | None = None
) -> reload.ConfigWatcher:
    logger = JsonLogger(stream=log if log is not None else io.StringIO())
    return reload.ConfigWatcher(path, applied.append, logger, poll_seconds=POLL, clock=clock)


CHECK = "check"  # a step: the watcher checks the file once (one poll, or a SIGHUP's check)
POKE = "poke"  # a step: a SIGHUP


def _checks(
    path: Path, applied: list[Config], clock: FakeClock, *steps: object, log: io.StringIO | None = None
) -> list[bool]:
    """What the checks among ``steps`` return, on a watcher that has read the file as it was:
    CHECK checks once, POKE pokes the watcher, a number moves the clock on that many seconds,
    a function changes the file."""

    async def run() -> list[bool]:
        watcher = _watcher(path, applied, clock, log)
        results = []
        for step in steps:
            if step == CHECK:
                results.append(await watcher.check_once())
            elif step == POKE:
                watcher.poke()
            elif isinstance(step, int | float):
                clock.now += step
            else:
                assert callable(step)
                step()
        return results

    return asyncio.run(run())


def _each_interval(checks: int) -> list[object]:
    """``checks`` polls, a poll interval apart."""
    return [CHECK, POLL] * checks


# -- settling ----------------------------------------------------------------------------------


def test_a_half_written_config_that_validates_is_never_applied(tmp_path: Path) -> None:
    """`cat new > config` caught mid-write: the first half of the new file is valid on its own
    (one deployment of two), the poll that reads it only notes it, the full file written within
    the same poll replaces it as the pending change, and only that full file is applied, by the
    first poll a whole interval after it was read."""
    path = tmp_path / "config.yaml"
    path.write_text(_text("/old"))
    new = _text("/orders", "/catalog")
    half = new[: new.index("- name: catalog")]
    assert _prefixes(load_config_text(tmp_path, half)) == ["/orders"]  # a valid config by itself

    clock, applied = FakeClock(), list[Config]()
    checks = _checks(
        path, applied, clock,
        lambda: path.write_text(half), CHECK,  # the writer has got this far...
        0.3, lambda: path.write_text(new),  # ...and finishes within the same poll interval
        CHECK,  # a SIGHUP check: new content, it starts over
        POLL, CHECK,
    )  # fmt: skip
    assert checks == [False, False, True]
    assert [_prefixes(c) for c in applied] == [["/orders", "/catalog"]]


def test_a_stable_new_config_is_applied_by_the_second_poll(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    _write(path, "/old")
    clock, applied = FakeClock(), list[Config]()
    # The first poll notes it, the second applies it, then nothing.
    checks = _checks(path, applied, clock, lambda: _write(path, "/new"), *_each_interval(4))
    assert checks == [False, True, False, False]
    assert [_prefixes(c) for c in applied] == [["/new"]]


def test_a_second_read_sooner_than_a_poll_interval_does_not_apply(tmp_path: Path) -> None:
    """A SIGHUP just after a poll read the change makes a check that reads it again at once; the
    content must still wait out a whole interval from its first read."""
    path = tmp_path / "config.yaml"
    _write(path, "/old")
    clock, applied = FakeClock(), list[Config]()
    checks = _checks(
        path, applied, clock, lambda: _write(path, "/new"), CHECK, 0.1, POKE, CHECK, POLL - 0.1, CHECK
    )
    assert checks == [False, False, True]
    assert [_prefixes(c) for c in applied] == [["/new"]]


def test_poke_checks_at_once_and_the_change_waits_for_the_next_check(tmp_path: Path) -> None:
    """Through the watcher's own loop (polls an hour apart, so only pokes wake it): the first
    poke reads the change and applies nothing; once the clock has moved a poll interval on, the
    next poke applies it."""
    path = tmp_path / "config.yaml"
    _write(path, "/old")
    clock, applied = FakeClock(), list[Config]()
    checks: list[bool] = []

    class Counting(reload.ConfigWatcher):
        async def check_once(self) -> bool:
            result = await super().check_once()
            checks.append(result)
            return result

    async def until(count: int) -> None:
        await wait_until_async(lambda: len(checks) >= count, timeout=5, what=f"check {count}")

    async def run() -> None:
        watcher = Counting(path, applied.append, JsonLogger(stream=io.StringIO()),
                           poll_seconds=3600, clock=clock)  # fmt: skip
        watcher.start()
        try:
            _write(path, "/new")
            watcher.poke()
            await until(1)
            assert applied == []
            clock.now += 3600
            watcher.poke()
            await until(2)
        finally:
            await watcher.stop()

    asyncio.run(run())
    assert checks == [False, True]
    assert [_prefixes(c) for c in applied] == [["/new"]]


def test_a_change_reverted_before_it_settled_applies_nothing(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    _write(path, "/old")
    clock, applied = FakeClock(), list[Config]()
    checks = _checks(
        path, applied, clock,
        lambda: _write(path, "/new"), CHECK, lambda: _write(path, "/old"),
        POLL, CHECK, POLL, CHECK, POLL, CHECK,
    )  # fmt: skip
    assert checks == [False, False, False, False]
    assert applied == []


def test_a_file_rewritten_while_it_is_read_is_not_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The content settled, then a new write began while the thread was reading it: what was read
    is discarded, and the newest content settles in its turn."""
    path = tmp_path / "config.yaml"
    _write(path, "/old")
    real = reload.load_config
    writes = iter(["/newest"])

    def load_then_overwritten(p: Path) -> Config:
        config = real(p)
        for prefix in writes:  # only on the first load
            _write(p, prefix)
        return config

    monkeypatch.setattr(reload, "load_config", load_then_overwritten)
    clock, applied = FakeClock(), list[Config]()
    # /new settles at poll 2 but is rewritten while read; /newest is seen at 3 and applied at 4.
    checks = _checks(path, applied, clock, lambda: _write(path, "/new"), *_each_interval(4))
    assert checks == [False, False, False, True]
    assert [_prefixes(c) for c in applied] == [["/newest"]]


def test_an_invalid_settled_config_is_reported_once_and_the_old_one_stays(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    _write(path, "/old")
    clock, applied, log = FakeClock(), list[Config](), io.StringIO()

    def invalid() -> None:
        path.write_text("deployments: []\n")  # valid YAML, not a valid config

    assert _checks(path, applied, clock, invalid, *_each_interval(4), log=log) == [False, False, False, False]
    assert applied == []
    assert log.getvalue().count('"config.reloadFailed"') == 1


def load_config_text(tmp_path: Path, text: str) -> Config:
    scratch = tmp_path / "scratch.yaml"
    scratch.write_text(text)
    return load_config(scratch)


# -- off the event loop ------------------------------------------------------------------------


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
    clock = FakeClock()

    async def run() -> tuple[bool, int]:
        watcher = _watcher(path, applied, clock)
        _write(path, "/orders-and-more")
        assert not await watcher.check_once()  # the first read only notes the change
        clock.now += POLL
        pending = asyncio.ensure_future(watcher.check_once())
        ticks = 0  # the loop keeps turning while the file is validated

        def ten_turns_while_validating() -> bool:
            nonlocal ticks
            ticks += 1  # asked once per turn of the loop
            return parsing.is_set() and ticks >= 10

        await wait_until_async(ten_turns_while_validating, timeout=5, what="the file read in its thread")
        assert not pending.done()  # still validating: it waits for the release
        release.set()
        return await pending, ticks

    changed, ticks = asyncio.run(run())
    assert changed and ticks >= 10 and threads[0] is not threading.main_thread()
    assert [_prefixes(c) for c in applied] == [["/orders-and-more"]]
