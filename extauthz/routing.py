"""Route selection: a pure function of the request's authority, path, method and the config.

The client controls the host and the path, and those choose the policy, so selection is defined
so that no spelling of either reaches a weaker policy than the one the operator wrote for it
(README, "Route selection"):

1. :func:`read_request_target` refuses what is not in normal form (``request_ambiguous``): a
   path is matched exactly as Envoy sent it, never rewritten, because extauthz and the upstream
   must agree on which resource was authorized.
2. :func:`select_route` looks at hosts before paths, most specific host first (Envoy's
   virtual-host order), then the longest ``pathPrefix`` within the first host group that has one,
   then the first route whose template and methods match.

Every step is linear in the length of the request: prefixes and wildcard suffixes are looked up
by the lengths the config actually has, never by rebuilding a string per path segment, and
route templates are matched without regular expressions (:mod:`extauthz.route_template`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from .config import Config, Deployment, HostGroup, Route
from .decision import Denial, Reason

__all__ = [
    "RequestTarget",
    "Selection",
    "Unmatched",
    "read_request_target",
    "request_path",
    "select",
    "select_route",
    "unmatched",
]

# A deployment without routes has one implicit route covering every path under pathPrefix.
_IMPLICIT_ROUTE_NAME = "default"


@dataclass(frozen=True, slots=True)
class Selection:
    deployment: Deployment
    route: Route | None  # None: the deployment has no routes (implicit AUTHENTICATION_ONLY)

    @property
    def route_name(self) -> str:
        return self.route.name if self.route else _IMPLICIT_ROUTE_NAME

    @property
    def authorization(self) -> str:
        if self.route is not None:
            return self.route.authorization
        # No routes: AUTHENTICATION_ONLY, except that a deployment that allows anonymous access
        # lets requests without a token through; a token sent is still checked.
        return "ANONYMOUS" if self.deployment.auth.anonymous_allowed else "AUTHENTICATION_ONLY"


@dataclass(frozen=True, slots=True)
class RequestTarget:
    """The host (lower-case, no port, no trailing dot) and the path (no query or fragment) of a
    request whose authority and path are in normal form."""

    host: str
    path: str


def request_path(raw_path: str) -> str:
    """The path without its query string and fragment (RFC 3986 §3.3: the path ends there)."""
    if "?" not in raw_path and "#" not in raw_path:
        return raw_path  # the common case: two scans, no copy
    end = len(raw_path)
    for mark in ("?", "#"):
        at = raw_path.find(mark, 0, end)
        if at != -1:
            end = at
    return raw_path[:end]


_ENVOY_PATH_OPTIONS = (
    "Envoy's normalize_path: true, merge_slashes: true and path_with_escaped_slashes_action: "
    "UNESCAPE_AND_REDIRECT on the HTTP connection manager keep clients from sending it."
)

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 (Unicode Cc)
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


_ASCII_CONTROLS = bytes(range(0x20)) + b"\x7f"


def _has_control(path: str) -> bool:
    if path.isascii():  # a byte-level pass: four times cheaper than str.isprintable
        raw = path.encode("ascii")
        return len(raw.translate(None, _ASCII_CONTROLS)) != len(raw)
    return _CONTROL.search(path) is not None


def _not_normal(path: str, keep_encoded_slashes: bool) -> str | None:
    """What makes ``path`` one of several spellings of a path (RFC 3986 §6.2.2), or None.

    Every test is a substring scan or a regular expression that starts with a literal, so a
    path costs a few passes over its characters in C, whatever it holds.
    """
    if (
        len(path) <= 256  # the common case, a short plain path: five scans, at once
        and path.isascii()
        and path.isprintable()
        and "%" not in path
        and "\\" not in path
        and "//" not in path
        and "/." not in path
    ):
        return None
    if "//" in path:
        return "an empty segment ('//')"
    lower = path.lower() if "%" in path else path
    # Dot segments in any spelling; between encoded slashes too, since with encodedSlashes KEEP
    # an upstream that does decode them would still see one.
    dots = lower.replace("%2e", ".").replace("%2f", "/") if "%" in path else path
    if "/." in dots and ("/./" in dots or "/../" in dots or dots.endswith(("/.", "/.."))):
        return "a '.' or '..' segment (in some spelling)"
    if "\\" in path or "%5c" in lower:
        return "a backslash ('\\' or '%5C')"
    if _has_control(path):
        return "a control character"
    if "%" in path:
        if _BAD_PERCENT.search(path):
            return "a '%' not followed by two hex digits"
        if not keep_encoded_slashes and "%2f" in lower:
            return "an encoded slash ('%2F')"
    return None


# RFC 3986 §3.2.2-3: a registered name (letters, digits, '-', '.'; '_' as many internal names
# have) or a bracketed IPv6 literal, then an optional port. Nothing else: no userinfo, no second
# port, no spaces, no percent-encoding, nothing that lower-cases into something else.
_AUTHORITY = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]*)(?::[0-9]{0,5})?")


def _ambiguous(what: str, advice: str) -> Denial:
    return Denial(Reason.REQUEST_AMBIGUOUS, f"The request {what}; {advice}")


def read_request_target(
    authority: str, raw_path: str, *, keep_encoded_slashes: bool = False
) -> RequestTarget | Denial:
    """The request's host and path when both are in normal form, else a ``request_ambiguous``
    denial that says what was found (never the path itself) and the Envoy option that prevents it.
    """
    path = request_path(raw_path)
    if not path.startswith("/"):
        return _ambiguous("path does not start with '/'", _ENVOY_PATH_OPTIONS)
    problem = _not_normal(path, keep_encoded_slashes)
    if problem is not None:
        advice = _ENVOY_PATH_OPTIONS
        if problem.startswith("an encoded slash"):
            advice += " Or set server.encodedSlashes: KEEP."
        return _ambiguous(f"path has {problem}", advice)
    m = _AUTHORITY.fullmatch(authority)
    host = m.group(1).lower() if m is not None else ""
    if host.endswith("."):
        host = host[:-1]  # one trailing dot: the same (fully qualified) name
    if m is None or host.startswith(".") or host.endswith(".") or ".." in host:
        return _ambiguous(
            "authority is not a host with an optional port",
            "Envoy's HTTP codec rejects most such authorities; check what forwards them.",
        )
    return RequestTarget(host, path)


def _prefix_match(group: HostGroup, path: str) -> Deployment | None:
    """The deployment of ``group`` with the longest ``pathPrefix`` that holds ``path`` on whole
    segments (``/orders`` holds ``/orders`` and ``/orders/7``, not ``/ordersX``)."""
    size = len(path)
    by_prefix = group.by_prefix
    for length in group.prefix_lengths:  # longest first
        if length > size:
            continue
        if length > 1 and length < size and path[length] != "/":
            continue
        deployment = by_prefix.get(path[:length])
        if deployment is not None:
            return deployment
    return None


def _under_prefix(prefix: str, path: str) -> str | None:
    """The path relative to ``prefix`` when it lies under it on whole segments, else None."""
    if prefix == "/":
        return path
    if path == prefix:
        return "/"
    if path.startswith(prefix) and path[len(prefix)] == "/":
        return path[len(prefix) :]
    return None


def _pick_route(deployment: Deployment, relative: str, method: str) -> Selection | None:
    if not deployment.routes:
        return Selection(deployment, None)
    # Split once, only as deep as the deepest template looks: the rest stays one string.
    parts = relative[1:].split("/", deployment.template_depth)
    for route in deployment.routes:
        if (not route.methods or method in route.methods) and route.path.matches_segments(parts):
            return Selection(deployment, route)
    return None


def _by_host(config: Config, host: str, path: str) -> Deployment | None:
    """Hosts before paths: the exact host's group, then wildcard groups by longest suffix (a
    ``*.example.com`` needs at least one more label), then the deployments without ``hosts``;
    the first group that holds a matching ``pathPrefix`` decides."""
    index = config.host_index
    exact = index.exact.get(host)
    if exact is not None:
        found = _prefix_match(exact, path)
        if found is not None:
            return found
    size = len(host)
    for length, groups in index.wildcards:  # longest suffix first
        if size > length:
            group = groups.get(host[size - length :])
            if group is not None:
                found = _prefix_match(group, path)
                if found is not None:
                    return found
    return _prefix_match(index.hostless, path)


def select_route(
    config: Config,
    *,
    target: RequestTarget,
    method: str,
    context_extensions: Mapping[str, str],
) -> Selection | None:
    """The deployment and route that govern a request, or None (→ ``no_matching_policy``).

    Envoy's per-route ``context_extensions`` win: ``deployment`` names the deployment and an
    optional ``route`` names a route by index or name. A name that does not exist selects
    nothing: fail closed, never fall back to matching.
    """
    method = method.upper()
    path = target.path
    named = context_extensions.get("deployment")
    if named is not None:
        deployment = config.by_name.get(named)
        if deployment is None:
            return None
        route_ref = context_extensions.get("route")
        if route_ref is None:
            # Below pathPrefix when the path is under it, else the whole path (a sidecar's Envoy
            # may route by host alone).
            below = _under_prefix(deployment.path_prefix, path) or path
            return _pick_route(deployment, below, method)
        for i, route in enumerate(deployment.routes):
            if route_ref in (route.name, str(i)):
                return Selection(deployment, route)
        return None
    deployment = _by_host(config, target.host, path)
    if deployment is None:
        return None
    relative = _under_prefix(deployment.path_prefix, path)
    assert relative is not None
    return _pick_route(deployment, relative, method)


def select(
    config: Config,
    *,
    authority: str,
    raw_path: str,
    method: str,
    context_extensions: Mapping[str, str],
) -> Selection | Denial | None:
    """Both steps: a ``request_ambiguous`` Denial, else :func:`select_route`'s answer."""
    target = read_request_target(
        authority, raw_path, keep_encoded_slashes=config.server.keep_encoded_slashes
    )
    if isinstance(target, Denial):
        return target
    return select_route(config, target=target, method=method, context_extensions=context_extensions)


