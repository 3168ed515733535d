"""Templates and the headers every page is sent with.

Jinja2 with autoescape on for every template and ``StrictUndefined`` (a misspelt variable is an
error, not an empty cell). Templates and the stylesheet ship as package data
(``fleet_server/dashboard/templates/*.html``, ``static/dashboard.css``); nothing is fetched
from a CDN, and pages carry no JavaScript at all.

The stylesheet is inlined into each page and allowed by its sha256 in the
Content-Security-Policy, so the policy can forbid every other style, script, frame and form
target: an injected ``<script>`` would not run even if escaping ever failed.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from importlib import resources
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from starlette.responses import HTMLResponse

from fleet_server.dashboard.health import model_path

__all__ = ["Renderer", "ago", "fmt_number", "fmt_time"]


def fmt_time(t: float | None) -> str:
    """Unix seconds as ``YYYY-MM-DD HH:MM:SS`` (UTC); ``never`` for None."""
    if t is None:
        return "never"
    return dt.datetime.fromtimestamp(t, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def ago(t: float | None, now: int) -> str:
    """How long before ``now`` (``"5 min ago"``), or after it (``"in 2 h"``)."""
    if t is None:
        return "never"
    delta = int(now - t)
    span = abs(delta)
    if span < 60:
        text = f"{span} s"
    elif span < 3600:
        text = f"{span // 60} min"
    elif span < 86400:
        text = f"{span // 3600} h"
    else:
        text = f"{span // 86400} d"
    return f"{text} ago" if delta >= 0 else f"in {text}"


def fmt_number(value: float | None) -> str:
    """A gate value or limit: 4 significant digits; an em dash for None."""
    return "\u2014" if value is None else f"{value:.4g}"


def _compact_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(", ", ": "))


class Renderer:
    """The template environment, the inlined stylesheet and the security headers."""

    def __init__(self) -> None:
        self.env = Environment(loader=PackageLoader("fleet_server.dashboard", "templates"),
                               autoescape=True, undefined=StrictUndefined, trim_blocks=True,
                               lstrip_blocks=True)
        self.env.filters.update(ts=fmt_time, ago=ago, num=fmt_number, json=_compact_json,
                                model_path=model_path)
        css = (resources.files("fleet_server.dashboard") / "static" / "dashboard.css"
               ).read_text(encoding="utf-8")
        self.css = Markup(css)  # our own file: trusted, and pinned by its hash below
        digest = base64.b64encode(hashlib.sha256(css.encode("utf-8")).digest()).decode()
        self.headers = {
            "Content-Security-Policy": (
                f"default-src 'none'; style-src 'sha256-{digest}'; img-src 'self' data:; "
                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
            # not no-referrer: with it, browsers send "Origin: null" on form posts, and the
            # login and logout forms are checked against their Origin
            "Referrer-Policy": "same-origin",
            "Cache-Control": "no-store",
        }

    def page(self, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
        html = self.env.get_template(template).render(css=self.css, **context)
        return HTMLResponse(html, status_code=status, headers=self.headers)
