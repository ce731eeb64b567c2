"""Route selection, differentially: extauthz against a reference written from the documented rules.

What this proves: for every one of more than 2,000 generated requests (hosts in every case, with
ports, trailing dots, userinfo and two ports; paths with every spelling of dot segments, empty
segments, trailing slashes, backslashes, percent signs good and bad, encoded slashes, control
characters, unicode, query strings and fragments; every method; Envoy ``context_extensions``),
extauthz chooses exactly the deployment and route, or the ``request_ambiguous`` or
``no_matching_policy`` denial, that ``select_route`` chooses. ``select_route`` is a plain, slow
reading of the documented route-selection rules, written without looking at extauthz's code.

The requests are sent two ways:

- straight over gRPC to a real ``extauthz serve`` (one CheckRequest each, all in flight at once);
- through the real Envoy with the shipped ``envoy/envoy.yaml``, over raw HTTP/1.1 so that each
  path reaches Envoy exactly as written. Envoy may normalize a path, redirect or reject a request
  before extauthz sees it; for every request extauthz did decide, the reference applied to what
  Envoy forwarded (the path extauthz logged, the Host sent, and the ``orders`` deployment that
  Envoy's ``/orders`` route names) gives the same decision. Every request that reached the echo
  upstream was for a host and a path that the deployment extauthz allowed it under covers.

Where the docs leave room, the reference reads them so: the path is matched as written, so a
trailing slash is a last, empty segment that ``{name}`` (non-empty) never matches and ``{name*}``
does (``/{id}`` covers ``/7``, not ``/7/``); the path equal to a pathPrefix is ``/`` below it; a
control character is any of Unicode's (C0, DEL, C1); a no_matching_policy failure line's
``deployment`` is compared when the line has one.

No request carries a token, so the choice shows from outside (``routing_policy.yaml``): an
anonymous deployment allows (its name and route in the dynamic metadata and the access line), a
token deployment denies 401 ``token_missing`` with ``Bearer realm="<deployment>"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import random
import re
import socket
import subprocess
import sys
import unicodedata
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import pytest
import yaml

from extauthz._pb.envoy.service.auth.v3 import external_auth_pb2 as ext
from extauthz.config import parse_config
from tests.check_requests import check_request as build_check_request
from tests.conftest import SigningKey
from tests.integration.serverproc import ExtauthzProcess, free_port, stop_process

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples"))

from stack import (  # noqa: E402 (examples/ is no package)
    Ports,
    accepts_tcp,
    find_envoy,
    render_envoy_config,
)

from tests.waiting import TimedOut, wait_until  # noqa: E402

POLICY = Path(__file__).with_name("routing_policy.yaml")
SHIPPED_ENVOY_CONFIG = REPO / "envoy" / "envoy.yaml"
CORPUS_SEED = 20261205
RANDOM_CASES = 2_400
AMBIGUOUS = "request_ambiguous"
NO_MATCH = "no_matching_policy"
TOKEN_MISSING = "token_missing"
ALLOWED = "allowed"  # stands for the reason of an allowed request, which has none
SHOWN_DISAGREEMENTS = 30


# -- the policy, as the reference reads it -------------------------------------------------------


@dataclass(frozen=True)
class Route:
    name: str | None  # None: the implicit route of a deployment without routes (its name unused)
    template: str
    methods: frozenset[str] | None  # None: any method


@dataclass(frozen=True)
class Deployment:
    name: str
    hosts: tuple[str, ...]
    path_prefix: str
    routes: tuple[Route, ...]
    anonymous: bool  # isAnonymousAccessAllowed: a request without a token is allowed


def deployments_of(policy: Mapping[str, Any]) -> list[Deployment]:
    """The deployments of a policy file; one without routes covers every path, any method."""
    found = []
    for raw in policy["deployments"]:
        routes = tuple(
            Route(
                name=str(route.get("name", index)),  # a route's name defaults to its index
                template=route["path"],
                methods=frozenset(route["methods"]) if "methods" in route else None,
            )
            for index, route in enumerate(raw.get("routes", ()))
        )
        found.append(
            Deployment(
                name=raw["name"],
                hosts=tuple(raw.get("hosts", ())),
                path_prefix=raw["pathPrefix"],
                routes=routes or (Route(None, "/{rest*}", None),),
                anonymous=bool(raw["authentication"].get("isAnonymousAccessAllowed", False)),
            )
        )
    return found


# -- the reference: route selection as the docs word it ------------------------------------------


@dataclass(frozen=True)
class Selection:
    """What route selection decides: ``reason`` AMBIGUOUS or NO_MATCH, or a deployment's route."""

    reason: str | None
    deployment: Deployment | None = None
    route: Route | None = None
    rule: str = ""  # the rule that decided, for the disagreement table


def path_without_query(raw_path: str) -> str:
    """The path as matched: the query string and the fragment dropped."""
    return re.split(r"[?#]", raw_path, maxsplit=1)[0]


def is_control_character(char: str) -> bool:
    """Unicode's control characters (category Cc): C0, DEL and C1 (U+0080 to U+009F)."""
    return unicodedata.category(char) == "Cc"


def not_in_normal_form(path: str, *, keep_encoded_slashes: bool = False) -> str | None:
    """Why ``path`` (query and fragment already dropped) is not in normal form, or None."""
    if any(is_control_character(char) for char in path):
        return "control character"
    if "\\" in path:
        return "backslash"
    if re.search(r"%(?![0-9A-Fa-f]{2})", path):
        return "percent sign without two hex digits"
    if re.search(r"%5c", path, re.IGNORECASE):
        return "encoded backslash"
    if not keep_encoded_slashes and re.search(r"%2f", path, re.IGNORECASE):
        return "encoded slash"
    segments = path.split("/")[1:]
    if segments[-1:] == [""]:
        segments = segments[:-1]  # one trailing slash is fine
    if "" in segments:
        return "empty segment"
    if any(unquote_to_bytes(segment) in (b".", b"..") for segment in segments):
        return "dot segment"
    return None


