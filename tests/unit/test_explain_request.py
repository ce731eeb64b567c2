"""`extauthz explain --header / --request`: the request replayed as the client sent it.

For every request below, explain's verdict and reason are the server's: the server's answer is
the real engine's, for the CheckRequest Envoy would send (``tests/check_requests.py``), lifted
the way the gRPC servicer lifts it (``lift_request``). Messages are not compared: the verdict
and the reason are what the replay has to get right. And whatever the request carries, no header
value is printed, and no error about a malformed request quotes it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format

from extauthz.cli import main
from extauthz.config import Config, parse_config
from extauthz.explain import (
    MAX_REQUEST_BYTES,
    ExplainRequest,
    RequestError,
    SentRequest,
    explain,
    parse_request,
    render_text,
    replaying,
    sent_headers,
    to_json,
)
from extauthz.server import lift_request
from tests.check_requests import HOST, check_request
from tests.conftest import AUDIENCE, ISSUER, SigningKey, claims
from tests.fake_idp import FakeIdp
from tests.policies import GET_ORDER, LIST_ORDERS, orders

# A credential-looking value that must never be printed.
SECRET = "s3cr3t-Value-never-printed"


# -- the config: orders (Authorization: Bearer), query (?access_token=) ----------------------------


def config_dict(key: SigningKey) -> dict[str, Any]:
    validation = {
        "type": "STATIC_KEYS",
        "keys": [key.public_jwk],
        "additionalValidationPolicy": {"issuers": [ISSUER], "audiences": [AUDIENCE]},
    }
    return {
        "deployments": [
            orders(validation, routes=[GET_ORDER, LIST_ORDERS], hosts=[HOST]),
            orders(
                validation,
                authentication={"tokenQueryParam": "access_token"},
                name="query",
                pathPrefix="/q",
            ),
        ]
    }


@pytest.fixture
def config(rsa_key: SigningKey) -> Config:
    return parse_config(config_dict(rsa_key))


@pytest.fixture
def config_file(tmp_path: Path, rsa_key: SigningKey) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_dict(rsa_key)))
    return path


@pytest.fixture
def jwt(rsa_key: SigningKey) -> str:
    return rsa_key.sign(claims())


# -- the two answers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    allowed: bool
    reason: str | None


def server_answer(config: Config, path: str, headers: dict[str, str]) -> Answer:
    """What the server decides for the CheckRequest Envoy sends for this request."""
    inp, _ = lift_request(check_request(path, host=HOST, headers=headers))
    decision = asyncio.run(FakeIdp().engine(config).check(inp))
    return Answer(decision.allowed, decision.reason.value if decision.reason else None)


@dataclass
class Cli:
    """`extauthz explain` as a person runs it, output captured."""

    config_file: Path
    capsys: pytest.CaptureFixture[str]

    def run(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(["explain", "--config", str(self.config_file), *argv])
        out, err = self.capsys.readouterr()
        return code, out, err

    def answer(self, *argv: str) -> tuple[Answer, dict[str, Any], str]:
        """explain's verdict with --json, and its text report (the same request)."""
        code, out, _ = self.run(*argv, "--json")
        data = json.loads(out)
        decision = data["decision"]
        assert decision["exact"] is True
        assert code == (0 if decision["allowed"] else 1)
        text_code, text, _ = self.run(*argv)
        assert text_code == code
        return Answer(decision["allowed"], decision.get("reason")), data, text


