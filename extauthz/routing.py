"""Route selection (CONTRACT.md §2, "Route selection"): a pure function of request and config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .config import Config, Deployment, Route

__all__ = ["Selection", "normalize_path", "select_route"]

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
        # No routes: AUTHENTICATION_ONLY (CONTRACT.md §2), except that a deployment that allows
        # anonymous access lets requests without a token through; a token sent is still checked.
        return "ANONYMOUS" if self.deployment.auth.anonymous_allowed else "AUTHENTICATION_ONLY"


def normalize_path(raw: str) -> str:
    """Drop query and fragment, merge slashes and resolve dot segments (RFC 3986 §5.2.4).

    Envoy normally normalizes paths itself (``normalize_path``, ``merge_slashes``); doing it again
    here means a policy never matches a different path than the upstream will serve.
    """
    if raw[:1] == "/" and "//" not in raw and "/." not in raw and "?" not in raw and "#" not in raw:
        return raw  # already normal: the common case costs four substring scans
    path = raw.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        path = "/" + path
    out: list[str] = []
    segments = path.split("/")[1:]
    for seg in segments:
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    trailing = path.endswith("/") and bool(out) and segments[-1] not in (".", "..")
    return "/" + "/".join(out) + ("/" if trailing else "")


def _host_matches(patterns: tuple[str, ...], host: str) -> bool:
    if not patterns:
        return True
    for p in patterns:
        if p.startswith("*."):
            if host.endswith(p[1:]) and len(host) > len(p) - 1:
                return True
        elif p == host:
            return True
    return False


def _under_prefix(prefix: str, path: str) -> str | None:
    """The path relative to ``prefix`` when it lies under it on whole segments, else None."""
    if prefix == "/":
        return path
    if path == prefix:
        return "/"
    if path.startswith(prefix) and path[len(prefix)] == "/":
        return path[len(prefix) :]
    return None


def _strip_port(authority: str) -> str:
    host = authority.strip().lower()
    if host.startswith("["):  # IPv6 literal
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    return host.rsplit(":", 1)[0] if ":" in host else host


def _pick_route(deployment: Deployment, relative: str, method: str) -> Selection | None:
    if not deployment.routes:
        return Selection(deployment, None)
    for route in deployment.routes:
        if route.matches(relative, method):
            return Selection(deployment, route)
    return None


def select_route(
    config: Config,
    *,
    host: str,
    path: str,
    method: str,
    context_extensions: Mapping[str, str],
) -> Selection | None:
    """Find the deployment and route that govern a request, or None (→ ``no_matching_policy``).

    ``path`` must already be normalized. Envoy's per-route ``context_extensions`` win: a
    ``deployment`` entry names the deployment (and an optional ``route`` names a route by index or
    name). A name that does not exist selects nothing: fail closed, never fall back.
    """
    method = method.upper()
    named = context_extensions.get("deployment")
    if named is not None:
        deployment = config.by_name.get(named)
        if deployment is None:
            return None
        relative = _under_prefix(deployment.path_prefix, path) or path
        route_ref = context_extensions.get("route")
        if route_ref is None:
            return _pick_route(deployment, relative, method)
        for i, route in enumerate(deployment.routes):
            if route_ref in (route.name, str(i)):
                return Selection(deployment, route)
        return None

    hostname = _strip_port(host)
    # The longest prefix first: the path itself, then without its last segment, ..., then "/".
    # A trailing slash is not part of a prefix ("/orders/" is under "/orders").
    candidate = path.rstrip("/") or "/"
    while True:
        for deployment in config.by_prefix.get(candidate, ()):
            if _host_matches(deployment.hosts, hostname):
                under = _under_prefix(deployment.path_prefix, path)
                assert under is not None
                return _pick_route(deployment, under, method)
        if candidate == "/":
            return None
        candidate = candidate.rsplit("/", 1)[0] or "/"
