"""The monitoring views: fleet, model, device, drift over time, reference against live.

Each view reads one time range of records (:func:`fleet_server.monitoring.records.load_samples`)
and folds them with :class:`fleet_server.rollout.health.Accumulator`, the aggregation the
rollout gates use, so a view and a gate never disagree about a device:

- *stats* (every view): ``requests``, ``errors``, ``error_rate``, ``errors_by_kind``, the
  ``p50_ms``/``p95_ms``/``p99_ms`` latency of the merged histograms, ``max_psi`` (the largest
  input-feature PSI of any drift window), ``drift_windows`` and the ``predictions`` they cover;
- *series*: one point per time bucket with the stats of the bucket, ``mean_psi`` (the mean over
  devices of each device's largest PSI in the bucket) and how many ``devices`` reported;
- drift per feature: per bucket and feature the largest and the mean over devices of each
  device's largest PSI and JS in the bucket;
- the live distribution of one feature: the devices' live bin counts summed over windows and
  devices, against the reference frequencies of the artifact's ``drift_baseline``, with the
  PSI and JS of the pooled counts.

Each function returns plain dicts (the API's response models describe them) and raises
:class:`~fleet_server.errors.NotFound` for an unknown device or model and
:class:`~fleet_server.errors.InvalidInput` for an input or feature the baseline does not have.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from sqlalchemy import func, select

from fleet_server.db import tables
from fleet_server.db.engine import reading
from fleet_server.errors import InvalidInput, NotFound
from fleet_server.fleet import Fleet
from fleet_server.monitoring import distance
from fleet_server.monitoring.records import Sample, device_rows, load_samples
from fleet_server.monitoring.timerange import TimeRange
from fleet_server.rollout.health import (
    DRIFT_KIND,
    Accumulator,
    DriftPoint,
    FeatureAccumulator,
    FeaturePoint,
)

__all__ = [
    "TREND_DELTA",
    "device_view",
    "distribution_view",
    "drift_view",
    "fleet_view",
    "model_view",
    "running_models",
    "stats",
]

#: a device's drift is ``rising``/``falling`` when its latest max PSI in the range is this much
#: above/below its first (half of ``agent.drift.PSI_WARN``); ``steady`` otherwise
TREND_DELTA: Final = 0.05
#: features listed per device in the drift view (those of its latest window, largest PSI first)
TOP_FEATURES: Final = 3


def _sig(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.6g}") + 0.0


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def stats(acc: Accumulator) -> dict[str, Any]:
    """The stats every view shows (module docstring) of one accumulator."""
    return {"requests": acc.requests, "errors": acc.errors, "error_rate": _sig(acc.error_rate),
            "errors_by_kind": dict(sorted(acc.errors_by_kind.items())),
            "p50_ms": _ms(acc.percentile("p50")), "p95_ms": _ms(acc.percentile("p95")),
            "p99_ms": _ms(acc.percentile("p99")), "max_psi": _sig(acc.max_psi),
            "drift_windows": acc.windows, "predictions": acc.samples}


def _mean(values: Sequence[float]) -> float | None:
    return _sig(math.fsum(values) / len(values)) if values else None


#: (bucket start, device, a view's key such as the version): the finest grain a view folds
Cell = tuple[int, str, Any]


def _cells(rng: TimeRange, samples: Iterable[Sample], key: Callable[[Sample], Any]
           ) -> dict[Cell, Accumulator]:
    """Each sample folded once, into its (bucket, device, ``key``) cell; every number a view
    shows is a merge of cells (far fewer than samples)."""
    out: dict[Cell, Accumulator] = {}
    for s in samples:
        cell = (rng.bucket(s.at), s.device_id, key(s))
        acc = out.get(cell)
        if acc is None:
            acc = out[cell] = Accumulator()
        acc.add(s.point)
    return out


def _rollup(cells: Mapping[Cell, Accumulator], key: Callable[[Cell], Any]
            ) -> dict[Any, Accumulator]:
    """Cells merged by ``key(cell)``."""
    out: dict[Any, Accumulator] = {}
    for cell, acc in cells.items():
        k = key(cell)
        merged = out.get(k)
        if merged is None:
            merged = out[k] = Accumulator()
        merged.merge(acc)
    return out


def _series(rng: TimeRange, cells: Mapping[Cell, Accumulator]) -> list[dict[str, Any]]:
    totals = _rollup(cells, lambda cell: cell[0])
    devices: dict[int, dict[str, float | None]] = {}
    for (start, device, _), acc in cells.items():
        seen = devices.setdefault(start, {})
        before = seen.get(device)
        seen[device] = acc.max_psi if before is None else (
            before if acc.max_psi is None else max(before, acc.max_psi))
    out = []
    for start in rng.starts():
        row = stats(totals.get(start) or Accumulator())
        del row["errors_by_kind"]
        psis = devices.get(start, {})
        out.append({"start": start, **row, "devices": len(psis),
                    "mean_psi": _mean([v for v in psis.values() if v is not None])})
    return out


def _last_at(samples: Iterable[Sample], key: Callable[[Sample], Any]) -> dict[Any, int]:
    """The latest receive time per ``key`` (samples come oldest first)."""
    return {key(s): s.at for s in samples}


def running_models(reported: str | None) -> list[tuple[str, str]]:
    """``(model, version)`` a device reported it runs (its stored ``reported`` message)."""
    try:
        running = (json.loads(reported) if reported else {}).get("running") or ()
    except (ValueError, AttributeError):
        return []
    return [(m["name"], m["version"]) for m in running if isinstance(m, Mapping)
            and isinstance(m.get("name"), str) and isinstance(m.get("version"), str)]


def _group(samples: Iterable[Sample], key: Callable[[Sample], Any]) -> dict[Any, list[Sample]]:
    out: dict[Any, list[Sample]] = {}
    for s in samples:
        out.setdefault(key(s), []).append(s)
    return out


def _alert_counts(fleet: Fleet) -> dict[str, int]:
    a = tables.alerts.c
    with reading(fleet.engine) as conn:
        got: dict[str, int] = dict(conn.execute(select(a.state, func.count()).where(
            a.state.in_(("pending", "firing"))).group_by(a.state)).all())
    return {"pending": int(got.get("pending", 0)), "firing": int(got.get("firing", 0))}


# ------------------------------------------------------------------------------- fleet
def fleet_view(fleet: Fleet, rng: TimeRange) -> dict[str, Any]:
    """Devices by state, every model and version (running on, stats), the fleet-wide stats
    and series, and how many alerts are pending and firing.

    Raises:
        StoreError: the database failed.
    """
    rows = device_rows(fleet.engine)
    live = [r for r in rows if r.revoked_at is None]
    running: dict[tuple[str, str], set[str]] = {}
    for r in live:
        for key in running_models(r.reported):
            running.setdefault(key, set()).add(r.id)
    samples = load_samples(fleet.engine, since=rng.since, until=rng.until,
                           device_ids=[r.id for r in rows])
    cells = _cells(rng, samples, lambda s: (s.point.model, s.point.version))
    by_version = _rollup(cells, lambda cell: cell[2])
    reporting: dict[tuple[str, str], set[str]] = {}
    for _, device, key in cells:
        reporting.setdefault(key, set()).add(device)
    names = sorted({m for m, _ in running} | {m for m, _ in by_version})
    models = []
    for name in names:
        keys = sorted({k for k in (*running, *by_version) if k[0] == name})
        model_acc = Accumulator()
        for k in keys:
            model_acc.merge(by_version.get(k) or Accumulator())
        versions = [{"version": v, "running_devices": len(running.get((m, v), ())),
                     "reporting_devices": len(reporting.get((m, v), ())),
                     **stats(by_version.get((m, v)) or Accumulator())} for m, v in keys]
        models.append({"model": name,
                       "running_devices": len(set().union(*(running.get(k, set())
                                                            for k in keys))),
                       "reporting_devices": len(set().union(*(reporting.get(k, set())
                                                              for k in keys))),
                       **stats(model_acc), "versions": versions})
    online = sum(1 for r in live if r.online)
    totals = Accumulator()
    for acc in by_version.values():
        totals.merge(acc)
    return {**rng.to_dict(),
            "devices": {"total": len(rows), "online": online, "offline": len(live) - online,
                        "revoked": len(rows) - len(live)},
            "totals": stats(totals), "models": models,
            "series": _series(rng, cells), "alerts": _alert_counts(fleet)}


# ------------------------------------------------------------------------------- model
def _pushed(fleet: Fleet, model: str) -> bool:
    """Whether any artifact of ``model`` was pushed."""
    a = tables.artifacts.c
    with reading(fleet.engine) as conn:
        return conn.execute(select(a.id).where(a.name == model).limit(1)).first() is not None


def model_view(fleet: Fleet, model: str, rng: TimeRange) -> dict[str, Any]:
    """One model: its stats and series, per version (devices running it, stats, series) and
    per device and version (stats, whether it still runs it, its latency budget). Devices
    that run the model but sent nothing in the range are listed with zero requests.

    Raises:
        NotFound: no artifact of the model was pushed and no device reports it.
        StoreError: the database failed.
    """
    rows = device_rows(fleet.engine)
    samples = load_samples(fleet.engine, since=rng.since, until=rng.until,
                           device_ids=[r.id for r in rows], model=model)
    runs = {r.id: {v for m, v in running_models(r.reported) if m == model}
            for r in rows if r.revoked_at is None}
    if not samples and not any(runs.values()) and not _pushed(fleet, model):
        raise NotFound(f"model {model!r} not found: no artifact was pushed and no device "
                       "reports it")
    cells = _cells(rng, samples, lambda s: s.point.version)
    pairs = _rollup(cells, lambda cell: (cell[1], cell[2]))
    last_at = _last_at(samples, lambda s: (s.device_id, s.point.version))
    for device_id, running in runs.items():
        for v in running:
            pairs.setdefault((device_id, v), Accumulator())
    info = {r.id: r for r in rows}
    devices = []
    for (device_id, version), acc in sorted(pairs.items()):
        r = info[device_id]
        profile = fleet.profiles.get(r.profile)
        devices.append({"device": device_id, "version": version, "profile": r.profile,
                        "online": bool(r.online), "revoked": r.revoked_at is not None,
                        "running": version in runs.get(device_id, ()),
                        "latency_budget_ms": profile.latency_budget_ms if profile else None,
                        "last_at": last_at.get((device_id, version)), **stats(acc)})
    versions: list[dict[str, Any]] = []
    totals = Accumulator()
    for version in sorted({v for _, v in pairs}):
        acc = Accumulator()
        for (_, v), pair in pairs.items():
            if v == version:
                acc.merge(pair)
        totals.merge(acc)
        mine = {cell: a for cell, a in cells.items() if cell[2] == version}
        versions.append({"version": version,
                         "running_devices": sum(1 for vs in runs.values() if version in vs),
                         "reporting_devices": len({cell[1] for cell in mine}),
                         **stats(acc), "series": _series(rng, mine)})
    return {"model": model, **rng.to_dict(), "totals": stats(totals),
            "versions": versions, "devices": devices, "series": _series(rng, cells)}


# ------------------------------------------------------------------------------- device
def device_view(fleet: Fleet, device_id: str, rng: TimeRange) -> dict[str, Any]:
    """One device: its registry state, the models it runs, and per model version it served
    in the range its stats and series.

    Raises:
        NotFound: no such device.
        StoreError: the database failed.
    """
    found = [r for r in device_rows(fleet.engine) if r.id == device_id]
    if not found:
        raise NotFound(f"device {device_id!r} not found")
    r = found[0]
    samples = load_samples(fleet.engine, since=rng.since, until=rng.until,
                           device_ids=[device_id])
    profile = fleet.profiles.get(r.profile)
    running = running_models(r.reported)
    cells = _cells(rng, samples, lambda s: (s.point.model, s.point.version))
    pairs = _rollup(cells, lambda cell: cell[2])
    last_at = _last_at(samples, lambda s: (s.point.model, s.point.version))
    totals = Accumulator()
    for acc in pairs.values():
        totals.merge(acc)
    models = [{"model": m, "version": v, "running": (m, v) in running,
               "last_at": last_at[(m, v)], **stats(acc),
               "series": _series(rng, {c: a for c, a in cells.items() if c[2] == (m, v)})}
              for (m, v), acc in sorted(pairs.items())]
    return {"device": device_id, **rng.to_dict(), "profile": r.profile,
            "online": bool(r.online), "revoked": r.revoked_at is not None,
            "last_seen_at": r.last_seen_at,
            "latency_budget_ms": profile.latency_budget_ms if profile else None,
            "running": [{"model": m, "version": v} for m, v in running],
            "totals": stats(totals), "models": models}


# ------------------------------------------------------------------------------- drift
def _trend(first: float, latest: float) -> str:
    if latest - first > TREND_DELTA:
        return "rising"
    if first - latest > TREND_DELTA:
        return "falling"
    return "steady"


def _feature_rows(devices: Mapping[str, Accumulator],
                  wanted: Callable[[str, int], bool]) -> list[dict[str, Any]]:
    per: dict[tuple[str, int], list[FeatureAccumulator]] = {}
    for acc in devices.values():
        for key, f in acc.features.items():
            if wanted(*key):
                per.setdefault(key, []).append(f)
    return [{"input": name, "feature": index,
             "psi_max": _sig(max(f.psi_max for f in fs)),
             "psi_mean": _mean([f.psi_max for f in fs]),
             "js_max": _sig(max(f.js_max for f in fs)),
             "js_mean": _mean([f.js_max for f in fs]),
             "samples": sum(f.samples for f in fs), "devices": len(fs)}
            for (name, index), fs in sorted(per.items())]


def drift_view(fleet: Fleet, model: str, rng: TimeRange, *, version: str | None = None,
               device: str | None = None, input_name: str | None = None,
               feature: int | None = None) -> dict[str, Any]:
    """Input drift of ``model`` over time, from the devices' drift summaries.

    Per bucket: the largest and the mean (over devices) max PSI, each device's max PSI, and
    per input feature the largest and mean PSI and JS (only ``input_name`` / ``feature`` when
    given). Per device: its max PSI per bucket (None where it sent no window), the first,
    latest and peak value, the trend (:data:`TREND_DELTA`), and the top features of its
    latest window.

    Raises:
        NotFound: ``device`` does not exist.
        StoreError: the database failed.
    """
    rows = device_rows(fleet.engine)
    ids = [r.id for r in rows]
    if device is not None:
        if device not in ids:
            raise NotFound(f"device {device!r} not found")
        ids = [device]
    samples = load_samples(fleet.engine, since=rng.since, until=rng.until, device_ids=ids,
                           model=model, version=version, kinds=(DRIFT_KIND,), features=True)

    def wanted(name: str, index: int) -> bool:
        return (input_name is None or name == input_name) and (feature is None
                                                               or index == feature)

    buckets: dict[int, dict[str, Accumulator]] = {}
    for (start, device_id, _), acc in _cells(rng, samples, lambda s: None).items():
        buckets.setdefault(start, {})[device_id] = acc
    out_buckets = []
    for start in rng.starts():
        devices = buckets.get(start, {})
        psis = {d: a.max_psi for d, a in sorted(devices.items()) if a.max_psi is not None}
        out_buckets.append({
            "start": start, "max_psi": _sig(max(psis.values(), default=None)),
            "mean_psi": _mean(list(psis.values())),
            "windows": sum(a.windows for a in devices.values()),
            "predictions": sum(a.samples for a in devices.values()),
            "devices": [{"device": d, "max_psi": _sig(v), "windows": devices[d].windows}
                        for d, v in psis.items()],
            "features": _feature_rows(devices, wanted)})
    per_device = []
    for device_id, mine in sorted(_group(samples, lambda s: s.device_id).items()):
        series = [_sig(buckets[start][device_id].max_psi)
                  if device_id in buckets.get(start, {}) else None for start in rng.starts()]
        points = [s.point for s in mine if isinstance(s.point, DriftPoint)]
        values = [p.max_psi for p in points]
        top = sorted((f for f in points[-1].features if wanted(f.input, f.feature)),
                     key=lambda f: (-f.psi, f.input, f.feature))[:TOP_FEATURES]
        per_device.append({
            "device": device_id, "versions": sorted({s.point.version for s in mine}),
            "windows": len(points), "predictions": sum(p.predictions for p in points),
            "first_max_psi": _sig(values[0]), "latest_max_psi": _sig(values[-1]),
            "peak_max_psi": _sig(max(values)), "latest_at": mine[-1].at,
            "trend": _trend(values[0], values[-1]), "series": series,
            "top_features": [{"input": f.input, "feature": f.feature, "psi": _sig(f.psi),
                              "js": _sig(f.js)} for f in top]})
    return {"model": model, "version": version, "device": device, "input": input_name,
            "feature": feature, **rng.to_dict(), "buckets": out_buckets,
            "devices": per_device}


# ------------------------------------------------------------------------------- distribution
def _reference(manifest: Mapping[str, Any], input_name: str | None, feature: int,
               where: str) -> tuple[str, str, list[float], list[float]]:
    """``(input, kind, edges, ref)`` of one feature of an artifact's drift baseline.

    Raises:
        NotFound: the manifest has no usable drift baseline.
        InvalidInput: the input or the feature is not in it.
    """
    baseline = manifest.get("drift_baseline")
    inputs = baseline.get("inputs") if isinstance(baseline, Mapping) else None
    if not isinstance(inputs, Mapping) or not inputs:
        raise NotFound(f"{where} has no drift baseline")
    if input_name is None:
        if len(inputs) != 1:
            raise InvalidInput(f"input: expected one of {sorted(inputs)} (the model has "
                               f"{len(inputs)} inputs), got none")
        input_name = str(next(iter(inputs)))
    entry = inputs.get(input_name)
    if not isinstance(entry, Mapping):
        raise InvalidInput(f"input: expected one of {sorted(inputs)}, got {input_name!r}")
    kind = entry.get("kind")
    if kind == "tabular":
        features = [f for f in entry.get("features") or () if isinstance(f, Mapping)]
        hist: Any = next((f for f in features if f.get("index") == feature), None)
        if hist is None:
            indexes = [f.get("index") for f in features]
            shown = f"{indexes[0]}..{indexes[-1]}" if indexes else "none"
            raise InvalidInput(f"feature: expected a feature index of input {input_name!r} "
                               f"({shown}), got {feature}")
    else:
        if feature != 0:
            raise InvalidInput(f"feature: expected 0 (input {input_name!r} is {kind}: one "
                               f"distribution of all its values), got {feature}")
        hist = entry.get("intensity")
    edges = hist.get("edges") if isinstance(hist, Mapping) else None
    ref = hist.get("ref") if isinstance(hist, Mapping) else None
    if not (isinstance(edges, list) and isinstance(ref, list) and len(ref) == len(edges) + 1):
        raise NotFound(f"{where} has no usable reference for input {input_name!r} feature "
                       f"{feature}")
    return input_name, str(kind), [float(e) for e in edges], [float(r) for r in ref]


def distribution_view(fleet: Fleet, model: str, rng: TimeRange, *, version: str,
                      input_name: str | None = None, feature: int = 0,
                      profile: str | None = None, device: str | None = None
                      ) -> dict[str, Any]:
    """The reference distribution of one input feature (an artifact's drift baseline)
    against the live one: the devices' live bin counts summed over the windows in the range
    (only ``device``'s, when given: the reference is then its profile's artifact).

    Devices count when their profile's artifact bins the feature with the same edges as the
    reference (the same calibration data gives the same input edges; ``profiles`` lists
    them). The reference is the artifact built for ``profile``; by default the one whose
    edges the most live windows share (ties: the first profile by name). Windows from agents
    that sent no bin counts are counted in ``windows_without_counts``.

    Raises:
        NotFound: no artifact of that model version (for that profile, or for ``device``'s
            profile), no drift baseline, or no such device.
        InvalidInput: the input or feature is not in the baseline, or ``profile`` is not
            ``device``'s.
        StoreError: the database failed.
    """
    rows = device_rows(fleet.engine)
    if device is not None:
        mine = [r for r in rows if r.id == device]
        if not mine:
            raise NotFound(f"device {device!r} not found")
        if profile is not None and profile != mine[0].profile:
            raise InvalidInput(f"profile: expected device {device!r}'s profile "
                               f"{mine[0].profile!r} or none, got {profile!r}")
        profile, rows = mine[0].profile, mine
    a = tables.artifacts.c
    with reading(fleet.engine) as conn:
        artifacts = conn.execute(select(a.profile, a.manifest).where(
            a.name == model, a.version == version).order_by(a.profile)).all()
    if not artifacts:
        raise NotFound(f"model {model!r} version {version!r} not found")
    if profile is not None and profile not in {row.profile for row in artifacts}:
        raise NotFound(f"model {model!r} version {version!r} has no artifact for profile "
                       f"{profile!r} (it has: {', '.join(r.profile for r in artifacts)})")
    refs: dict[str, tuple[str, str, list[float], list[float]]] = {}
    for row in artifacts:
        where = f"model {model!r} version {version!r} for profile {row.profile!r}"
        try:
            refs[row.profile] = _reference(json.loads(row.manifest), input_name, feature, where)
        except (InvalidInput, NotFound):
            if row.profile == profile or (profile is None and row is artifacts[-1]
                                          and not refs):
                raise  # the asked-for reference, or none is usable: say why
    rows = [r for r in rows if r.profile in refs]
    samples = load_samples(fleet.engine, since=rng.since, until=rng.until,
                           device_ids=[r.id for r in rows], model=model, version=version,
                           kinds=(DRIFT_KIND,), features=True)
    device_profile = {r.id: r.profile for r in rows}
    by_profile: dict[str, list[tuple[str, FeaturePoint]]] = {}
    for s in samples:
        for f in s.point.features if isinstance(s.point, DriftPoint) else ():
            if f.input == refs[device_profile[s.device_id]][0] and f.feature == feature:
                by_profile.setdefault(device_profile[s.device_id], []).append((s.device_id, f))

    def sharing(p: str) -> list[str]:
        return sorted(q for q in refs if refs[q][2] == refs[p][2])

    chosen = profile if profile is not None else max(
        sorted(refs), key=lambda p: sum(len(by_profile.get(q, ())) for q in sharing(p)))
    name, kind, edges, ref = refs[chosen]
    live = FeatureAccumulator()
    devices = set()
    for p in sharing(chosen):
        for device_id, f in by_profile.get(p, ()):
            live.add(f)
            devices.add(device_id)
    counts = live.counts if live.counts is not None and len(live.counts) == len(ref) else None
    total = sum(counts) if counts else 0
    return {"model": model, "version": version, "device": device, "input": name,
            "feature": feature, "kind": kind, "profile": chosen,
            "profiles": [profile] if device is not None else sharing(chosen),
            **rng.to_dict(), "edges": edges, "reference": ref,
            "live_counts": counts, "live": [c / total for c in counts] if counts and total
            else None, "samples": total, "windows": live.windows,
            "windows_without_counts": live.windows - live.counted, "devices": len(devices),
            "psi": _sig(distance.psi(ref, counts)) if counts and total else None,
            "js": _sig(distance.js_divergence(ref, counts)) if counts and total else None}