@pytest.fixture
def cli(config_file: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(config_file, capsys)


def request_head(path: str, headers: list[tuple[str, str]]) -> str:
    lines = [f"GET {path} HTTP/1.1", f"Host: {HOST}", *(f"{n}: {v}" for n, v in headers)]
    return "\r\n".join(lines) + "\r\n\r\n"


def envoy_headers(headers: list[tuple[str, str]]) -> dict[str, str]:
    """The headers map of Envoy's CheckRequest: names lower-cased, repeats joined with ","."""
    joined: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        joined[key] = f"{joined[key]},{value}" if key in joined else value
    return joined


# -- explain answers what the server answers ---------------------------------------------------------

# (id, path, headers as sent); "{jwt}" is a valid token for both deployments.
REQUESTS = [
    ("another-scheme", "/orders/42", [("Authorization", "Token {secret}")]),
    ("basic", "/orders/42", [("Authorization", "Basic YTpi")]),
    ("bare-token-without-scheme", "/orders/42", [("Authorization", "{jwt}")]),
    ("another-header", "/orders/42", [("X-Access-Token", "{jwt}")]),
    ("no-header", "/orders/42", [("Accept", "application/json")]),
    ("valid-bearer", "/orders/42", [("Authorization", "Bearer {jwt}")]),
    ("scheme-in-lower-case", "/orders/42", [("authorization", "bearer {jwt}")]),
    ("two-authorization-lines", "/orders/42", [("Authorization", "Bearer {jwt}")] * 2),
    ("bearer-two-words", "/orders/42", [("Authorization", "Bearer {jwt} {secret}")]),
    ("query-param", "/q/1?access_token={jwt}", [("Accept", "*/*")]),
    ("query-param-header-ignored", "/q/1", [("Authorization", "Bearer {jwt}")]),
    ("query-param-twice", "/q/1?access_token={jwt}&access_token={jwt}", [("Accept", "*/*")]),
]


@pytest.fixture(params=REQUESTS, ids=[r[0] for r in REQUESTS])
def sent(request: pytest.FixtureRequest, jwt: str) -> tuple[str, list[tuple[str, str]]]:
    _, path, headers = request.param
    fill = {"jwt": jwt, "secret": SECRET}
    return path.format(**fill), [(n, v.format(**fill)) for n, v in headers]


def assert_no_values_printed(headers: list[tuple[str, str]], *outputs: str) -> None:
    for name, value in headers:
        for part in [*value.split(" "), *value.split(".")]:
            if len(part) >= 8:  # scheme words and short values may appear for other reasons
                assert all(part not in out for out in outputs), name


def test_header_replay_is_the_servers_answer(
    config: Config, cli: Cli, sent: tuple[str, list[tuple[str, str]]]
) -> None:
    path, headers = sent
    expected = server_answer(config, path, envoy_headers(headers))
    argv = [arg for n, v in headers for arg in ("--header", f"{n}: {v}")]
    answer, data, text = cli.answer("--path", path, "--host", HOST, *argv)
    assert answer == expected
    assert data["request"]["headers"] == sorted({n.lower() for n, _ in headers})
    assert_no_values_printed(headers, json.dumps(data), text)


def test_request_file_replay_is_the_servers_answer(
    config: Config, cli: Cli, tmp_path: Path, sent: tuple[str, list[tuple[str, str]]]
) -> None:
    path, headers = sent
    expected = server_answer(config, path, envoy_headers(headers))
    captured = tmp_path / "request.http"
    captured.write_text(request_head(path, headers) + "a body, ignored\n")
    answer, data, text = cli.answer("--request", str(captured))
    assert answer == expected
    assert (data["request"]["host"], data["request"]["method"]) == (HOST, "GET")
    assert_no_values_printed(headers, json.dumps(data), text)


def test_check_request_json_replay_is_the_servers_answer(
    config: Config, cli: Cli, tmp_path: Path, sent: tuple[str, list[tuple[str, str]]]
) -> None:
    """The CheckRequest itself, in proto3 JSON, as a capture of what Envoy sent would have it."""
    path, headers = sent
    request = check_request(path, host=HOST, headers=envoy_headers(headers))
    expected = server_answer(config, path, envoy_headers(headers))
    captured = tmp_path / "check.json"
    captured.write_text(json_format.MessageToJson(request))
    answer, _, _ = cli.answer("--request", str(captured))
    assert answer == expected


def test_the_answers_cover_allow_and_token_missing(config: Config, jwt: str) -> None:
    """The corpus is what it says: another scheme and no header are token_missing, a Bearer JWT
    is allowed, two tokens are token_malformed."""
    auth = [("Authorization", f"Token {SECRET}")]
    assert server_answer(config, "/orders/42", envoy_headers(auth)).reason == "token_missing"
    assert server_answer(config, "/orders/42", {}).reason == "token_missing"
    bearer = {"authorization": f"Bearer {jwt}"}
    assert server_answer(config, "/orders/42", bearer) == Answer(True, None)
    twice = envoy_headers([("Authorization", f"Bearer {jwt}")] * 2)
    assert server_answer(config, "/orders/42", twice).reason == "token_malformed"


def test_a_request_without_any_header(config: Config, cli: Cli, tmp_path: Path) -> None:
    captured = tmp_path / "bare.http"
    captured.write_text("GET /orders/42 HTTP/1.1\nHost: api.example.com\n\n")
    answer, data, text = cli.answer("--request", str(captured))
    assert answer == server_answer(config, "/orders/42", {}) == Answer(False, "token_missing")
    assert data["token"] is None and data["request"]["headers"] == []
    assert "no usable token in the request" in text.splitlines()[0]
    assert "request headers (values not shown): (none)" in text
    token_line = [c for c in data["checks"] if c["check"] == "token"]
    assert token_line and token_line[0]["result"] == "FAIL"


def test_the_token_found_in_the_request_is_named_by_its_hash(
    config: Config, jwt: str, cli: Cli
) -> None:
    answer, data, text = cli.answer(
        "--header", f"Authorization: Bearer {jwt}", "--header", f"Host: {HOST}", "--path", "/orders"
    )
    assert answer.allowed
    assert data["token"]["kind"] == "jwt" and len(data["token"]["sha256Prefix"]) == 8
    assert f"token sha256:{data['token']['sha256Prefix']} (jwt)" in text


# -- never a header value ----------------------------------------------------------------------------


def test_no_credential_header_value_is_ever_printed(config: Config, jwt: str) -> None:
    headers = {
        "authorization": f"DPoP {SECRET}-a",
        "cookie": f"session={SECRET}-c",
        "dpop": f"{SECRET}-d",
        "x-access-token": jwt,
        "x-other": f"{SECRET}-o",
    }
    for offline in (False, True):
        req = ExplainRequest(path="/orders/42", host=HOST, headers=headers, offline=offline)
        result = asyncio.run(explain(config, req))
        output = render_text(result) + json.dumps(to_json(result)) + repr(req) + repr(result)
        assert SECRET not in output
        assert all(part not in output for part in jwt.split("."))
        assert "authorization, cookie, dpop, x-access-token, x-other" in render_text(result)
        assert result.verdict.reason == "token_missing"


def test_a_query_token_is_not_printed(config: Config, jwt: str) -> None:
    req = ExplainRequest(path=f"/q/1?access_token={jwt}", headers={})
    result = asyncio.run(explain(config, req))
    assert result.verdict.allowed
    output = render_text(result) + json.dumps(to_json(result))
    assert all(part not in output for part in jwt.split("."))
    assert to_json(result)["request"]["path"] == "/q/1"


# -- --token with the request ------------------------------------------------------------------------


def test_token_with_other_headers_goes_where_the_policy_reads_it(cli: Cli, jwt: str) -> None:
    argv = ["--header", "X-Request-Id: r1", "--path", "/orders", "--host", HOST]
    answer, data, _ = cli.answer("--token", jwt, *argv)
    assert answer == Answer(True, None)
    assert data["request"]["headers"] == ["authorization", "x-request-id"]


@pytest.mark.parametrize(
    ("argv", "where"),
    [
        (["--header", f"Authorization: Token {SECRET}"], "'authorization' header"),
        (["--header", f"authorization: Bearer {SECRET}"], "'authorization' header"),
        (["--path", f"/q/1?access_token={SECRET}", "--header", "Accept: */*"], "'access_token'"),
    ],
    ids=["another-scheme", "lower-case-name", "query-param"],
)
def test_token_and_a_credential_in_the_request_is_a_usage_error(
    cli: Cli, jwt: str, argv: list[str], where: str
) -> None:
    code, out, err = cli.run("--token", jwt, "--path", "/orders/42", *argv)
    assert code == 2 and out == ""
    assert where in err and "not both" in err
    assert SECRET not in err and jwt not in err


def test_token_and_a_credential_in_the_request_file(cli: Cli, tmp_path: Path, jwt: str) -> None:
    captured = tmp_path / "r.http"
    captured.write_text(request_head("/orders/42", [("Authorization", f"Bearer {SECRET}")]))
    code, _, err = cli.run("--token", jwt, "--request", str(captured))
    assert code == 2 and SECRET not in err


def test_a_request_or_a_token_is_needed(cli: Cli) -> None:
    code, _, err = cli.run("--path", "/orders")
    assert code == 2 and "--request" in err


def test_header_and_request_exclude_each_other(cli: Cli, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.run("--header", "A: b", "--request", str(tmp_path / "r"))
    assert exc.value.code == 2


def test_only_one_option_reads_standard_input(cli: Cli) -> None:
    code, _, err = cli.run("--token-file", "-", "--request", "-")
    assert code == 2 and "standard input" in err


def test_request_from_standard_input(
    cli: Cli, jwt: str, monkeypatch: pytest.MonkeyPatch, config: Config
) -> None:
    head = request_head("/orders/42", [("Authorization", f"Bearer {jwt}")]).encode()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(head)))
    code, out, _ = cli.run("--request", "-")
    assert code == 0 and "ALLOW" in out


