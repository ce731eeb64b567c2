"""Ratios, the markdown tables and the latency-vs-load chart, from the results dict of a run.

Pure functions of that dict (bench/run.py builds it), so they are unit-tested without load.
Every ratio divides two numbers measured in the same run, minutes apart, on the same machine.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

BACKENDS = {
    "a": "floor",
    "b": "extauthz",
    "c": "jwt_authn",
    "d": "extauthz HTTP",
    "e": "floor HTTP",
}


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None when either is missing, not finite, or den is 0."""
    if num is None or den is None:
        return None
    if not (math.isfinite(num) and math.isfinite(den)) or den == 0:
        return None
    return num / den


# The ratios of a row against another backend: (name, point field). Against a floor, the server
# CPU; against jwt_authn, whose work happens inside Envoy, the total (server + Envoy) CPU.
_VS_FLOOR = (
    ("rate", "rate"),
    ("cpu", "server_cpu_us"),
    ("total_cpu", "total_cpu_us"),
    ("p50", "p50_ms"),
    ("p99", "p99_ms"),
)
_VS_JWT_AUTHN = (
    ("rate", "rate"),
    ("total_cpu", "total_cpu_us"),
    ("p50", "p50_ms"),
    ("p99", "p99_ms"),
)
_VS_OTHER_WIRE = (("rate", "rate"), ("cpu", "server_cpu_us"), ("total_cpu", "total_cpu_us"))


def _against(
    point: Mapping[str, Any],
    points: Mapping[str, Mapping[str, Any]],
    other: str,
    fields: tuple[tuple[str, str], ...],
) -> dict[str, float | None]:
    """``point`` ÷ backend ``other``'s point, as ``<name>_vs_<other>``; nothing without it."""
    base = points.get(other)
    if base is None:
        return {}
    return {f"{name}_vs_{other}": ratio(point[field], base[field]) for name, field in fields}