# A host with an optional port: a DNS name or IPv4 address (as the corpus writes them), or an IP
# literal in brackets, then at most one port.
_HOST_AND_PORT = re.compile(
    r"(?P<host>[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)


def host_of(authority: str) -> str | None:
    """The host route selection matches: lower-cased, no port, without one trailing dot; None
    when the authority is not a host with an optional port."""
    written = _HOST_AND_PORT.fullmatch(authority)
    if written is None:
        return None
    host = written.group("host").lower()
    return host[:-1] if host.endswith(".") else host


def wildcard_suffix_matches(pattern: str, host: str) -> bool:
    """``*.example.com`` matches ``a.example.com`` and ``a.b.example.com``, not ``example.com``."""
    suffix = pattern[1:]  # ".example.com"
    return host.endswith(suffix) and len(host) > len(suffix)


def host_groups(host: str, deployments: Sequence[Deployment]) -> list[list[Deployment]]:
    """Deployments in the order hosts are tried: the exact host, then each matching wildcard,
    longest suffix first, then the deployments without hosts."""
    exact = [d for d in deployments if host in d.hosts]
    by_suffix: dict[str, list[Deployment]] = {}
    for d in deployments:
        for pattern in d.hosts:
            if pattern.startswith("*.") and wildcard_suffix_matches(pattern, host):
                by_suffix.setdefault(pattern[1:], []).append(d)
    wildcards = [by_suffix[suffix] for suffix in sorted(by_suffix, key=len, reverse=True)]
    hostless = [d for d in deployments if not d.hosts]
    return [exact, *wildcards, hostless]


def is_under(path: str, prefix: str) -> bool:
    """Whole segments: ``/orders`` holds ``/orders`` and ``/orders/7``, not ``/ordersX``."""
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


def segments_of(path: str) -> list[str]:
    """The path as written, cut at each ``/``: ``/a/b`` is ``[a, b]``, and a trailing slash is a
    last, empty segment (``/a/`` is ``[a, ""]``, ``/`` is ``[""]``): the path is matched exactly,
    never rewritten, so ``/7/`` is not ``/7``."""
    return path.split("/")[1:]


_VARIABLE = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
_REST = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\*\}")


def segment_matches(template_segment: str, segment: str) -> bool:
    """Literal text exactly (case and percent-encoding included); each ``{name}`` non-empty."""
    literals = _VARIABLE.split(template_segment)
    pattern = ".+".join(re.escape(literal) for literal in literals)
    return re.fullmatch(pattern, segment, re.DOTALL) is not None


def template_matches(template: str, path: str) -> bool:
    """``{name}`` is one non-empty segment, ``{name*}`` zero or more, the empty last one of a
    trailing slash included (so ``/admin/{rest*}`` covers ``/admin``, ``/admin/`` and
    ``/admin/x/y``, while ``/{id}`` covers ``/7`` but not ``/7/``)."""
    wanted, given = segments_of(template), segments_of(path)
    for index, part in enumerate(wanted):
        if _REST.fullmatch(part):
            assert index == len(wanted) - 1, f"{template}: {{name*}} ends a template"
            return True
        if index >= len(given) or not segment_matches(part, given[index]):
            return False
    return len(given) == len(wanted)


def select_route(
    authority: str,
    raw_path: str,
    method: str,
    context_extensions: Mapping[str, str] | None,
    deployments: Sequence[Deployment],
) -> Selection:
    """The documented route selection, step by step."""
    # 1. The request must be unambiguous, before anything else.
    path = path_without_query(raw_path)
    flaw = not_in_normal_form(path)
    if flaw is not None:
        return Selection(AMBIGUOUS, rule=f"path: {flaw}")
    host = host_of(authority)
    if host is None:
        return Selection(AMBIGUOUS, rule="authority is not host[:port]")
    # 3. A deployment named by Envoy wins over host and path matching.
    named = (context_extensions or {}).get("deployment")
    if named is not None:
        chosen = next((d for d in deployments if d.name == named), None)
        if chosen is None:
            return Selection(
                NO_MATCH, rule=f"context_extensions name {named!r}: no such deployment"
            )
        rule = f"context_extensions {named!r}"
    else:
        # 2. Hosts before paths, most specific host first; the longest prefix in that group.
        chosen, rule = None, "no deployment covers host and path"
        for group in host_groups(host, deployments):
            covering = [d for d in group if is_under(path, d.path_prefix)]
            if covering:
                longest = max(len(d.path_prefix) for d in covering)
                (chosen,) = [d for d in covering if len(d.path_prefix) == longest]
                rule = f"host group of {chosen.name!r}"
                break
        if chosen is None:
            return Selection(NO_MATCH, rule=rule)
    # Templates below the prefix when the path is under it, else against the whole path. The
    # prefix itself is the root below it: /orders and /orders/ are both "/" below /orders.
    if is_under(path, chosen.path_prefix):
        below = path if chosen.path_prefix == "/" else path[len(chosen.path_prefix) :] or "/"
    else:
        below = path
    # 4. The first route whose path and methods match.
    for route in chosen.routes:
        if template_matches(route.template, below) and (
            route.methods is None or method in route.methods
        ):
            return Selection(None, chosen, route, rule)
    return Selection(NO_MATCH, chosen, rule=f"{rule}; no route for {method} {below!r}")


