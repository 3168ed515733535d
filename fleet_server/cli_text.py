"""Plain-text rendering for ``fleet_server`` commands (pure: API bodies in, lines out).

Kept apart from :mod:`fleet_server.cli` (option parsing and API calls) so the command module
stays a thin shell; the rollout and monitoring views are the largest renderings.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["alert_rules_table", "alerts_table", "deployment_progress_lines", "drift_lines",
           "duration", "fleet_monitor_lines", "model_monitor_lines", "rollout_lines",
           "rollouts_table", "selector_text", "sparkline", "table", "when"]


def when(ts: object) -> str:
    """Unix seconds as ``YYYY-MM-DD HH:MM:SSZ``; ``-`` for anything else."""
    if not isinstance(ts, (int, float)):
        return "-"
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Left-aligned columns, two spaces apart; None shows as ``-``."""
    cells = [[str(c) for c in headers]] + [["-" if c is None else str(c) for c in r]
                                            for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in cells]


def selector_text(sel: Mapping[str, Any]) -> str:
    """``device:a tag:lab profile:rpi4`` or ``all``."""
    if sel.get("all"):
        return "all"
    return " ".join([*(f"device:{d}" for d in sel.get("devices") or ()),
                     *(f"tag:{t}" for t in sel.get("tags") or ()),
                     *(f"profile:{p}" for p in sel.get("profiles") or ())]) or "-"


# --------------------------------------------------------------------------------- rollouts

def _percent(value: object) -> str:
    return f"{value * 100:g}%" if isinstance(value, (int, float)) else "-"


def _gates_text(gates: Mapping[str, Any]) -> str:
    p95 = gates.get("max_p95_ms")
    latency = ("off" if gates.get("latency_gate") is False
               else f"{p95:g} ms" if isinstance(p95, (int, float)) else "profile budget")
    error_rate = gates.get("max_error_rate")
    psi = gates.get("max_psi")
    timeout = gates.get("report_timeout_s")
    deadline = (f", report timeout {timeout}s ({gates.get('on_report_timeout') or 'fail'})"
                if timeout is not None else "")
    return (f"committed >= {_percent(gates.get('min_committed'))}, failed <= "
            f"{_percent(gates.get('max_failed'))}, bake {gates.get('bake_s')}s, error rate <= "
            f"{_percent(error_rate) if error_rate is not None else 'off'}, p95 <= {latency}, "
            f"psi <= {psi if psi is not None else 'off'}, min samples "
            f"{gates.get('min_samples')} on {_percent(gates.get('min_reporting', 1.0))} of "
            f"the committed, offline grace {gates.get('offline_grace_s')}s{deadline}")


def _counts(r: Mapping[str, Any]) -> str:
    totals = {k: sum(int(w.get(k) or 0) for w in r.get("waves") or ())
              for k in ("assigned", "committed", "failed", "pending", "reverted")}
    shown = [f"{totals['assigned']} assigned", f"{totals['committed']} committed",
             f"{totals['failed']} failed", f"{totals['pending']} pending"]
    if totals["reverted"]:
        shown.append(f"{totals['reverted']} reverted")
    return ", ".join(shown)


def _wave_text(r: Mapping[str, Any]) -> str:
    return (f"at wave {r.get('wave')} (waves 0-{int(r.get('wave_count') or 1) - 1}: "
            f"{r.get('waves_text')})")


