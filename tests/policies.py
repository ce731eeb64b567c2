"""The orders deployment most tests check requests against, written one way.

    orders(validation)                                   # pathPrefix /orders, token authentication
    orders(validation, routes=[GET_ORDER, LIST_ORDERS], headersFromClaims={"x-auth-subject": "sub"})
    orders(validation, authentication={"tokenQueryParam": "access_token"}, name="query", pathPrefix="/q")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["GET_ORDER", "LIST_ORDERS", "orders"]

# GET /orders/{id} needs the orders.read scope.
GET_ORDER: dict[str, Any] = {
    "name": "get-order",
    "path": "/{id}",
    "methods": ["GET"],
    "authorization": {"type": "ANY_OF", "allowedScope": ["orders.read"]},
}
# GET /orders/ needs a valid token only.
LIST_ORDERS: dict[str, Any] = {"name": "list", "path": "/", "methods": ["GET"]}


def orders(
    validation: Mapping[str, Any],
    *,
    authentication: Mapping[str, Any] | None = None,
    **deployment: Any,
) -> dict[str, Any]:
    """The orders deployment (its name, pathPrefix /orders) whose TOKEN_AUTHENTICATION validates
    with ``validation``; ``authentication``: more keys of it; ``deployment``: more keys of the
    deployment, or others in place of the name and pathPrefix."""
    return {
        "name": "orders",
        "pathPrefix": "/orders",
        "authentication": {
            "type": "TOKEN_AUTHENTICATION",
            "validationPolicy": dict(validation),
            **(authentication or {}),
        },
        **deployment,
    }
