"""The bench harness's pure parts (bench/): config generation, percentile math, /proc
parsing, ratios and the rendered tables. No process is started and no load is sent; nothing
here measures or asserts a timing (``make bench-smoke`` exercises the harness end to end)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench import configs, floor_server, loadgen, procs, report, run
from bench.keys import AUDIENCE, CLIENT_SECRET_ENV, ISSUER, SCOPE, BenchKeys
from examples.stack import find_envoy
from extauthz import http_wire
from extauthz.config import parse_config


@pytest.fixture(scope="module")
def keys() -> BenchKeys:
    return BenchKeys.generate()


# --- config generation ----------------------------------------------------------------------------


def test_jwt_policy_is_a_valid_extauthz_config() -> None:
    raw = configs.extauthz_config("jwt", "http://127.0.0.1:1234")
    config = parse_config(raw)
    (d,) = config.deployments
    assert d.name == configs.TARGET_DEPLOYMENT
    policy = raw["deployments"][0]["authentication"]["validationPolicy"]
    assert policy["type"] == "REMOTE_JWKS"
    assert policy["uri"] == "http://127.0.0.1:1234/jwks"
    assert policy["additionalValidationPolicy"] == {"issuers": [ISSUER], "audiences": [AUDIENCE]}
    assert raw["deployments"][0]["routes"][0]["authorization"]["allowedScope"] == [SCOPE]


def test_introspection_policy_takes_its_secret_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(CLIENT_SECRET_ENV, "s3cret")
    raw = configs.extauthz_config("introspection", "http://127.0.0.1:1")
    policy = raw["deployments"][0]["authentication"]["validationPolicy"]
    assert policy["type"] == "REMOTE_INTROSPECTION"
    assert policy["clientDetails"] == {
        "clientId": "bench-client",
        "clientSecretEnv": CLIENT_SECRET_ENV,
    }
    assert "s3cret" not in json.dumps(raw)
    parse_config(raw)


def test_many_deployments_put_the_target_near_the_end() -> None:
    raw = configs.extauthz_config("jwt", "http://127.0.0.1:1", deployments=300)
    names = [d["name"] for d in raw["deployments"]]
    assert len(names) == len(set(names)) == 300
    assert names.index(configs.TARGET_DEPLOYMENT) == 290
    assert len(parse_config(raw).deployments) == 300
    with pytest.raises(ValueError):
        configs.extauthz_config("jwt", "http://x", deployments=0)
    with pytest.raises(ValueError):
        configs.extauthz_config("saml", "http://x")


def test_hostile_paths_are_selected_and_reach_the_templates() -> None:
    """Each hostile path is in normal form and selects a route of the `files` deployment, so
    the bench measures route selection over the whole path (and a denial for the missing token),
    not an early `request_ambiguous`; and each fits Envoy's default limit on request headers."""
    from extauthz.routing import Selection, select

    raw = configs.extauthz_config("jwt", "http://127.0.0.1:1", files=True)
    config = parse_config(raw)
    assert [d.name for d in config.deployments] == [configs.TARGET_DEPLOYMENT, "files"]
    files = raw["deployments"][-1]
    assert files["pathPrefix"] == configs.FILES_PREFIX
    assert "/{name}.{ext}" in [r["path"] for r in files["routes"]]
    assert configs.extauthz_config("jwt", "http://127.0.0.1:1")["deployments"][-1]["name"] == "api"
    keys = [hp.key for hp in configs.HOSTILE_PATHS]
    assert len(keys) == len(set(keys)) >= 2
    for hp in configs.HOSTILE_PATHS:
        assert len(hp.path) + 200 < 60 * 1024, hp.key  # the path and the other headers
        assert (hp.status, hp.reason) == (401, "token_missing")
        selected = select(
            config,
            authority="api.bench.example",
            raw_path=hp.path,
            method="GET",
            context_extensions={},
        )
        assert getattr(selected, "deployment", None) is not None, (hp.key, selected)
        assert isinstance(selected, Selection), (hp.key, selected)
        assert selected.deployment.name == "files" and selected.route is not None
    long, dotted = configs.HOSTILE_PATHS[0].path, configs.HOSTILE_PATHS[1].path
    assert long == "/files" + "/a" * 30_000
    assert dotted.strip("/").split("/")[1] == "." * 20_000


