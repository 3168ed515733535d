"""The composition root of the HTTP API: :func:`create_app`.

Nothing is built at import time. ``create_app`` checks the settings (refusing insecure ones in
production), mounts the routers and installs the ONE mapping from errors to HTTP:

- :class:`~fleet_server.errors.FleetError` -> its ``status_code``, body
  ``{"error": "<ExceptionClassName>", "detail": "<message>"}`` (401 adds ``WWW-Authenticate``);
- request validation (bad JSON, unknown or mistyped fields, out-of-range or undeclared query
  parameters) -> 422 with the same shape, ``error`` ``"InvalidInput"`` and every problem in
  ``detail``;
- a body FastAPI cannot decode (its 400) -> 422 ``InvalidInput``, like any invalid input;
- unknown paths and methods (starlette's HTTPException) -> the same shape (405 lists every
  method the path serves in ``Allow``).

Besides :data:`~fleet_server.api.routes.ROUTERS`, the app mounts the monitoring and alert
routes and ``GET /metrics``, whose Prometheus registry is the app's own
(``app.state.prometheus``): it reads the Fleet and, once ``serve`` attached one, the MQTT
runtime's ingest counters at each scrape.

Request bodies are bounded before FastAPI reads them: :data:`JSON_BODY_LIMIT` everywhere but the
bundle upload, which streams to disk under its own limit (413 ``PayloadTooLarge`` either way).

The lifespan opens the :class:`~fleet_server.fleet.Fleet` with
:func:`~fleet_server.fleet.open_fleet` (unless one was passed in), runs the
``app.state.on_startup_extra`` hooks, publishes any desired state still pending, and on the way
out runs ``app.state.on_shutdown_extra`` (in reverse) and closes what it opened.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet_server.api.deps import refuse_unknown_query
from fleet_server.api.routes import ROUTERS, alerts, models, monitoring
from fleet_server.dashboard import mount as mount_dashboard
from fleet_server.deploy.service import publish_pending
from fleet_server.errors import FleetError, InvalidInput, PayloadTooLarge, Unauthenticated
from fleet_server.fleet import Fleet, Publisher, open_fleet
from fleet_server.ingest import IngestCounters
from fleet_server.monitoring import RecordRetention, make_registry
from fleet_server.settings import Settings

__all__ = ["API_VERSION", "JSON_BODY_LIMIT", "Hook", "create_app"]

log = logging.getLogger(__name__)

API_VERSION = "1"
#: the largest request body accepted by any route but the bundle upload (bytes)
JSON_BODY_LIMIT = 1 << 20

#: an extra start-up or shut-down step; called with the app (``app.state.fleet`` is open)
Hook = Callable[[FastAPI], Awaitable[None]]

_HTTP_ERROR_NAMES = {404: "NotFound", 405: "MethodNotAllowed", 413: "PayloadTooLarge"}


def _error(status: int, name: str, detail: str,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": name, "detail": detail}, status_code=status, headers=headers)


async def _fleet_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FleetError)
    if exc.status_code >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc, exc_info=exc)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthenticated) else None
    return _error(exc.status_code, type(exc).__name__, str(exc), headers)


def _where(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "request"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":  # loc is (body, character offset)
            reason = (err.get("ctx") or {}).get("error", "")
            problems.append(f"body: {err.get('msg')}: {reason}".rstrip(": "))
            continue
        got = err.get("input")
        shown = "" if err.get("type") == "missing" else f" (got {str(got)[:80]!r})"
        problems.append(f"{_where(tuple(err.get('loc', ())))}: {err.get('msg')}{shown}")
    return _error(422, InvalidInput.__name__, "; ".join(problems) or "invalid request")


def _allowed_methods(request: Request) -> str:
    """Every method any route serves on this path (starlette names only the first route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:  # FastAPI could not decode the body: invalid input like the rest
        return _error(422, InvalidInput.__name__, f"body: {exc.detail}")
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    name = _HTTP_ERROR_NAMES.get(exc.status_code, "HTTPError")
    return _error(exc.status_code, name, str(exc.detail), headers or None)


class _BodyLimit:
    """Refuse request bodies over ``limit`` bytes with the API's own 413, except for ``exempt``
    (the bundle upload, bounded while it streams: see ``routes/models.py``).

    Every other body is small JSON, which FastAPI reads whole before any dependency runs (so
    before authentication). Starlette's own limiter answers in plain text, hence this one.
    """

    def __init__(self, app: ASGIApp, limit: int, exempt: tuple[str, str]) -> None:
        self.app, self.limit, self.exempt = app, limit, exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) == self.exempt:
            await self.app(scope, receive, send)
            return
        detail = (f"request body over the limit of {self.limit} bytes (bundles go to "
                  f"{self.exempt[0]} {self.exempt[1]})")
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            response = _error(413, PayloadTooLarge.__name__, detail)
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # an HTTPException: FastAPI passes those through body parsing (any other
                    # error becomes its 400), and _http_error gives it the API's shape
                    raise StarletteHTTPException(413, detail)
            return message

        await self.app(scope, limited, send)