# -- what a selection looks like from outside ----------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """A decision as Envoy's client and extauthz's log show it."""

    status: int
    reason: str  # ALLOWED, or the x-extauthz-reason
    deployment: str | None  # None: a no_matching_policy line that names none (not compared)
    route: str | None  # None: not compared
    realm: str | None  # of www-authenticate, when there is one

    def __str__(self) -> str:
        deployment = "(not named)" if self.deployment is None else self.deployment or "-"
        shown = f"{self.status} {self.reason} {deployment}"
        if self.route is not None:
            shown += f"/{self.route}"
        return shown + (f" realm={self.realm}" if self.realm is not None else "")


def expected_outcome(selection: Selection) -> Outcome:
    if selection.reason == AMBIGUOUS:
        return Outcome(400, AMBIGUOUS, "", None, None)
    chosen = selection.deployment
    if selection.reason == NO_MATCH:
        return Outcome(403, NO_MATCH, chosen.name if chosen else "", None, None)
    assert chosen is not None and selection.route is not None
    route = selection.route.name
    if chosen.anonymous:
        return Outcome(200, ALLOWED, chosen.name, route, None)
    return Outcome(401, TOKEN_MISSING, chosen.name, route, chosen.name)


def agrees(expected: Outcome, observed: Outcome) -> bool:
    """The same decision, deployment, realm and (where the reference names one) route."""
    if expected.route is None:
        observed = dataclasses.replace(observed, route=None)
    if observed.deployment is None:
        expected = dataclasses.replace(expected, deployment=None)
    return expected == observed


def realm_of(www_authenticate: str | None) -> str | None:
    if not www_authenticate:
        return None
    found = re.search(r'realm="([^"]*)"', www_authenticate)
    return found.group(1) if found else www_authenticate


# -- the corpus ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    authority: str
    path: str
    method: str
    context_extensions: tuple[tuple[str, str], ...] = ()
    kinds: frozenset[str] = frozenset()

    @property
    def extensions(self) -> dict[str, str]:
        return dict(self.context_extensions)

    def sendable_over_http1(self) -> bool:
        """Only what a raw HTTP/1.1 request can carry as it is: no CR or LF anywhere, no control
        character or surrounding whitespace in the Host (a parser would trim that), and no
        context_extensions (Envoy sets those itself)."""
        return (
            not self.context_extensions
            and "\r" not in self.path
            and "\n" not in self.path
            and not any(is_control_character(char) for char in self.authority)
            and self.authority == self.authority.strip()
        )


HOSTS = (
    "api.example.com",
    "shop.example.com",
    "www.example.com",
    "v1.api.example.com",
    "a.b.api.example.com",
    "example.com",
    "evilexample.com",
    "api.example.com.evil.test",
    "example.org",
    "a.example.org",
    "other.test",
    "localhost",
    "127.0.0.1",
    "[::1]",
)
PREFIXES = (
    "",
    "/api",
    "/api/admin",
    "/api/v2",
    "/orders",
    "/orders/archive",
    "/public",
    "/reports",
    "/apix",
    "/Api",
    "/publicity",
    "/ordersX",
    "/admin",
    "/items",
)
SEGMENTS = (
    "items", "7", "42", "users", "search", "admin", "orders", "archive", "v1", "2024", "x",
    "a.b", "file.json", "report.pdf", ".hidden", "trailing.", "...", "é", "日本", "💡",
    "%41", "%7E", "a%20b", "x%2ey", "%2e%2e%2e", "~user", "a+b", "a:b", "@", "!$&'()*,;=",
)  # fmt: skip
DOT_SEGMENTS = (".", "..", "%2e", "%2E", ".%2e", "%2e.", "%2E%2E", "%2e%2E", ".%2E", "%2E.")
BAD_PERCENTS = ("%", "%zz", "%4", "%g1", "%%41", "%2", "%-1")
QUERIES = ("?a=1", "?x=/../y", "?%zz", "?q=%2f", "?", "?a=b#frag", "?\\", "?//", "?a=%00")
FRAGMENTS = ("#frag", "#/../admin", "#", "#%zz", "#?a=1")
CONTROL_CHARACTERS = ("\x00", "\x01", "\t", "\x1f", "\x7f", "\n", "\r\n", "\x85")  # NEL: C1
METHODS = ("GET",) * 8 + ("POST", "POST", "PUT", "DELETE", "PATCH", "HEAD", "HEAD", "OPTIONS")
NAMED_DEPLOYMENTS = ("orders", "orders", "exact-api", "shop", "wildcard-reports", "no-such-one")


def _mutated_host(rng: random.Random, kinds: set[str]) -> str:
    host = rng.choice(HOSTS)
    if rng.random() < 0.3:
        host = "".join(c.upper() if rng.random() < 0.5 else c for c in host)
        kinds.add("host case")
    if rng.random() < 0.15 and not host.endswith("]"):
        host += "."
        kinds.add("trailing dot")
    if rng.random() < 0.3:
        host += ":" + rng.choice(("80", "8080", "443", "65535", "1"))
        kinds.add("port")
    if rng.random() < 0.14:
        flaw = rng.choice(("userinfo", "userinfo", "two ports", "space", "control", "bad port"))
        kinds.add(f"authority {flaw}")
        if flaw == "userinfo":
            host = rng.choice(("x@", "user:pw@", "@", "api.example.com@")) + host
        elif flaw == "two ports":
            host += rng.choice((":1:2", ":80:80", ":443:8080"))
        elif flaw == "space":
            at = rng.randrange(len(host) + 1)
            host = host[:at] + " " + host[at:]
        elif flaw == "control":
            at = rng.randrange(len(host) + 1)
            host = host[:at] + rng.choice(("\t", "\x00", "\x7f")) + host[at:]
        else:
            host += rng.choice((":abc", ":8o", ":-1"))
    return host


