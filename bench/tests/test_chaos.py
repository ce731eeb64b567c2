"""The chaos scenarios' pure parts (bench/chaos*.py): how each answer is judged (false
allow, false denial, other mismatch), the summary tables, the policy-in-force windows of the reload
scenario, the ConfigMap layout, the chaos IdP's token and JWKS logic, and /proc parsing. No process
is started, no load is sent and no timing is asserted (``make chaos`` runs the scenarios)."""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest

from bench import chaos, chaos_idp
from bench import chaos_report as rep
from bench.chaos_client import Record, read_response, request_bytes
from bench.chaos_proc import parse_proc_net_tcp
from bench.keys import BenchKeys
from extauthz.config import ConfigError, parse_config


def rec(kind: str, status: int, reason: str = "", error: str = "", t: float = 0.0) -> Record:
    return Record("s", kind, t, t + 0.001, status, reason, f"rid-{kind}-{status}", error)


# --- judging one answer ---------------------------------------------------------------------------


def test_outcome_reduces_a_response() -> None:
    assert rep.outcome(200, "") == rep.ALLOW
    assert rep.outcome(401, "token_expired") == "token_expired"
    assert rep.outcome(500, "idp_call_failed") == "idp_call_failed"
    # no x-extauthz-reason: Envoy answered itself (status_on_error)
    assert rep.outcome(503, "") == rep.ENVOY_ERROR == "envoy_503"
    assert rep.outcome(0, "", "timeout") == "error:timeout"
    assert rep.outcome(200, "", "reset") == "error:reset"


@pytest.mark.parametrize(
    ("got", "expect", "verdict"),
    [
        (rep.ALLOW, rep.allow(), "ok"),
        ("key_not_found", rep.deny("key_not_found"), "ok"),
        # a bad token let through
        (rep.ALLOW, rep.deny("key_not_found"), "false_allow"),
        (rep.ALLOW, rep.deny("token_inactive", "idp_call_failed"), "false_allow"),
        # a good token refused, whatever the way
        ("key_not_found", rep.allow(), "false_deny"),
        (rep.ENVOY_ERROR, rep.allow(), "false_deny"),
        ("error:timeout", rep.allow(), "false_deny"),
        # denied as it must be, for another reason
        ("idp_call_failed", rep.deny("key_not_found"), "unexpected"),
        (rep.ENVOY_ERROR, rep.deny("token_expired"), "unexpected"),
        # transitions: either is right
        (rep.ALLOW, rep.either(rep.ALLOW, "idp_call_failed"), "ok"),
        ("idp_call_failed", rep.either(rep.ALLOW, "idp_call_failed"), "ok"),
        # a denial was acceptable there, just not this one
        ("token_inactive", rep.either(rep.ALLOW, "idp_call_failed"), "unexpected"),
        (rep.ENVOY_ERROR, rep.either(rep.ALLOW, "idp_call_failed"), "unexpected"),
        (rep.ENVOY_ERROR, rep.either(rep.ALLOW, rep.ENVOY_ERROR), "ok"),
    ],
)
def test_classify(got: str, expect: rep.Expect, verdict: str) -> None:
    assert rep.classify(got, expect) == verdict


def test_deny_needs_reasons_and_never_allow() -> None:
    with pytest.raises(ValueError):
        rep.deny()
    with pytest.raises(ValueError):
        rep.deny(rep.ALLOW, "key_not_found")


