"""`extauthz probe` against a real IdP on loopback (tests/integration/faulty_idp.py): all ✔ and
exit 0 when healthy, and each fault named on its layer, with the contract's log message, exit 1."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz.cli import main
from extauthz.config import load_config
from extauthz.errors import IdpError
from extauthz.idp import Providers
from tests.conftest import SigningKey
from tests.integration.faulty_idp import Fault, FaultyIdp
from tests.integration.serverproc import closed_port, run_extauthz

CLIENT_ID = "extauthz"
SECRET = "probe-test-secret-value"  # the throw-away IdP's client secret; must never be printed
CONNECT_HINT = "Make sure that the URI is accessible from the network of the authorization service."
PARSE = "Unable to parse response from Identity Provider"


@pytest.fixture(scope="module")
def idp(rsa_key: SigningKey, ec_key: SigningKey) -> Iterator[FaultyIdp]:
    with FaultyIdp(keys=[rsa_key.public_jwk], clients={CLIENT_ID: SECRET}) as server:
        server.jwks("/jwks")
        server.introspection("/introspect")
        server.discovery(
            "/.well-known/openid-configuration", jwks="/jwks", introspection="/introspect"
        )
        server.jwks("/empty/jwks", fault=Fault.json({"keys": []}))
        server.jwks("/ec/jwks", fault=Fault.json({"keys": [ec_key.public_jwk]}))
        server.jwks("/broken/jwks", fault=Fault.status_code(500))
        server.jwks("/html/jwks", fault=Fault.html())
        server.jwks("/hang/jwks", fault=Fault.hang())
        yield server


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "client-secret"
    path.write_text(SECRET + "\n")
    return path


def deployment(name: str, validation: dict[str, Any], issuers: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "pathPrefix": f"/{name}",
        "authentication": {
            "type": "TOKEN_AUTHENTICATION",
            "validationPolicy": {
                "timeoutSeconds": 1,
                **validation,
                "additionalValidationPolicy": {"issuers": issuers},
            },
        },
    }


def write_config(tmp_path: Path, *deployments: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"deployments": list(deployments)}))
    return path


def probe(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, dict[str, Any]]:
    """Run the CLI twice (text and --json): exit code, text output, JSON output."""
    code = main(["probe", "--config", str(config)])
    text = capsys.readouterr().out
    json_code = main(["probe", "--config", str(config), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert json_code == code
    assert SECRET not in text and SECRET not in json.dumps(data)
    return code, text, data


def failed_checks(data: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(endpoint, check, log message) of every ✘."""
    return [
        (e["endpoint"], c["check"], c["message"])
        for e in data["endpoints"]
        for c in e["checks"]
        if not c["ok"]
    ]


def server_message(config: Path, deployment: str) -> str:
    """What the server logs when it fetches this deployment's discovery document."""

    async def fetch() -> str:
        providers = Providers(load_config(config))
        discovery = providers.by_deployment[deployment].discovery
        assert discovery is not None
        try:
            with pytest.raises(IdpError) as failed:
                await discovery.document()
        finally:
            await providers.aclose()
        return failed.value.message

    return asyncio.run(fetch())


def marked(text: str, mark: str, check: str) -> list[str]:
    """The details printed on the ``mark`` (✔ or ✘) lines of ``check``, timings left out."""
    found = re.findall(rf"^  {mark} {re.escape(check)} +(.*?)(?:  [\d.]+ ms)?$", text, re.M)
    return [str(detail) for detail in found]


# -- healthy -----------------------------------------------------------------------------------------


