"""The documentation against the code: what docs/ says exists, exists, and what exists is said.

Each test reads the code's own source of truth (the pydantic config models, the Reason enum, the
Prometheus registry, the argparse parser) and looks for every item in the page that documents it,
written as code (`` `name` ``). Links between the pages, and from the README, must lead to files
that exist and to headings that exist. And the repository stands alone: nothing outside tests/
points at a spec that lives outside it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import typing
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from extauthz import cli
from extauthz.config import _RawConfig, parse_config
from extauthz.decision import Reason
from extauthz.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def missing_as_code(names: set[str], page: Path) -> list[str]:
    text = read(page)
    return sorted(name for name in names if f"`{name}`" not in text)


# ---------------------------------------------------------------------------------------------
# docs/configuration.md: every key the config model accepts
# ---------------------------------------------------------------------------------------------


def _models_in(annotation: Any) -> Iterator[type[pydantic.BaseModel]]:
    """The pydantic models an annotation can hold: itself, union members, Annotated and
    container arguments."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        yield annotation
        return
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)


def config_keys() -> dict[str, set[str]]:
    """Every key the config file accepts (its alias, as written in YAML) → the models that
    accept it, walking from ``_RawConfig`` through every reachable model."""
    keys: dict[str, set[str]] = {}
    seen: set[type[pydantic.BaseModel]] = set()

    def walk(model: type[pydantic.BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, info in model.model_fields.items():
            keys.setdefault(info.alias or name, set()).add(model.__name__)
            for sub in _models_in(info.annotation):
                walk(sub)

    walk(_RawConfig)
    return keys


def test_the_key_walk_sees_every_part_of_the_model() -> None:
    """Union members, nested models and the legacy form are all reached (a walk that stopped at
    the first union would make the next test pass vacuously)."""
    keys = config_keys()
    reached = {"circuitBreaker", "failureThreshold", "publicKeys", "clientSecretEnv", "kty"}
    reached |= {"verifyClaims", "isRequired", "allowedScope", "format", "encodedSlashes"}
    assert reached <= set(keys), reached - set(keys)
    assert len(keys) >= 50


def test_configuration_documents_every_config_key() -> None:
    missing = missing_as_code(set(config_keys()), DOCS / "configuration.md")
    assert missing == [], f"docs/configuration.md does not mention as code: {missing}"


def yaml_blocks(markdown: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", markdown, flags=re.DOTALL)


def test_configuration_examples_are_valid_configs() -> None:
    """Every whole config file shown in docs/configuration.md passes the config model."""
    whole = []
    for block in yaml_blocks(read(DOCS / "configuration.md")):
        data = yaml.safe_load(block)
        if isinstance(data, dict) and "deployments" in data:
            parse_config(data, source="docs/configuration.md")  # raises ConfigError
            whole.append(block)
    assert whole, "docs/configuration.md shows no complete config file"


# ---------------------------------------------------------------------------------------------
# docs/decisions.md, docs/metrics.md, docs/logs.md
# ---------------------------------------------------------------------------------------------


def test_decisions_documents_every_reason() -> None:
    missing = missing_as_code({reason.value for reason in Reason}, DOCS / "decisions.md")
    assert missing == [], f"docs/decisions.md does not mention as code: {missing}"


def metric_names() -> set[str]:
    """The series names a scrape shows: a counter's family ``x`` is exposed as ``x_total``."""
    names = set()
    for family in Metrics().registry.collect():
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def test_metrics_documents_every_series() -> None:
    names = metric_names()
    assert "extauthz_checks_total" in names
    missing = missing_as_code(names, DOCS / "metrics.md")
    assert missing == [], f"docs/metrics.md does not mention as code: {missing}"


_EVENT = re.compile(
    r'"((?:server|config|routing|authentication|tokenAuthentication|jwtAuthentication|cache)'
    r'\.[a-z][A-Za-z]*)"'
)


def log_events() -> set[str]:
    """Every event name the code writes: the quoted ``area.name`` literals in extauthz/, and the
    failure events of both authentication types."""
    events = {"access", "tokenAuthentication.authenticationFailed"}
    events.add("jwtAuthentication.authenticationFailed")
    for source in (ROOT / "extauthz").rglob("*.py"):
        if "_pb" not in source.parts:
            events.update(_EVENT.findall(read(source)))
    return events


def test_logs_documents_every_event() -> None:
    events = log_events()
    assert {"server.started", "config.reloadFailed", "routing.requestAmbiguous"} <= events
    missing = missing_as_code(events, DOCS / "logs.md")
    assert missing == [], f"docs/logs.md does not mention as code: {missing}"


# ---------------------------------------------------------------------------------------------
# docs/cli.md: every subcommand and long option of the parser
# ---------------------------------------------------------------------------------------------


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_cli_documents_every_command_and_option() -> None:
    text = read(DOCS / "cli.md")
    commands = subcommands()
    assert {"serve", "check-config", "explain", "probe"} <= set(commands)
    missing = []
    for name, sub in commands.items():
        if f"`{name}`" not in text:
            missing.append(name)
        for action in sub._actions:
            for option in action.option_strings:
                # As code, alone or with its value: `--workers N`, `--json`.
                documented = re.search(rf"`{re.escape(option)}(?=[` =])", text)
                if option.startswith("--") and option != "--help" and not documented:
                    missing.append(f"{name} {option}")
    assert missing == [], f"docs/cli.md does not mention as code: {missing}"


# ---------------------------------------------------------------------------------------------
# Links: every relative link leads to a file, and every anchor to a heading
# ---------------------------------------------------------------------------------------------


def _without_code(markdown: str) -> str:
    markdown = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", markdown)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: formatting dropped, lower case, punctuation other than
    ``-`` and ``_`` removed, spaces as ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in ("L", "N"))
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", read(page), flags=re.DOTALL)
    found: set[str] = set()
    counts: dict[str, int] = {}
    for match in re.finditer(r"(?m)^#{1,6}\s+(.+?)\s*#*\s*$", text):
        base = slug(match.group(1))
        n = counts.get(base, 0)
        counts[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def links(page: Path) -> Iterator[str]:
    for match in _LINK.finditer(_without_code(read(page))):
        target = match.group(1)
        if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not ours
            yield target


def test_the_link_check_sees_links() -> None:
    """README.md links into docs/ (so the next test has something to check)."""
    readme = list(links(ROOT / "README.md"))
    assert any(t.startswith("docs/") for t in readme), readme
    assert slug("GitHub `anchor` with code") == "github-anchor-with-code"
    assert slug("The legacy `JWT_AUTHENTICATION` form") == "the-legacy-jwt_authentication-form"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in links(page):
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
            continue
        if not dest.is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert broken == [], f"{page.relative_to(ROOT)}: {broken}"


def test_readme_layout_names_every_module() -> None:
    """The README's Layout is a true map: every module of the package is on it."""
    readme = read(ROOT / "README.md")
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    package = ROOT / "extauthz"
    modules = [
        path.relative_to(package)
        for path in package.rglob("*.py")
        if "_pb" not in path.parts and path.name not in ("__init__.py", "__main__.py")
    ]
    missing = [
        str(m) for m in modules if f"`{m.name}`" not in layout and f"`extauthz/{m}`" not in layout
    ]
    assert missing == [], f"README.md's Layout does not name: {missing}"


# ---------------------------------------------------------------------------------------------
# The repository stands alone
# ---------------------------------------------------------------------------------------------

# Built, not written out: this file would otherwise hold what it looks for.
_OUTSIDE = ("/".join(("..", "sha" + "red", "")), "CONTRACT" + ".md")


def tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = []
    for name in out.decode().split("\0"):
        path = ROOT / name
        if not name or name.startswith("tests/") or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary
        files.append(path)
    return files


def test_no_file_points_outside_the_repository() -> None:
    """No tracked file but the tests names the internal spec or a path beside the repository: a
    user who clones it has neither. (Tests may, to check exactly this.)"""
    offenders = []
    for path in tracked_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for needle in _OUTSIDE:
            for number, line in enumerate(text.splitlines(), 1):
                if needle in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert offenders == [], "\n".join(offenders)