def _insert_segment(rng: random.Random, path: str, segment: str) -> str:
    slashes = [i for i, c in enumerate(path) if c == "/"]
    at = rng.choice(slashes)
    return path[: at + 1] + segment + "/" + path[at + 1 :]


def _into_a_segment(rng: random.Random, path: str, text: str) -> str:
    at = rng.randrange(1, len(path) + 1)
    return path[:at] + text + path[at:]


def _mutated_path(rng: random.Random, kinds: set[str]) -> str:
    prefix = rng.choice(PREFIXES)
    tail = [rng.choice(SEGMENTS) for _ in range(rng.choice((0, 1, 1, 2, 2, 3)))]
    path = "/".join([prefix, *tail]) if tail else prefix or "/"
    if not path.startswith("/"):
        path = "/" + path
    if any(not s.isascii() for s in tail):
        kinds.add("unicode")
    if "%" in "".join(tail):
        kinds.add("percent-encoded character")
    for _ in range(rng.choice((0, 1, 1, 2))):
        mutation = rng.random()
        if mutation < 0.18:
            path += "/"
            kinds.add("trailing slash")
        elif mutation < 0.27:
            path = _insert_segment(rng, path, "")
            kinds.add("empty segment")
        elif mutation < 0.42:
            path = _insert_segment(rng, path, rng.choice(DOT_SEGMENTS))
            kinds.add("dot segment")
        elif mutation < 0.47:
            path = rng.choice((path.replace("/", "\\", 1), _into_a_segment(rng, path, "\\")))
            kinds.add("backslash")
        elif mutation < 0.52:
            path = _into_a_segment(rng, path, rng.choice(("%5c", "%5C")))
            kinds.add("encoded backslash")
        elif mutation < 0.58:
            path = _into_a_segment(rng, path, rng.choice(("%2f", "%2F")))
            kinds.add("encoded slash")
        elif mutation < 0.64:
            path = _into_a_segment(rng, path, rng.choice(BAD_PERCENTS))
            kinds.add("bad percent")
        elif mutation < 0.74:
            segments = path.split("/")
            at = rng.randrange(len(segments))
            segments[at] = segments[at].swapcase()
            path = "/".join(segments)
            kinds.add("path case")
        elif mutation < 0.78:
            path = _into_a_segment(rng, path, rng.choice(CONTROL_CHARACTERS))
            kinds.add("control character")
        elif mutation < 0.81:
            path = _into_a_segment(rng, path, " ")
            kinds.add("space")
        elif mutation < 0.86:
            path = _into_a_segment(rng, path, rng.choice(("é", "日本", "%C3%A9", "ü")))
            kinds.add("unicode")
    if rng.random() < 0.15:
        path += rng.choice(QUERIES)
        kinds.add("query")
    if rng.random() < 0.06:
        path += rng.choice(FRAGMENTS)
        kinds.add("fragment")
    return path


def random_case(rng: random.Random) -> Case:
    kinds: set[str] = set()
    authority = _mutated_host(rng, kinds)
    path = _mutated_path(rng, kinds)
    method = rng.choice(METHODS)
    extensions: tuple[tuple[str, str], ...] = ()
    if rng.random() < 0.12:
        extensions = (("deployment", rng.choice(NAMED_DEPLOYMENTS)),)
        kinds.add("context_extensions")
    return Case(authority, path, method, extensions, frozenset(kinds))