def test_flags_override_the_request_file(cli: Cli, tmp_path: Path, jwt: str) -> None:
    captured = tmp_path / "r.http"
    captured.write_text(request_head("/orders/42", [("Authorization", f"Bearer {jwt}")]))
    answer, data, _ = cli.answer("--request", str(captured), "--method", "POST", "--path", "/q/1")
    assert data["request"]["method"] == "POST" and data["request"]["path"] == "/q/1"
    assert answer == Answer(False, "token_missing")  # /q reads the query, not the header


# -- reading a captured request -------------------------------------------------------------------


def test_a_captured_request_head_is_read() -> None:
    head = (
        "\r\n"  # an empty line before the request line is ignored (RFC 9112 §2.2)
        "POST /orders/1?x=y HTTP/1.1\r\n"
        "Host: api.example.com:8443\r\n"
        "Authorization:  Bearer abc \r\n"
        "X-Forwarded-For: 10.0.0.1\r\n"
        "x-forwarded-for: 10.0.0.2\r\n"
        "X-Empty:\r\n"
        "Content-Length: 11\r\n"
        "\r\n"
        "Host: not-a-header\r\n"
    )
    sent = parse_request(head.encode())
    assert (sent.method, sent.path, sent.host) == ("POST", "/orders/1?x=y", "api.example.com:8443")
    assert dict(sent.headers) == {
        "authorization": "Bearer abc",
        "x-forwarded-for": "10.0.0.1,10.0.0.2",
        "x-empty": "",
        "content-length": "11",
    }
    assert sent.deployment is None