def test_healthy_idp_is_all_green(
    idp: FaultyIdp, tmp_path: Path, secret_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Discovery (and the JWKS and introspection endpoint it names), a JWKS over TLS trusted
    through caFile, and a REMOTE_INTROSPECTION client: every line ✔, exit 0."""
    client = {"clientId": CLIENT_ID, "clientSecretFile": str(secret_file)}
    config = write_config(
        tmp_path,
        deployment(
            "discovered",
            {
                "type": "REMOTE_DISCOVERY",
                "uri": f"{idp.url}/.well-known/openid-configuration",
                "clientDetails": client,
            },
            [idp.issuer],
        ),
        deployment(
            "tls",
            {"type": "REMOTE_JWKS", "uri": f"{idp.https_url}/jwks", "caFile": str(idp.ca_file)},
            [idp.issuer],
        ),
        deployment(
            "opaque",
            {
                "type": "REMOTE_INTROSPECTION",
                "uri": f"{idp.url}/introspect",
                "clientDetails": {**client, "authMethod": "client_secret_post"},
            },
            [idp.issuer],
        ),
    )
    code, text, data = probe(config, capsys)
    assert code == 0, text
    assert data["ok"] is True and failed_checks(data) == []
    assert "✘" not in text
    assert text.rstrip().endswith("probe: 5 endpoint(s), all good")
    endpoints = [(e["endpoint"], e["uri"]) for e in data["endpoints"]]
    assert endpoints == [
        ("discovery", f"{idp.url}/.well-known/openid-configuration"),
        ("jwks_uri", f"{idp.url}/jwks"),  # named by the discovery document
        ("introspection_endpoint", f"{idp.url}/introspect"),  # likewise
        ("jwks_uri", f"{idp.https_url}/jwks"),
        ("introspection_endpoint", f"{idp.url}/introspect"),
    ]
    checks = {
        (e["endpoint"], e["uri"]): [c["check"] for c in e["checks"]] for e in data["endpoints"]
    }
    assert checks[endpoints[0]] == ["dns", "tcp", "http", "json", "issuer"]
    assert checks[endpoints[1]] == ["dns", "tcp", "http", "json", "keys"]
    assert checks[endpoints[2]] == ["dns", "tcp", "credentials", "http", "json", "introspection"]
    assert checks[endpoints[3]] == ["dns", "tcp", "tls", "http", "json", "keys"]
    tls = data["endpoints"][3]["checks"][2]
    assert tls["subject"] == "CN=faulty-idp.test" and "verified" in tls["detail"]
    assert (
        marked(text, "✔", "introspection")
        == ['{"active": false} for a made-up token: the credentials are accepted'] * 2
    )
    # The made-up token reached the IdP with the configured credentials, both auth methods.
    posted = idp.requests("/introspect")
    assert {r.form.get("token", "")[:15] for r in posted} == {"extauthz-probe-"}
    assert any(r.headers.get("authorization", "").startswith("Basic ") for r in posted)
    assert any(r.form.get("client_id") == CLIENT_ID for r in posted)


def test_probe_runs_as_a_command(idp: FaultyIdp, tmp_path: Path) -> None:
    """`python -m extauthz probe` as an operator runs it."""
    config = write_config(
        tmp_path, deployment("keys", {"type": "REMOTE_JWKS", "uri": f"{idp.url}/jwks"}, [])
    )
    done = run_extauthz("probe", "--config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "✔ keys" in done.stdout


# -- each fault, on its layer ------------------------------------------------------------------------


def jwks_config(tmp_path: Path, uri: str, **extra: Any) -> Path:
    return write_config(
        tmp_path, deployment("keys", {"type": "REMOTE_JWKS", "uri": uri, **extra}, [])
    )


def probe_fails(
    config: Path, capsys: pytest.CaptureFixture[str], *failed: tuple[str, str, str | None]
) -> tuple[str, dict[str, Any]]:
    """probe exits 1, and ``failed`` are its ✘ lines as (endpoint, check, log message), in order;
    the text output and the JSON."""
    code, text, data = probe(config, capsys)
    assert code == 1
    assert failed_checks(data) == list(failed)
    return text, data


def unreachable(uri: str, kind: str) -> str:
    """The contract's message for a JWKS the server cannot reach."""
    return f"Unable to connect to the jwks_uri uri: {uri}, {kind}. {CONNECT_HINT}"


def test_unresolvable_host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = "https://idp.does-not-exist.invalid/jwks"
    message = unreachable(uri, "DNS_FAILURE")
    text, _ = probe_fails(jwks_config(tmp_path, uri), capsys, ("jwks_uri", "dns", message))
    assert marked(text, "✘", "dns") and message in text


@pytest.mark.parametrize(
    ("where", "kind", "layers"),
    [
        pytest.param(
            lambda idp: f"http://127.0.0.1:{closed_port()}/jwks", "CONNECTION_REFUSED", ["dns", "tcp"],
            id="closed-port",
        ),
        pytest.param(
            lambda idp: f"{idp.url}/hang/jwks", "TIMEOUT", ["dns", "tcp", "http"], id="hang-is-a-timeout"
        ),
    ],
)
def test_the_probe_stops_at_the_layer_that_fails(
    idp: FaultyIdp,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    where: Callable[[FaultyIdp], str],
    kind: str,
    layers: list[str],
) -> None:
    """A refused connection fails tcp, a hang fails http (as a timeout); nothing past it is probed."""
    uri = where(idp)
    failed = ("jwks_uri", layers[-1], unreachable(uri, kind))
    _, data = probe_fails(jwks_config(tmp_path, uri), capsys, failed)
    assert [c["check"] for c in data["endpoints"][0]["checks"]] == layers


def test_server_error(idp: FaultyIdp, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"{idp.url}/broken/jwks"
    message = (
        f"Unexpected response from the jwks_uri uri: {uri}, received (500, Internal Server Error)."
    )
    text, _ = probe_fails(jwks_config(tmp_path, uri), capsys, ("jwks_uri", "http", message))
    assert "IDP-BODY-MARKER" not in text  # an IdP response body is never shown


def test_html_instead_of_json(
    idp: FaultyIdp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = jwks_config(tmp_path, f"{idp.url}/html/jwks")
    text, _ = probe_fails(config, capsys, ("jwks_uri", "json", PARSE))
    assert marked(text, "✔", "http") == ["200 OK, text/html"]
    assert marked(text, "✘", "json") == ["not JSON (content-type text/html)"]
    assert "IDP-BODY-MARKER" not in text


def test_discovery_issuer_mismatch(
    idp: FaultyIdp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"{idp.url}/.well-known/openid-configuration"
    config = write_config(
        tmp_path,
        deployment(
            "orders", {"type": "REMOTE_DISCOVERY", "uri": uri}, ["https://login.example.com"]
        ),
    )
    code, _, data = probe(config, capsys)
    assert code == 1
    message = server_message(config, "orders")
    assert idp.issuer in message or message == "Unable to parse response from Identity Provider"
    assert failed_checks(data) == [("discovery", "issuer", message)]
    issuer = data["endpoints"][0]["checks"][-1]
    assert (issuer["actual"], issuer["expected"]) == (idp.issuer, ["https://login.example.com"])
    # The JWKS it names is still probed.
    assert [e["endpoint"] for e in data["endpoints"]] == ["discovery", "jwks_uri"]


def test_empty_jwks(idp: FaultyIdp, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = jwks_config(tmp_path, f"{idp.url}/empty/jwks")
    text, _ = probe_fails(config, capsys, ("jwks_uri", "json", PARSE))
    assert "no usable signing keys" in marked(text, "✘", "json")[0]


def test_jwks_without_keys_for_the_allowed_algorithms(
    idp: FaultyIdp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = jwks_config(tmp_path, f"{idp.url}/ec/jwks", allowedAlgorithms=["RS256"])
    code, text, data = probe(config, capsys)
    assert code == 1
    [(endpoint, check, message)] = failed_checks(data)
    assert (endpoint, check) == ("jwks_uri", "keys")
    assert message is not None and "key_not_found or algorithm_not_allowed" in message
    assert '["RS256"]; the JWKS offers ["ES256"]' in marked(text, "✘", "keys")[0]


def test_wrong_client_secret_is_a_401(
    idp: FaultyIdp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "wrong-secret"
    wrong.write_text("not-the-secret")
    uri = f"{idp.url}/introspect"
    config = write_config(
        tmp_path,
        deployment(
            "opaque",
            {
                "type": "REMOTE_INTROSPECTION",
                "uri": uri,
                "clientDetails": {"clientId": CLIENT_ID, "clientSecretFile": str(wrong)},
            },
            [],
        ),
    )
    message = (
        f"Unexpected response from the introspection_endpoint uri: {uri}, "
        "received (401, Unauthorized)."
    )
    text, _ = probe_fails(config, capsys, ("introspection_endpoint", "http", message))
    assert "the IdP refuses the configured client credentials" in marked(text, "✘", "http")[0]
    assert "not-the-secret" not in text


def test_unreadable_client_secret(
    tmp_path: Path, idp: FaultyIdp, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path,
        deployment(
            "opaque",
            {
                "type": "REMOTE_INTROSPECTION",
                "uri": f"{idp.url}/introspect",
                "clientDetails": {
                    "clientId": CLIENT_ID,
                    "clientSecretEnv": "PROBE_TEST_UNSET_SECRET",
                },
            },
            [],
        ),
    )
    code, _, data = probe(config, capsys)
    assert code == 1
    [(_, check, message)] = failed_checks(data)
    assert check == "credentials"
    assert message == (
        "deployments[0].authentication.validationPolicy.clientDetails.clientSecretEnv: "
        "environment variable PROBE_TEST_UNSET_SECRET is not set"
    )


def test_self_signed_certificate(
    idp: FaultyIdp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"{idp.https_url}/jwks"
    message = unreachable(uri, "TLS_ERROR")
    text, _ = probe_fails(jwks_config(tmp_path, uri), capsys, ("jwks_uri", "tls", message))
    [tls_line] = marked(text, "✘", "tls")
    assert "certificate verify failed: self-signed certificate" in tls_line
    assert "the server presents: subject CN=faulty-idp.test, expires" in tls_line


def test_tls_verification_disabled_is_said(
    idp: FaultyIdp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = jwks_config(tmp_path, f"{idp.https_url}/jwks", isSslVerifyDisabled=True)
    code, text, _ = probe(config, capsys)
    assert code == 0, text
    assert "NOT verified (isSslVerifyDisabled)" in marked(text, "✔", "tls")[0]


def test_several_faults_each_on_its_own_endpoint(
    idp: FaultyIdp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path,
        deployment("good", {"type": "REMOTE_JWKS", "uri": f"{idp.url}/jwks"}, []),
        deployment("broken", {"type": "REMOTE_JWKS", "uri": f"{idp.url}/broken/jwks"}, []),
        deployment("html", {"type": "REMOTE_JWKS", "uri": f"{idp.url}/html/jwks"}, []),
    )
    code, text, data = probe(config, capsys)
    assert code == 1
    assert [e["ok"] for e in data["endpoints"]] == [True, False, False]
    assert text.rstrip().endswith("probe: 3 endpoint(s), 2 failed")


def test_config_error_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("deployments: [{name: x}]\n")
    assert main(["probe", "--config", str(bad)]) == 2
    assert "deployments[0]" in capsys.readouterr().err


def test_static_keys_need_no_probe(
    rsa_key: SigningKey, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path, deployment("static", {"type": "STATIC_KEYS", "keys": [rsa_key.public_jwk]}, [])
    )
    code, text, _ = probe(config, capsys)
    assert code == 0
    assert "static keys, nothing to probe: static" in text