def _check_settings(settings: Settings) -> None:
    """Raises: InvalidInput: insecure settings in production (only logged in development)."""
    reasons = settings.insecure_reasons()
    if reasons and settings.environment == "production":
        raise InvalidInput("refusing insecure settings in production: " + "; ".join(reasons))
    for reason in reasons:
        log.warning("INSECURE: %s", reason)


def _document_limits(app: FastAPI, settings: Settings) -> None:
    """Make /openapi.json state this server's ``max_page_size`` as the ``limit`` maximum."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for item in schema.get("paths", {}).values():
                for op in item.values():
                    for param in op.get("parameters", []) if isinstance(op, dict) else []:
                        if param.get("name") == "limit" and param.get("in") == "query":
                            param["schema"]["maximum"] = settings.max_page_size
                            param["schema"]["default"] = min(100, settings.max_page_size)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings, *, clock: Callable[[], float] = time.time,
               publisher: Publisher | None = None, fleet: Fleet | None = None) -> FastAPI:
    """Build the API for ``settings``.

    Args:
        settings: the server configuration (checked here).
        clock: unix seconds; injected into the Fleet the lifespan opens.
        publisher: where signed desired states go (MQTT later; a recorder in tests).
        fleet: an already open Fleet to serve (then the lifespan neither opens nor closes
            it; ``publisher``, when given, is set on it). Requests work without the lifespan.

    Raises:
        InvalidInput: insecure settings with ``environment="production"``.
    """
    _check_settings(settings)
    if fleet is not None and publisher is not None:
        fleet.publisher = publisher

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = app.state.fleet is None
        if owned:
            app.state.fleet = await run_in_threadpool(
                open_fleet, settings, clock=clock, publisher=publisher)
        try:
            for hook in list(app.state.on_startup_extra):
                await hook(app)
            await run_in_threadpool(publish_pending, app.state.fleet)
            yield
        finally:
            for hook in reversed(list(app.state.on_shutdown_extra)):
                await hook(app)
            if owned:
                app.state.fleet.engine.dispose()
                app.state.fleet = None

    app = FastAPI(
        title="edgefleet fleet server",
        version=API_VERSION,
        summary="Registry, TUF repository and desired-state publisher for a fleet of devices.",
        description="Every route except `/healthz` needs `Authorization: Bearer <token>`. "
                    "Errors are `{\"error\": \"<ExceptionClassName>\", \"detail\": \"...\"}`.",
        lifespan=lifespan,
        dependencies=[Depends(refuse_unknown_query)],
    )
    app.state.settings = settings
    app.state.fleet = fleet
    # ---- extension hooks -------------------------------------------------------------------
    # Async callables taking the app, run by the lifespan after the Fleet is open (start-up,
    # in order) and before it is closed (shut-down, in reverse order). This is where the MQTT
    # link (broker, publisher, ingest) gets wired in: set `app.state.fleet.publisher` in a
    # start-up hook and stop the link in a shut-down hook. Nothing here starts MQTT.
    app.state.on_startup_extra = []
    app.state.on_shutdown_extra = []
    # -----------------------------------------------------------------------------------------
    app.add_exception_handler(FleetError, _fleet_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for router in (*ROUTERS, monitoring.router, alerts.router, monitoring.metrics_router):
        app.include_router(router)

    def counters() -> IngestCounters | None:
        runtime = getattr(app.state, "mqtt", None)  # set by fleet_server.runtime.attach_mqtt
        return runtime.counters if runtime is not None else None

    def retention() -> RecordRetention | None:
        runtime = getattr(app.state, "mqtt", None)
        return runtime.retention if runtime is not None else None

    app.state.prometheus = make_registry(lambda: app.state.fleet, counters, retention)
    app.add_middleware(_BodyLimit, limit=JSON_BODY_LIMIT, exempt=("POST", models.router.prefix))
    _document_limits(app, settings)
    mount_dashboard(app)  # read-only pages under /ui/, left out of /openapi.json
    return app