def test_bare_lf_line_ends_and_an_absolute_target() -> None:
    sent = parse_request(b"GET http://api.example.com/orders/2?a=b HTTP/1.1\nHost: other\n\n")
    assert (sent.path, sent.host) == ("/orders/2?a=b", "api.example.com")
    assert dict(sent.headers) == {}


def test_a_head_without_the_empty_line_is_read_to_its_end() -> None:
    sent = parse_request(b"DELETE /orders/3 HTTP/1.0\nAccept: */*")
    assert (sent.method, sent.path, sent.host) == ("DELETE", "/orders/3", None)


def test_a_large_body_after_the_head_is_not_read() -> None:
    data = b"GET /orders HTTP/1.1\r\nHost: h\r\n\r\n" + b"\xff" * (2 * MAX_REQUEST_BYTES)
    assert parse_request(data).path == "/orders"


def test_header_options_are_read_like_header_lines() -> None:
    sent = sent_headers(["X-A: 1", "x-a:2", "Host: api.example.com", "Authorization: Token t"])
    assert dict(sent.headers) == {"x-a": "1,2", "authorization": "Token t"}
    assert (sent.host, sent.path, sent.method) == ("api.example.com", None, None)


def test_the_http_part_of_a_check_request_in_json() -> None:
    doc = {
        "method": "PUT",
        "path": "/orders/9",
        "host": "api.example.com",
        "headers": {"authorization": "Bearer x", ":authority": "api.example.com"},
        "protocol": "HTTP/1.1",
    }
    sent = parse_request(json.dumps(doc).encode())
    assert (sent.method, sent.path, sent.host) == ("PUT", "/orders/9", "api.example.com")
    assert sent.headers["authorization"] == "Bearer x"


def test_a_whole_check_request_in_json_names_the_deployment() -> None:
    request = check_request(
        "/orders/1",
        host="h",
        method="POST",
        headers={"authorization": "Bearer x"},
        context_extensions={"deployment": "orders"},
    )
    sent = parse_request(json_format.MessageToJson(request).encode())
    assert (sent.method, sent.path, sent.host) == ("POST", "/orders/1", "h")
    assert sent.deployment == "orders"
    snake = json_format.MessageToJson(request, preserving_proto_field_name=True)
    assert parse_request(snake.encode()).deployment == "orders"


def test_a_raw_header_map_in_json() -> None:
    raw = base64.b64encode(b"Bearer raw").decode()
    doc = {
        "path": "/orders",
        "headerMap": {
            "headers": [
                {"key": "Authorization", "rawValue": raw},
                {"key": "x-a", "value": "1"},
                {"key": "X-A", "value": "2"},
            ]
        },
    }
    sent = parse_request(json.dumps(doc).encode())
    assert dict(sent.headers) == {"authorization": "Bearer raw", "x-a": "1,2"}


def test_replaying_lets_the_flags_win() -> None:
    sent = SentRequest("POST", "/a", "h", {"x": "1"}, "orders")
    req = replaying(sent, token=None, path="/b", host=None, method=None)
    assert (req.path, req.method, req.host, req.deployment) == ("/b", "POST", "h", "orders")
    assert req.headers == {"x": "1"} and req.token is None


# -- malformed requests: exit 2, the line named, nothing quoted ------------------------------------

