"""A check is a step value: what it compared, whether it passed, and the denial it causes.

The engine runs the checks in their documented order and, when asked with a :class:`Trace`,
records every step, going on past the first failure if the trace says so. ``extauthz explain``
renders those steps; it never runs a check of its own, so what it prints is what the server does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from .decision import Denial

__all__ = ["Result", "Step", "Trace", "Unverifiable", "checked", "first_denial", "skipped"]

Result = Literal["PASS", "FAIL", "SKIP"]


class Step(NamedTuple):
    """One check of one request.

    ``expected`` and ``actual`` are the two values compared (as read: a claim, a list of
    issuers); ``facts`` holds whatever else the comparison used (``now``, ``skewSeconds``, the
    kids a key set has). A ``SKIP`` step says in ``note`` why it was not checked. A named tuple:
    immutable, and cheap enough to build for every check of every first-seen token.
    """

    name: str
    result: Result
    denial: Denial | None = None
    expected: Any = None
    actual: Any = None
    note: str = ""
    facts: tuple[tuple[str, Any], ...] = ()

    def fact(self, name: str, default: Any = None) -> Any:
        return next((v for k, v in self.facts if k == name), default)


# How a check ends: passed when it found no denial, else failed. Explicit parameters and the
# tuple built directly (a named tuple's own constructor is a second Python call): this runs for
# every check of every first-seen token.
_new_tuple = tuple.__new__


def checked(
    name: str,
    denial: Denial | None,
    *,
    actual: Any = None,
    expected: Any = None,
    note: str = "",
    facts: tuple[tuple[str, Any], ...] = (),
) -> Step:
    result = "PASS" if denial is None else "FAIL"
    return _new_tuple(Step, (name, result, denial, expected, actual, note, facts))


def skipped(name: str, note: str, *, actual: Any = None) -> Step:
    return _new_tuple(Step, (name, "SKIP", None, None, actual, note, ()))


def first_denial(steps: Iterable[Step]) -> Denial | None:
    """The denial of the first failed step: the one the server answers with."""
    return next((s.denial for s in steps if s.denial is not None), None)


class Unverifiable(Exception):
    """Raised by a key or introspection source that cannot be reached by design (``explain
    --offline``): the engine records what it could not check and, tracing, goes on without it."""


@dataclass(slots=True)
class Trace:
    """Where the engine records the steps of one check.

    ``keep_going``: record every step even after a failure (the decision stays the first
    failure's); without it the trace holds the steps up to the first failure, as the server ran
    them. ``claims_verified`` says whether the claims the later steps read were vouched for by a
    signature or the IdP; ``undecided`` that a source was :class:`Unverifiable` and nothing
    earlier had failed, so there is no decision to give.
    """

    keep_going: bool = False
    steps: list[Step] = field(default_factory=list)
    claims_read: bool = False
    claims_verified: bool = False
    unverified_signature: bool = False
    undecided: bool = False

    def add(self, *steps: Step) -> None:
        self.steps.extend(steps)

    def step(self, name: str) -> Step | None:
        return next((s for s in self.steps if s.name == name), None)