def _filters(listener: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return list(hcm["http_filters"])


def test_envoy_bootstrap_has_one_listener_per_backend(keys: BenchKeys) -> None:
    boot = configs.envoy_bootstrap(
        9901,
        ext_authz={"floor": (8001, [9001]), "extauthz": (8002, [9002, 9003])},
        jwt_authn=(8003, keys.jwks),
    )
    assert boot["admin"]["address"]["socket_address"]["port_value"] == 9901
    listeners = {lst["name"]: lst for lst in boot["static_resources"]["listeners"]}
    assert set(listeners) == {"floor", "extauthz", "jwt_authn"}
    for lst in listeners.values():
        hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
        (route,) = hcm["route_config"]["virtual_hosts"][0]["routes"]
        assert route["direct_response"]["status"] == 200  # the upstream costs nothing
        assert _filters(lst)[-1]["name"] == "envoy.filters.http.router"
    ext = _filters(listeners["extauthz"])[0]["typed_config"]
    assert ext["grpc_service"]["envoy_grpc"]["cluster_name"] == "extauthz_grpc"
    assert ext["failure_mode_allow"] is False
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    endpoints = clusters["extauthz_grpc"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == [
        9002,
        9003,
    ]
    assert "http2_protocol_options" in json.dumps(clusters["floor_grpc"])
    provider = _filters(listeners["jwt_authn"])[0]["typed_config"]["providers"]["bench"]
    assert provider["issuer"] == ISSUER and provider["audiences"] == [AUDIENCE]
    jwks = json.loads(provider["local_jwks"]["inline_string"])
    assert {k["kid"] for k in jwks["keys"]} == {"bench-rs", "bench-es"}
    assert all("d" not in k for k in jwks["keys"])  # public keys only


def _bootstrap_with_every_kind(keys: BenchKeys) -> dict[str, Any]:
    return configs.envoy_bootstrap(
        9901,
        ext_authz={"floor": (8001, [9001]), "extauthz": (8002, [9002])},
        ext_authz_http={"floor": (8005, [9005]), "extauthz": (8004, [9004])},
        jwt_authn=(8003, keys.jwks),
    )


def _hcm(listener: dict[str, Any]) -> dict[str, Any]:
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def test_the_http_wire_listeners_ask_the_http_service(keys: BenchKeys) -> None:
    """(d) and (e): a listener each whose ext_authz filter speaks Envoy's http_service protocol
    to an HTTP/1.1 cluster, forwarding authorization and x-request-id (and the DPoP proof with
    the scheme, for scenario 9's htu), copying the identity
    headers the bench policies set, failing closed like the gRPC listeners."""
    boot = _bootstrap_with_every_kind(keys)
    listeners = {lst["name"]: lst for lst in boot["static_resources"]["listeners"]}
    assert set(listeners) == {"floor", "extauthz", "jwt_authn", "floor_http", "extauthz_http"}
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    grpc = _filters(listeners["extauthz"])[0]["typed_config"]
    for name, port in (("floor", 9005), ("extauthz", 9004)):
        lst = listeners[f"{name}_http"]
        ext = _filters(lst)[0]["typed_config"]
        assert _filters(lst)[0]["name"] == "envoy.filters.http.ext_authz"
        assert "grpc_service" not in ext
        service = ext["http_service"]
        cluster = service["server_uri"]["cluster"]
        assert cluster == f"{name}_http_service"
        assert service["server_uri"]["timeout"] == grpc["grpc_service"]["timeout"]
        assert "path_prefix" not in service  # extauthz matches the path as it comes
        # Envoy 1.40 deprecates authorization_request.allowed_headers: the filter's own is used
        assert "authorization_request" not in service
        forwarded = {m["exact"] for m in ext["allowed_headers"]["patterns"]}
        assert forwarded == {"authorization", "x-request-id", "dpop", "x-forwarded-proto"}
        copied = {
            m["exact"]
            for m in service["authorization_response"]["allowed_upstream_headers"]["patterns"]
        }
        for kind in ("jwt", "introspection"):
            for d in configs.extauthz_config(kind, "http://x", files=True)["deployments"]:
                assert set(d["headersFromClaims"]) <= copied
        for key in ("failure_mode_allow", "status_on_error", "transport_api_version"):
            assert ext[key] == grpc[key], key
        # Everything but the filter is the gRPC listener's: the same hardening, the same route.
        same = {k: v for k, v in _hcm(lst).items() if k not in ("stat_prefix", "http_filters")}
        grpc_hcm = _hcm(listeners[name])
        assert same == {
            k: v for k, v in grpc_hcm.items() if k not in ("stat_prefix", "http_filters")
        } | {"route_config": {**grpc_hcm["route_config"], "name": f"{name}_http"}}
        upstream = clusters[cluster]
        endpoints = upstream["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == [
            port
        ]
        options = upstream["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]
        assert "http2_protocol_options" not in json.dumps(upstream)  # HTTP/1.1
        idle = options["common_http_protocol_options"]["idle_timeout"]
        assert float(idle.rstrip("s")) < http_wire.IDLE_SECONDS  # Envoy closes idle ones first


def test_neither_wire_names_the_deployment(keys: BenchKeys) -> None:
    """The gRPC listeners set no context_extensions, so the HTTP ones add no
    x-extauthz-deployment header: on both wires extauthz selects the deployment by the path."""
    text = json.dumps(_bootstrap_with_every_kind(keys))
    assert "context_extensions" not in text and "headers_to_add" not in text
    assert http_wire.DEPLOYMENT_HEADER not in text


def test_envoy_validates_the_bench_bootstrap_with_every_listener_kind(
    keys: BenchKeys, tmp_path: Path
) -> None:
    """`envoy --mode validate` accepts the bootstrap rendered from every template (both wires
    and jwt_authn), without deprecated fields."""
    config = tmp_path / "bench-envoy.json"
    config.write_text(json.dumps(_bootstrap_with_every_kind(keys)), encoding="utf-8")
    result = subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(config), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Deprecated field" not in output, output


def test_worker_endpoints() -> None:
    assert run._b_endpoints(9000, 1, "shared") == [9000]
    assert run._b_endpoints(9000, 2, "shared") == [9000]
    assert run._b_endpoints(9000, 3, "consecutive") == [9000, 9001, 9002]


def test_expired_token_is_expired(keys: BenchKeys) -> None:
    import jwt

    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(
            keys.expired_rs256(),
            keys.rsa.private.public_key(),
            algorithms=["RS256"],
            audience=AUDIENCE,
        )
    assert (
        jwt.decode(
            keys.es256(), keys.ec.private.public_key(), algorithms=["ES256"], audience=AUDIENCE
        )["scope"]
        == SCOPE
    )


# --- load generation and percentiles -------------------------------------------------------------


def test_percentile_nearest_rank() -> None:
    hist = [[100, 50], [200, 40], [1000, 9], [5000, 1]]  # 100 samples
    assert loadgen.percentile(hist, 50) == 100
    assert loadgen.percentile(hist, 51) == 200
    assert loadgen.percentile(hist, 90) == 200
    assert loadgen.percentile(hist, 99) == 1000
    assert loadgen.percentile(hist, 99.9) == 5000
    assert loadgen.percentile(hist, 100) == 5000
    assert loadgen.percentile(list(reversed(hist)), 50) == 100  # order does not matter
    assert math.isnan(loadgen.percentile([], 50))
    with pytest.raises(ValueError):
        loadgen.percentile(hist, 0)


def test_merge_histograms() -> None:
    merged = loadgen.merge_histograms([[[1, 2], [3, 1]], [[3, 4], [2, 1]]])
    assert merged == [[1, 2], [2, 1], [3, 5]]


def test_wrk_summary_as_written_by_bench_lua() -> None:
    summary = {
        "requests": 1000,
        "duration_us": 2_000_000,
        "bytes": 1,
        "errors": {"connect": 0, "read": 0, "write": 0, "status": 3, "timeout": 0},
        "histogram": [[900, 500], [1500, 490], [9000, 10]],
    }
    res = loadgen.WrkResult.from_summary(summary)
    assert res.rate == 500
    assert res.latency_ms(50) == 0.9
    assert res.latency_ms(99) == 1.5
    assert res.latency_ms(99.9) == 9.0
    assert res.socket_errors == 0


def test_load_env_and_wrk_command() -> None:
    env = loadgen.Load(mode="rotate", token_file="/t.txt", delay_ms=2.5, stop_after=7).env()
    assert env["BENCH_MODE"] == "rotate" and env["BENCH_TOKEN_FILE"] == "/t.txt"
    assert env["BENCH_DELAY_MS"] == "2.5" and env["BENCH_STOP_AFTER"] == "7"
    assert loadgen.Load().env()["BENCH_NONCE"] != loadgen.Load().env()["BENCH_NONCE"]
    if shutil.which("wrk"):
        cmd = loadgen.wrk_command("http://h/x", connections=1, seconds=3, threads=4)
        assert "-t1" in cmd and "-c1" in cmd and "-d3s" in cmd and str(loadgen.LUA) in cmd
    lua = loadgen.LUA.read_text(encoding="utf-8")
    for name in ("BENCH_MODE", "BENCH_TOKEN_FILE", "BENCH_PATH_FILE", "BENCH_OUT", "function done"):
        assert name in lua


def test_load_of_paths(tmp_path: Path) -> None:
    paths = tmp_path / "paths.txt"
    paths.write_text("/files/a/a\n/files/b\n", encoding="utf-8")
    load = loadgen.Load(mode="paths", path_file=str(paths))
    env = load.env()
    assert env["BENCH_MODE"] == "paths" and env["BENCH_PATH_FILE"] == str(paths)
    assert env["BENCH_TOKEN"] == ""  # no Authorization header
    assert "BENCH_PATH_FILE" not in loadgen.Load().env()


# --- the floors ----------------------------------------------------------------------------------


class _Transport:
    """What the HTTP floor writes and whether it closed, without a socket."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def test_the_http_floor_answers_every_request_200_in_order() -> None:
    """Pipelined, split anywhere, with a body: one 200 per request, each as soon as it is read;
    the connection closes after a request that asks for it, and on what is not HTTP/1.1."""
    conn = floor_server.FloorHttpConnection()
    transport = _Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    one = b"GET /api/items HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\n\r\n"
    posted = b"POST /x HTTP/1.1\r\nHost: a\r\ncontent-length: 3\r\n\r\nabc"
    stream = one + posted + one
    conn.data_received(stream[:10])
    assert transport.written == []
    conn.data_received(stream[10:-5])
    assert transport.written == [floor_server.HTTP_OK] * 2
    conn.data_received(stream[-5:])
    assert transport.written == [floor_server.HTTP_OK] * 3 and not transport.is_closing()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert transport.written[-1] == floor_server.HTTP_OK and transport.is_closing()
    assert floor_server.HTTP_OK == b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"

    bad = floor_server.FloorHttpConnection()
    refused = _Transport()
    bad.connection_made(refused)  # type: ignore[arg-type]
    bad.data_received(b"\x16\x03\x01 not http\r\n\r\n")
    assert refused.closed and refused.written[-1].startswith(b"HTTP/1.1 400 ")


def test_the_floors_run_on_extauthz_s_event_loop() -> None:
    """uvloop, as extauthz's --event-loop auto picks when it is installed (it is in the bench's
    environment: extauthz depends on it), so that extauthz ÷ floor compares no event loops."""
    import uvloop

    from extauthz.cli import loop_factory

    factory = floor_server.event_loop("uvloop")
    assert factory is not None and factory is loop_factory("auto")
    loop = factory()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    assert floor_server.event_loop("asyncio") is None  # asyncio's own, for comparison


# --- /proc ---------------------------------------------------------------------------------------


def test_parse_stat_with_a_command_name_holding_spaces_and_parens() -> None:
    fields = ["S", "41"] + ["0"] * 9 + ["250", "50"] + ["0"] * 8 + ["3000"] + ["0"] * 20
    st = procs.parse_stat("1234 (python (x) y) " + " ".join(fields))
    assert (st.pid, st.ppid, st.utime, st.stime, st.rss_pages) == (1234, 41, 250, 50, 3000)


def test_usage_of_this_process() -> None:
    import os

    u = procs.usage([os.getpid()])
    assert os.getpid() in u.pids and u.rss_kb > 0 and u.cpu_seconds > 0
    assert procs.usage([2**22 + 1]).pids == ()  # a pid that does not exist


# --- ratios, tables, chart -----------------------------------------------------------------------


def _point(
    backend: str, rate: float, server_cpu: float | None, envoy_cpu: float, **kw: Any
) -> dict[str, Any]:
    return {
        "backend": backend,
        "label": report.BACKENDS[backend],
        "connections": kw.pop("connections", 16),
        "rate": rate,
        "p50_ms": 1000 / rate,
        "p99_ms": 3000 / rate,
        "p999_ms": 5000 / rate,
        "server_cpu_us": server_cpu,
        "envoy_cpu_us": envoy_cpu,
        "total_cpu_us": (server_cpu or 0) + envoy_cpu,
        "rss_mb": 60.0 if server_cpu else None,
        "idp_calls": kw.pop("idp_calls", 0),
        "idp_distinct_tokens": kw.pop("idp_distinct", 0),
        "valid": kw.pop("valid", True),
        **kw,
    }


def _results() -> dict[str, Any]:
    s1 = {
        "id": "1",
        "title": "JWT RS256",
        "points": {
            "a": _point("a", 4000, 250, 80),
            "b": _point("b", 3600, 300, 85),
            "c": _point("c", 15000, None, 60),
            "e": _point("e", 12000, 12, 65),
            "d": _point("d", 9000, 30, 62),
        },
    }
    s4 = {
        "id": "4",
        "title": "opaque",
        "points": {
            "a": _point("a", 4000, 250, 80),
            "b": _point("b", 3800, 270, 80),
            "e": _point("e", 12000, 12, 65),
            "d": _point("d", 11000, 40, 66),
        },
    }
    s5 = {
        "id": "5",
        "title": "new opaque",
        "points": {
            "a": _point("a", 4000, 250, 80),
            "b": _point("b", 1000, 900, 90, idp_calls=5000, idp_distinct=5000),
        },
        "extra_points": {"b@½sat": _point("b", 500, 950, 90, valid=False)},
    }
    s7 = {
        "id": "7",
        "title": "10k deployments",
        # the machine drifted 10 % slower since scenario 1: the floor shows it
        "points": {"a": _point("a", 4000, 275, 80), "b": _point("b", 3500, 310, 85)},
    }
    scenarios: list[dict[str, Any]] = [s1, s4, s5, s7]
    for s in scenarios:
        s["ratios"] = report.scenario_ratios(s["points"])
        if "d" in s["points"]:
            s["http_ratios"] = report.http_ratios(s["points"])
        s["wires"] = report.wire_ratios(s["points"])
    return {
        "meta": {
            "date": "2026-01-01T00:00:00+00:00",
            "machine": "2 × test CPU",
            "profile": "smoke",
            "seconds": 1,
            "connections": 16,
            "wrk_threads": 1,
            "workers": 1,
            "elapsed_s": 12.0,
        },
        "scenarios": scenarios,
        "curve": [
            _point(b, r * f, 1, 1, connections=c)
            for b, r in (("a", 4000), ("b", 3600), ("c", 15000))
            for c, f in ((1, 0.3), (16, 1.0))
        ],
        "flood": {
            **_point("b", 300, 3000, 100),
            "idp_distinct_tokens": 50_000,
            "tokens_target": 200_000,
            "rss_mb": 90.0,
            "rss_peak_mb": 95.0,
            "rss_projected_mb": 160.0,
            "rss_projected_peaks_mb": 100.0,
        },
        "workers_scaling": {
            "counts": [1, 2],
            "points": {"1": _point("b", 3000, 300, 90), "2": _point("b", 5000, 310, 90)},
        },
        "notes": ["a note"],
        "profiles": {
            "scenario 1": report.profile_summary(
                "process 1;main (extauthz/cli.py:1);Engine.check (extauthz/engine.py:9);"
                "verify (jwt/api.py:3) 3\n"
                "process 1;Handle._run (asyncio/events.py:80) 7\n"
            )
        },
    }


def _hostile_scenario() -> dict[str, Any]:
    """Scenario 8 as run.hostile_paths builds it: per-path points (a, b), the innocent check
    quiet and under each flood (3 rounds each), and the floods."""
    points: dict[str, Any] = {}
    for hp, cpu in zip(configs.HOSTILE_PATHS, (1_100.0, 1_700.0, 5_300.0), strict=False):
        points[f"a {hp.key}"] = _point("a", 900, 350, 800)
        points[f"b {hp.key}"] = _point("b", 500, cpu, 850, round_server_cpu_us=[cpu, cpu, cpu])
    quiet = [2.0, 2.5, 3.0]
    points["b innocent, quiet"] = _point("b", 350, 360, 300, connections=4, round_p99_ms=quiet)
    points["b innocent, quiet"]["p99_ms"] = 2.5
    for name, p99s, valid in (
        ("hostile flood", [30.0, 33.0, 36.0], True),
        ("innocent flood", [7.0, 8.0, 9.0], False),
    ):
        under = _point("b", 100, None, 0, connections=4, round_p99_ms=p99s, valid=valid)
        under["p99_ms"], under["envoy_cpu_us"], under["total_cpu_us"] = p99s[1], None, None
        points[f"b innocent, {name}"] = under
        points[f"b {name}"] = _point("b", 280, 2_700, 800, connections=8, server_cpu_cores=0.75)
        points[f"b {name}"]["envoy_cpu_cores"] = 0.2
    for p in points.values():
        p.setdefault("delay_ms", 10.0)
    for hp in configs.HOSTILE_PATHS:
        b = points[f"b {hp.key}"]
        b["ratios"] = report.scenario_ratios({"a": points[f"a {hp.key}"], "b": b})
    return {
        "id": "8",
        "title": "hostile paths",
        "points": points,
        "ratios": {},
        "hostile": run.hostile_summary(
            configs.HOSTILE_PATHS, ["hostile flood", "innocent flood"], points
        ),
    }


def test_hostile_summary_and_targets() -> None:
    s8 = _hostile_scenario()
    h = s8["hostile"]
    assert [p["key"] for p in h["paths"]] == [hp.key for hp in configs.HOSTILE_PATHS]
    assert h["paths"][0]["server_cpu_us"] == 1_100.0 and h["paths"][0]["floor_server_cpu_us"] == 350
    assert h["paths"][0]["chars"] == 60_006
    flooded = h["innocent"]["hostile flood"]
    assert flooded["p99_ratio"] == pytest.approx(33.0 / 2.5)
    assert flooded["round_p99_ratios"] == pytest.approx([15.0, 13.2, 12.0])
    assert "p99_ratio" not in h["innocent"]["quiet"]
    assert h["floods"]["hostile flood"]["server_cpu_cores"] == 0.75
    results = _results()
    results["scenarios"].append(s8)
    t = {x["name"]: x for x in run.targets(results)}
    cpu = [x for name, x in t.items() if name.startswith("hostile path CPU per check")]
    assert [x["met"] for x in cpu] == [True, True, False]  # 5,300 µs > 5,000
    assert cpu[0]["measured"] == "1,100.0 µs"
    ratio = next(x for name, x in t.items() if name.startswith("innocent p99 under hostile flood"))
    assert ratio["value"] == pytest.approx(13.2) and ratio["met"] is False
    assert "33.00 ms ÷ 2.50 ms" in ratio["name"]
    reference = next(x for name, x in t.items() if "a flood of innocent checks" in name)
    assert reference["value"] == pytest.approx(3.2) and reference["goal"] == "report"


def test_markdown_of_the_hostile_paths() -> None:
    results = _results()
    results["scenarios"].append(_hostile_scenario())
    results["targets"] = run.targets(results)
    md = report.markdown(results)
    section = md.split("## Hostile paths (scenario 8)")[1]
    long_path = (
        "| 60 KB path: /files + '/a' × 30,000 | 60,006 | 401 token_missing | 1,100 (1,100 / "
    )
    assert long_path in section
    assert "| quiet | 350 | 2.86 | 2.50 (2.00 / 2.50 / 3.00) |" in section
    assert "| under the hostile flood | 100 |" in section
    assert "13.20× (15.00× / 13.20× / 12.00×)" in section
    assert "| under the innocent flood ⚠ |" in section  # an invalid point is flagged
    assert "8 connections: 280/s, 0.75, 0.20" in section
    table = md.split("\n## ")[0]  # the results table, before the sections
    assert "| b long path extauthz | 500 |" in table
    assert "| 0.56× | 3.14× |" in table  # a hostile path's (b) row carries its own ratios
    header_cells = report.TABLE_HEADER.splitlines()[0].count("|")
    for line in table.splitlines():
        if line.startswith("| "):
            assert line.count("|") == header_cells


def test_checks_answered_sums_the_series_with_the_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    body = (
        b"# HELP extauthz_checks_total Checks answered\n"
        b'extauthz_checks_total{deployment="files",decision="deny",reason="token_missing"} 7.0\n'
        b'extauthz_checks_total{deployment="files",decision="deny",reason="token_expired"} 2.0\n'
        b'extauthz_checks_total{deployment="api",decision="allow",reason=""} 40.0\n'
        b'extauthz_checks_created{deployment="api",decision="allow",reason=""} 1.7e9\n'
    )
    monkeypatch.setattr(run, "http_get", lambda *a, **kw: (200, {}, body))
    server = procs.Proc("x", None, Path("/dev/null"))  # type: ignore[arg-type]
    server.admin_url = "http://127.0.0.1:1"
    assert run.checks_answered(server) == 49
    assert run.checks_answered(server, deployment="files", decision="deny") == 9
    assert run.checks_answered(server, deployment="files", reason="token_missing") == 7


def test_ratios() -> None:
    assert report.ratio(3, 2) == 1.5
    assert report.ratio(1, 0) is None and report.ratio(None, 2) is None
    assert report.ratio(float("nan"), 2) is None
    r = _results()["scenarios"][0]["ratios"]
    assert r["rate_vs_a"] == pytest.approx(0.9)
    assert r["cpu_vs_a"] == pytest.approx(1.2)
    assert r["rate_vs_c"] == pytest.approx(0.24)
    assert r["total_cpu_vs_c"] == pytest.approx(385 / 60)
    assert report.scenario_ratios({"a": _point("a", 1, 1, 1)}) == {}


def test_http_ratios_against_the_http_floor_jwt_authn_and_the_grpc_wire() -> None:
    s1 = _results()["scenarios"][0]
    r = s1["http_ratios"]
    assert r["rate_vs_e"] == pytest.approx(9000 / 12000)
    assert r["cpu_vs_e"] == pytest.approx(30 / 12)  # server CPU against the HTTP floor's
    assert r["total_cpu_vs_c"] == pytest.approx((30 + 62) / 60)  # Envoy + extauthz
    assert r["rate_vs_c"] == pytest.approx(9000 / 15000)
    assert r["rate_vs_b"] == pytest.approx(9000 / 3600)
    assert r["total_cpu_vs_b"] == pytest.approx(92 / 385)
    assert "rate_vs_c" not in _results()["scenarios"][1]["http_ratios"]  # no (c) in 4
    assert report.http_ratios({"b": s1["points"]["b"]}) == {}
    assert s1["ratios"]["cpu_vs_a"] == pytest.approx(1.2)  # (b)'s own are unchanged


def test_wire_ratios_keep_each_round() -> None:
    """The medians' ratio, and each round's ratio of its two points (the spread); a ratio
    whose backends the scenario did not measure is left out."""
    d = run.combine_rounds(
        [_point("d", r, cpu, 60) for r, cpu in ((9000, 30), (8000, 33), (10000, 28))]
    )
    b = run.combine_rounds(
        [_point("b", r, cpu, 180) for r, cpu in ((3000, 300), (4000, 310), (3500, 290))]
    )
    e = _point("e", 12000, 12, 65)
    wires = report.wire_ratios({"b": b, "d": d, "e": e})
    assert wires["http_rate_vs_grpc"]["value"] == pytest.approx(9000 / 3500)
    assert wires["http_rate_vs_grpc"]["rounds"] == pytest.approx([3.0, 2.0, 10000 / 3500])
    assert wires["http_total_cpu_vs_grpc"]["rounds"] == pytest.approx(
        [90 / 480, 93 / 490, 88 / 470]
    )
    assert wires["http_cpu_vs_floor"]["rounds"] == pytest.approx([30 / 12])  # one round of (e)
    assert "http_rate_vs_c" not in wires and "grpc_cpu_vs_floor" not in wires
    assert report.rounds_of(d, "rate") == [9000, 8000, 10000]
    assert report.rounds_of(e, "server_cpu_us") == [12]


def test_targets_of_the_http_wire() -> None:
    results = _results()
    for s in results["scenarios"]:  # three rounds for the spread, in scenario 1
        if s["id"] == "1":
            s["wires"]["http_rate_vs_grpc"]["rounds"] = [2.4, 2.5, 2.6]
    t = {x["name"]: x for x in run.targets(results)}
    total = t["HTTP wire, scenario 1 (cached JWT): total CPU (Envoy + extauthz) ÷ jwt_authn's"]
    assert total["value"] == pytest.approx(92 / 60) and total["met"] is False  # 1.53 > 1.5
    assert total["goal"] == "≤ 1.5×"
    floor = t["HTTP wire, scenario 1 (cached JWT): server CPU ÷ the HTTP floor's"]
    assert floor["value"] == pytest.approx(2.5) and floor["met"] is True
    rate = t["HTTP wire, scenario 1 (cached JWT): checks/s ÷ jwt_authn's"]
    assert rate["value"] == pytest.approx(0.6) and rate["met"] is False
    grpc = [x for name, x in t.items() if name.endswith("checks/s ÷ the gRPC wire's")]
    assert [x["name"].split(":")[0] for x in grpc] == [
        "HTTP wire, scenario 1",
        "HTTP wire, scenario 4",
    ]
    assert [x["met"] for x in grpc] == [True, True]  # 2.50× and 2.89×, goal ≥ 2.5×
    assert grpc[0]["measured"] == "2.50× (2.40 / 2.50 / 2.60)"  # each round's too
    assert grpc[1]["measured"] == "2.89×"  # one round: no spread to show
    uv = t["CPU per allowed check, scenario 1 (cached JWT), gRPC ÷ floor, both on uvloop"]
    assert uv["value"] == pytest.approx(1.2) and uv["met"] is True and uv["goal"] == "≤ 1.25×"
    assert "CPU per allowed check, scenario 1, ÷ floor" not in t  # the one against asyncio's


def test_targets_name_every_goal() -> None:
    results = _results()
    t = {x["name"]: x for x in run.targets(results)}
    uv = "CPU per allowed check, scenario 1 (cached JWT), gRPC ÷ floor, both on uvloop"
    assert t[uv]["met"] is True  # 1.20 ≤ 1.25
    assert t["CPU per allowed check, scenario 4, ÷ floor"]["met"] is True  # 1.08
    assert t["CPU per allowed check, scenario 2, ÷ floor"]["met"] is None  # not run
    assert t["checks/s, scenario 1, ÷ floor"]["met"] is True
    assert t["checks/s, scenario 1, ÷ Envoy jwt_authn"]["met"] is False
    assert t["scenario 5: IdP calls per distinct token"]["met"] is True
    normalized = t["CPU per check ÷ floor, scenario 7 ÷ scenario 1 (one deployment)"]
    assert normalized["value"] == pytest.approx((310 / 275) / (300 / 250))
    assert normalized["met"] is True
    raw = t["CPU per check, scenario 7 ÷ scenario 1, raw (minutes apart)"]
    assert raw["value"] == pytest.approx(310 / 300)
    assert t["checks/s, scenario 1, 2 workers ÷ 1 worker"]["value"] == pytest.approx(5000 / 3000)
    peak = t["peak RSS during a flood of 50,000 distinct opaque tokens"]
    assert peak["value"] == 95.0 and peak["met"] is True
    projected = next(x for x in t.values() if x["name"].startswith("peak RSS projected to 200,000"))
    assert projected["value"] == 100.0 and projected["met"] is True
    half = next(x for x in t.values() if x["name"].startswith("scenario 5: p99"))
    assert half["measured"] == "6.0 ms" and half["met"] is True


def test_project_rss_from_the_peaks_of_the_flood_second_half() -> None:
    # A sawtooth (a bounded cache cleared when full) whose peaks are flat: the last sample, low
    # after a clear, or a line through the second half's samples would mislead; the peaks do not.
    saw = [(n, 100.0 + (n % 8_000) / 8_000 * 20) for n in range(0, 100_001, 500)]
    assert run.project_rss_peaks(saw, 200_000) == pytest.approx(max(mb for _, mb in saw))
    # Peaks that keep growing, 1 MB per 10,000 tokens: that growth goes on to the target.
    growing = [(n, 100.0 + n / 10_000 + (n % 8_000) / 8_000 * 20) for n in range(0, 100_001, 500)]
    projected = run.project_rss_peaks(growing, 200_000)
    assert projected == pytest.approx(max(mb for _, mb in growing) + 10.0, abs=1.0)
    reached = [*saw[:-1], (200_000, 110.0)]  # the flood reached the target: its peak, measured
    assert run.project_rss_peaks(reached, 200_000) == max(mb for _, mb in reached)
    assert run.project_rss_peaks([(10, 60.0)], 200_000) is None
    assert run.project_rss_peaks([], 200_000) is None


def test_flood_time_takes_what_is_left_of_the_budget() -> None:
    full = run.PROFILES["full"]
    assert run.flood_seconds(full, 400.0) == min(full.flood_seconds, full.budget_seconds - 420)
    assert run.flood_seconds(full, 10_000.0) == 30
    assert run.flood_seconds(run.PROFILES["quick"], 400.0) == run.PROFILES["quick"].flood_seconds


def test_project_rss() -> None:
    assert run.project_rss(60, 80, 50_000, 200_000) == 140
    assert run.project_rss(60, 80, 200_000, 200_000) == 80
    assert run.project_rss(60, 80, 0, 200_000) is None


def test_markdown_table() -> None:
    results = _results()
    results["targets"] = run.targets(results)
    md = report.markdown(results)
    assert md.startswith("# extauthz bench")
    assert "| 1. JWT RS256 | a floor | 4,000 |" in md
    assert "| 0.90× | 1.20× | 0.24× |" in md  # the (b) row carries the ratios
    # the (d) row: against the HTTP floor (e), jwt_authn (c) and the gRPC wire (b)
    assert "| d extauthz HTTP | 9,000 |" in md
    assert "| 0.75× | 2.50× | 0.60× | 1.53× | 2.50× |" in md
    assert "| e floor HTTP | 12,000 |" in md
    wires = md.split("## The two wires")[1].split("## Targets")[0]
    assert "| 1. JWT RS256 | 2.50× | 2.50× | 1.20× | 1.53× | 0.60× | 0.24× |" in wires
    assert "| 4. opaque | 2.89× | 3.33× | 1.08× | – | – | 0.30× |" in wires
    assert "new opaque" not in wires  # no HTTP wire in that scenario
    assert "b@½sat extauthz ⚠" in md  # an invalid point is flagged
    assert "## Targets" in md and "| **no** |" in md
    assert "latency_vs_load.png" in md and "- a note" in md
    assert "`Engine.check (extauthz/engine.py)` | 30.0" in md
    header_cells = report.TABLE_HEADER.splitlines()[0].count("|")
    for line in md.split("\n## ")[0].splitlines():  # the results table, before the sections
        if line.startswith("| "):
            assert line.count("|") == header_cells


def test_markdown_of_the_flood_alone() -> None:
    results = _results()
    samples = [(n, 60.0 + n / 1_000) for n in range(0, 50_001, 1_000)]
    results["flood"] = {
        **results["flood"],
        "rss_samples": samples,
        "rss_peak_mb": 110.0,
        "seconds": 100.0,
        "rate": 500.0,
    }
    for key in ("scenarios", "curve"):
        results[key] = []
    for key in ("profiles", "workers_scaling"):
        del results[key]
    results["targets"] = run.targets(results)
    md = report.markdown(results)
    assert "| scenario | backend |" not in md and "scenario 1" not in md  # nothing unmeasured
    assert "peak RSS during a flood of 50,000 distinct opaque tokens" in md
    table = md.split("## RSS during the token flood")[1]
    assert "| 0 | 60.0 |" in table and "| 50,000 | 110.0 |" in table
    assert table.count("| 50,000 |") == 1 and "peak RSS 110.0 MB" in table


def test_profile_summary() -> None:
    prof = report.profile_summary(
        "process 9;main (extauthz/cli.py:1);Engine.check (extauthz/engine.py:10);"
        "decode (jwt/api.py:3) 6\n"
        "process 9;main (extauthz/cli.py:1);Engine.check (extauthz/engine.py:12) 2\n"
        "process 9;Handle._run (asyncio/events.py:80) 12\n"
        "process 9;EpollSelector.select (selectors.py:468) 30\n"
        "garbage line\n"
    )
    assert prof["samples"] == 20 and prof["idle_samples"] == 30
    assert prof["extauthz_code_pct"] == 40.0
    assert prof["extauthz_inclusive"] == [("Engine.check (extauthz/engine.py)", 40.0)]
    assert prof["self"][0] == ("Handle._run (asyncio/events.py)", 60.0)


def test_chart_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "chart.png"
    report.chart(_results()["curve"], out, "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profiles_and_arguments() -> None:
    assert set(run.PROFILES) == {"full", "quick", "smoke"}
    for prof in run.PROFILES.values():
        assert prof.seconds >= 1 and 1 in prof.curve and prof.connections in prof.curve
    ids = [s.id for s in run.scenarios(run.PROFILES["full"])]
    assert ids == ["1", "2", "3", "4", "5", "6", "7", "8", "9"]
    assert run.parse_args([]).scenarios.split(",") == ids[:-1]  # 9 (DPoP) on demand
    (hostile,) = [s for s in run.scenarios(run.PROFILES["smoke"]) if s.hostile_paths]
    assert hostile.id == "8" and hostile.hostile_paths == configs.HOSTILE_PATHS
    with_c = {s.id for s in run.scenarios(run.PROFILES["full"]) if s.with_c}
    assert with_c == {"1", "2", "3", "6"}
    args = run.parse_args(["--quick", "--workers", "2", "--scenarios", "1,4"])
    assert (args.profile_name, args.workers, args.scenarios) == ("quick", 2, "1,4")
    assert run.parse_args([]).profile_name == "full"


def test_both_wires_in_every_scenario_but_the_hostile_paths() -> None:
    """Scenarios 1-7 measure the HTTP wire (d) beside its floor (e), measured just before it,
    after the gRPC backends; 8 stays on gRPC. Each has its floor with it. (9, DPoP, compares
    each wire's DPoP check with the bearer check on one server: bench/tests/test_dpop.py.)"""
    catalogue = [s for s in run.scenarios(run.PROFILES["full"]) if not s.dpop]
    assert {s.id for s in catalogue if s.with_http} == set(run.HTTP_SCENARIOS)
    assert run.HTTP_SCENARIOS == ("1", "2", "3", "4", "5", "6", "7")
    for sc in catalogue:
        assert sc.backends[:2] == ("a", "b"), sc.id
        if sc.with_http:
            assert sc.backends[-2:] == ("e", "d"), sc.id
        assert len(set(sc.backends)) == len(sc.backends)
        assert set(sc.backends) <= set(report.BACKENDS)
    assert set(run.FLOORS) == {"a", "e"}
    assert {s.id for s in catalogue if s.with_c} == {"1", "2", "3", "6"}


def test_backends_of_a_stack_without_the_http_wire() -> None:
    """With --workers N extauthz serves no HTTP wire: the stack has no (d) and (e) listeners,
    and the scenarios run without them."""
    (first, *_) = run.scenarios(run.PROFILES["smoke"])
    both = run.Stack(
        None,  # type: ignore[arg-type]
        Path("/tmp"),
        None,  # type: ignore[arg-type]
        "http://idp",
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        1,
        {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5},
        9000,
        1,
        "shared",
        False,
    )
    assert run.backends_of(both, first) == ("a", "b", "c", "e", "d")
    grpc_only = replace(both, listen={"a": 1, "b": 2, "c": 3}, b_workers=2)
    assert run.backends_of(grpc_only, first) == ("a", "b", "c")
    assert not grpc_only.http and not both.http  # no HTTP floor process in this fake stack


def test_combine_rounds_takes_medians_and_sums_counts() -> None:
    rounds = [
        _point("b", 1000, 300, 80, requests=5000, seconds=5.0),
        _point("b", 1200, 260, 90, requests=6000, seconds=5.0, valid=False),
        _point("b", 1100, 280, 70, requests=5500, seconds=5.0),
    ]
    p = run.combine_rounds(rounds)
    assert p["rate"] == 1100 and p["server_cpu_us"] == 280 and p["envoy_cpu_us"] == 80
    assert p["requests"] == 16500 and p["seconds"] == 15.0
    assert p["valid"] is False
    assert p["round_rates"] == [1000, 1200, 1100]
    assert p["round_server_cpu_us"] == [300, 260, 280]
    assert p["round_total_cpu_us"] == [380, 350, 350]  # the spread of every CPU ratio
    assert run.combine_rounds(rounds[:1]) == rounds[0]


def test_pacing_delay() -> None:
    # 16 connections at 160/s: one request per 100 ms each; 10 ms of it is the request itself
    assert run.pacing_delay(16, 160, 10.0) == pytest.approx(90.0)
    assert run.pacing_delay(16, 100_000, 10.0) == 0.0
    assert run.pacing_delay(16, 0, 10.0) == 0.0
    assert run.pacing_delay(16, 160, float("nan")) == 0.0


def test_count_listening_sockets_in_proc_net_tcp() -> None:
    table = (
        "  sl  local_address                         remote_address                        st\n"
        "   0: 0000000000000000FFFF00000100007F:B26E 00000000000000000000000000000000:0000 0A\n"
        "   1: 0000000000000000FFFF00000100007F:B26E 00000000000000000000000000000000:0000 0A\n"
        "   2: 0000000000000000FFFF00000100007F:B26E 0000000000000000FFFF00000100007F:9C40 01\n"
        "   3: 0100007F:026E 00000000:0000 0A\n"
    )
    assert procs.count_listening(table, 0xB26E) == 2  # two workers; the connection is not counted
    assert procs.count_listening(table, 0x026E) == 1
    assert procs.count_listening("header only\n", 0xB26E) == 0


def test_stalled_waits_for_progress_then_a_quiet_second(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    counts = iter([10, 10, 15, 20, 20, 20])
    done = run.stalled(lambda: next(counts), since=10)
    assert done() is False  # nothing answered yet
    clock[0] = 5.0
    assert done() is False  # still nothing: waiting is not stalling
    assert done() is False  # 15: moving
    clock[0] = 5.5
    assert done() is False  # 20: moving
    clock[0] = 6.0
    assert done() is False  # quiet for 0.5 s
    clock[0] = 6.6
    assert done() is True
