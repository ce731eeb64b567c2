"""Route selection as an attacker meets it: no spelling of a host or a path reaches a weaker policy
than the one written for it, and no request line costs more than its length."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz.answers import AnswerCache
from extauthz.config import Config, ConfigError, parse_config
from extauthz.decision import Decision, Reason
from extauthz.engine import CheckInput, Engine
from extauthz.response import Renderer
from extauthz.routing import RequestTarget, read_request_target, request_path
from tests.check_requests import check_request
from tests.conftest import SigningKey
from tests.fake_idp import FakeIdp
from tests.unit.test_engine import build, check

ROOT = Path(__file__).resolve().parents[2]


def deployment(name: str, prefix: str, *, anonymous: bool, key: SigningKey, **extra: Any) -> dict[str, Any]:
    """A deployment that allows requests without a token (anonymous) or requires one."""
    return {
        "name": name,
        "pathPrefix": prefix,
        "authentication": {
            "type": "TOKEN_AUTHENTICATION",
            "isAnonymousAccessAllowed": anonymous,
            "validationPolicy": {"type": "STATIC_KEYS", "keys": [key.public_jwk]},
        },
        **extra,
    }


def engine_for(*deployments: dict[str, Any], **server: Any) -> Engine:
    return build(parse_config({"server": server, "deployments": list(deployments)}), FakeIdp())


def decide(engine: Engine, host: str, path: str, method: str = "GET", **context: str) -> Decision:
    return check(engine, CheckInput(method, host, path, {"x-request-id": "r"}, context))


def applied(decision: Decision) -> str:
    """Which deployment decided, or the reason when none did."""
    return decision.deployment or decision.reason.value if decision.reason else decision.deployment


@pytest.fixture
def hosts_engine(rsa_key: SigningKey) -> Engine:
    """Listed least specific first: config order must not matter."""
    return engine_for(
        deployment("anywhere", "/api", anonymous=True, key=rsa_key),
        deployment("wild", "/api", anonymous=True, key=rsa_key, hosts=["*.example.com"]),
        deployment("deep-wild", "/api", anonymous=False, key=rsa_key, hosts=["*.corp.example.com"]),
        deployment("secure", "/api", anonymous=False, key=rsa_key, hosts=["secure.example.com"]),
        deployment("vault", "/", anonymous=False, key=rsa_key, hosts=["vault.example"]),
    )


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("secure.example.com", "secure"),  # exact host before the wildcard listed earlier
        ("SECURE.Example.COM", "secure"),
        ("secure.example.com:8443", "secure"),
        ("secure.example.com.", "secure"),  # one trailing dot: the same name
        ("other.example.com", "wild"),
        ("a.corp.example.com", "deep-wild"),  # the longest wildcard suffix first
        ("example.com", "anywhere"),  # *.example.com needs one more label
        ("vault.example.", "vault"),  # was: fell through to the host-less anonymous deployment
        ("vault.example", "vault"),
        ("elsewhere.test", "anywhere"),
    ],
)
def test_hosts_before_paths_most_specific_first(hosts_engine: Engine, host: str, expected: str) -> None:
    d = decide(hosts_engine, host, "/api/x")
    assert d.deployment == expected
    assert d.allowed is (expected in ("anywhere", "wild"))


@pytest.mark.parametrize(
    "authority",
    ["x@secure.example.com", "secure.example.com:1:2", "secure.example.com ", "a b", "vault.example..",
     ".vault.example", "secure.example.com:80x", "%73ecure.example.com", "ſecure.example.com"],
)
def test_an_authority_that_is_not_host_and_port_is_ambiguous(hosts_engine: Engine, authority: str) -> None:
    """Such authorities used to fall through to a host-less anonymous deployment and be allowed."""
    d = decide(hosts_engine, authority, "/api/x")
    assert not d.allowed and d.reason is Reason.REQUEST_AMBIGUOUS
    assert d.deployment == "" and "authority" in d.message


@pytest.fixture
def paths_engine(rsa_key: SigningKey) -> Engine:
    return engine_for(
        deployment("public", "/public", anonymous=True, key=rsa_key),
        deployment(
            "admin", "/", anonymous=True, key=rsa_key,
            routes=[
                {"name": "admin", "path": "/admin/{rest*}"},  # token required
                {"name": "file", "path": "/files/{name}.{ext}", "authorization": {"type": "ANONYMOUS"}},
                {"name": "by-id", "path": "/{id}", "authorization": {"type": "ANONYMOUS"}},
            ],
        ),
    )


@pytest.mark.parametrize(
    ("path", "what"),
    [
        ("/public/../admin/x", "'.' or '..' segment"),
        ("/public/%2e%2e/admin/x", "'.' or '..' segment"),
        ("/public/%2E%2e/admin/x", "'.' or '..' segment"),
        ("/public/.%2e/admin/x", "'.' or '..' segment"),
        ("/public/%2e./admin/x", "'.' or '..' segment"),
        ("/public/./x", "'.' or '..' segment"),
        ("/public/%2e", "'.' or '..' segment"),
        ("/public/..", "'.' or '..' segment"),
        ("/public/..%2Fadmin/x", "'.' or '..' segment"),
        ("/public/..%2fadmin/x", "'.' or '..' segment"),
        ("/public/a%2Fb", "encoded slash"),
        ("/public//x", "empty segment"),
        ("//admin/x", "empty segment"),
        ("/public\\..\\admin", "backslash"),
        ("/public/%5C../admin", "backslash"),
        ("/public/\x00", "control character"),
        ("/public/\t", "control character"),
        ("/public/a\x85b", "control character"),
        ("/public/%zz", "not followed by two hex digits"),
        ("/public/%", "not followed by two hex digits"),
        ("/public/%4", "not followed by two hex digits"),
        ("public/x", "does not start with '/'"),
        ("", "does not start with '/'"),
        ("*", "does not start with '/'"),
    ],
)
def test_a_path_not_in_normal_form_is_ambiguous(paths_engine: Engine, path: str, what: str) -> None:
    """Denied before any policy is looked at: the path is never rewritten, so extauthz and the
    upstream cannot disagree about which resource was authorized."""
    d = decide(paths_engine, "h", path)
    assert d.reason is Reason.REQUEST_AMBIGUOUS and not d.allowed
    assert what in d.message and "normalize_path" in d.message
    assert path not in d.message or not path.strip("/")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/public/x", "public"),
        ("/public/", "public"),  # one trailing slash is fine
        ("/public/x?a=/../b//c%zz", "public"),  # the query is not the path
        ("/public/x#/../", "public"),
        ("/public/%41", "public"),
        ("/public/.well-known", "public"),  # a dot that is not a whole segment
        ("/public/...", "public"),
        ("/public/caf%C3%A9", "public"),
    ],
)
def test_a_path_in_normal_form_is_matched_as_sent(paths_engine: Engine, path: str, expected: str) -> None:
    assert decide(paths_engine, "h", path).deployment == expected


def test_encoded_slashes_may_be_kept(rsa_key: SigningKey) -> None:
    engine = engine_for(deployment("public", "/public", anonymous=True, key=rsa_key), encodedSlashes="KEEP")
    assert decide(engine, "h", "/public/a%2Fb").allowed
    assert decide(engine, "h", "/public/%2e%2e%2Fadmin").reason is Reason.REQUEST_AMBIGUOUS


@pytest.mark.parametrize(
    ("path", "route", "allowed"),
    [
        ("/admin", "admin", False),  # was: fell through to the anonymous /{id} route
        ("/admin/", "admin", False),
        ("/admin/users/7", "admin", False),
        ("/adminx", "by-id", True),
        ("/files/report.pdf", "file", True),
        ("/files/a.b.c", "file", True),
    ],
)
def test_rest_placeholder_covers_zero_or_more_segments(paths_engine: Engine, path: str, route: str, allowed: bool) -> None:
    d = decide(paths_engine, "h", path)
    assert (d.route, d.allowed) == (route, allowed)


def test_ambiguity_comes_before_context_extensions(paths_engine: Engine) -> None:
    d = decide(paths_engine, "h", "/public/%2e%2e/admin", deployment="public")
    assert d.reason is Reason.REQUEST_AMBIGUOUS


def _cpu_seconds(engine: Engine, path: str) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        decide(engine, "h", path)
        best = min(best, time.process_time() - started)
    return best


def test_selection_cost_grows_linearly_with_the_path(paths_engine: Engine) -> None:
    """A ratio, not a deadline: 10x the path may cost about 10x (it cost 100x when selection
    rebuilt a string per segment, and a dotted template backtracked). The absolute figures are
    measured by the bench's hostile-path scenario."""
    for unit in ("/a", "/files/" + "." * 2, "/files/x" + "." * 2):
        short, long = unit * 3_000, unit * 30_000
        if unit.startswith("/files/"):
            short, long = unit + "." * 3_000, unit + "." * 30_000
        ratio = _cpu_seconds(paths_engine, long) / max(_cpu_seconds(paths_engine, short), 1e-6)
        assert ratio < 30, (unit, ratio)