def test_tally_counts_per_kind_and_keeps_examples() -> None:
    records = [
        rec("valid", 200),
        rec("valid", 200),
        rec("valid", 401, "key_not_found", t=1.5),  # false denial
        rec("forged", 401, "key_not_found"),
        rec("forged", 200, t=2.0),  # false allow
        rec("forged", 500, "idp_call_failed"),  # unexpected reason
        rec("valid", 503),  # Envoy's status_on_error: a false denial
    ]

    def expect(r: Record) -> rep.Expect:
        return rep.allow() if r.kind == "valid" else rep.deny("key_not_found")

    rows = rep.tally(records, expect, t0=1.0)
    assert [r.kind for r in rows] == ["valid", "forged"]
    valid, forged = rows
    assert (valid.sent, valid.allowed, valid.false_denials, valid.false_allows) == (4, 2, 2, 0)
    assert dict(valid.denied) == {"key_not_found": 1, "envoy_503": 1}
    assert (forged.sent, forged.allowed, forged.false_allows, forged.unexpected) == (3, 1, 1, 1)
    assert forged.false_denials == 0
    assert valid.examples[0].startswith("t+0.500s rid-valid-401 (0.001 s): got key_not_found")
    assert "expected allow" in valid.examples[0]
    assert len(forged.examples) == 2
    t = rep.total(rows)
    assert (t.sent, t.allowed, t.false_allows, t.false_denials, t.unexpected) == (7, 3, 1, 2, 1)


def test_wrk_row_counts_every_2xx_of_a_flood_as_a_false_allow() -> None:
    clean = rep.wrk_row("flood", 1000, 1000, 0, expect_allow=False)
    assert (clean.allowed, clean.false_allows, dict(clean.denied)) == (
        0,
        0,
        {"non-2xx (wrk)": 1000},
    )
    leak = rep.wrk_row("flood", 1000, 997, 1, expect_allow=False)
    assert (leak.allowed, leak.false_allows) == (2, 2)
    assert leak.denied["error:socket (wrk)"] == 1
    good = rep.wrk_row("valid flood", 100, 3, 0, expect_allow=True)
    assert (good.false_denials, good.false_allows) == (3, 0)


# --- figures and tables ---------------------------------------------------------------------------


def test_percentile_nearest_rank() -> None:
    assert rep.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert rep.percentile([3.0, 1.0, 2.0, 4.0], 100) == 4.0
    assert rep.percentile([5.0], 99) == 5.0
    assert math.isnan(rep.percentile([], 50))
    assert rep.latency_summary([]) == "n=0"
    assert rep.latency_summary([0.001, 0.002, 0.250]) == "n=3, p50 2.0 ms, p99 250 ms, max 250 ms"


def result(**kw: object) -> rep.ScenarioResult:
    res = rep.ScenarioResult("9", "a scenario")
    res.rows = [rep.Row("valid", sent=10, allowed=10)]
    res.figures = [rep.check("bounded", "3", True, "≤ 5"), rep.info("peak RSS", "70 MB")]
    for k, v in kw.items():
        setattr(res, k, v)
    return res


def test_a_scenario_passes_only_without_false_answers_failed_checks_or_errors() -> None:
    assert result().passed
    assert not result(rows=[rep.Row("forged", sent=5, false_allows=1)]).passed
    assert not result(rows=[rep.Row("valid", sent=5, false_denials=1)]).passed
    assert not result(rows=[rep.Row("forged", sent=5, unexpected=1)]).passed
    assert not result(rows=[]).passed  # nothing sent proves nothing
    assert not result(figures=[rep.check("bounded", "9", False, "≤ 5")]).passed
    assert not result(error="RuntimeError: preflight").passed


def test_traffic_table_has_a_row_per_kind_and_the_total() -> None:
    rows = [
        rep.Row("valid", sent=1200, allowed=1200),
        rep.Row("forged | kid", sent=30, denied=Counter({"key_not_found": 30})),
    ]
    table = rep.traffic_table(rows).splitlines()
    assert table[0].startswith("| token kind | sent | allowed | denied, by reason |")
    assert "false denials | false allows |" in table[0]
    assert table[2] == "| valid | 1,200 | 1,200 | – | 0 | 0 | 0 |"
    assert table[3] == "| forged \\| kid | 30 | 0 | key_not_found 30 | 0 | 0 | 0 |"
    assert table[4] == "| **all** | 1,230 | 1,200 | key_not_found 30 | 0 | 0 | 0 |"


def test_denied_reasons_are_listed_most_frequent_first() -> None:
    row = rep.Row("x", sent=6, denied=Counter({"a": 1, "b": 5}))
    assert "| b 5, a 1 |" in rep.traffic_table([row])


