"""Plain-text rendering for ``fleet_server`` commands (pure: API bodies in, lines out).

Kept apart from :mod:`fleet_server.cli` (option parsing and API calls) so the command module
stays a thin shell; the rollout views are the largest renderings.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["deployment_progress_lines", "rollout_lines", "rollouts_table", "selector_text",
           "table", "when"]


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
    return (f"committed >= {_percent(gates.get('min_committed'))}, failed <= "
            f"{_percent(gates.get('max_failed'))}, bake {gates.get('bake_s')}s, error rate <= "
            f"{_percent(error_rate) if error_rate is not None else 'off'}, p95 <= {latency}, "
            f"psi <= {psi if psi is not None else 'off'}, min samples "
            f"{gates.get('min_samples')}, offline grace {gates.get('offline_grace_s')}s")


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
