"""The bench's DPoP scenario (9), its pure parts: the policy, the proofs the harness makes (which
extauthz's own engine must allow once each, as the bench sends them), the proof counts against
the jti memory's bound, the wrk script's mode, and the report's table and target. No process is
started and no load is sent; nothing here measures a timing.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
import pytest

from bench import configs, loadgen, report, run
from bench.keys import BenchKeys, claims
from bench.signing import ProofKey
from extauthz.config import parse_config
from extauthz.decision import Reason
from extauthz.dpop import MAX_REMEMBERED_JTIS
from tests.check_requests import check_input
from tests.fake_idp import ORIGIN, FakeIdp

HOST = "api.bench.example"  # the Host bench.lua sends


@pytest.fixture(scope="module")
def keys() -> BenchKeys:
    return BenchKeys.generate()


@pytest.fixture(scope="module")
def proof_key() -> ProofKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ProofKey(ec.generate_private_key(ec.SECP256R1()))


def test_the_dpop_policy_adds_a_dpop_deployment_beside_scenario_1s() -> None:
    policy = configs.extauthz_config("jwt", "http://127.0.0.1:1", dpop=True)
    parse_config(policy)  # extauthz's own parser accepts it
    api, dpop = policy["deployments"]
    assert (
        api["name"] == configs.TARGET_DEPLOYMENT and "senderConstraint" not in api["authentication"]
    )
    assert dpop["name"] == configs.DPOP_DEPLOYMENT and dpop["pathPrefix"] == configs.DPOP_PREFIX
    assert dpop["authentication"]["senderConstraint"] == "DPOP"
    assert dpop["authentication"]["validationPolicy"] == api["authentication"]["validationPolicy"]
    # Each block of the scenario restarts its server: no drain on SIGTERM.
    assert policy["server"]["drainSeconds"] == 0
    assert f"http://{HOST}{configs.DPOP_PATH}" == run.DPOP_HTU
    # The other scenarios' policies are as they were.
    plain = configs.extauthz_config("jwt", "http://127.0.0.1:1")
    assert [d["name"] for d in plain["deployments"]] == [configs.TARGET_DEPLOYMENT]
    assert "drainSeconds" not in plain["server"]


def test_each_proof_the_harness_makes_is_allowed_once_by_extauthz(
    keys: BenchKeys, proof_key: ProofKey
) -> None:
    """The bound token and the proofs as bench.lua sends them (Host, DPoP scheme, GET on
    DPOP_PATH; Envoy's scheme http) through extauthz's engine with the scenario's policy: each
    proof allowed, each jti new, the same proof again a replay."""
    token = keys.rsa.sign({**claims("user-dpop"), "cnf": {"jkt": proof_key.jkt}})
    proofs = proof_key.proofs(token, "GET", run.DPOP_HTU, 5, iat=int(time.time()))
    assert len({jwt.decode(p, options={"verify_signature": False})["jti"] for p in proofs}) == 5
    header = jwt.get_unverified_header(proofs[0])
    assert header["typ"] == "dpop+jwt" and header["alg"] == "ES256"
    assert set(header["jwk"]) == {"kty", "crv", "x", "y"}  # the public key only
    engine = FakeIdp([keys.rsa.public_jwk]).engine(
        parse_config(configs.extauthz_config("jwt", ORIGIN, dpop=True))
    )

    def check(proof: str) -> Any:
        headers = {"authorization": f"DPoP {token}", "dpop": proof}
        req = check_input(configs.DPOP_PATH, host=HOST, headers=headers)._replace(scheme="http")
        return asyncio.run(engine.check(req))

    for proof in proofs:
        decision = check(proof)
        assert decision.allowed, decision.message
    replayed = check(proofs[0])
    assert replayed.reason is Reason.DPOP_PROOF_INVALID and "seen before" in replayed.message


def test_proof_counts_stay_below_what_one_server_may_remember() -> None:
    """The measured run's proofs first, the warm-up's from what is left; never more than the
    budget, itself below extauthz's bound (the preflight's proof included)."""
    assert run.DPOP_JTI_BUDGET < MAX_REMEMBERED_JTIS
    assert run.DPOP_JTI_LIFETIME_S == 120
    warm, measured = run.dpop_proof_counts(2_000, 1, 5)
    assert measured == run.dpop_proofs_needed(2_000, 5) > 2_000 * 5
    assert warm == run.dpop_proofs_needed(2_000, 1) > 2_000
    warm, measured = run.dpop_proof_counts(20_000, 1, 5)
    assert measured == run.DPOP_JTI_BUDGET - 1 and warm == 0
    warm, measured = run.dpop_proof_counts(9_000, 1, 5)
    assert warm + measured + 1 <= run.DPOP_JTI_BUDGET and warm < run.dpop_proofs_needed(9_000, 1)
    assert run.dpop_proof_counts(2_000, 0, 5)[0] == 0


def test_wrk_sends_each_proof_once_with_the_dpop_scheme(tmp_path: Any) -> None:
    load = run.Tokens("r", "e", "x", "f", dpop="bound").load("dpop")
    assert (load.mode, load.token) == ("dpop", "bound")
    env = loadgen.Load(mode="dpop", token="bound", proof_file="/p.txt").env()
    assert env["BENCH_MODE"] == "dpop" and env["BENCH_PROOF_FILE"] == "/p.txt"
    assert "BENCH_PROOF_FILE" not in loadgen.Load().env()
    lua = loadgen.LUA.read_text(encoding="utf-8")
    for text in ('mode == "dpop"', "BENCH_PROOF_FILE", "BENCH_THREADS", '"DPoP " .. token'):
        assert text in lua
    assert "wrk.thread:stop()" in lua.split('mode == "dpop" then\n  function request()')[1]


def _point(rate: float, server: float, envoy: float, **kw: Any) -> dict[str, Any]:
    return {
        "rate": rate,
        "p50_ms": 2.0,
        "p99_ms": 5.0,
        "p999_ms": 9.0,
        "server_cpu_us": server,
        "envoy_cpu_us": envoy,
        "total_cpu_us": server + envoy,
        "valid": True,
        **kw,
    }


def _scenario() -> dict[str, Any]:
    points = {
        "b bearer": _point(3000, 300, 180, round_server_cpu_us=[300, 290, 310]),
        "b": _point(1700, 600, 230, round_server_cpu_us=[600, 640, 590], jtis_remembered=9000),
        "d bearer": _point(9000, 36, 70, round_server_cpu_us=[36, 35, 37]),
        "d": _point(2400, 320, 190, round_server_cpu_us=[320, 330, 300], jtis_remembered=15000),
    }
    for backend in ("b", "d"):
        points[backend]["ratios"] = report.dpop_ratios(points[backend], points[f"{backend} bearer"])
    summary = report.dpop_summary(points, ("b", "d"), MAX_REMEMBERED_JTIS, 120.0)
    return {"id": "9", "title": "DPoP", "points": points, "ratios": {}, "dpop": summary}


def test_the_report_compares_each_wires_dpop_check_with_its_bearer_check() -> None:
    s9 = _scenario()
    summary = s9["dpop"]
    assert summary["sustained_rate_bound"] == pytest.approx(MAX_REMEMBERED_JTIS / 120)
    grpc, http = summary["wires"]
    assert (grpc["wire"], http["wire"]) == ("gRPC", "HTTP")
    assert http["cpu_ratio"]["value"] == pytest.approx(320 / 36)
    assert http["cpu_ratio"]["rounds"] == pytest.approx([320 / 36, 330 / 35, 300 / 37])
    assert s9["points"]["d"]["ratios"]["cpu_vs_bearer"] == pytest.approx(320 / 36)
    table = report.dpop_table(summary)
    assert "| HTTP | 9,000 | 2,400 | 36 (36 / 35 / 37) | 320 (320 / 330 / 300) | 8.89×" in table
    assert "546 DPoP checks/s" in table and "15,000" in table
    results = {
        "meta": {
            "date": "2026-12-05T23:00:00+00:00",
            "machine": "test",
            "profile": "quick",
            "seconds": 3,
            "connections": 16,
            "wrk_threads": 1,
            "workers": 1,
        },
        "scenarios": [s9],
    }
    targets = {t["name"]: t for t in run.targets(results)}
    (http_target,) = [t for name, t in targets.items() if name.startswith("DPoP, HTTP wire")]
    assert http_target["goal"] == "≤ 2×" and http_target["met"] is False
    assert http_target["measured"].startswith("8.89× (8.89 / 9.43 / 8.11)")
    (grpc_target,) = [t for name, t in targets.items() if name.startswith("DPoP, gRPC wire")]
    assert grpc_target["goal"] == "report" and grpc_target["value"] == pytest.approx(2.0)
    text = report.markdown(results)
    assert "## DPoP (scenario 9)" in text and table in text
    assert "| 9. DPoP | b bearer" in report.results_table([s9])


def test_a_run_out_or_denied_point_is_flagged() -> None:
    s9 = _scenario()
    s9["points"]["d"].update(valid=False, proofs_ran_out=True, dpop_denied=3)
    summary = report.dpop_summary(s9["points"], ("b", "d"), MAX_REMEMBERED_JTIS, 120.0)
    assert "| HTTP ⚠ (proofs ran out) (3 DPoP denials) |" in report.dpop_table(summary)


def test_a_dpop_point_is_judged_by_what_its_server_counted() -> None:
    def judged(requests: int, denied: int = 0, why: str | None = None) -> dict[str, Any]:
        p: dict[str, Any] = {"requests": requests, "valid": True}
        run.judge_dpop_point(
            p,
            proofs=10_000,
            connections=16,
            allowed=(1, 1 + requests),
            denied=denied,
            preflight_problem=why,
        )
        return p

    ok = judged(7_000)
    assert ok["valid"] and ok["jtis_remembered"] == 7_001 and ok["dpop_allowed"] == 7_000
    assert not ok.get("proofs_ran_out")
    # A thread out of proofs stops with up to a connection's worth unanswered.
    ran_out = judged(10_000 - 16)
    assert not ran_out["valid"] and ran_out["proofs_ran_out"]
    assert not judged(7_000, denied=1)["valid"]
    refused = judged(7_000, why="expected HTTP 200, got 401 dpop_proof_invalid")
    assert not refused["valid"] and refused["preflight"].endswith("dpop_proof_invalid")