def test_figures_table_marks_checks() -> None:
    table = rep.figures_table(
        [
            rep.check("fetches", "7", True, "≤ 9"),
            rep.check("p99", "2 s", False, "≤ 1.5 s"),
            rep.info("peak RSS", "70 MB"),
        ]
    )
    lines = table.splitlines()
    assert lines[2] == "| fetches | 7 | ≤ 9 | ✔ |"
    assert lines[3] == "| p99 | 2 s | ≤ 1.5 s | ✘ |"
    assert lines[4] == "| peak RSS | 70 MB |  |  |"


def test_scenario_markdown_and_json() -> None:
    res = result(timeline=[(0.0, "load starts"), (3.04, "IdP killed")], notes=["a note"])
    res.rows[0].examples.append("t+1.000s rid: got key_not_found, expected allow")
    md = rep.scenario_markdown(res)
    assert md.startswith("### 9. a scenario — PASS")
    assert "Timeline: t+0.0s load starts → t+3.0s IdP killed." in md
    assert "- t+1.000s rid: got key_not_found" in md
    assert "- a note" in md
    failed = rep.scenario_markdown(result(error="RuntimeError: boom"))
    assert "— FAIL" in failed and "**Did not complete:** RuntimeError: boom" in failed
    data = json.loads(json.dumps(res.as_dict()))
    assert data["passed"] is True
    assert data["total"]["sent"] == 10
    assert data["figures"][0] == {"name": "bounded", "value": "3", "bound": "≤ 5", "ok": True}
    whole = rep.markdown([res, result(error="x")], {"profile": "quick", "elapsed_s": 80})
    assert "**1 of 2 scenarios passed.**" in whole


# --- the reload scenario's windows, and the ConfigMap layout -------------------------------------


def test_policies_in_force() -> None:
    in_force = [(-math.inf, "v1"), (10.0, "v2"), (20.0, "v3")]
    assert chaos.policies_in_force(in_force, 1.0, 2.0) == {"v1"}
    assert chaos.policies_in_force(in_force, 9.0, 10.5) == {"v1", "v2"}  # spans the reload
    assert chaos.policies_in_force(in_force, 10.0, 11.0) == {"v2"}
    assert chaos.policies_in_force(in_force, 9.0, 21.0) == {"v1", "v2", "v3"}
    assert chaos.policies_in_force(in_force, 25.0, 26.0) == {"v3"}


def test_configmap_dir_swaps_the_data_symlink(tmp_path: Path) -> None:
    cm = chaos.ConfigMapDir(tmp_path / "cm")
    cm.publish("a: 1\n")
    assert os.readlink(cm.root / "..data") == "..v1"
    assert os.readlink(cm.path) == "..data/config.yaml"
    assert cm.path.read_text() == "a: 1\n"
    cm.publish("a: 2\n")
    assert os.readlink(cm.root / "..data") == "..v2"
    assert cm.path.read_text() == "a: 2\n"
    assert not (cm.root / "..v1").exists()  # the kubelet removes the old version
    assert not (cm.root / "..data_tmp").exists()


def test_chaos_configs_are_valid_and_the_invalid_variant_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BENCH_IDP_CLIENT_SECRET", "s")
    raw = chaos.chaos_config(
        "http://127.0.0.1:1", opaque=True, timeout=1, cool_down=2, jwks_cache_hours=0.002
    )
    config = parse_config(raw)
    assert [d.name for d in config.deployments] == ["api", "opaque"]
    assert raw["server"]["circuitBreaker"] == {"failureThreshold": 5, "coolDownSeconds": 2}
    assert raw["deployments"][1]["pathPrefix"] == "/op"
    assert all(
        d["authentication"]["validationPolicy"]["timeoutSeconds"] == 1 for d in raw["deployments"]
    )
    scoped = chaos.chaos_config("http://127.0.0.1:1", scope="items.write")
    assert chaos.scope_of(scoped) == "items.write"
    parse_config(scoped)
    with pytest.raises(ConfigError) as err:
        parse_config(chaos.invalid_variant(scoped))
    assert "allowedScopes" in str(err.value.errors)
    assert chaos.scope_of(scoped) == "items.write"  # the original is untouched