# (id, file content, what the message says)
MALFORMED: list[tuple[str, bytes, str]] = [
    ("no-colon", b"GET / HTTP/1.1\r\nHost: h\r\nBearer SECRET\r\n\r\n", "line 3: not a 'Name: value'"),
    ("space-before-colon", b"GET / HTTP/1.1\nAuthorization : Bearer SECRET\n\n", "line 2: the header name is not a token"),
    ("folded", b"GET / HTTP/1.1\nAuthorization: Bearer\n SECRET\n\n", "line 3: a folded header line"),
    ("request-line", b"GET /SECRET\nHost: h\n\n", "line 1: not a request line"),
    ("leading-lines-counted", b"\n\nGET /SECRET HTTP/1.1 extra\n\n", "line 3: not a request line"),
    ("target", b"GET SECRET HTTP/1.1\n\n", "line 1: the request target is neither"),
    ("userinfo", b"GET http://u:SECRET@h/ HTTP/1.1\n\n", "line 1: the request target has userinfo"),
    ("method", b"G(T /x HTTP/1.1\n\n", "line 1: the method is not a token"),
    ("control-character", b"GET / HTTP/1.1\nX-A: SECRET\x00\n\n", "line 2: the header value holds a control"),
    ("bare-cr", b"GET / HTTP/1.1\nX-A: SECRET\rX-B: 1\n\n", "line 2: a CR not followed by LF"),
    ("not-utf-8", b"GET / HTTP/1.1\nX-A: SECRET\xff\n\n", "line 2: not UTF-8"),
    ("two-hosts", b"GET / HTTP/1.1\nHost: a\nHost: SECRET\n\n", "line 3: a second Host header"),
    ("empty", b"\r\n\r\n", "no request line"),
    ("too-long", b"GET / HTTP/1.1\nX-A: SECRET" + b"a" * MAX_REQUEST_BYTES, "longer than 64 KiB"),
    ("json-syntax", b'{"headers": {"authorization": "SECRET"', "line 1: not JSON"),
    ("json-lines", b'{\n"headers": {\n"authorization": SECRET}}', "line 3: not JSON"),
    ("json-headers-type", b'{"headers": {"authorization": ["SECRET"]}}', "headers must map names to strings"),
    ("json-unknown-member", b'{"header": {"authorization": "SECRET"}}', 'unknown member(s) "header"'),
    ("json-path-type", b'{"path": ["SECRET"]}', "path must be a string"),
    ("json-not-object", b'{"attributes": ["SECRET"]}', "attributes must be a JSON object"),
    ("json-raw-value", b'{"headerMap": {"headers": [{"key": "a", "rawValue": "SECRET!"}]}}', "rawValue is not base64"),
    ("json-too-long", b'{"path": "/", "x": "SECRET' + b"a" * MAX_REQUEST_BYTES + b'"}', "longer than 64 KiB"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("content", "says"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_a_malformed_request_file_exits_2_naming_the_line_not_the_value(
    cli: Cli, tmp_path: Path, content: bytes, says: str
) -> None:
    captured = tmp_path / "bad.http"
    captured.write_bytes(content.replace(b"SECRET", SECRET.encode()))
    code, out, err = cli.run("--request", str(captured))
    assert code == 2 and out == ""
    assert says in err, err
    assert err.startswith(f"--request {captured}: ")
    assert SECRET not in err


@pytest.mark.parametrize(
    ("header", "says"),
    [
        (f"Bearer {SECRET}", "--header [2]: not a 'Name: value'"),
        (f"Bad Name: {SECRET}", "--header [2]: the header name is not a token"),
        (f"X-A: {SECRET}\n", "--header [2]: the header value holds a control character"),
        (f"Host: {SECRET}", "--header [2]: a second Host header"),
    ],
)
def test_a_malformed_header_option_exits_2_without_its_value(
    cli: Cli, header: str, says: str
) -> None:
    code, out, err = cli.run("--path", "/orders", "--header", "Host: h", "--header", header)
    assert code == 2 and out == ""
    assert says in err and SECRET not in err


def test_an_unreadable_request_file(cli: Cli, tmp_path: Path) -> None:
    code, _, err = cli.run("--request", str(tmp_path / "missing"))
    assert code == 2 and "cannot read" in err


def test_request_error_is_a_usage_error() -> None:
    with pytest.raises(RequestError, match="line 1"):
        parse_request(b"nonsense\n\n")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Static keys only: nothing here may reach out (a replay is decided locally)."""
    import httpx

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("explain reached for the network")

    monkeypatch.setattr(httpx.AsyncClient, "send", refuse)
    yield
