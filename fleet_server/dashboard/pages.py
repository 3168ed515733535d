"""The dashboard's routes under ``/ui/``: sign-in, sign-out and the read-only pages.

Sign-in takes a pasted API token and checks it exactly as the admin API does
(:func:`fleet_server.auth.authenticate`, then :func:`fleet_server.auth.require` with
``reader``): device tokens and unknown or revoked tokens are refused. The browser then holds
only a session cookie (HttpOnly, SameSite=Strict, Path=/ui, Secure behind HTTPS; see
:mod:`fleet_server.dashboard.sessions`). Each page re-reads the token's row, so a revoked
token's sessions end at their next request.

Scopes are the API's: every page needs ``reader``, except the audit log, which needs
``admin`` like ``GET /v1/audit``. The model-health pages (``/ui/models``,
``/ui/models/{model}``, ``/ui/alerts``, a device's health) take their time range as
``?since=`` (``1h``, ``6h``, ``24h``...; :func:`fleet_server.dashboard.health.parse_since`).
No page changes the fleet: the only forms are sign-in and sign-out, which are refused when the
browser says they come from another origin, and the model page's GET form that picks a
feature.

Handlers parse, read inside one transaction (:mod:`fleet_server.dashboard.views`) and render.
A missing session is a 303 to the sign-in page (which comes back to the page asked for); a
``FleetError`` while reading (an unknown device, say) is an HTML page with its status code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote, urlencode, urlsplit

from fastapi import APIRouter, Depends, FastAPI, Form, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import Connection, select

from fleet_server import auth
from fleet_server.api.deps import MAX_INT64, FleetDep
from fleet_server.dashboard import health, views
from fleet_server.dashboard.render import Renderer
from fleet_server.dashboard.sessions import Session, SessionStore
from fleet_server.db import atomic, tables
from fleet_server.db.engine import reading
from fleet_server.errors import FleetError, Forbidden, Unauthenticated
from fleet_server.fleet import Fleet

__all__ = ["COOKIE", "PREFIX", "Dashboard", "DashboardDep", "Viewer", "get_dashboard", "install",
           "router"]

log = logging.getLogger(__name__)

PREFIX = "/ui"
COOKIE = "edgefleet_session"
#: why the sign-in page was shown instead of the page asked for
_REASONS = {
    "signin": "Sign in to see this page.",
    "expired": "Your session expired. Sign in again.",
    "revoked": "The token of your session was revoked. Sign in with another one.",
    "signedout": "You are signed out.",
}


@dataclass(frozen=True)
class Viewer:
    """Who is looking (a live session) and the time the page is rendered for."""

    session: Session
    now: int

    @property
    def is_admin(self) -> bool:
        return self.session.scope == "admin"


class _LoginRequired(Exception):
    """No live session: answered with a redirect to the sign-in page."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _PageError(Exception):
    """A page that cannot be shown: answered with an HTML page with ``status``."""

    def __init__(self, status: int, message: str, viewer: Viewer | None, now: int) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.viewer = viewer
        self.now = now


@dataclass
class Dashboard:
    renderer: Renderer
    sessions: SessionStore
    page_size: int


def _next_target(value: str | None) -> str:
    """Where to go after signing in: a dashboard path only (never another site)."""
    if not value:
        return f"{PREFIX}/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or "\\" in value or not (
            parts.path == PREFIX or parts.path.startswith(PREFIX + "/")):
        return f"{PREFIX}/"
    return value


def _cross_origin(request: Request, fleet: Fleet) -> str | None:
    """Why a form post is refused as coming from another site, or None.

    Browsers send ``Origin`` on every form post (``null`` from opaque origins); clients
    without one (scripts, tests) are not browsers acting for a signed-in user.
    """
    origin = request.headers.get("origin")
    if origin is None:
        site = request.headers.get("sec-fetch-site")
        return f"the form came from a {site} page" if site == "cross-site" else None
    allowed = {request.headers.get("host", ""), urlsplit(fleet.settings.base_url).netloc}
    if origin == "null" or urlsplit(origin).netloc not in allowed:
        return f"the form came from origin {origin!r}, expected this server's own"
    return None


