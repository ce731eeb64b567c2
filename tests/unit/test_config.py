"""Config parsing: YAML paths on every error, frozen resolved objects, defaults filled in."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from extauthz.config import ConfigError, load_config, parse_config
from extauthz.route_template import RouteTemplate

ROOT = Path(__file__).resolve().parents[2]


def deployment(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": "orders",
        "pathPrefix": "/orders",
        "authentication": {
            "type": "TOKEN_AUTHENTICATION",
            "validationPolicy": {"type": "REMOTE_JWKS", "uri": "https://idp.example.com/keys"},
        },
    }
    d.update(over)
    return d


def errors_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    return exc.value.errors


def test_defaults_are_resolved_and_frozen() -> None:
    cfg = parse_config({"deployments": [deployment()]})
    d = cfg.deployments[0]
    assert d.auth.token_header == "authorization"
    assert d.auth.token_auth_scheme == "Bearer"
    assert d.auth.keys.max_cache_seconds == 3600
    assert d.auth.keys.timeout_seconds == 5
    assert "none" not in d.auth.algorithms and "HS256" not in d.auth.algorithms
    assert cfg.server.deny_status_on_idp_failure == 500
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.name = "x"  # type: ignore[misc]


def test_five_distinct_mistakes_are_all_reported_with_paths() -> None:
    data = {
        "server": {"denyStatusOnIdpFailure": 404},
        "deployments": [
            deployment(
                pathPrefx="/typo",
                authentication={
                    "type": "TOKEN_AUTHENTICATION",
                    "validationPolicy": {
                        "type": "REMOTE_JWKS",
                        "uri": "idp.example.com/keys",
                        "allowedAlgorithms": ["none"],
                    },
                },
                routes=[{"path": "/{id", "authorization": {"type": "ANY_OF"}}],
            )
        ],
    }
    errors = errors_of(data)
    paths = [e.split(":", 1)[0] for e in errors]
    assert "server.denyStatusOnIdpFailure" in paths
    assert "deployments[0].pathPrefx" in paths
    assert "deployments[0].authentication.validationPolicy.uri" in paths
    assert "deployments[0].authentication.validationPolicy.allowedAlgorithms" in paths
    assert "deployments[0].routes[0].path" in paths
    assert "deployments[0].routes[0].authorization" in paths
    assert len(errors) >= 5


def test_unknown_key_is_an_error() -> None:
    errors = errors_of({"deployments": [deployment(hostz=["a"])]})
    assert errors == ["deployments[0].hostz: unknown key"]


def test_inline_client_secret_is_refused() -> None:
    d = deployment(
        authentication={
            "type": "TOKEN_AUTHENTICATION",
            "validationPolicy": {
                "type": "REMOTE_INTROSPECTION",
                "uri": "https://idp.example.com/introspect",
                "clientDetails": {"clientId": "rs", "clientSecret": "hunter2"},
            },
        }
    )
    (err,) = errors_of({"deployments": [d]})
    assert err.startswith("deployments[0].authentication.validationPolicy.clientDetails.clientSecret:")
    assert "hunter2" not in err


def test_hmac_and_none_are_never_allowed() -> None:
    for alg in ("HS256", "none", "NONE"):
        d = deployment()
        d["authentication"]["validationPolicy"]["allowedAlgorithms"] = [alg]
        (err,) = errors_of({"deployments": [d]})
        assert "allowedAlgorithms" in err and alg in err


def test_duplicate_deployment_names() -> None:
    (err,) = errors_of({"deployments": [deployment(), deployment(pathPrefix="/x")]})
    assert err.startswith("deployments:") and "orders" in err


def test_anonymous_route_needs_anonymous_access() -> None:
    (err,) = errors_of(
        {"deployments": [deployment(routes=[{"path": "/", "authorization": {"type": "ANONYMOUS"}}])]}
    )
    assert "isAnonymousAccessAllowed" in err


def test_legacy_jwt_authentication_resolves_to_the_same_shape(rsa_key: Any) -> None:
    cfg = parse_config(
        {
            "deployments": [
                {
                    "name": "legacy",
                    "pathPrefix": "/",
                    "authentication": {
                        "type": "JWT_AUTHENTICATION",
                        "issuers": ["https://idp"],
                        "audiences": ["api"],
                        "maxClockSkewInSeconds": 30,
                        "verifyClaims": [{"key": "tenant", "values": ["acme"], "isRequired": True}],
                        "publicKeys": {"type": "STATIC_KEYS", "keys": [rsa_key.public_jwk]},
                    },
                }
            ]
        }
    )
    auth = cfg.deployments[0].auth
    assert auth.style == "JWT_AUTHENTICATION"
    assert auth.log_event == "jwtAuthentication.authenticationFailed"
    assert auth.issuers == ("https://idp",) and auth.audiences == frozenset({"api"})
    assert auth.clock_skew == 30 and auth.keys.type == "STATIC_KEYS"


def test_static_private_key_is_refused(rsa_key: Any) -> None:
    import json

    from jwt.algorithms import RSAAlgorithm

    private = json.loads(RSAAlgorithm.to_jwk(rsa_key.private))
    d = deployment(
        authentication={
            "type": "TOKEN_AUTHENTICATION",
            "validationPolicy": {"type": "STATIC_KEYS", "keys": [private]},
        }
    )
    (err,) = errors_of({"deployments": [d]})
    assert "private" in err and '"d"' not in err


def test_verify_claims_values_become_json_text() -> None:
    d = deployment()
    d["authentication"]["validationPolicy"]["additionalValidationPolicy"] = {
        "verifyClaims": [{"key": "email_verified", "values": [True, 42]}]
    }
    rule = parse_config({"deployments": [d]}).deployments[0].auth.claims[0]
    assert rule.values == ("true", "42") and rule.is_required is False


@pytest.mark.parametrize(
    ("template", "path", "matches"),
    [
        ("/{id}", "/42", True),
        ("/{id}", "/42/items", False),
        ("/{id}", "/", False),
        ("/{id}/items/{rest*}", "/42/items/a/b", True),
        ("/{id}/items/{rest*}", "/42/items/", True),
        ("/files/{path*}", "/files/", True),
        ("/", "/", True),
        ("/a.b", "/aXb", False),
        # {name*} is zero or more segments: the template's own prefix is covered too.
        ("/admin/{rest*}", "/admin", True),
        ("/admin/{rest*}", "/admin/", True),
        ("/admin/{rest*}", "/adminx", False),
        ("/{id}/items/{rest*}", "/42/items", True),
        ("/{rest*}", "/", True),
        # Placeholders inside a segment: each takes at least one character.
        ("/{name}.{ext}", "/a.b", True),
        ("/{name}.{ext}", "/a.b.c", True),
        ("/{name}.{ext}", "/.b", False),
        ("/{name}.{ext}", "/a.", False),
        ("/{name}.{ext}", "/ab", False),
        ("/{a}{b}", "/x", False),
        ("/{a}{b}", "/xy", True),
        ("/v{n}/x", "/v2/x", True),
        ("/v{n}/x", "/v/x", False),
    ],
)
def test_route_templates(template: str, path: str, matches: bool) -> None:
    assert RouteTemplate.parse(template).matches(path) is matches


@pytest.mark.parametrize("template", ["/files{rest*}", "/{rest*}/x", "/a/{x*}.txt", "x", "/{a"])
def test_bad_route_templates(template: str) -> None:
    with pytest.raises(ValueError):
        RouteTemplate.parse(template)


def test_examples_pass_check_config() -> None:
    files = sorted((ROOT / "examples").glob("*.yaml"))
    assert files
    for f in files:
        load_config(f)


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run(
        [sys.executable, "-m", "extauthz", "check-config", str(ROOT / "examples" / "demo.yaml")],
        capture_output=True, text=True, env=env,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("\n") == 1 and "OK" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("deployments:\n  - name: x\n    pathPrefix: nope\n    extra: 1\n")
    res = subprocess.run(
        [sys.executable, "-m", "extauthz", "check-config", str(bad)],
        capture_output=True, text=True, env=env,
    )
    assert res.returncode == 2
    assert "deployments[0].pathPrefix:" in res.stderr
    assert "deployments[0].extra: unknown key" in res.stderr
    assert "deployments[0].authentication: Field required" in res.stderr