def test_unique_long_paths_do_not_grow_memory(paths_engine: Engine, rsa_key: SigningKey) -> None:
    """With exposeDetailedErrors, 200 distinct 59 KB paths used to keep 35 MB of rendered
    responses (their messages quoted the path); what selection and rendering keep is now
    bounded per entry."""
    engine = engine_for(deployment("public", "/public", anonymous=True, key=rsa_key), exposeDetailedErrors=True)
    answers = AnswerCache(engine)
    renderer = Renderer(engine.config.server)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(200):
        path = f"/other/{i:05d}" + "/x" * 29_500
        d = asyncio.run(answers.check(CheckInput("GET", "h", path, {}, {})))
        assert d.reason is Reason.NO_MATCHING_POLICY and len(d.message) < 300
        renderer.render(d, f"rid-{i}")
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 2_000_000, grown


def test_large_context_extensions_are_not_memoized(paths_engine: Engine) -> None:
    answers = AnswerCache(paths_engine)

    def remembered(**context: str) -> Decision:
        return asyncio.run(answers.check(CheckInput("GET", "h", "/public/x", {}, context)))

    for i in range(50):
        assert remembered(deployment="public", junk=f"{i}" + "x" * 10_000).allowed
    assert len(answers._routes) == 0
    assert remembered(deployment="public").allowed
    assert len(answers._routes) == 1