def _token_live(conn: Connection, token_id: str) -> bool:
    """Whether the token behind a session still signs anybody in (exists, not revoked)."""
    t = tables.tokens.c
    row = conn.execute(select(t.revoked_at).where(t.id == token_id)).first()
    return row is not None and row.revoked_at is None


def get_dashboard(request: Request) -> Dashboard:
    """The app's dashboard (set by :func:`install`).

    Raises:
        RuntimeError: the app was not given a dashboard.
    """
    dash: Dashboard | None = getattr(request.app.state, "dashboard", None)
    if dash is None:
        raise RuntimeError("the app has no dashboard: call fleet_server.dashboard.mount(app)")
    return dash


DashboardDep = Annotated[Dashboard, Depends(get_dashboard)]


class _RequireViewer:
    """Dependency: the signed-in viewer, whose token must hold at least ``scope``."""

    def __init__(self, scope: str) -> None:
        self.scope = scope

    def __call__(self, request: Request, fleet: FleetDep, dash: DashboardDep) -> Viewer:
        now = fleet.now()
        session_id = request.cookies.get(COOKIE)
        session = dash.sessions.get(session_id, now)
        if session is None:
            raise _LoginRequired("expired" if session_id else "signin")
        with atomic(fleet.engine) as conn:
            live = _token_live(conn, session.token_id)
        if not live:
            dash.sessions.end_token(session.token_id)
            raise _LoginRequired("revoked")
        who = Viewer(session, now)
        try:
            auth.require(auth.Principal(session.token_id, session.name, session.scope),
                         self.scope)
        except Forbidden as exc:
            raise _PageError(403, f"this page needs a {self.scope!r} token (as the admin API "
                                  f"does); you signed in with a {session.scope!r} token",
                             who, now) from exc
        return who


ReaderView = Annotated[Viewer, Depends(_RequireViewer("reader"))]
AdminView = Annotated[Viewer, Depends(_RequireViewer("admin"))]
PageQuery = Annotated[int, Query(ge=1, le=MAX_INT64, description="1-based page")]
SinceQuery = Annotated[str | None, Query(max_length=20, description="a duration: 1h, 6h...")]
NameQuery = Annotated[str | None, Query(max_length=200)]


@contextmanager
def _reading(fleet: Fleet, who: Viewer) -> Iterator[Connection]:
    """One read transaction; a FleetError becomes an HTML error page with its status.

    The monitoring views called inside it open their own read-only snapshots.
    """
    try:
        with reading(fleet.engine) as conn:
            yield conn
    except FleetError as exc:
        if exc.status_code >= 500:
            log.error("dashboard page failed: %s", exc, exc_info=exc)
        raise _PageError(exc.status_code, str(exc), who, who.now) from exc


def _span(who: Viewer, since: str | None) -> health.Span:
    """The page's time range; a bad ``?since=`` is an error page (422)."""
    try:
        return health.parse_since(since, who.now)
    except FleetError as exc:
        raise _PageError(exc.status_code, str(exc), who, who.now) from exc


#: the ``/ui`` routes (kept out of ``/openapi.json``: they are pages, not the API)
router = APIRouter(prefix=PREFIX, include_in_schema=False)


# ---------------------------------------------------------------------- sign in and out
@router.get("/login")
def login_form(request: Request, fleet: FleetDep, dash: DashboardDep,
               next: Annotated[str | None, Query(max_length=2000)] = None,
               reason: Annotated[str | None, Query(max_length=20)] = None) -> Response:
    now = fleet.now()
    if dash.sessions.get(request.cookies.get(COOKIE), now) is not None:
        return RedirectResponse(_next_target(next), status_code=303)
    return dash.renderer.page("login.html", viewer=None, now=now, next=_next_target(next),
                              message=_REASONS.get(reason or ""), error=None)


