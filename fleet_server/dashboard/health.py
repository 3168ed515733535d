"""What the model-health pages show: models, one model's drift and health, alerts, a device's
health; read with the functions the monitoring API serves.

Every figure comes from :mod:`fleet_server.monitoring` (``fleet_view``, ``model_view``,
``drift_view``, ``distribution_view``, ``device_view``, ``list_alerts``, ``list_rules``) with
the same :class:`~fleet_server.monitoring.TimeRange` the API builds for the same query, so a
page and ``GET /v1/monitoring/...`` can never disagree: nothing here computes a statistic of
its own. What is composed here is only what to show: which version and feature a model
page's distribution chart is about by default, which threshold line its PSI chart draws,
and the charts themselves (:mod:`fleet_server.dashboard.charts`).

The time range of a page is ``?since=`` as a duration (``15m``, ``1h``, ``6h``, ``24h``,
``7d``; default ``1h``) ending now on the server's clock, with the API's default bucket (at
most 60 buckets).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, urlencode

from markupsafe import Markup
from sqlalchemy import Connection

from agent.drift import PSI_ALERT
from fleet_server.dashboard.charts import BarSeries, LineSeries, bar_chart, line_chart
from fleet_server.errors import FleetError, InvalidInput
from fleet_server.fleet import Fleet
from fleet_server.monitoring import (
    TimeRange,
    device_view,
    distribution_view,
    drift_view,
    fleet_view,
    list_alerts,
    list_rules,
    model_view,
)

__all__ = [
    "SPANS",
    "AlertsPage",
    "DeviceHealth",
    "FeatureChoice",
    "ModelPage",
    "ModelsPage",
    "Span",
    "alerts_page",
    "device_health",
    "firing_counts",
    "href",
    "model_page",
    "model_path",
    "models_page",
    "parse_since",
]

#: the time ranges every health page links to
SPANS: Final = ("15m", "1h", "6h", "24h", "7d")
DEFAULT_SPAN: Final = "1h"
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION: Final = re.compile(r"^([1-9][0-9]{0,6})([smhd])$")
#: the longest range a page may ask for (the API's bucket limit allows far more; a page that
#: reads a year of records is a mistake)
MAX_SPAN_S: Final = 90 * 86400
#: the most rows read whole (rules, open alerts: both are few)
_ALL: Final = 10_000
#: features offered as links in a model page's feature picker (largest latest PSI first)
PICKER_FEATURES: Final = 16


def href(path: str, **params: object) -> str:
    """``path`` with the query parameters that are not None, URL-encoded."""
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return f"{path}?{query}" if query else path


def model_path(model: str) -> str:
    """The model page of ``model`` (any name a device sent, quoted whole)."""
    return f"/ui/models/{quote(model, safe='')}"


@dataclass(frozen=True)
class Span:
    """A page's time range: as asked (``6h``) and as the monitoring views take it."""

    text: str
    seconds: int
    range: TimeRange


def parse_since(text: str | None, now: int) -> Span:
    """``?since=`` (``90s``, ``15m``, ``6h``, ``2d``; None: ``1h``) as a range ending ``now``.

    Raises:
        InvalidInput: not such a duration, or longer than :data:`MAX_SPAN_S`.
    """
    given = DEFAULT_SPAN if text is None else text.strip().lower()
    match = _DURATION.match(given)
    if match is None:
        raise InvalidInput(f"since: expected a duration such as 15m, 6h or 7d, got {text!r}")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds > MAX_SPAN_S:
        raise InvalidInput(f"since: expected at most {MAX_SPAN_S // 86400}d, got {text!r}")
    return Span(given, seconds, TimeRange.make(now, since=now - seconds))


def _points(starts: Sequence[int], values: Sequence[float | None]) -> list[tuple[float, float]]:
    """One point per bucket that has a value."""
    return [(float(t), float(v)) for t, v in zip(starts, values, strict=True) if v is not None]


def firing_counts(alerts: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str | None], int]:
    """Firing alerts per ``(model, version)`` of their rule (None: every version)."""
    out: dict[tuple[str, str | None], int] = {}
    for a in alerts:
        key = (str(a["model"]), a["rule"].get("version"))
        out[key] = out.get(key, 0) + 1
    return out


def _firing(conn: Connection) -> list[dict[str, Any]]:
    return list_alerts(conn, state="firing", limit=_ALL)[0]


# ------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelsPage:
    span: Span
    view: dict[str, Any]  # fleet_view
    firing: dict[tuple[str, str | None], int]

    def model_firing(self, model: str) -> int:
        """Firing alerts of ``model`` (any version)."""
        return sum(n for (m, _), n in self.firing.items() if m == model)

    def version_firing(self, model: str, version: str) -> int:
        """Firing alerts whose rule covers ``version`` (it names it, or every version)."""
        return self.firing.get((model, version), 0) + self.firing.get((model, None), 0)


