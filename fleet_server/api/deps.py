"""Request dependencies: the Fleet, the caller (bearer token -> Principal, scope checked) and
paging parameters. Annotated aliases keep route signatures short::

    def list_devices(caller: ReaderDep, fleet: FleetDep, page: PageDep) -> ...

Scopes nest ``admin`` ⊇ ``publisher`` ⊇ ``reader``; ``device`` tokens pass only
:data:`AnyTokenDep` (the TUF routes). Failures raise :class:`~fleet_server.errors.Unauthenticated`
(401) or :class:`~fleet_server.errors.Forbidden` (403), mapped in :mod:`fleet_server.api.app`.

:func:`refuse_unknown_query` runs for every route (``create_app`` installs it): a query
parameter the route does not declare is a 422, like an unknown body field, never ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, get_origin

from fastapi import Depends, Query, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fleet_server import auth
from fleet_server.auth import Principal
from fleet_server.db.engine import reading
from fleet_server.errors import InvalidInput
from fleet_server.fleet import Fleet

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_INT64",
    "AdminDep",
    "AnyTokenDep",
    "FleetDep",
    "LimitDep",
    "PageDep",
    "PageParams",
    "PublisherDep",
    "ReaderDep",
    "get_fleet",
    "get_limit",
    "get_page",
    "get_principal",
    "refuse_unknown_query",
]

DEFAULT_LIMIT = 100
MAX_INT64 = (1 << 63) - 1  # database integers are signed 64-bit


async def get_fleet(request: Request) -> Fleet:
    """The app's Fleet (opened by the lifespan, or passed to ``create_app``).

    Raises:
        RuntimeError: the app is used outside its lifespan and was given no Fleet.
    """
    fleet: Fleet | None = getattr(request.app.state, "fleet", None)
    if fleet is None:
        raise RuntimeError("the app has no Fleet: run it inside its lifespan (e.g. `with "
                           "TestClient(app)`) or pass fleet= to create_app")
    return fleet


FleetDep = Annotated[Fleet, Depends(get_fleet)]

_bearer = HTTPBearer(auto_error=False, description="an edgefleet token: `ef_<scope>_...`")


def get_principal(
    fleet: FleetDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller behind the bearer token.

    Raises:
        Unauthenticated: no bearer token, or an unknown or revoked one.
    """
    with reading(fleet.engine) as conn:  # a lookup: off SQLite's write lock
        return auth.authenticate(conn, credentials.credentials if credentials else None)


AnyTokenDep = Annotated[Principal, Depends(get_principal)]


class _RequireScope:
    """Dependency: the caller, who must hold at least ``scope`` (never a device token)."""

    def __init__(self, scope: str) -> None:
        self.scope = scope

    async def __call__(self, principal: AnyTokenDep) -> Principal:
        auth.require(principal, self.scope)
        return principal


ReaderDep = Annotated[Principal, Depends(_RequireScope("reader"))]
PublisherDep = Annotated[Principal, Depends(_RequireScope("publisher"))]
AdminDep = Annotated[Principal, Depends(_RequireScope("admin"))]


async def get_limit(
    request: Request,
    fleet: FleetDep,
    limit: Annotated[int, Query(ge=1, description="page size, 1..max_page_size (default 100)")]
    = DEFAULT_LIMIT,
) -> int:
    """The page size, bounded by ``settings.max_page_size`` (also the default's bound).

    Raises:
        InvalidInput: ``limit`` over the server's maximum page size.
    """
    largest = fleet.settings.max_page_size
    if "limit" not in request.query_params:
        return min(limit, largest)
    if limit > largest:
        raise InvalidInput(f"limit: expected 1..{largest} (the server's max_page_size), "
                           f"got {limit}")
    return limit


LimitDep = Annotated[int, Depends(get_limit)]


@dataclass(frozen=True)
class PageParams:
    limit: int
    offset: int


async def get_page(limit: LimitDep,
                   offset: Annotated[int, Query(ge=0, le=MAX_INT64)] = 0) -> PageParams:
    return PageParams(limit, offset)


PageDep = Annotated[PageParams, Depends(get_page)]


_QUERY_NAMES: dict[int, tuple[frozenset[str], frozenset[str]]] = {}


def _query_names(route: APIRoute) -> tuple[frozenset[str], frozenset[str]]:
    """The query parameters ``route`` declares, its dependencies' included, and those of them
    that take one value (cached per route)."""
    names = _QUERY_NAMES.get(id(route))
    if names is None:
        found: set[str] = set()
        single: set[str] = set()
        stack: list[Any] = [route.dependant]
        while stack:
            dependant = stack.pop()
            for f in dependant.query_params:
                found.add(f.alias)
                if get_origin(f.field_info.annotation) not in (list, tuple, set, frozenset):
                    single.add(f.alias)
            stack.extend(dependant.dependencies)
        names = _QUERY_NAMES[id(route)] = (frozenset(found), frozenset(single))
    return names


async def refuse_unknown_query(request: Request) -> None:
    """Refuse query parameters the route does not declare, and repeated single-valued ones (a
    typo is never ignored, and ``?tag=a&tag=b`` never silently means ``b``).

    Raises:
        InvalidInput: an unknown or repeated query parameter (names it).
    """
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    known, single = _query_names(route)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise InvalidInput(f"query.{unknown[0]}: expected no such parameter (this route takes "
                           f"{', '.join(sorted(known)) or 'none'}), got {unknown[0]!r}")
    for name in sorted(single):
        given = request.query_params.getlist(name)
        if len(given) > 1:
            raise InvalidInput(f"query.{name}: expected one value, got {len(given)}")