@router.post("/login")
def login(request: Request, fleet: FleetDep, dash: DashboardDep,
          token: Annotated[str, Form(max_length=1000)] = "",
          next: Annotated[str, Form(max_length=2000)] = "") -> Response:
    now = fleet.now()
    target = _next_target(next)
    refused = _cross_origin(request, fleet)
    if refused is not None:
        return dash.renderer.page("login.html", status=403, viewer=None, now=now, next=target,
                                  message=None, error=f"Sign-in refused: {refused}.")
    try:
        with atomic(fleet.engine) as conn:
            principal = auth.authenticate(conn, token.strip() or None)
        auth.require(principal, "reader")
    except (Unauthenticated, Forbidden) as exc:
        log.info("dashboard sign-in refused: %s", exc)
        return dash.renderer.page("login.html", status=exc.status_code, viewer=None, now=now,
                                  next=target, message=None, error=f"Sign-in refused: {exc}.")
    session_id, _ = dash.sessions.create(token_id=principal.token_id, name=principal.name,
                                         scope=principal.scope, now=now)
    log.info("dashboard sign-in: %s", principal.actor)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, session_id, max_age=dash.sessions.ttl_s, path=PREFIX,
                        httponly=True, samesite="strict", secure=_secure(request, fleet))
    return response


@router.post("/logout")
def logout(request: Request, fleet: FleetDep, dash: DashboardDep) -> Response:
    refused = _cross_origin(request, fleet)
    if refused is not None:
        raise _PageError(403, f"Sign-out refused: {refused}.", None, fleet.now())
    dash.sessions.delete(request.cookies.get(COOKIE))
    response = RedirectResponse(f"{PREFIX}/login?reason=signedout", status_code=303)
    response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict",
                           secure=_secure(request, fleet))
    return response


# ---------------------------------------------------------------------- pages
@router.get("/")
def overview_page(who: ReaderView, fleet: FleetDep, dash: DashboardDep) -> Response:
    with _reading(fleet, who) as conn:
        data = views.overview(conn)
    return dash.renderer.page("overview.html", viewer=who, now=who.now, nav="overview",
                              data=data)


@router.get("/models")
def models_page(who: ReaderView, fleet: FleetDep, dash: DashboardDep,
                since: SinceQuery = None) -> Response:
    span = _span(who, since)
    with _reading(fleet, who) as conn:
        data = health.models_page(fleet, conn, span)
    return dash.renderer.page("models.html", viewer=who, now=who.now, nav="models",
                              data=data,
                              spans=[(t, health.href("/ui/models", since=t))
                                     for t in health.SPANS])


@router.get("/models/{model:path}")
def model_page(who: ReaderView, fleet: FleetDep, dash: DashboardDep,
               model: Annotated[str, PathParam(max_length=200)],
               since: SinceQuery = None, device: NameQuery = None, version: NameQuery = None,
               input: NameQuery = None,
               feature: Annotated[int | None, Query(ge=0, le=1 << 31)] = None) -> Response:
    span = _span(who, since)
    with _reading(fleet, who) as conn:
        data = health.model_page(fleet, conn, model, span, device=device or None,
                                 version=version or None, input_name=input or None,
                                 feature=feature)
    return dash.renderer.page("model.html", viewer=who, now=who.now, nav="models", m=data,
                              spans=[(t, data.link(since=t)) for t in health.SPANS])


@router.get("/alerts")
def alerts_page(who: ReaderView, fleet: FleetDep, dash: DashboardDep,
                page: PageQuery = 1) -> Response:
    with _reading(fleet, who) as conn:
        data = health.alerts_page(conn, page=page, per_page=dash.page_size)
    return dash.renderer.page("alerts.html", viewer=who, now=who.now, nav="alerts", data=data,
                              paging=views.Paging(page, dash.page_size, data.resolved_total))