def scenario_ratios(points: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """(b) against (a) the floor and (c) jwt_authn, from the main point of each backend.

    CPU ÷ (a) compares the ext_authz server processes' CPU per check. Against (c), whose work
    happens inside Envoy, the fair cost is the total (server + Envoy) CPU per check.
    """
    b = points.get("b")
    if b is None:
        return {}
    return {**_against(b, points, "a", _VS_FLOOR), **_against(b, points, "c", _VS_JWT_AUTHN)}


def http_ratios(points: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """(d), extauthz on the HTTP wire, against (e) its floor, (c) jwt_authn and (b) extauthz on
    the gRPC wire: the ratios of its row in the table. As for (b), the server CPU is compared
    with the floor's, the total CPU (server + Envoy) with jwt_authn's."""
    d = points.get("d")
    if d is None:
        return {}
    return {
        **_against(d, points, "e", _VS_FLOOR),
        **_against(d, points, "c", _VS_JWT_AUTHN),
        **_against(d, points, "b", _VS_OTHER_WIRE),
    }


# The ratios that compare the wires: (name, numerator, denominator, figure, title). Each is the
# ratio of the medians and, per round, the ratio of that round's two points (taken seconds apart).
WIRE_RATIOS = (
    ("http_rate_vs_grpc", "d", "b", "rate", "checks/s, HTTP ÷ gRPC"),
    ("http_cpu_vs_floor", "d", "e", "server_cpu_us", "server CPU, HTTP ÷ HTTP floor"),
    ("grpc_cpu_vs_floor", "b", "a", "server_cpu_us", "server CPU, gRPC ÷ gRPC floor"),
    ("http_total_cpu_vs_c", "d", "c", "total_cpu_us", "total CPU, HTTP ÷ jwt_authn"),
    ("http_rate_vs_c", "d", "c", "rate", "checks/s, HTTP ÷ jwt_authn"),
    ("http_total_cpu_vs_grpc", "d", "b", "total_cpu_us", "total CPU, HTTP ÷ gRPC"),
)


def rounds_of(p: Mapping[str, Any], key: str) -> list[Any]:
    """Each round's value of ``key`` of a combined point (one round: the point's own)."""
    values = p.get("round_rates" if key == "rate" else f"round_{key}")
    return list(values) if values else [p.get(key)]


def ratio_with_rounds(num: Mapping[str, Any], den: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``num[key] ÷ den[key]``: the medians' ratio (``value``) and each round's (``rounds``)."""
    pairs = zip(rounds_of(num, key), rounds_of(den, key), strict=False)
    return {"value": ratio(num.get(key), den.get(key)), "rounds": [ratio(n, d) for n, d in pairs]}


def wire_ratios(points: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The :data:`WIRE_RATIOS` whose two backends the scenario measured."""
    out = {}
    for name, num, den, key, _title in WIRE_RATIOS:
        if num in points and den in points:
            out[name] = ratio_with_rounds(points[num], points[den], key)
    return out


# The DPoP scenario: each wire's DPoP check (a new proof per request) against the cached bearer
# check (scenario 1's request) on the same server, seconds apart.
WIRE_NAMES = {"b": "gRPC", "d": "HTTP"}


def dpop_ratios(dpop: Mapping[str, Any], bearer: Mapping[str, Any]) -> dict[str, float | None]:
    """A DPoP point ÷ the bearer point of its wire: ``<name>_vs_bearer``."""
    return _against(dpop, {"bearer": bearer}, "bearer", _VS_OTHER_WIRE)


def dpop_summary(
    points: Mapping[str, Mapping[str, Any]],
    wires: Sequence[str],
    jti_bound: int,
    jti_lifetime_s: float,
) -> dict[str, Any]:
    """What the DPoP scenario's table and targets read, per wire: the two checks' CPU and rate,
    the CPU ratios with each round's, the most proofs one server remembered; and the rate a
    process can sustain before its jti memory (``jti_bound`` entries, each kept
    ``jti_lifetime_s``) is full."""
    out: dict[str, Any] = {
        "jti_bound": jti_bound,
        "jti_lifetime_s": jti_lifetime_s,
        "sustained_rate_bound": jti_bound / jti_lifetime_s,
        "wires": [],
    }
    for backend in wires:
        dpop, bearer = points.get(backend), points.get(f"{backend} bearer")
        if dpop is None or bearer is None:
            continue
        out["wires"].append(
            {
                "backend": backend,
                "wire": WIRE_NAMES.get(backend, backend),
                "bearer_rate": bearer["rate"],
                "dpop_rate": dpop["rate"],
                "bearer_cpu_us": bearer["server_cpu_us"],
                "dpop_cpu_us": dpop["server_cpu_us"],
                "round_bearer_cpu_us": rounds_of(bearer, "server_cpu_us"),
                "round_dpop_cpu_us": rounds_of(dpop, "server_cpu_us"),
                "bearer_envoy_cpu_us": bearer["envoy_cpu_us"],
                "dpop_envoy_cpu_us": dpop["envoy_cpu_us"],
                "dpop_p99_ms": dpop["p99_ms"],
                "cpu_ratio": ratio_with_rounds(dpop, bearer, "server_cpu_us"),
                "total_cpu_ratio": ratio_with_rounds(dpop, bearer, "total_cpu_us"),
                "jtis_remembered": dpop.get("jtis_remembered"),
                "dpop_denied": dpop.get("dpop_denied", 0),
                "proofs_ran_out": bool(dpop.get("proofs_ran_out")),
                "valid": bool(dpop.get("valid", True) and bearer.get("valid", True)),
            }
        )
    return out


def dpop_table(dpop: Mapping[str, Any]) -> str:
    """The DPoP scenario: per wire, the cached bearer check and the DPoP check on one server."""
    lines = [
        "| wire | bearer checks/s | DPoP checks/s | bearer server CPU µs/check (rounds) "
        "| DPoP server CPU µs/check (rounds) | DPoP ÷ bearer, server CPU (rounds) "
        "| DPoP ÷ bearer, total CPU | DPoP p99 ms | most jtis one server remembered |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for w in dpop.get("wires", []):
        flag = "" if w["valid"] else " ⚠"
        if w["proofs_ran_out"]:
            flag += " (proofs ran out)"
        if w["dpop_denied"]:
            flag += f" ({w['dpop_denied']:,} DPoP denials)"
        lines.append(
            f"| {w['wire']}{flag} | {fmt(w['bearer_rate'])} | {fmt(w['dpop_rate'])} "
            f"| {fmt(w['bearer_cpu_us'])} ({_spread(w['round_bearer_cpu_us'], 0)}) "
            f"| {fmt(w['dpop_cpu_us'])} ({_spread(w['round_dpop_cpu_us'], 0)}) "
            f"| {_with_rounds(w['cpu_ratio'])} | {fmt_ratio(w['total_cpu_ratio']['value'])} "
            f"| {fmt(w['dpop_p99_ms'], 2)} | {fmt(w['jtis_remembered'])} |"
        )
    lines += [
        "",
        f"A process remembers at most {dpop['jti_bound']:,} proofs, each for "
        f"{dpop['jti_lifetime_s']:g} s (2 × (maxClockSkewInSeconds + 60 s), skew 0 here); full, "
        "it refuses new proofs. So one process sustains at most "
        f"{dpop['sustained_rate_bound']:,.0f} DPoP checks/s over a lifetime's length; each "
        "block of this scenario runs on a fresh server and sends it fewer proofs than that bound.",
    ]
    return "\n".join(lines)


def fmt(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _row(label: str, backend: str, p: Mapping[str, Any], r: Mapping[str, Any]) -> str:
    """One point's row; its floor is (a) for (b), (e) for (d)."""
    flag = "" if p.get("valid", True) else " ⚠"
    floor = "e" if "rate_vs_e" in r or "cpu_vs_e" in r else "a"
    cells = [
        label,
        f"{backend} {p.get('label', BACKENDS.get(backend[:1], ''))}{flag}",
        fmt(p["rate"]),
        fmt(p["p50_ms"], 2),
        fmt(p["p99_ms"], 2),
        fmt(p["p999_ms"], 2),
        fmt(p.get("server_cpu_us")),
        fmt(p.get("envoy_cpu_us")),
        fmt(p.get("rss_mb"), 1),
        fmt(p.get("idp_calls")),
        fmt_ratio(r.get(f"rate_vs_{floor}")),
        fmt_ratio(r.get(f"cpu_vs_{floor}")),
        fmt_ratio(r.get("rate_vs_c")),
        fmt_ratio(r.get("total_cpu_vs_c")),
        fmt_ratio(r.get("rate_vs_b")),
    ]
    return "| " + " | ".join(cells) + " |"


TABLE_HEADER = (
    "| scenario | backend | checks/s | p50 ms | p99 ms | p99.9 ms | server CPU µs/check "
    "| Envoy CPU µs/check | RSS MB | IdP calls | checks/s ÷ floor | CPU ÷ floor | checks/s ÷ (c) "
    "| total CPU ÷ (c) | checks/s ÷ (b) |\n"
    "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
)


def results_table(scenarios: Sequence[Mapping[str, Any]]) -> str:
    """One row per backend of each scenario; the ratio columns are filled on the (b) rows
    (against the gRPC floor (a)) and the (d) rows (against the HTTP floor (e), and (b)); a point
    with ratios of its own, as the hostile paths' have, shows those."""
    lines = [TABLE_HEADER]
    cells = TABLE_HEADER.splitlines()[0].count("|") - 1
    for s in scenarios:
        label = f"{s['id']}. {s['title']}"
        by_backend = {"b": s.get("ratios", {}), "d": s.get("http_ratios", {})}
        for backend, point in s["points"].items():
            own = point.get("ratios") or by_backend.get(backend, {})
            lines.append(_row(label, backend, point, own))
            label = ""
        for name, point in s.get("extra_points", {}).items():
            lines.append(_row(label, name, point, point.get("ratios", {})))
            label = ""
        if s.get("skipped"):
            lines.append(f"| {label} | skipped: {s['skipped']} |" + " |" * (cells - 2))
    return "\n".join(lines)


def _with_rounds(r: Mapping[str, Any] | None) -> str:
    """A ratio and, when there were several rounds, each round's: ``1.20× (1.1 / 1.2 / 1.3)``."""
    if not r or r.get("value") is None:
        return "–"
    rounds = r.get("rounds") or []
    if len(rounds) < 2:
        return fmt_ratio(r["value"])
    return f"{fmt_ratio(r['value'])} ({' / '.join(fmt(v, 2) for v in rounds)})"


def wires_table(scenarios: Sequence[Mapping[str, Any]]) -> str:
    """The two wires side by side, per scenario: the :data:`WIRE_RATIOS`, each with its
    rounds."""
    titles = [title for _n, _a, _b, _k, title in WIRE_RATIOS]
    lines = [
        "| scenario | " + " | ".join(titles) + " |",
        "|---|" + "--:|" * len(titles),
    ]
    for s in scenarios:
        wires = s.get("wires") or {}
        if "http_rate_vs_grpc" not in wires:
            continue
        cells = [_with_rounds(wires.get(name)) for name, *_ in WIRE_RATIOS]
        lines.append(f"| {s['id']}. {s['title']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(targets: Sequence[Mapping[str, Any]]) -> str:
    """One row per target; ``measured`` holds each round's value too where there were several."""
    lines = ["| target | measured | goal | met |", "|---|--:|---|:-:|"]
    for t in targets:
        met = {True: "yes", False: "**no**", None: "–"}[t.get("met")]
        lines.append(f"| {t['name']} | {t['measured']} | {t['goal']} | {met} |")
    return "\n".join(lines)


def curve_table(curve: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| backend | connections | checks/s | p50 ms | p99 ms | p99.9 ms | server CPU µs/check |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for p in sorted(curve, key=lambda p: (p["backend"], p["connections"])):
        lines.append(
            f"| {p['backend']} {p.get('label', '')} | {p['connections']} | {fmt(p['rate'])} "
            f"| {fmt(p['p50_ms'], 2)} | {fmt(p['p99_ms'], 2)} | {fmt(p['p999_ms'], 2)} "
            f"| {fmt(p.get('server_cpu_us'))} |"
        )
    return "\n".join(lines)


def _spread(values: Sequence[Any], digits: int, unit: str = "") -> str:
    """Each round's value, as ``a / b / c``."""
    return " / ".join(fmt(v, digits) for v in values) + unit


def hostile_table(hostile: Mapping[str, Any]) -> str:
    """The hostile-path scenario: CPU per check of each path, then the innocent check's latency
    quiet and under each flood, with each round's value."""
    lines = [
        "| hostile path | bytes | answer | extauthz CPU µs/check (median; rounds) "
        "| floor CPU µs/check | Envoy CPU µs/check | extauthz checks/s |",
        "|---|--:|---|--:|--:|--:|--:|",
    ]
    for p in hostile.get("paths", []):
        flag = "" if p.get("valid", True) else " ⚠"
        lines.append(
            f"| {p['title']}{flag} | {p['chars']:,} | {p['expect']} "
            f"| {fmt(p['server_cpu_us'])} ({_spread(p['round_server_cpu_us'], 0)}) "
            f"| {fmt(p['floor_server_cpu_us'])} | {fmt(p.get('envoy_cpu_us'))} "
            f"| {fmt(p['rate'])} |"
        )
    innocent = hostile.get("innocent", {})
    quiet = innocent.get("quiet")
    if quiet:
        lines += [
            "",
            f"The innocent check (scenario 1's request) on {quiet['connections']} connections, "
            f"each pausing {fmt(quiet['delay_ms'], 1)} ms between requests, quiet and under "
            "each flood:",
            "",
            "| innocent check | checks/s | p50 ms | p99 ms (median; rounds) "
            "| p99 ÷ quiet (median; rounds) | the flood: checks/s, extauthz cores, Envoy cores |",
            "|---|--:|--:|--:|--:|---|",
        ]
        floods = hostile.get("floods", {})
        for name, p in innocent.items():
            flag = "" if p.get("valid", True) else " ⚠"
            ratio_cell = ""
            if "p99_ratio" in p:
                ratio_cell = (
                    f"{fmt_ratio(p['p99_ratio'])} "
                    f"({' / '.join(fmt_ratio(r) for r in p['round_p99_ratios'])})"
                )
            fl = floods.get(name)
            flood_cell = ""
            if fl:
                flood_cell = (
                    f"{fl['connections']} connections: {fmt(fl['rate'])}/s, "
                    f"{fmt(fl['server_cpu_cores'], 2)}, {fmt(fl['envoy_cpu_cores'], 2)}"
                    + ("" if fl.get("valid", True) else " ⚠")
                )
            where = "quiet" if name == "quiet" else f"under the {name}"
            lines.append(
                f"| {where}{flag} | {fmt(p['rate'])} | {fmt(p['p50_ms'], 2)} "
                f"| {fmt(p['p99_ms'], 2)} ({_spread(p['round_p99_ms'], 2)}) "
                f"| {ratio_cell} | {flood_cell} |"
            )
    return "\n".join(lines)


def flood_table(flood: Mapping[str, Any], rows: int = 10) -> str:
    """RSS against distinct tokens introspected, at about ``rows`` even steps of the flood."""
    samples = flood["rss_samples"]
    step = max(1, len(samples) // rows)
    picked = samples[::step]
    if picked[-1] != samples[-1]:
        picked.append(samples[-1])
    lines = ["| distinct tokens | RSS MB |", "|--:|--:|"]
    lines += [f"| {n:,} | {mb:.1f} |" for n, mb in picked]
    lines.append(
        f"\n{flood['idp_distinct_tokens']:,} tokens in {flood['seconds']:.0f} s "
        f"({flood['rate']:,.0f}/s); peak RSS {flood.get('rss_peak_mb', flood['rss_mb']):.1f} MB."
    )
    return "\n".join(lines)


def markdown(results: Mapping[str, Any]) -> str:
    meta = results["meta"]
    parts = [
        "# extauthz bench",
        "",
        f"{meta['date']} · {meta['machine']} · profile `{meta['profile']}` "
        f"({meta.get('rounds', 1)} × {meta['seconds']} s per point, "
        f"{meta['connections']} connections, wrk "
        f"{meta['wrk_threads']} thread) · extauthz `--workers {meta['workers']}` · "
        f"commit {meta.get('commit', '?')} · run took {meta.get('elapsed_s', 0):.0f} s",
    ]
    targets = results.get("targets", [])
    if results["scenarios"]:
        parts += [
            "",
            "(a) do-nothing grpc.aio ext_authz server · (b) extauthz over gRPC · (c) Envoy "
            "jwt_authn · (d) extauthz over the HTTP wire (`--http-listen`, Envoy's http_service; "
            "the same process as (b)) · (e) do-nothing HTTP ext_authz server (asyncio.Protocol "
            "over httptools); (a), (b), (d) and (e) on uvloop, all behind the same Envoy "
            "(`--concurrency 1`, direct_response upstream). Ratios compare points of this one "
            "run: the floor of (b) is (a), of (d) is (e). server CPU: the ext_authz process(es), "
            "from /proc; total CPU adds Envoy's.",
            "",
            results_table(results["scenarios"]),
        ]
        if any("http_rate_vs_grpc" in (s.get("wires") or {}) for s in results["scenarios"]):
            parts += [
                "",
                "## The two wires",
                "",
                "Medians' ratios, with each round's ratio (its two points taken seconds apart) "
                "in parentheses.",
                "",
                wires_table(results["scenarios"]),
            ]
    else:  # the flood alone (`make bench-flood`): only what was measured
        targets = [t for t in targets if t["value"] is not None]
    if targets:
        parts += ["", "## Targets", "", targets_table(targets)]
    for s in results["scenarios"]:
        if s.get("dpop"):
            parts += ["", f"## DPoP (scenario {s['id']})", "", dpop_table(s["dpop"])]
        if s.get("hostile"):
            parts += [
                "",
                f"## Hostile paths (scenario {s['id']})",
                "",
                hostile_table(s["hostile"]),
            ]
    if results.get("flood", {}).get("rss_samples"):
        parts += ["", "## RSS during the token flood", "", flood_table(results["flood"])]
    if results.get("curve"):
        parts += [
            "",
            "## Latency against offered load (scenario 1)",
            "",
            curve_table(results["curve"]),
            "",
            f"![latency against load]({results.get('chart_file', 'latency_vs_load.png')})",
        ]
    for note in results.get("notes", []):
        parts += ["", f"- {note}"]
    if results.get("profiles"):
        parts += [
            "",
            "## Where extauthz's CPU goes (py-spy, Python frames, one extra unmeasured run)",
            "",
            "Percentages of the busy samples (samples waiting in epoll or in grpc's poller "
            "thread left out). A leaf in the event loop (`Handle._run`, `_run_once`) is C code "
            "it calls: mostly grpc's cython core (Python frames only; no `--native`).",
        ]
        for name, prof in results["profiles"].items():
            parts += [
                "",
                f"**{name}**: {prof['samples']:,} busy samples "
                f"({prof.get('idle_samples', 0):,} waiting); extauthz's own code on the stack "
                f"in {prof['extauthz_code_pct']:.1f} %.",
                "",
                "| extauthz function (inclusive) | % | leaf function (self) | % |",
                "|---|--:|---|--:|",
            ]
            mine, leaves = prof["extauthz_inclusive"], prof["self"]
            for i in range(max(len(mine), len(leaves))):
                a = mine[i] if i < len(mine) else ("", None)
                b = leaves[i] if i < len(leaves) else ("", None)
                parts.append(
                    f"| {'`' + a[0] + '`' if a[0] else ''} | {fmt(a[1], 1)} "
                    f"| {'`' + b[0] + '`' if b[0] else ''} | {fmt(b[1], 1)} |"
                )
    return "\n".join(parts) + "\n"


def chart(curve: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """p50 (solid) and p99 (dashed) latency against achieved checks/s, one colour per backend,
    each point labelled with its wrk connection count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    colours = {
        "a": "tab:gray",
        "b": "tab:blue",
        "c": "tab:green",
        "d": "tab:orange",
        "e": "tab:brown",
    }
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    for backend in sorted({p["backend"] for p in curve}):
        pts = sorted((p for p in curve if p["backend"] == backend), key=lambda p: p["connections"])
        xs = [p["rate"] for p in pts]
        label = f"({backend}) {BACKENDS.get(backend, backend)}"
        colour = colours.get(backend)
        ax.plot(xs, [p["p50_ms"] for p in pts], "o-", color=colour, label=f"{label} p50")
        ax.plot(
            xs, [p["p99_ms"] for p in pts], "s--", color=colour, label=f"{label} p99", alpha=0.8
        )
        for p in pts:
            ax.annotate(
                f"c={p['connections']}",
                (p["rate"], p["p99_ms"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=colour,
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    steps = [m * 10**e for e in range(-1, 6) for m in (1, 2, 5)]
    for axis, values in (
        (ax.xaxis, [p["rate"] for p in curve]),
        (ax.yaxis, [p[k] for p in curve for k in ("p50_ms", "p99_ms")]),
    ):
        finite = [v for v in values if v and math.isfinite(v)]
        if finite:
            lo, hi = min(finite) / 1.5, max(finite) * 1.5
            axis.set_major_locator(ticker.FixedLocator([s for s in steps if lo <= s <= hi]))
        axis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{v:,.10g}"))
        axis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("achieved checks/s, log (each point: wrk connections c)")
    ax.set_ylabel("latency through Envoy, ms (log)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.13))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


_LINE_NO = re.compile(r":\d+\)$")


def _frame(text: str) -> str:
    """A py-spy frame ``func (file.py:123)`` without its line number and site-packages path."""
    text = _LINE_NO.sub(")", text.strip())
    return re.sub(r"\(.*/(site-packages|lib/python3\.\d+)/", "(", text)


def _stacks(collapsed: str) -> Iterator[tuple[list[str], int]]:
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            yield [_frame(f) for f in stack.split(";")], int(count)


def _is_ours(frame: str) -> bool:
    return "(extauthz/" in frame and not frame.startswith(("main (", "_serve (", "<module> ("))


# Leaves that are (mostly) waiting, not working: the event loop's epoll and grpc's poller thread
# (py-spy's idle detection misses them without --native). Left out of the percentages.
_IDLE_LEAVES = ("EpollSelector.select (", "Thread.run (", "Condition.wait (", "Event.wait (")


def profile_summary(collapsed: str, n: int = 12) -> dict[str, Any]:
    """What py-spy ``--format raw`` output (collapsed stacks, ``frame;...;leaf count`` per
    line) says: the share of busy samples with extauthz's own code on the stack, the extauthz
    functions by inclusive share, and the leaf functions (self time). Percentages are of the
    busy samples (leaves waiting in epoll or in grpc's poller thread are counted apart)."""
    total = ours_total = idle = 0
    ours: dict[str, int] = {}
    leaves: dict[str, int] = {}
    for frames, count in _stacks(collapsed):
        if frames[-1].startswith(_IDLE_LEAVES):
            idle += count
            continue
        total += count
        leaves[frames[-1]] = leaves.get(frames[-1], 0) + count
        mine = {f for f in frames if _is_ours(f)}
        if mine:
            ours_total += count
        for f in mine:
            ours[f] = ours.get(f, 0) + count

    def top(counts: Mapping[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
        return [(f, 100.0 * c / total) for f, c in ranked] if total else []

    return {
        "samples": total,
        "idle_samples": idle,
        "extauthz_code_pct": 100.0 * ours_total / total if total else 0.0,
        "extauthz_inclusive": top(ours),
        "self": top(leaves),
    }