def models_page(fleet: Fleet, conn: Connection, span: Span) -> ModelsPage:
    """Every model and version (``GET /v1/monitoring/fleet``) and the firing alerts.

    Raises:
        StoreError: the database failed.
    """
    return ModelsPage(span, fleet_view(fleet, span.range), firing_counts(_firing(conn)))


# ------------------------------------------------------------------------------- one model
@dataclass(frozen=True)
class FeatureChoice:
    """A feature the picker offers: its largest PSI over devices in the latest bucket."""

    input: str
    feature: int
    psi: float | None
    href: str
    chosen: bool


@dataclass(frozen=True)
class ModelPage:
    model: str
    span: Span
    view: dict[str, Any]  # model_view
    drift: dict[str, Any]  # drift_view (of ``device`` when given)
    device: str | None
    devices: list[str]  # devices with drift summaries in the range (the device picker)
    threshold: float
    threshold_label: str
    psi_chart: Markup
    requests_chart: Markup
    latency_chart: Markup
    version: str | None  # the distribution's version
    input: str | None  # as asked (None: the default feature's)
    feature: int | None
    distribution: dict[str, Any] | None  # distribution_view
    distribution_error: str | None  # why there is none
    distribution_chart: Markup | None
    features: list[FeatureChoice]
    open_alerts: list[dict[str, Any]]

    def link(self, **changes: object) -> str:
        """This page with some query parameters changed (None drops one)."""
        params: dict[str, object] = {"since": self.span.text, "device": self.device,
                                     "version": self.version, "input": self.input,
                                     "feature": self.feature}
        params.update(changes)
        return href(model_path(self.model), **params)


def _threshold(rules: Sequence[Mapping[str, Any]], model: str) -> tuple[float, str]:
    """The PSI line to draw: the lowest ``drift_psi`` rule of the model, else PSI_ALERT."""
    mine = [r for r in rules if r["model"] == model and r["kind"] == "drift_psi"]
    if not mine:
        return PSI_ALERT, f"{PSI_ALERT}: a significant shift (no drift alert rule)"
    low = min(mine, key=lambda r: (r["threshold"], r["id"]))
    return float(low["threshold"]), f"alert rule {low['id']}: PSI > {low['threshold']:g}"


def _default_version(view: Mapping[str, Any]) -> str | None:
    """The version with the most drift windows in the range (ties: the last), else the last
    version listed."""
    versions = view["versions"]
    if not versions:
        return None
    return str(max(reversed(versions), key=lambda v: v["drift_windows"])["version"])