@router.get("/devices")
def devices_page(who: ReaderView, fleet: FleetDep, dash: DashboardDep,
                 page: PageQuery = 1) -> Response:
    with _reading(fleet, who) as conn:
        rows, paging = views.device_page(conn, page=page, per_page=dash.page_size)
    return dash.renderer.page("devices.html", viewer=who, now=who.now, nav="devices",
                              rows=rows, paging=paging)


@router.get("/devices/{device_id}")
def device_page(who: ReaderView, fleet: FleetDep, dash: DashboardDep,
                device_id: Annotated[str, PathParam(max_length=200)],
                since: SinceQuery = None) -> Response:
    span = _span(who, since)
    with _reading(fleet, who) as conn:
        row, full = views.device_detail(conn, device_id)
        seen = health.device_health(fleet, device_id, span)
    return dash.renderer.page("device.html", viewer=who, now=who.now, nav="devices", row=row,
                              full=full, health=seen,
                              spans=[(t, health.href(f"/ui/devices/{quote(device_id, safe='')}",
                                                     since=t)) for t in health.SPANS])


@router.get("/rollouts")
def rollouts_page(who: ReaderView, fleet: FleetDep, dash: DashboardDep,
                  page: PageQuery = 1) -> Response:
    with _reading(fleet, who) as conn:
        items, paging = views.rollout_page(conn, page=page, per_page=dash.page_size)
    return dash.renderer.page("rollouts.html", viewer=who, now=who.now, nav="rollouts",
                              items=items, paging=paging)


@router.get("/rollouts/{rollout_id}")
def rollout_page(who: ReaderView, fleet: FleetDep, dash: DashboardDep,
                 rollout_id: Annotated[int, PathParam(ge=1, le=MAX_INT64)]) -> Response:
    with _reading(fleet, who) as conn:
        item = views.rollout_detail(conn, rollout_id)
    return dash.renderer.page("rollout.html", viewer=who, now=who.now, nav="rollouts",
                              r=item)


@router.get("/audit")
def audit_page(who: AdminView, fleet: FleetDep, dash: DashboardDep,
               page: PageQuery = 1) -> Response:
    with _reading(fleet, who) as conn:
        data = views.audit_page(conn, page=page, per_page=dash.page_size)
    return dash.renderer.page("audit.html", viewer=who, now=who.now, nav="audit", data=data)


def _secure(request: Request, fleet: Fleet) -> bool:
    """Mark the cookie Secure when the browser reaches us over HTTPS (directly or through the
    TLS proxy that ``public_url`` names)."""
    return request.url.scheme == "https" or fleet.settings.base_url.startswith("https://")


def install(app: FastAPI, dash: Dashboard) -> None:
    """Serve ``dash`` from ``app``: the routes, the answers to a missing session and to a
    page error, and ``/`` -> ``/ui/`` when nothing else serves ``/``.

    On an app that has a dashboard already, ``dash`` replaces it (its settings and sessions)
    and nothing is added twice.
    """
    mounted = getattr(app.state, "dashboard", None) is not None
    app.state.dashboard = dash
    if mounted:
        return
    app.include_router(router)
    render = dash.renderer.page

    async def login_required(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, _LoginRequired)
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        query = urlencode({"next": _next_target(path), "reason": exc.reason})
        return RedirectResponse(f"{PREFIX}/login?{query}", status_code=303)

    async def page_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, _PageError)
        return render("error.html", status=exc.status, viewer=exc.viewer, now=exc.now,
                      nav="", status_code=exc.status, message=exc.message)

    app.add_exception_handler(_LoginRequired, login_required)
    app.add_exception_handler(_PageError, page_error)
    if not any(getattr(route, "path", None) == "/" for route in app.router.routes):
        async def root() -> RedirectResponse:
            return RedirectResponse(f"{PREFIX}/", status_code=303)
        app.add_api_route("/", root, methods=["GET"], include_in_schema=False)