# --- the chaos IdP and the client's wire format ---------------------------------------------------


def test_opaque_tokens_only_the_secret_can_mint() -> None:
    secret = b"0123abcd"
    token = chaos_idp.opaque_token(secret)
    assert chaos_idp.is_issued(secret, token)
    assert not chaos_idp.is_issued(b"another", token)
    assert not chaos_idp.is_issued(secret, chaos_idp.forged_opaque_token())
    assert not chaos_idp.is_issued(secret, "op-abc-1-2")  # wrk's unique tokens
    assert not chaos_idp.is_issued(secret, "")


def test_chaos_idp_rotates_keys_and_introspects() -> None:
    keys = BenchKeys.generate()
    secret = b"s3"
    idp = chaos_idp.ChaosIdp({"keys": [keys.rsa.public_jwk]}, secret, jwks_max_age=30)

    async def go() -> None:
        status, body, extra = await idp.route("GET", "/jwks", {}, b"")
        assert status == 200 and "max-age=30" in extra
        assert [k["kid"] for k in json.loads(body)["keys"]] == ["bench-rs"]
        new = json.dumps({"keys": [keys.ec.public_jwk]}).encode()
        assert (await idp.route("POST", "/_chaos/jwks", {}, new))[0] == 200
        _, body, _ = await idp.route("GET", "/jwks", {}, b"")
        assert [k["kid"] for k in json.loads(body)["keys"]] == ["bench-es"]
        auth = {"authorization": "Basic eDp5"}
        good = f"token={chaos_idp.opaque_token(secret)}".encode()
        _, body, _ = await idp.route("POST", "/introspect", auth, good)
        assert json.loads(body)["active"] is True
        bad = f"token={chaos_idp.forged_opaque_token()}".encode()
        _, body, _ = await idp.route("POST", "/introspect", auth, bad)
        assert json.loads(body) == {"active": False}
        assert (await idp.route("POST", "/introspect", {}, good))[0] == 401

    asyncio.run(go())
    stats = idp.chaos_stats()
    assert stats["jwks"] == 2 and stats["introspect"] == 3 and stats["active"] == 1
    assert [kids for _, kids in stats["jwks_fetches"]] == [["bench-rs"], ["bench-es"]]


def test_request_bytes_and_read_response() -> None:
    raw = request_bytes("/api/items", "tok", "rid-1").decode()
    assert raw.startswith("GET /api/items HTTP/1.1\r\nHost: api.bench.example\r\n")
    assert "Authorization: Bearer tok\r\n" in raw and raw.endswith("x-request-id: rid-1\r\n\r\n")
    assert "Authorization" not in request_bytes("/api/items", None, "r").decode()

    async def parse(data: bytes) -> tuple[int, str, bytes, bool]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        resp, close = await read_response(reader)
        return resp.status, resp.headers.get("x-extauthz-reason", ""), resp.body, close

    denied = (
        b"HTTP/1.1 401 Unauthorized\r\nx-extauthz-reason: key_not_found\r\n"
        b"content-length: 2\r\n\r\n{}"
    )
    assert asyncio.run(parse(denied)) == (401, "key_not_found", b"{}", False)
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    assert asyncio.run(parse(chunked)) == (200, "", b"ok", False)
    closing = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    assert asyncio.run(parse(closing)) == (503, "", b"", True)


# --- /proc ----------------------------------------------------------------------------------------

PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1
   1: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 2222 1
   2: 0100007F:D432 0100007F:1F90 06 00000000:00000000 03:00000D2C 00000000     0        0 0 3
"""


def test_parse_proc_net_tcp() -> None:
    socks = parse_proc_net_tcp(PROC_NET_TCP)
    assert socks[0] == (8080, 0, "LISTEN", 1111)
    assert socks[1] == (54321, 8080, "ESTABLISHED", 2222)
    assert socks[2].state == "TIME_WAIT"
    assert parse_proc_net_tcp("header only\n") == []