# -- why nothing matched (the no_matching_policy line only: never on an allowed check's path) ---

_MAX_LISTED = 10  # routes or prefixes a no_matching_policy line lists


class Unmatched(NamedTuple):
    """What selection tried for a request that matched nothing: the deployment it chose (by
    Envoy's ``context_extensions`` or by host and ``pathPrefix``; "" for none) with the routes
    it tried (``METHODS template``), or without one the nearest ``pathPrefix`` values."""

    deployment: str
    routes_tried: tuple[str, ...] = ()
    nearest_prefixes: tuple[str, ...] = ()


def _route_line(route: Route) -> str:
    methods = ",".join(sorted(route.methods)) or "*"
    return f"{methods} {route.template}"


def _groups(config: Config, host: str) -> list[HostGroup]:
    """The host groups selection looks in for ``host``, in its order."""
    index = config.host_index
    groups = [index.exact[host]] if host in index.exact else []
    size = len(host)
    for length, by_suffix in index.wildcards:
        if size > length and host[size - length :] in by_suffix:
            groups.append(by_suffix[host[size - length :]])
    return [*groups, index.hostless]


def unmatched(
    config: Config, *, authority: str, raw_path: str, context_extensions: Mapping[str, str]
) -> Unmatched:
    """What :func:`select` tried, for a request in normal form that it found no policy for."""
    target = read_request_target(
        authority, raw_path, keep_encoded_slashes=config.server.keep_encoded_slashes
    )
    if isinstance(target, Denial):
        return Unmatched("")
    named = context_extensions.get("deployment")
    deployment = (
        config.by_name.get(named)
        if named is not None
        else _by_host(config, target.host, target.path)
    )
    if deployment is not None:
        lines = tuple(_route_line(r) for r in deployment.routes[:_MAX_LISTED])
        return Unmatched(deployment.name, routes_tried=lines)
    prefixes = {p for g in _groups(config, target.host) for p in g.by_prefix}

    def shared(prefix: str) -> int:
        """Characters in common from the start (not segments: a typo in a prefix is near too)."""
        common = min(len(prefix), len(target.path))
        return next((i for i in range(common) if prefix[i] != target.path[i]), common)

    nearest = sorted(prefixes, key=lambda p: (-shared(p), p))[:3]
    return Unmatched("", nearest_prefixes=tuple(nearest))