def rollouts_table(items: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per rollout (the body of ``GET /v1/rollouts``)."""
    return table(["ID", "MODEL", "VERSION", "STATUS", "WAVE", "WAVES", "DEVICES", "REASON"], [
        [r.get("id"), r.get("model"), r.get("version"), r.get("status"), r.get("wave"),
         r.get("waves_text"), _counts(r), r.get("reason")] for r in items])


def rollout_lines(r: Mapping[str, Any]) -> list[str]:
    """``rollout status ID``: header, gates, per wave counts, latest gate evaluation, and every
    moved device's desired against running version (the body of ``GET /v1/rollouts/{id}``)."""
    spec = r.get("spec") or {}
    head = (f"Rollout {r.get('id')}: {r.get('model')} {r.get('version')} to "
            f"{selector_text(r.get('selector') or {})}: {r.get('status')} {_wave_text(r)}; "
            f"on failure: {r.get('on_failure')}")
    out = [head]
    if r.get("reason"):
        out.append(f"Reason: {r['reason']}")
    out.append(f"Gates: {_gates_text(spec.get('gates') or {})}")
    out.append(f"Started {when(r.get('created_at'))}; current wave since "
               f"{when(r.get('wave_started_at'))}; last planned {when(r.get('updated_at'))}")
    out += ["", *table(["WAVE", "TARGET", "ASSIGNED", "COMMITTED", "FAILED", "PENDING",
                        "REVERTED"],
                       [[w.get("index"), w.get("target"), w.get("assigned"), w.get("committed"),
                         w.get("failed"), w.get("pending"), w.get("reverted")]
                        for w in r.get("waves") or ()])]
    gates = r.get("gates") or []
    if gates:
        out += ["", "Latest gate evaluation:", *("  " + line for line in table(
            ["WAVE", "GATE", "VALUE", "LIMIT", "VERDICT", "DETAIL"],
            [[g.get("wave"), g.get("gate"), _number(g.get("value")), _number(g.get("limit")),
              {True: "pass", False: "FAIL"}.get(g.get("ok"), "waiting"), g.get("detail")]
             for g in gates]))]
    devices = r.get("devices")
    if devices is not None:
        out += ["", *table(
            ["DEVICE", "WAVE", "OUTCOME", "DESIRED", "RUNNING", "SEQ CARRIED/APPLIED",
             "LAST RESULT", "WHY"],
            [[d.get("device_id") + ("" if d.get("active", True) else " (not selected)"),
              d.get("wave"), d.get("outcome"), d.get("desired_version"),
              d.get("running_version"),
              f"{_dash(d.get('desired_sequence'))}/{_dash(d.get('applied_sequence'))}",
              d.get("last_result"), _why(d)] for d in devices])]
        if not devices:
            out.append("No device moved yet.")
    return out


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else "-"


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _why(d: Mapping[str, Any]) -> str | None:
    reason = d.get("reason")
    error = d.get("last_error")
    if reason and error and str(error) not in str(reason):
        return f"{reason}; device error: {error}"
    return reason or (f"device error: {error}" if error and d.get("outcome") != "committed"
                      else None)


def deployment_progress_lines(status: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per deployment (``FleetClient.rollout``): counts, then each targeted device."""
    out: list[str] = []
    if not status:
        out.append("No active deployments.")
    for entry in status:
        d = entry["deployment"]
        counts = ", ".join(f"{n} {k}" for k, n in sorted(entry["counts"].items())) or \
            "no live device matches"
        rollout = entry.get("rollout")
        how = (f"rollout {rollout.get('id')} {rollout.get('status')} {_wave_text(rollout)}"
               if rollout else "all at once")
        out += ["", (f"Deployment {d.get('id')}: {d.get('model')} {d.get('version')} to "
                     f"{selector_text(d.get('selector') or {})} ({d.get('status')}; {how}): "
                     f"{counts}")]
        rows = [[r["device"], *([r.get("wave")] if rollout else []),
                 "yes" if r["online"] else "no", r["desired_sequence"], r["applied_sequence"],
                 r["running_version"], r["state"] + (f": {r['error']}" if r["error"] else "")]
                for r in entry["devices"]]
        out += ["  " + line for line in table(
            ["DEVICE", *(["WAVE"] if rollout else []), "ONLINE", "DESIRED SEQ", "APPLIED SEQ",
             "RUNNING", "STATE"], rows)]
    return out


# --------------------------------------------------------------------------------- monitoring

#: PSI levels the drift view names (``agent.drift.PSI_WARN`` and ``PSI_ALERT``)
_PSI_WARN, _PSI_ALERT = 0.1, 0.25
_BARS = "▁▂▃▄▅▆▇█"


def duration(seconds: object) -> str:
    """``90`` -> ``1m30s``, ``3600`` -> ``1h``; ``-`` for anything but a number."""
    if not isinstance(seconds, (int, float)):
        return "-"
    left = int(seconds)
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size or (unit == "s" and not parts):
            parts.append(f"{left // size}{unit}")
            left %= size
    return "".join(parts)


def sparkline(values: Sequence[float | None], top: float) -> str:
    """One character per value, ``▁`` (0) to ``█`` (``top`` or more); ``·`` for None."""
    out = []
    for v in values:
        if v is None:
            out.append("·")
        else:
            level = min(len(_BARS) - 1, int(len(_BARS) * max(v, 0.0) / top)) if top > 0 else 0
            out.append(_BARS[level])
    return "".join(out)


def _n(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


def _rate(value: object) -> str:
    return f"{value:.2%}" if isinstance(value, (int, float)) else "-"


def _psi(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else "-"


def _span(view: Mapping[str, Any]) -> str:
    return (f"from {when(view.get('since'))} to {when(view.get('until'))} (buckets of "
            f"{duration(view.get('bucket_s'))})")


def _stats_line(s: Mapping[str, Any]) -> str:
    return (f"{_n(s.get('requests'))} requests, {_n(s.get('errors'))} errors "
            f"({_rate(s.get('error_rate'))}); latency p50 {_number(s.get('p50_ms'))} ms, p95 "
            f"{_number(s.get('p95_ms'))} ms, p99 {_number(s.get('p99_ms'))} ms; largest input "
            f"PSI {_psi(s.get('max_psi'))} over {_n(s.get('drift_windows'))} drift windows")


def fleet_monitor_lines(view: Mapping[str, Any]) -> list[str]:
    """``monitor fleet``: devices, alerts, totals, one row per model version."""
    d, a = view.get("devices") or {}, view.get("alerts") or {}
    out = [f"Fleet {_span(view)}:",
           (f"Devices: {d.get('total')} ({d.get('online')} online, {d.get('offline')} "
            f"offline, {d.get('revoked')} revoked); alerts: {a.get('firing')} firing, "
            f"{a.get('pending')} pending"),
           f"All models: {_stats_line(view.get('totals') or {})}", ""]
    rows = [[m.get("model"), v.get("version"), v.get("running_devices"),
             v.get("reporting_devices"), _n(v.get("requests")), _n(v.get("errors")),
             _rate(v.get("error_rate")), _number(v.get("p95_ms")), _psi(v.get("max_psi"))]
            for m in view.get("models") or () for v in m.get("versions") or ()]
    if not rows:
        return [*out, "No model runs on a device or reported anything in this range."]
    return out + table(["MODEL", "VERSION", "RUNNING ON", "REPORTING", "REQUESTS", "ERRORS",
                        "ERROR RATE", "P95 MS", "MAX PSI"], rows)


def model_monitor_lines(view: Mapping[str, Any]) -> list[str]:
    """``monitor model NAME``: totals, one row per version, one per device and version."""
    out = [f"{view.get('model')} {_span(view)}:",
           f"All versions: {_stats_line(view.get('totals') or {})}", ""]
    out += table(["VERSION", "RUNNING ON", "REPORTING", "REQUESTS", "ERRORS", "ERROR RATE",
                  "P50 MS", "P95 MS", "P99 MS", "MAX PSI"],
                 [[v.get("version"), v.get("running_devices"), v.get("reporting_devices"),
                   _n(v.get("requests")), _n(v.get("errors")), _rate(v.get("error_rate")),
                   _number(v.get("p50_ms")), _number(v.get("p95_ms")),
                   _number(v.get("p99_ms")), _psi(v.get("max_psi"))]
                  for v in view.get("versions") or ()])
    out += ["", *table(["DEVICE", "VERSION", "ONLINE", "REQUESTS", "ERRORS", "ERROR RATE",
                        "P95 MS", "BUDGET MS", "MAX PSI", "LAST RECORD"],
                       [[d.get("device") + ("" if d.get("running") else " (not running it)"),
                         d.get("version"), "yes" if d.get("online") else "no",
                         _n(d.get("requests")), _n(d.get("errors")),
                         _rate(d.get("error_rate")), _number(d.get("p95_ms")),
                         _number(d.get("latency_budget_ms")), _psi(d.get("max_psi")),
                         when(d.get("last_at"))] for d in view.get("devices") or ()])]
    return out


def _trend(d: Mapping[str, Any]) -> str:
    first, latest = d.get("first_max_psi"), d.get("latest_max_psi")
    if isinstance(first, (int, float)) and isinstance(latest, (int, float)):
        return f"{d.get('trend')} ({latest - first:+.3g})"
    return str(d.get("trend") or "-")


def drift_lines(view: Mapping[str, Any]) -> list[str]:
    """``monitor drift NAME``: per device its latest largest PSI, trend and PSI over time
    (a sparkline per bucket); with one device, also its buckets."""
    what = f"{view.get('model')} " + (f"{view['version']}" if view.get("version")
                                     else "(every version)")
    if view.get("device"):
        what += f" on {view['device']}"
    out = [f"Input drift of {what} {_span(view)}.",
           (f"PSI under {_PSI_WARN:g} is stable, {_PSI_WARN:g}-{_PSI_ALERT:g} a moderate "
            f"shift, over {_PSI_ALERT:g} a significant one."), ""]
    devices = view.get("devices") or []
    if not devices:
        return [*out, "No drift summary arrived in this range."]
    top = max([_PSI_ALERT, *(d.get("peak_max_psi") or 0.0 for d in devices)])
    out += table(["DEVICE", "VERSIONS", "WINDOWS", "LATEST MAX PSI", "TREND", "PSI OVER TIME",
                  "TOP FEATURES (LATEST WINDOW)"],
                 [[d.get("device"), ",".join(d.get("versions") or ()), d.get("windows"),
                   _psi(d.get("latest_max_psi")), _trend(d),
                   sparkline(d.get("series") or [], top),
                   ", ".join(f"{f.get('input')}[{f.get('feature')}] {_psi(f.get('psi'))}"
                             for f in d.get("top_features") or ())]
                  for d in devices])
    out.append(f"(PSI over time: one mark per bucket, █ = {top:.3g} or more, · = no window)")
    if view.get("device"):
        out += ["", *table(["BUCKET", "MAX PSI", "WINDOWS", "PREDICTIONS"],
                           [[when(b.get("start")), _psi(b.get("max_psi")), b.get("windows"),
                             _n(b.get("predictions"))]
                            for b in view.get("buckets") or () if b.get("windows")])]
    return out


# --------------------------------------------------------------------------------- alerts

def alert_rules_table(rules: Sequence[Mapping[str, Any]]) -> list[str]:
    """``alert rule list``."""
    if not rules:
        return ["No alert rules."]
    return table(["ID", "MODEL", "VERSION", "KIND", "THRESHOLD", "MIN DEVICES", "FOR",
                  "WINDOW", "MIN SAMPLES", "WEBHOOK"],
                 [[r.get("id"), r.get("model"), r.get("version") or "all", r.get("kind"),
                   _number(r.get("threshold")) if r.get("threshold") is not None
                   else "profile budget", r.get("min_devices"), duration(r.get("for_s")),
                   duration(r.get("window_s")), r.get("min_samples"), r.get("webhook_url")]
                  for r in rules])


def alerts_table(alerts: Sequence[Mapping[str, Any]]) -> list[str]:
    """``alert list``."""
    if not alerts:
        return ["No alerts."]
    return table(["ID", "RULE", "MODEL", "KIND", "STATE", "STARTED", "FIRED", "RESOLVED",
                  "SUMMARY"],
                 [[a.get("id"), a.get("rule_id"), a.get("model"), a.get("kind"),
                   str(a.get("state")).upper() if a.get("state") == "firing" else a.get("state"),
                   when(a.get("started_at")), when(a.get("fired_at")),
                   when(a.get("resolved_at")), a.get("summary")] for a in alerts])
