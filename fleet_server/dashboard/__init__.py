"""The fleet dashboard: server-rendered, read-only pages under ``/ui/`` on the admin API's server.

Why server-rendered HTML with SVG charts and no JavaScript: the dashboard must work offline
(no CDN), be testable with a plain HTTP client, and be safe to open with an admin token: a
strict Content-Security-Policy forbids every script, and autoescaping covers every value a
device or an operator could have stored.

- :mod:`~fleet_server.dashboard.pages`: routes, sign-in/sign-out, scope checks (the API's).
- :mod:`~fleet_server.dashboard.sessions`: server-side sessions behind an HttpOnly cookie.
- :mod:`~fleet_server.dashboard.views`: what each page shows, read with the API's functions.
- :mod:`~fleet_server.dashboard.health`: the model-health pages (models, drift, alerts), read
  with :mod:`fleet_server.monitoring`, as ``/v1/monitoring/...`` and ``/v1/alerts`` are.
- :mod:`~fleet_server.dashboard.charts`: pure SVG charts (line with threshold, grouped bars).
- :mod:`~fleet_server.dashboard.render`: Jinja2 templates (package data) and page headers.

Pages: ``/ui/login``, ``/ui/`` (overview), ``/ui/devices``, ``/ui/devices/{id}``,
``/ui/rollouts``, ``/ui/rollouts/{id}``, ``/ui/models``, ``/ui/models/{model}``,
``/ui/alerts``, ``/ui/audit`` (admin). ``mount`` adds them to an app
built by :func:`fleet_server.api.create_app`::

    app = create_app(settings)
    mount(app)
"""

from __future__ import annotations

from fastapi import FastAPI

from fleet_server.dashboard.pages import COOKIE, PREFIX, Dashboard, install
from fleet_server.dashboard.render import Renderer
from fleet_server.dashboard.sessions import SessionStore

__all__ = ["COOKIE", "PREFIX", "mount"]


def mount(app: FastAPI, *, session_ttl_s: int = 8 * 3600, max_sessions: int = 10_000,
          page_size: int = 50) -> None:
    """Serve the dashboard from ``app`` (before it starts): the ``/ui/`` pages, and a redirect
    from ``/`` to ``/ui/`` when nothing else serves ``/``. Mounting again replaces the
    dashboard's settings (and signs everybody out); routes are added once.

    Args:
        app: an app from :func:`fleet_server.api.create_app` (its Fleet serves the pages).
        session_ttl_s: how long a sign-in lasts (absolute, from sign-in).
        max_sessions: sessions kept in memory at most (the oldest go first).
        page_size: rows per page of the devices, rollouts and audit lists.

    Raises:
        ValueError: ``session_ttl_s`` under 60, ``max_sessions`` or ``page_size`` under 1.
    """
    if page_size < 1:
        raise ValueError(f"page_size: expected >= 1, got {page_size}")
    dash = Dashboard(Renderer(), SessionStore(ttl_s=session_ttl_s, max_sessions=max_sessions),
                     page_size)
    install(app, dash)