def test_request_path_drops_query_and_fragment() -> None:
    assert request_path("/a?b#c") == "/a"
    assert request_path("/a#b?c") == "/a"
    assert request_path("/a") == "/a"


def test_request_target_normalizes_the_host() -> None:
    target = read_request_target("API.Example.com.:443", "/x?y")
    assert isinstance(target, RequestTarget)
    assert (target.host, target.path) == ("api.example.com", "/x")


# -- config ---------------------------------------------------------------------------------------


def config_of(*deployments: dict[str, Any]) -> Config:
    return parse_config({"deployments": list(deployments)})


def test_two_deployments_for_one_host_and_prefix_are_an_error(rsa_key: SigningKey) -> None:
    with pytest.raises(ConfigError) as err:
        config_of(
            deployment("a", "/api", anonymous=True, key=rsa_key, hosts=["x.example.com", "y.example.com"]),
            deployment("b", "/api/", anonymous=False, key=rsa_key, hosts=["y.example.com"]),
        )
    assert err.value.errors == [
        "deployments[1].pathPrefix: '/api' for host 'y.example.com' is also deployments[0] ('a')'s;"
        " two deployments may not serve the same host and prefix"
    ]
    with pytest.raises(ConfigError, match="for requests of any host"):
        config_of(
            deployment("a", "/api", anonymous=True, key=rsa_key),
            deployment("b", "/api", anonymous=False, key=rsa_key),
        )


def test_a_host_less_deployment_beside_a_host_scoped_one_is_a_warning(rsa_key: SigningKey) -> None:
    config = config_of(
        deployment("wild", "/api", anonymous=True, key=rsa_key),
        deployment("secure", "/api", anonymous=False, key=rsa_key, hosts=["secure.example.com"]),
        deployment("docs", "/api/docs", anonymous=True, key=rsa_key),
        deployment("unrelated", "/other", anonymous=True, key=rsa_key),
    )
    assert config.warnings == (
        "deployments 'secure' (hosts secure.example.com) and 'wild' (no hosts) share pathPrefix"
        " '/api': for secure.example.com, 'secure' applies; for any other host, 'wild'",
        "deployments 'secure' (hosts secure.example.com) and 'docs' (no hosts) cover '/api/docs'"
        " ('secure' through its pathPrefix '/api'): for secure.example.com, 'secure' applies;"
        " for any other host, 'docs'",
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("pathPrefix", "/a//b", "normal form"),
        ("pathPrefix", "/a/../b", "normal form"),
        ("pathPrefix", "/a/%2e", "normal form"),
        ("hosts", ["api.example.com:443"], "not a host name"),
        ("hosts", ["https://api.example.com"], "not a host name"),
        ("hosts", ["api.example.com", "API.example.com."], "listed twice"),
    ],
)
def test_prefixes_and_hosts_are_checked(rsa_key: SigningKey, field: str, value: Any, message: str) -> None:
    d = deployment("a", "/api", anonymous=True, key=rsa_key)
    d[field] = value
    with pytest.raises(ConfigError, match=message):
        config_of(d)


def test_check_config_prints_the_warnings_and_passes(rsa_key: SigningKey, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"deployments": [
        deployment("wild", "/api", anonymous=True, key=rsa_key),
        deployment("secure", "/api", anonymous=False, key=rsa_key, hosts=["secure.example.com"]),
    ]}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "extauthz", "check-config", str(path)], capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("\n") == 1 and "OK" in res.stdout
    assert res.stderr == (
        "warning: deployments 'secure' (hosts secure.example.com) and 'wild' (no hosts) share pathPrefix"
        " '/api': for secure.example.com, 'secure' applies; for any other host, 'wild'\n"
    )


def test_the_access_line_cuts_a_long_path(paths_engine: Engine) -> None:
    """A client chooses the path: one request must not write 60 KB to the log."""
    import io
    import json

    from extauthz.logs import MAX_LOGGED_PATH_CHARS, JsonLogger
    from extauthz.metrics import Metrics
    from extauthz.server import AuthorizationService

    out = io.StringIO()
    service = AuthorizationService(paths_engine, JsonLogger(stream=out), Metrics())
    path = "/public" + "/a" * 30_000
    asyncio.run(service.Check(check_request(path, host="h", request_id="rid-long"), None))  # type: ignore[arg-type]
    (access,) = [json.loads(line) for line in out.getvalue().splitlines() if '"access"' in line]
    assert access["path"] == f"{path[:MAX_LOGGED_PATH_CHARS]}... ({len(path)} characters)"
    assert access["decision"] == "allow" and access["deployment"] == "public"