def _latest_features(drift: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The per-feature rows of the latest bucket that has any."""
    return next((b["features"] for b in reversed(drift["buckets"]) if b["features"]), [])


def _psi_chart(model: str, drift: Mapping[str, Any], device: str | None, threshold: float,
               label: str) -> Markup:
    starts = [b["start"] for b in drift["buckets"]]
    if device is None:
        series = [LineSeries("max over devices", _points(starts, [b["max_psi"] for b in
                                                                  drift["buckets"]])),
                  LineSeries("mean over devices", _points(starts, [b["mean_psi"] for b in
                                                                   drift["buckets"]]))]
        title = f"{model}: largest input PSI per bucket, every device"
    else:
        series = [LineSeries(device, _points(starts, [b["max_psi"] for b in
                                                      drift["buckets"]]))]
        title = f"{model}: largest input PSI per bucket on {device}"
    return line_chart(series, title=title, threshold=threshold, threshold_label=label,
                      y_label="PSI", width=560, height=260,
                      empty_message="no drift summaries in this range yet")


def _version_charts(model: str, view: Mapping[str, Any]) -> tuple[Markup, Markup]:
    requests, p95 = [], []
    for v in view["versions"]:
        starts = [p["start"] for p in v["series"]]
        requests.append(LineSeries(v["version"], _points(starts, [float(p["requests"])
                                                                   for p in v["series"]])))
        p95.append(LineSeries(v["version"], _points(starts, [p["p95_ms"] for p in v["series"]])))
    return (line_chart(requests, title=f"{model}: requests per bucket, by version",
                       y_label="requests", width=560, height=240),
            line_chart(p95, title=f"{model}: p95 latency per bucket, by version",
                       y_label="ms", width=560, height=240))


def _distribution_chart(dist: Mapping[str, Any]) -> Markup:
    edges = [f"{e:.3g}" for e in dist["edges"]]
    categories = [f"< {edges[0]}", *(f"{a}..{b}" for a, b in itertools.pairwise(edges)),
                  f">= {edges[-1]}"]
    series = [BarSeries("reference", dist["reference"], "#9db4c8")]
    if dist["live"] is not None:
        series.append(BarSeries("live", dist["live"], "#d55e00"))
    what = f"{dist['input']}[{dist['feature']}]" + (
        f" on {dist['device']}" if dist.get("device") else "")
    psi = f", PSI {dist['psi']:.3g}" if dist["psi"] is not None else ", no live counts yet"
    return bar_chart(categories, series, title=f"{what} {dist['version']}: reference vs live "
                     f"(share of values per bin{psi})", y_label="share", width=560, height=260)


def model_page(fleet: Fleet, conn: Connection, model: str, span: Span, *,
               device: str | None = None, version: str | None = None,
               input_name: str | None = None, feature: int | None = None) -> ModelPage:
    """One model: health per version and device, PSI over time, requests and p95 over time,
    and one feature's reference against live distribution.

    The distribution is of ``version`` (default: the version with the most drift windows in
    the range), of ``device`` alone when one is chosen, and ``input_name``/``feature``
    (default: the feature with the largest PSI in the latest bucket that has drift
    summaries, else feature 0 of the only input). A
    distribution that cannot be shown (no baseline, an unknown feature) is a message on the
    page, not an error page.

    Raises:
        NotFound: no such model, or no such ``device``.
        InvalidInput: a bad range.
        StoreError: the database failed.
    """
    rng = span.range
    view = model_view(fleet, model, rng)
    drift = drift_view(fleet, model, rng, device=device)
    devices = [d["device"] for d in (drift if device is None else
                                     drift_view(fleet, model, rng))["devices"]]
    rules = list_rules(conn, limit=_ALL)[0]
    threshold, label = _threshold(rules, model)
    chosen_version = version if version is not None else _default_version(view)
    features: list[FeatureChoice] = []
    dist: dict[str, Any] | None = None
    error: str | None = None
    if chosen_version is None:
        error = "No version of this model was pushed or reported yet."
    else:
        latest = _latest_features(drift_view(fleet, model, rng, version=chosen_version))
        ranked = sorted(latest, key=lambda f: (-(f["psi_max"] or 0.0), f["input"],
                                               f["feature"]))
        want_input, want_feature = input_name, feature
        if want_feature is None and want_input is None and ranked:
            want_input, want_feature = ranked[0]["input"], ranked[0]["feature"]
        try:
            dist = distribution_view(fleet, model, rng, version=chosen_version,
                                     input_name=want_input, feature=want_feature or 0,
                                     device=device)
        except FleetError as exc:  # NotFound / InvalidInput: said on the page
            error = str(exc)
        shown = (dist["input"], dist["feature"]) if dist is not None else None
        base = {"since": span.text, "device": device, "version": chosen_version}
        features = [FeatureChoice(f["input"], f["feature"], f["psi_max"],
                                  href(model_path(model), **base, input=f["input"],
                                       feature=f["feature"]),
                                  (f["input"], f["feature"]) == shown)
                    for f in ranked[:PICKER_FEATURES]]
    open_alerts = [a for state in ("firing", "pending")
                   for a in list_alerts(conn, state=state, model=model, limit=_ALL)[0]]
    requests_chart, latency_chart = _version_charts(model, view)
    return ModelPage(
        model=model, span=span, view=view, drift=drift, device=device, devices=devices,
        threshold=threshold, threshold_label=label,
        psi_chart=_psi_chart(model, drift, device, threshold, label),
        requests_chart=requests_chart, latency_chart=latency_chart, version=chosen_version,
        input=input_name, feature=feature, distribution=dist, distribution_error=error,
        distribution_chart=_distribution_chart(dist) if dist is not None else None,
        features=features, open_alerts=open_alerts)


# ------------------------------------------------------------------------------- alerts
@dataclass(frozen=True)
class AlertsPage:
    firing: list[dict[str, Any]]  # newest first, as GET /v1/alerts?state=firing
    pending: list[dict[str, Any]]
    resolved: list[dict[str, Any]]  # one page, newest first
    resolved_total: int
    rules: list[dict[str, Any]]  # by id, as GET /v1/alert-rules


def alerts_page(conn: Connection, *, page: int, per_page: int) -> AlertsPage:
    """Open alerts (all), resolved ones (a page), and every rule.

    Raises:
        StoreError: the database failed.
    """
    resolved, total = list_alerts(conn, state="resolved", limit=per_page,
                                  offset=(page - 1) * per_page)
    return AlertsPage(firing=list_alerts(conn, state="firing", limit=_ALL)[0],
                      pending=list_alerts(conn, state="pending", limit=_ALL)[0],
                      resolved=resolved, resolved_total=total,
                      rules=list_rules(conn, limit=_ALL)[0])


# ------------------------------------------------------------------------------- device
@dataclass(frozen=True)
class DeviceHealth:
    span: Span
    view: dict[str, Any]  # device_view
    latest_psi: dict[tuple[str, str], float | None]  # (model, version) -> latest max PSI

    def latest(self, model: str, version: str) -> float | None:
        return self.latest_psi.get((model, version))


def device_health(fleet: Fleet, device_id: str, span: Span) -> DeviceHealth:
    """The device's requests, errors, latency and drift per model version it served
    (``GET /v1/monitoring/devices/{id}``), with the max PSI of its latest bucket that has one.

    Raises:
        NotFound: no such device.
        StoreError: the database failed.
    """
    view = device_view(fleet, device_id, span.range)
    latest = {(m["model"], m["version"]): next(
        (p["max_psi"] for p in reversed(m["series"]) if p["max_psi"] is not None), None)
        for m in view["models"]}
    return DeviceHealth(span, view, latest)
