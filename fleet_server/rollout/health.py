"""A device's health on one model version, from the records it sent (pure).

The rollout gates judge each committed device on its requests, errors, p95 latency and input
drift. Devices send those as record bodies (stored by :mod:`fleet_server.ingest`):

- ``metrics.requests`` (telemetry, :mod:`agent.metrics`): per interval and per model version,
  ``count`` (requests), ``ok`` and ``errors`` by kind, and ``latency_ms`` of the successful
  requests as a histogram (``edges``, ``counts``, ``min``, ``max``) with percentiles;
- ``drift.summary`` (drift, :mod:`agent.drift.summary`): per window, ``max_psi`` (the largest
  input-feature PSI) and ``window.predictions``.

:func:`aggregate` folds the bodies of one model version into a :class:`Health`: requests and
errors are summed; p95 is estimated from the summed histograms when every interval used the
same bucket edges (else the worst interval's p95, conservatively); ``max_psi`` is the largest
of the windows and ``samples`` the predictions they cover. Bodies are device input: one that is
malformed or about another model version is skipped, never trusted to raise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from agent.metrics import METRICS_KIND, estimate_percentile

__all__ = ["DRIFT_KIND", "METRICS_KIND", "Health", "aggregate"]

#: record kind of a drift summary (``agent.drift.summary.DRIFT_SUMMARY_KIND``; not imported:
#: that module needs numpy, the server's view of the body does not)
DRIFT_KIND: Final = "drift.summary"


@dataclass(frozen=True)
class Health:
    """What :class:`fleet_server.rollout.DeviceReport` takes about a device's health."""

    requests: int = 0
    errors: int = 0
    p95_ms: float | None = None
    max_psi: float | None = None
    samples: int = 0


def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


def _about(body: Mapping[str, Any], model: str, version: str) -> bool:
    return body.get("model") == model and body.get("model_version") == version


def aggregate(model: str, version: str, bodies: Iterable[tuple[str, Mapping[str, Any]]]
              ) -> Health:
    """Fold ``(kind, body)`` records into the health of ``model`` ``version``.

    Records of other kinds, models or versions, and malformed bodies, are skipped.
    """
    requests = errors = samples = 0
    psi: float | None = None
    worst_p95: float | None = None
    edges: list[float] | None = None
    counts: list[int] | None = None
    low, high = math.inf, 0.0
    mergeable = True
    for kind, body in bodies:
        if not isinstance(body, Mapping) or not _about(body, model, version):
            continue
        if kind == METRICS_KIND:
            count, ok = _count(body.get("count")), _count(body.get("ok"))
            if count is None or ok is None or ok > count:
                continue
            requests += count
            errors += count - ok
            latency = body.get("latency_ms")
            if not isinstance(latency, Mapping):
                continue
            p95 = _number(latency.get("p95"))
            if p95 is not None:
                worst_p95 = p95 if worst_p95 is None else max(worst_p95, p95)
            e, c = latency.get("edges"), latency.get("counts")
            lo, hi = _number(latency.get("min")), _number(latency.get("max"))
            if not (isinstance(e, list) and isinstance(c, list) and len(c) == len(e) + 1
                    and all(_number(x) is not None for x in e)
                    and all(_count(x) is not None for x in c)):
                mergeable = False
                continue
            if not sum(c):
                continue
            if lo is None or hi is None:
                mergeable = False
                continue
            if edges is None or counts is None:
                edges, counts = [float(x) for x in e], [0] * len(c)
            elif [float(x) for x in e] != edges:
                mergeable = False
                continue
            counts = [a + b for a, b in zip(counts, c, strict=True)]
            low, high = min(low, lo), max(high, hi)
        elif kind == DRIFT_KIND:
            value = _number(body.get("max_psi"))
            window = body.get("window")
            predictions = _count(window.get("predictions")) if isinstance(window, Mapping) \
                else None
            if value is None or predictions is None:
                continue
            psi = value if psi is None else max(psi, value)
            samples += predictions
    p95_ms = worst_p95
    if mergeable and edges is not None and counts is not None and any(counts):
        p95_ms = estimate_percentile(edges, counts, 0.95, low=low, high=high)
    return Health(requests=requests, errors=errors, p95_ms=p95_ms, max_psi=psi,
                  samples=samples)
