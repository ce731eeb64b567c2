"""The pure parts of the chaos scenarios: judging each response, and the summary tables.

A scenario knows, independently of the server, what every token it sent is (valid, expired,
forged, signed by a key the IdP dropped...) and what the IdP was doing at each moment, so it can
say for each request which answers are acceptable (:data:`Expect`). :func:`outcome` reduces a
response to ``"allow"``, the ``x-extauthz-reason`` of a denial, ``envoy_<status>`` for an answer
Envoy made up itself (its ``status_on_error`` when the ext_authz call failed), or
``error:<kind>`` for a connection error; :func:`classify` compares the two:

* ``false_allow``: allowed, where an allow was not acceptable (a bad token let through);
* ``false_deny``: not allowed (denied, or an error), where only an allow was right (a good
  token refused);
* ``unexpected``: denied, where a denial was acceptable, but for another reason than expected
  (e.g. Envoy's own 503 where extauthz's 500 ``idp_call_failed`` was expected).

No process, no clock: bench/tests/test_chaos.py covers this module.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.chaos_client import Record

ALLOW = "allow"
ENVOY_ERROR = "envoy_503"  # the bench listener's status_on_error (ServiceUnavailable)

Expect = frozenset[str]


def allow() -> Expect:
    return frozenset({ALLOW})


def deny(*reasons: str) -> Expect:
    if not reasons or ALLOW in reasons:
        raise ValueError("deny() needs reasons, and not 'allow'")
    return frozenset(reasons)


def either(*outcomes: str) -> Expect:
    """A transition: any of these outcomes is right (e.g. allow or idp_call_failed)."""
    return frozenset(outcomes)


def outcome(status: int, reason: str, error: str = "") -> str:
    if error:
        return f"error:{error}"
    if status == 200:
        return ALLOW
    if reason:
        return reason
    return f"envoy_{status}"


def record_outcome(rec: Record) -> str:
    return outcome(rec.status, rec.reason, rec.error)


def classify(got: str, expect: Expect) -> str:
    """``ok``, ``false_allow``, ``false_deny`` (only an allow was right) or ``unexpected`` (a
    denial was right, but not this one: e.g. Envoy's 503 where extauthz's own 500
    ``idp_call_failed`` was expected)."""
    if got in expect:
        return "ok"
    if got == ALLOW:
        return "false_allow"
    if expect == {ALLOW}:
        return "false_deny"
    return "unexpected"


@dataclass
class Row:
    """The traffic of one token kind."""

    kind: str
    sent: int = 0
    allowed: int = 0
    denied: Counter[str] = field(default_factory=Counter)
    false_denials: int = 0
    false_allows: int = 0
    unexpected: int = 0
    examples: list[str] = field(default_factory=list)  # what went wrong, a few cases

    def add(self, got: str, verdict: str, example: str = "") -> None:
        self.sent += 1
        if got == ALLOW:
            self.allowed += 1
        else:
            self.denied[got] += 1
        if verdict == "false_allow":
            self.false_allows += 1
        elif verdict == "false_deny":
            self.false_denials += 1
        elif verdict == "unexpected":
            self.unexpected += 1
        if verdict != "ok" and len(self.examples) < 5 and example:
            self.examples.append(example)

    def merge(self, other: Row) -> None:
        self.sent += other.sent
        self.allowed += other.allowed
        self.denied.update(other.denied)
        self.false_denials += other.false_denials
        self.false_allows += other.false_allows
        self.unexpected += other.unexpected

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "sent": self.sent,
            "allowed": self.allowed,
            "denied": dict(self.denied.most_common()),
            "false_denials": self.false_denials,
            "false_allows": self.false_allows,
            "unexpected": self.unexpected,
            "examples": self.examples,
        }


def tally(
    records: Iterable[Record], expect: Callable[[Record], Expect], t0: float = 0.0
) -> list[Row]:
    """One row per token kind, in the order the kinds first appear."""
    rows: dict[str, Row] = {}
    for rec in records:
        got = record_outcome(rec)
        exp = expect(rec)
        verdict = classify(got, exp)
        row = rows.get(rec.kind)
        if row is None:
            row = rows[rec.kind] = Row(rec.kind)
        example = ""
        if verdict != "ok":
            example = (
                f"t+{rec.t_send - t0:.3f}s {rec.request_id} ({rec.t_recv - rec.t_send:.3f} s): "
                f"got {got}, expected {'|'.join(sorted(exp))}"
            )
        row.add(got, verdict, example)
    return list(rows.values())


def wrk_row(kind: str, requests: int, non_2xx: int, socket_errors: int, expect_allow: bool) -> Row:
    """A wrk flood as a row: wrk counts answers, not reasons, so a denial shows as ``non-2xx``.
    Every token of a chaos flood is unverifiable (``expect_allow`` False): each 2xx is a false
    allow."""
    row = Row(kind, sent=requests)
    row.allowed = requests - non_2xx - socket_errors
    if non_2xx:
        row.denied["non-2xx (wrk)"] = non_2xx
    if socket_errors:
        row.denied["error:socket (wrk)"] = socket_errors
    if expect_allow:
        row.false_denials = non_2xx + socket_errors
    else:
        row.false_allows = row.allowed
    return row


def total(rows: Sequence[Row]) -> Row:
    t = Row("all")
    for r in rows:
        t.merge(r)
    return t


# --- figures --------------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest rank, like bench/loadgen.py's; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency_summary(seconds: Sequence[float]) -> str:
    """``n=…, p50 … ms, p99 … ms, max … ms``."""
    if not seconds:
        return "n=0"
    ms = [s * 1000 for s in seconds]
    return (
        f"n={len(ms):,}, p50 {fmt_ms(percentile(ms, 50))}, p99 {fmt_ms(percentile(ms, 99))}, "
        f"max {fmt_ms(max(ms))}"
    )


def fmt_ms(ms: float) -> str:
    if math.isnan(ms):
        return "–"
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms"


@dataclass
class Figure:
    name: str
    value: str
    bound: str = ""
    ok: bool | None = None  # None: reported, not judged

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "bound": self.bound, "ok": self.ok}


def check(name: str, value: str, ok: bool, bound: str) -> Figure:
    return Figure(name, value, bound, bool(ok))


def info(name: str, value: str) -> Figure:
    return Figure(name, value)


@dataclass
class ScenarioResult:
    id: str
    title: str
    rows: list[Row] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    timeline: list[tuple[float, str]] = field(default_factory=list)  # seconds from start, event
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""  # the scenario could not run to the end

    @property
    def passed(self) -> bool:
        if self.error:
            return False
        t = total(self.rows)
        if t.false_allows or t.false_denials or t.unexpected or t.sent == 0:
            return False
        return all(f.ok is not False for f in self.figures)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "passed": self.passed,
            "seconds": round(self.seconds, 1),
            "error": self.error,
            "traffic": [r.as_dict() for r in self.rows],
            "total": total(self.rows).as_dict(),
            "figures": [f.as_dict() for f in self.figures],
            "timeline": [[round(t, 3), e] for t, e in self.timeline],
            "notes": self.notes,
        }


# --- rendering ------------------------------------------------------------------------------------


def _n(v: int) -> str:
    return f"{v:,}"


def _denied(denied: Mapping[str, int]) -> str:
    if not denied:
        return "–"
    return ", ".join(
        f"{reason} {n:,}" for reason, n in sorted(denied.items(), key=lambda kv: -kv[1])
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def traffic_table(rows: Sequence[Row]) -> str:
    head = (
        "| token kind | sent | allowed | denied, by reason | false denials | false allows | "
        "other mismatches |\n|---|--:|--:|---|--:|--:|--:|"
    )
    lines = [head]
    named = [(_cell(r.kind), r) for r in rows] + [("**all**", total(rows))]
    for name, r in named:
        lines.append(
            f"| {name} | {_n(r.sent)} | {_n(r.allowed)} | {_cell(_denied(r.denied))} | "
            f"{_n(r.false_denials)} | {_n(r.false_allows)} | {_n(r.unexpected)} |"
        )
    return "\n".join(lines)


def figures_table(figures: Sequence[Figure]) -> str:
    lines = ["| figure | measured | bound | |", "|---|---|---|---|"]
    for f in figures:
        mark = {True: "✔", False: "✘", None: ""}[f.ok]
        lines.append(f"| {_cell(f.name)} | {_cell(f.value)} | {_cell(f.bound)} | {mark} |")
    return "\n".join(lines)


def scenario_markdown(res: ScenarioResult) -> str:
    verdict = "PASS" if res.passed else "FAIL"
    out = [f"### {res.id}. {res.title} — {verdict}", ""]
    if res.error:
        out += [f"**Did not complete:** {_cell(res.error)}", ""]
    if res.timeline:
        steps = " → ".join(f"t+{t:.1f}s {e}" for t, e in res.timeline)
        out += [f"Timeline: {steps}.", ""]
    out += [traffic_table(res.rows), "", figures_table(res.figures), ""]
    problems = [ex for r in res.rows for ex in r.examples]
    if problems:
        out += ["Mismatches (first few):", ""]
        out += [f"- {_cell(p)}" for p in problems[:10]]
        out.append("")
    for note in res.notes:
        out.append(f"- {note}")
    if res.notes:
        out.append("")
    return "\n".join(out)


def markdown(results: Sequence[ScenarioResult], meta: Mapping[str, Any]) -> str:
    passed = sum(r.passed for r in results)
    lines = [
        "# Chaos scenarios (`make chaos`)",
        "",
        f"{meta.get('date', '')} · {meta.get('machine', '')} · commit {meta.get('commit', '')} · "
        f"Envoy {meta.get('envoy', '')} · profile {meta.get('profile', '')} · "
        f"{meta.get('elapsed_s', 0):.0f} s in all · load average "
        f"{meta.get('load_average_at_start', math.nan):.1f} at start, "
        f"{meta.get('load_average_at_end', math.nan):.1f} at the end (the scenarios' own "
        "processes included)",
        "",
        f"**{passed} of {len(results)} scenarios passed.** Every request goes wrk or the "
        "harness's client → Envoy (`--concurrency 1`) → `python -m extauthz serve` → a local "
        "IdP, on loopback. The harness knows what each token is, so each answer is judged on its "
        "own: a *false allow* lets through a token that is not valid (or that nobody could "
        "verify at that moment), a *false denial* refuses a valid one, *other mismatches* are "
        "denials with an unexpected reason. `envoy_503` is Envoy's own `status_on_error` "
        "(the ext_authz call failed); `non-2xx (wrk)` is a denial counted by wrk, which does not "
        "read reasons. What each scenario does, and why each bound: the docstring of "
        "bench/chaos.py.",
        "",
    ]
    for r in results:
        lines.append(scenario_markdown(r))
    return "\n".join(lines).rstrip() + "\n"