# Requests written out for each rule the docs state, so that none depends on the dice.
LANDMARKS: tuple[tuple[str, str, str, dict[str, str] | None], ...] = (
    ("shop.example.com", "/admin", "POST", None),  # /admin/{rest*} covers /admin
    ("shop.example.com", "/admin/", "POST", None),  # ... and /admin/
    ("shop.example.com", "/admin/x/y", "GET", None),  # ... and everything below
    ("shop.example.com", "/admin", "GET", None),  # an earlier route /{id} takes it first
    ("shop.example.com", "/a.b", "GET", None),  # /{name}.{ext}
    ("shop.example.com", "/a%2eb", "GET", None),  # no literal dot: /{id}
    ("shop.example.com", "/.b", "GET", None),  # {name} is not empty: /{id}
    ("shop.example.com", "/7", "DELETE", None),  # no route allows DELETE
    ("shop.example.com", "/api/items/7", "GET", None),  # the host's catch-all wins over /api
    ("shop.example.com", "/", "GET", None),
    ("api.example.com", "/api/items", "GET", None),  # exact host over wildcard and host-less
    ("API.Example.COM.:8443", "/api/items/7", "HEAD", None),
    ("api.example.com", "/api/items/7", "DELETE", None),  # methods restrict the route
    ("api.example.com", "/api/admin/users/1", "DELETE", None),  # the longer prefix
    ("api.example.com", "/api/admin", "POST", None),
    ("api.example.com", "/api/v2/x", "GET", None),  # not the wildcard's longer /api/v2
    ("api.example.com", "/apix/items", "GET", None),  # whole segments only
    ("api.example.com", "/api/search", "POST", None),
    ("api.example.com", "/api/search/a/b/c", "GET", None),
    ("www.example.com", "/api/v2/x/y", "PUT", None),  # the wildcard group's longest prefix
    ("www.example.com", "/api/x", "GET", None),
    ("v1.api.example.com", "/api/v1/x", "GET", None),  # the longest wildcard suffix first
    ("v1.api.example.com", "/reports/2024/a.pdf", "GET", None),  # next wildcard group
    ("a.b.api.example.com", "/reports", "GET", None),  # unnamed route: its index
    ("example.com", "/api/x", "GET", None),  # *.example.com needs one more label
    ("evilexample.com", "/api/x", "GET", None),
    ("api.example.com.evil.test", "/api/items", "GET", None),
    ("example.org", "/anything", "PATCH", None),
    ("deep.a.example.org:80", "/", "GET", None),
    ("other.test", "/orders", "POST", None),
    ("other.test", "/orders/", "POST", None),
    ("other.test", "/orders/7", "GET", None),
    ("other.test", "/orders/7/items", "GET", None),
    ("other.test", "/orders/archive/7", "GET", None),
    ("other.test", "/ordersX/7", "GET", None),
    ("other.test", "/public", "DELETE", None),
    ("other.test", "/publicity", "GET", None),
    ("other.test", "/public/a?b=/../c#d", "GET", None),
    ("other.test", "/public/a#/../b", "GET", None),
    ("other.test", "/public//a", "GET", None),
    ("other.test", "/public/a//", "GET", None),
    ("other.test", "/public/%2e%2E/a", "GET", None),
    ("other.test", "/public/.%2e", "GET", None),
    ("other.test", "/public/a\\b", "GET", None),
    ("other.test", "/public/a%5Cb", "GET", None),
    ("other.test", "/public/a%2fb", "GET", None),
    ("other.test", "/public/a%zz", "GET", None),
    ("other.test", "/public/100%", "GET", None),
    ("other.test", "/public/a\x00b", "GET", None),
    ("other.test", "/public/a\x85b", "GET", None),  # NEXT LINE, a C1 control character
    ("other.test", "/public/caf%C3%A9/日本", "GET", None),
    ("x@other.test", "/public", "GET", None),
    ("other.test:1:2", "/public", "GET", None),
    ("other .test", "/public", "GET", None),
    ("[::1]:8443", "/public", "GET", None),
    ("127.0.0.1:8080", "/public/x", "GET", None),
    ("other.test", "/orders/archive/7", "GET", {"deployment": "orders"}),
    ("shop.example.com", "/7", "GET", {"deployment": "orders"}),  # not under /orders: whole path
    ("other.test", "/items/7", "GET", {"deployment": "exact-api"}),
    ("other.test", "/api/items/7", "GET", {"deployment": "exact-api"}),
    ("other.test", "/public", "GET", {"deployment": "no-such-one"}),
    ("x@other.test", "/orders/7", "GET", {"deployment": "orders"}),  # ambiguous first
    ("other.test", "/orders/../public", "GET", {"deployment": "orders"}),
)


def corpus() -> list[Case]:
    """The landmarks, then RANDOM_CASES generated ones; the same list on every run."""
    cases = [
        Case(a, p, m, tuple(sorted((x or {}).items())), frozenset({"landmark"}))
        for a, p, m, x in LANDMARKS
    ]
    rng = random.Random(CORPUS_SEED)
    cases += [random_case(rng) for _ in range(RANDOM_CASES)]
    return cases


CORPUS = corpus()


# -- the disagreement table ----------------------------------------------------------------------


@dataclass
class Disagreement:
    via: str
    case: Case
    expected: str
    observed: str
    rule: str
    forwarded: str = ""  # what Envoy forwarded, when it differs from what was sent
    kind: str = ""  # which part differs, for the summary


def difference(expected: Outcome, observed: Outcome) -> str:
    """What kind of disagreement: another decision, or the same one for another deployment..."""
    if expected.reason != observed.reason:
        return f"reference {expected.reason}, extauthz {observed.reason}"
    parts = [
        name
        for name in ("status", "deployment", "route", "realm")
        if getattr(expected, name) != getattr(observed, name)
        and not (name == "route" and expected.route is None)
    ]
    return f"{expected.reason}: other {' and '.join(parts)}"


def table(disagreements: Sequence[Disagreement], total: int) -> str:
    kinds = Counter(f"{d.via}: {d.kind}" for d in disagreements)
    lines = [
        f"{len(disagreements)} of {total} requests disagree with the reference:",
        *(f"  {count:5d}  {kind}" for kind, count in kinds.most_common()),
        "",
        "via   | method  | authority | path (-> forwarded) | ctx | reference | extauthz | rule",
    ]
    for d in disagreements[:SHOWN_DISAGREEMENTS]:
        ctx = d.case.extensions.get("deployment", "")
        path = repr(d.case.path) + (f" -> {d.forwarded!r}" if d.forwarded else "")
        lines.append(
            f"{d.via:5} | {d.case.method:7} | {d.case.authority!r} | {path} | {ctx} | "
            f"{d.expected} | {d.observed} | {d.rule}"
        )
    return "\n".join(lines)


# -- the processes -------------------------------------------------------------------------------


def policy_with_key(public_jwk: Mapping[str, Any]) -> dict[str, Any]:
    """routing_policy.yaml with the public key in every validation policy (no anchors left)."""
    policy: dict[str, Any] = json.loads(json.dumps(yaml.safe_load(POLICY.read_text())))
    for deployment in policy["deployments"]:
        deployment["authentication"]["validationPolicy"]["keys"] = [dict(public_jwk)]
    return policy


@pytest.fixture(scope="module")
def policy(rsa_key: SigningKey) -> dict[str, Any]:
    written = policy_with_key(rsa_key.public_jwk)
    parse_config(written, str(POLICY))  # a policy mistake fails here, with its YAML path
    return written


@pytest.fixture(scope="module")
def deployments(policy: dict[str, Any]) -> list[Deployment]:
    return deployments_of(policy)


@pytest.fixture(scope="module")
def extauthz(
    policy: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ExtauthzProcess]:
    with ExtauthzProcess(policy, tmp_path_factory.mktemp("route-differential")) as server:
        yield server


def _envoy_is_live(admin_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as ready:
            return ready.status == 200 and ready.read().strip() == b"LIVE"
    except (OSError, urllib.error.URLError):
        return False


def _wait_until_ready(
    process: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    what: str,
    log: Path,
    timeout: float = 30.0,
) -> None:
    """Until ``ready()``; fail with the log's tail if the process exits first or the time is up."""
    with contextlib.suppress(TimedOut):  # then the process's log says why
        wait_until(lambda: process.poll() is not None or ready(), timeout=timeout, what=what)
    if process.poll() is not None or not ready():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise AssertionError(f"{what} not ready (exit {process.poll()}):\n{tail}")


@dataclass
class Gateway:
    """The shipped Envoy config, rendered on free ports, in front of the extauthz under test."""

    port: int
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)


@pytest.fixture(scope="module")
def gateway(
    extauthz: ExtauthzProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("route-differential-envoy")
    ports = dataclasses.replace(
        Ports.free(), extauthz=extauthz.port, extauthz_admin=extauthz.admin_port
    )
    envoy_config = workdir / "envoy.yaml"
    envoy_config.write_text(
        render_envoy_config(
            SHIPPED_ENVOY_CONFIG.read_text(),
            ports,
            listen_address="127.0.0.1",
            otlp_endpoint=f"127.0.0.1:{free_port()}",  # nobody listens: spans are dropped
        )
    )
    started = Gateway(ports.envoy)
    try:
        upstream_log = workdir / "upstream.log"
        with upstream_log.open("wb") as out:
            upstream = subprocess.Popen(
                [sys.executable, str(REPO / "examples" / "upstream.py"), str(ports.upstream)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        started.processes.append(upstream)
        _wait_until_ready(upstream, lambda: accepts_tcp(ports.upstream), "upstream", upstream_log)
        envoy_log = workdir / "envoy.log"
        with envoy_log.open("wb") as out:
            envoy = subprocess.Popen(
                [
                    find_envoy(), "-c", str(envoy_config), "--base-id", str(ports.envoy_admin),
                    "--concurrency", "2", "--log-level", "warn",
                ],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        started.processes.append(envoy)
        _wait_until_ready(envoy, lambda: _envoy_is_live(ports.envoy_admin), "Envoy", envoy_log)
        yield started
    finally:
        for process in reversed(started.processes):
            stop_process(process)


# -- sending -------------------------------------------------------------------------------------


def check_request(case: Case, request_id: str) -> ext.CheckRequest:
    """The CheckRequest Envoy would send for the case, pseudo-headers included."""
    pseudo = {":authority": case.authority, ":path": case.path, ":method": case.method}
    return build_check_request(
        case.path,
        method=case.method,
        host=case.authority,
        headers=pseudo,
        request_id=request_id,
        context_extensions=case.extensions,
    )


def outcome_of(response: ext.CheckResponse) -> Outcome:
    metadata = response.dynamic_metadata.fields
    deployment = metadata["deployment"].string_value if "deployment" in metadata else ""
    route = metadata["route"].string_value if "route" in metadata else ""
    if response.status.code == 0 and response.HasField("ok_response"):
        return Outcome(200, ALLOWED, deployment, route, None)
    headers = {h.header.key.lower(): h.header.value for h in response.denied_response.headers}
    return Outcome(
        int(response.denied_response.status.code),
        headers.get("x-extauthz-reason", f"(grpc {response.status.code})"),
        deployment,
        route,
        realm_of(headers.get("www-authenticate")),
    )


def check_all(
    server: ExtauthzProcess, cases: Sequence[tuple[str, Case]]
) -> list[ext.CheckResponse]:
    """Each (request id, case) over one channel, a few hundred in flight at a time."""
    responses: list[ext.CheckResponse] = []
    for start in range(0, len(cases), 400):
        futures = [
            server.stub.Check.future(check_request(case, request_id), timeout=30)
            for request_id, case in cases[start : start + 400]
        ]
        responses += [future.result() for future in futures]
    return responses


@dataclass
class Answer:
    """Envoy's HTTP response to one raw request (status 0: the connection closed unanswered)."""

    status: int
    headers: dict[str, str]
    body: bytes

    def echo(self) -> dict[str, Any] | None:
        """The echo upstream's description of the request it received, if this is one."""
        if self.status != 200 or not self.body.startswith(b"{"):
            return None
        try:
            echoed = json.loads(self.body)
        except ValueError:
            return None
        return echoed if isinstance(echoed, dict) and "path" in echoed else None


class RawHttp:
    """HTTP/1.1 keep-alive over a plain socket: the request line is sent byte for byte as written
    (like ``curl --path-as-is``), and a connection Envoy closes is opened again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def exchange(self, method: str, target: str, host: str, request_id: str) -> Answer:
        request = (
            f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nx-request-id: {request_id}\r\n\r\n"
        ).encode()
        reused = self.sock is not None
        try:
            return self._exchange(method, request)
        except (OSError, http.client.HTTPException):
            self.close()
            if not reused:
                return Answer(0, {}, b"")
        try:  # a kept-alive connection the server had closed: once more on a new one
            return self._exchange(method, request)
        except (OSError, http.client.HTTPException):
            self.close()
            return Answer(0, {}, b"")

    def _exchange(self, method: str, request: bytes) -> Answer:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=15)
        self.sock.sendall(request)
        response = http.client.HTTPResponse(self.sock, method=method)
        try:
            response.begin()
            body = response.read()
            headers = {name.lower(): value for name, value in response.getheaders()}
            closing = response.will_close
        finally:
            response.close()
        if closing:
            self.close()
        return Answer(response.status, headers, body)


def send_through_envoy(
    port: int, cases: Sequence[tuple[str, Case]], connections: int = 8
) -> dict[str, Answer]:
    """Each (request id, case) through Envoy, over a few kept-alive connections at once."""

    def send_share(share: Sequence[tuple[str, Case]]) -> dict[str, Answer]:
        client = RawHttp(port)
        try:
            return {
                request_id: client.exchange(case.method, case.path, case.authority, request_id)
                for request_id, case in share
            }
        finally:
            client.close()

    answers: dict[str, Answer] = {}
    with ThreadPoolExecutor(connections) as pool:
        for share in pool.map(send_share, [cases[i::connections] for i in range(connections)]):
            answers.update(share)
    return answers


@dataclass
class Logged:
    """extauthz's log lines for one request: its access line and its failure lines."""

    access: dict[str, Any] | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)

    def deployment_for(self, reason: str) -> str | None:
        """The deployment the log names: for no_matching_policy, the ``deployment`` field of the
        failure line (the docs say it names the deployment chosen, if any; None when the line has
        no such field: then only the decision is compared); otherwise the access line's."""
        if reason == NO_MATCH:
            named = [f for f in self.failures if f.get("reason") == NO_MATCH]
            if not named:
                return "(no failure line)"
            return str(named[0]["deployment"] or "") if "deployment" in named[0] else None
        return str(self.access.get("deployment", "")) if self.access else "(no access line)"

    @property
    def route(self) -> str:
        return str(self.access.get("route", "")) if self.access else "(no access line)"


def read_log(
    server: ExtauthzProcess, request_ids: Iterable[str], timeout: float = 15.0
) -> dict[str, Logged]:
    """Each request id's lines, once all of ``request_ids`` have an access line (or the deadline
    passed: then what is there; the caller reports what is missing)."""
    wanted = set(request_ids)

    def by_request() -> dict[str, Logged]:
        found: dict[str, Logged] = {}
        for line in server.lines():
            logged = found.setdefault(str(line.get("requestId", "")), Logged())
            if line.get("event") == "access":
                logged.access = line
            elif "reason" in line:
                logged.failures.append(line)
        return found

    def complete() -> dict[str, Logged] | None:
        found = by_request()
        return found if all(found.get(rid, Logged()).access for rid in wanted) else None

    try:
        return wait_until(complete, timeout=timeout, what="an access line for every request")
    except TimedOut:
        return by_request()


# -- the reference checks itself against the documented examples --------------------------------


def test_the_reference_reads_the_documented_examples(deployments: list[Deployment]) -> None:
    """The examples the docs give, as the reference answers them (and the corpus is big enough
    and holds every kind of spelling)."""
    assert all(template_matches("/admin/{rest*}", p) for p in ("/admin", "/admin/", "/admin/x/y"))
    assert not template_matches("/admin/{rest*}", "/administrator")
    assert template_matches("/{id}", "/7") and not template_matches("/{id}", "/7/")
    assert template_matches("/", "/") and not template_matches("/items", "/items/")
    assert is_under("/orders", "/orders") and is_under("/orders/7", "/orders")
    assert not is_under("/ordersX", "/orders")
    assert not wildcard_suffix_matches("*.example.com", "example.com")
    assert wildcard_suffix_matches("*.example.com", "a.b.example.com")
    for spelling in ("%2e", "%2E", ".%2e", "%2E%2e", ".", ".."):
        assert not_in_normal_form(f"/a/{spelling}/b") == "dot segment", spelling
    assert not_in_normal_form("/a/") is None and not_in_normal_form("/a//") == "empty segment"
    assert not_in_normal_form("/a%2Fb") == "encoded slash"
    assert not_in_normal_form("/a%2Fb", keep_encoded_slashes=True) is None
    assert path_without_query("/a?b/../c#d") == "/a" and path_without_query("/a#b?c") == "/a"
    assert host_of("API.Example.com.:8443") == "api.example.com"
    assert host_of("x@api.example.com") is None and host_of("api.example.com:1:2") is None
    assert host_of("api .example.com") is None
    by_name = {
        (a, p, m): select_route(a, p, m, None, deployments)
        for a, p, m in (
            ("api.example.com", "/api/items", "GET"),
            ("www.example.com", "/api/items", "GET"),
            ("other.test", "/api/items", "GET"),
            ("shop.example.com", "/api/items/7", "GET"),
        )
    }
    assert [s.deployment.name if s.deployment else None for s in by_name.values()] == [
        "exact-api", "wildcard-api", "anywhere-api", "shop",
    ]  # fmt: skip
    assert len(CORPUS) >= 2_000
    kinds = Counter(kind for case in CORPUS for kind in case.kinds)
    for kind in (
        "host case", "trailing dot", "port", "authority userinfo", "authority two ports",
        "authority space", "trailing slash", "empty segment", "dot segment", "backslash",
        "encoded backslash", "encoded slash", "bad percent", "path case", "control character",
        "unicode", "query", "fragment", "context_extensions", "percent-encoded character",
    ):  # fmt: skip
        assert kinds[kind] >= 20, (kind, kinds)
    decided = Counter(
        select_route(c.authority, c.path, c.method, c.extensions, deployments).reason or "route"
        for c in CORPUS
    )
    assert min(decided[k] for k in (AMBIGUOUS, NO_MATCH, "route")) >= 300, decided


# -- the two differential runs -------------------------------------------------------------------


def test_grpc_checks_select_the_reference_route(
    extauthz: ExtauthzProcess, deployments: list[Deployment]
) -> None:
    """Each case as a CheckRequest: extauthz's decision, deployment and route are the reference's."""
    request_ids = [f"rd-grpc-{i}-{uuid.uuid4()}" for i in range(len(CORPUS))]
    responses = check_all(extauthz, list(zip(request_ids, CORPUS, strict=True)))
    log = read_log(extauthz, request_ids)
    disagreements = []
    for request_id, case, response in zip(request_ids, CORPUS, responses, strict=True):
        selection = select_route(
            case.authority, case.path, case.method, case.extensions, deployments
        )
        expected, observed = expected_outcome(selection), outcome_of(response)
        if observed.reason != ALLOWED:  # a denial names its deployment and route in the log
            logged = log.get(request_id, Logged())
            observed = dataclasses.replace(
                observed, deployment=logged.deployment_for(observed.reason), route=logged.route
            )
        if not agrees(expected, observed):
            disagreements.append(
                Disagreement(
                    "grpc",
                    case,
                    str(expected),
                    str(observed),
                    selection.rule,
                    kind=difference(expected, observed),
                )
            )
    assert not disagreements, table(disagreements, len(CORPUS))


def envoy_names_orders(forwarded_path: str) -> bool:
    """The shipped config's ``path_separated_prefix: /orders`` route, which sets
    ``context_extensions: {deployment: orders}``."""
    path = path_without_query(forwarded_path)
    return path == "/orders" or path.startswith("/orders/")


def covers(deployment: Deployment, authority: str, path: str, named_by_envoy: bool) -> bool:
    """Whether a request for this host and path is one the deployment is written for."""
    host = host_of(authority)
    if host is None:
        return False
    host_listed = not deployment.hosts or any(
        host == pattern or (pattern.startswith("*.") and wildcard_suffix_matches(pattern, host))
        for pattern in deployment.hosts
    )
    return host_listed and (named_by_envoy or is_under(path, deployment.path_prefix))


def test_through_the_shipped_envoy_config_extauthz_decides_like_the_reference(
    gateway: Gateway, extauthz: ExtauthzProcess, deployments: list[Deployment]
) -> None:
    """Each sendable case through Envoy: what extauthz decided matches the reference on what
    Envoy forwarded, and what reached the upstream is covered by the deployment that allowed it."""
    sent = [(str(uuid.uuid4()), case) for case in CORPUS if case.sendable_over_http1()]
    answers = send_through_envoy(gateway.port, sent)
    by_name = {d.name: d for d in deployments}

    def decided_by_extauthz(answer: Answer) -> bool:
        echoed = answer.echo()
        healthz = echoed is not None and path_without_query(echoed["path"]) == "/healthz"
        return "x-extauthz-reason" in answer.headers or (answer.status == 200 and not healthz)

    log = read_log(extauthz, [rid for rid, _ in sent if decided_by_extauthz(answers[rid])])
    disagreements: list[Disagreement] = []
    tally: Counter[str] = Counter()
    for request_id, case in sent:
        answer, logged = answers[request_id], log.get(request_id, Logged())
        echoed, line = answer.echo(), logged.access
        if line is None:
            tally[f"answered by Envoy itself: {answer.status}"] += 1
            if decided_by_extauthz(answer):
                disagreements.append(
                    Disagreement(
                        "envoy",
                        case,
                        "an access line",
                        f"{answer.status}, no access line",
                        "every extauthz answer and every allowed request is logged",
                        kind="no access line",
                    )
                )
            continue
        tally["decided by extauthz"] += 1
        forwarded = str(line["path"])
        named_by_envoy = envoy_names_orders(forwarded)
        selection = select_route(
            case.authority,
            forwarded,
            str(line["method"]),
            {"deployment": "orders"} if named_by_envoy else None,
            deployments,
        )
        expected = expected_outcome(selection)
        reason = ALLOWED if line["decision"] == "allow" else answer.headers.get("x-extauthz-reason")
        observed = Outcome(
            answer.status,
            reason or "(no x-extauthz-reason)",
            logged.deployment_for(reason or ""),
            logged.route,
            realm_of(answer.headers.get("www-authenticate")),
        )
        shown_forwarded = "" if forwarded == path_without_query(case.path) else forwarded
        if not agrees(expected, observed):
            disagreements.append(
                Disagreement(
                    "envoy",
                    case,
                    str(expected),
                    str(observed),
                    selection.rule,
                    shown_forwarded,
                    difference(expected, observed),
                )
            )
        if echoed is None:
            continue
        # It reached the upstream: for a host and path its deployment covers.
        tally["reached the upstream"] += 1
        upstream_path, upstream_host = str(echoed["path"]), echoed["headers"].get("host", "")
        allowed_under = by_name.get(str(line["deployment"]))
        problems = [
            f"{what}: {value!r}"
            for what, value, fine in (
                ("Host changed on the way", upstream_host, upstream_host == case.authority),
                (
                    "upstream path differs from the checked one",
                    upstream_path,
                    upstream_path.split("?", 1)[0] == forwarded,
                ),
                (
                    f"not covered by {line['deployment']!r}",
                    f"{upstream_host} {upstream_path}",
                    allowed_under is not None
                    and covers(
                        allowed_under,
                        upstream_host,
                        path_without_query(upstream_path),
                        named_by_envoy,
                    ),
                ),
            )
            if not fine
        ]
        if problems:
            disagreements.append(
                Disagreement(
                    "upstr", case, "covered by its deployment", "; ".join(problems),
                    "the upstream gets only what the deployment covers", shown_forwarded,
                    "reached the upstream outside its deployment",
                )
            )  # fmt: skip
    assert tally["decided by extauthz"] >= len(sent) // 2, tally
    assert not disagreements, f"{tally}\n" + table(disagreements, len(sent))
