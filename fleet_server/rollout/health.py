"""What devices report about a model version, parsed and folded (pure): the ONE aggregation
that rollout gates and fleet monitoring both read.

Devices send two kinds of record bodies (stored by :mod:`fleet_server.ingest`):

- ``metrics.requests`` (telemetry, :mod:`agent.metrics`): per interval and per model version,
  ``count`` (requests), ``ok`` and ``errors`` by kind, and ``latency_ms`` of the successful
  requests as a histogram (``edges``, ``counts``, ``min``, ``max``) with percentiles;
- ``drift.summary`` (drift, :mod:`agent.drift.summary`): per window, ``max_psi`` (the largest
  input-feature PSI), ``window.predictions`` and, per input and feature, ``psi``, ``js``,
  ``samples`` and (since the agent sends them) ``counts``, the live counts per reference bin.

:func:`parse_metrics` and :func:`parse_drift` check one body and return a
:class:`MetricsPoint` / :class:`DriftPoint`, or None for a malformed body (bodies are device
input: skipped, never trusted to raise). An :class:`Accumulator` folds points, and other
accumulators, together:

- requests and errors are summed;
- latency percentiles are estimated (:func:`agent.metrics.estimate_percentile`) from the summed
  histograms while every interval used the same bucket edges; otherwise the worst (largest)
  percentile any interval reported stands in, conservatively;
- ``max_psi`` is the largest of the windows, ``samples`` the predictions they cover; per
  feature the largest and the summed PSI and JS (for means), the samples, and the summed live
  counts of the windows that carried them.

:func:`aggregate` is the rollout gates' view of one device (:class:`Health`); the monitoring
queries (:mod:`fleet_server.monitoring`) fold the same points per device, version and time
bucket.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from agent.metrics import METRICS_KIND, PERCENTILES, estimate_percentile

__all__ = [
    "DRIFT_KIND",
    "METRICS_KIND",
    "Accumulator",
    "DriftPoint",
    "FeatureAccumulator",
    "FeaturePoint",
    "Health",
    "Histogram",
    "MetricsPoint",
    "aggregate",
    "parse_drift",
    "parse_metrics",
    "parse_record",
]

#: record kind of a drift summary (``agent.drift.summary.DRIFT_SUMMARY_KIND``; not imported:
#: that module needs numpy, the server's view of the body does not)
DRIFT_KIND: Final = "drift.summary"
#: the percentile names a metrics body carries (``p50``, ``p95``, ``p99``) and their ranks
_QUANTILES: Final = dict(PERCENTILES)


@dataclass(frozen=True)
class Health:
    """What :class:`fleet_server.rollout.DeviceReport` takes about a device's health."""

    requests: int = 0
    errors: int = 0
    p95_ms: float | None = None
    max_psi: float | None = None
    samples: int = 0


# ------------------------------------------------------------------------------- parsing
def _count(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


@dataclass(frozen=True)
class Histogram:
    """Latencies of successful requests in buckets: ``counts`` has ``len(edges) + 1`` entries
    (the last is the overflow bucket); ``low``/``high`` the smallest and largest value."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]
    low: float
    high: float


@dataclass(frozen=True)
class MetricsPoint:
    """One checked ``metrics.requests`` body.

    ``histogram`` is None when the body had no latency buckets or none was counted;
    ``mergeable`` is False when it had buckets that cannot be merged (malformed, or no
    min/max), so percentiles fall back to ``reported``, the device's own estimates.
    """

    model: str
    version: str
    requests: int
    errors: int
    errors_by_kind: Mapping[str, int]
    histogram: Histogram | None
    mergeable: bool
    reported: Mapping[str, float]


@dataclass(frozen=True)
class FeaturePoint:
    """One input feature of a drift window; ``counts`` the live counts per reference bin,
    None in bodies from agents that did not send them."""

    input: str
    feature: int
    psi: float
    js: float
    samples: int
    counts: tuple[int, ...] | None


@dataclass(frozen=True)
class DriftPoint:
    """One checked ``drift.summary`` body (``features`` empty unless asked for)."""

    model: str
    version: str
    max_psi: float
    predictions: int
    features: tuple[FeaturePoint, ...] = ()


def _numbers(values: list[Any]) -> bool:
    """Every value a finite number >= 0 (not a bool): one pass of C builtins, since
    monitoring checks every bucket edge of every stored interval."""
    return all(type(x) is float or type(x) is int for x in values) and (
        not values or (min(values) >= 0 and math.isfinite(sum(values))))


def _counts(values: list[Any]) -> bool:
    """Every value an int >= 0 (not a bool)."""
    return all(type(x) is int for x in values) and (not values or min(values) >= 0)


def _about(body: Mapping[str, Any]) -> tuple[str, str] | None:
    model, version = body.get("model"), body.get("model_version")
    if isinstance(model, str) and isinstance(version, str):
        return model, version
    return None


def parse_metrics(body: object) -> MetricsPoint | None:
    """A ``metrics.requests`` body as a :class:`MetricsPoint`; None when malformed (no model
    and version, ``count``/``ok`` not counts, or more ``ok`` than ``count``)."""
    if not isinstance(body, Mapping) or (about := _about(body)) is None:
        return None
    count, ok = _count(body.get("count")), _count(body.get("ok"))
    if count is None or ok is None or ok > count:
        return None
    raw_errors = body.get("errors")
    by_kind = {str(k): n for k, v in raw_errors.items() if (n := _count(v))} \
        if isinstance(raw_errors, Mapping) else {}
    latency = body.get("latency_ms")
    histogram, mergeable, reported = None, True, {}
    if isinstance(latency, Mapping):
        reported = {name: v for name in _QUANTILES if (v := _number(latency.get(name)))
                    is not None}
        e, c = latency.get("edges"), latency.get("counts")
        lo, hi = _number(latency.get("min")), _number(latency.get("max"))
        if not (isinstance(e, list) and isinstance(c, list) and len(c) == len(e) + 1
                and _numbers(e) and _counts(c)):
            mergeable = False
        elif sum(c):
            if lo is None or hi is None:
                mergeable = False
            else:
                histogram = Histogram(tuple(map(float, e)), tuple(c), lo, hi)
    return MetricsPoint(about[0], about[1], count, count - ok, by_kind, histogram, mergeable,
                        reported)


def _features(body: Mapping[str, Any]) -> tuple[FeaturePoint, ...]:
    inputs = body.get("inputs")
    if not isinstance(inputs, Mapping):
        return ()
    out = []
    for name, entry in inputs.items():
        features = entry.get("features") if isinstance(entry, Mapping) else None
        for f in features if isinstance(features, list) else ():
            if not isinstance(f, Mapping):
                continue
            index, samples = _count(f.get("feature")), _count(f.get("samples"))
            psi, js = _number(f.get("psi")), _number(f.get("js"))
            if index is None or samples is None or psi is None or js is None:
                continue
            counts = f.get("counts")
            live = tuple(counts) if isinstance(counts, list) and counts and _counts(counts) \
                else None
            out.append(FeaturePoint(str(name), index, psi, js, samples, live))
    return tuple(out)


def parse_drift(body: object, *, features: bool = False) -> DriftPoint | None:
    """A ``drift.summary`` body as a :class:`DriftPoint`; None when malformed (no model and
    version, ``max_psi`` not a number >= 0, ``window.predictions`` not a count).

    Args:
        features: also read the per-feature statistics (malformed features are left out).
    """
    if not isinstance(body, Mapping) or (about := _about(body)) is None:
        return None
    value = _number(body.get("max_psi"))
    window = body.get("window")
    predictions = _count(window.get("predictions")) if isinstance(window, Mapping) else None
    if value is None or predictions is None:
        return None
    return DriftPoint(about[0], about[1], value, predictions,
                      _features(body) if features else ())


def parse_record(kind: str, body: object, *, features: bool = False
                 ) -> MetricsPoint | DriftPoint | None:
    """The point of a record of either kind; None for other kinds and malformed bodies."""
    if kind == METRICS_KIND:
        return parse_metrics(body)
    if kind == DRIFT_KIND:
        return parse_drift(body, features=features)
    return None


# ------------------------------------------------------------------------------- folding
@dataclass
class FeatureAccumulator:
    """One input feature over drift windows: largest and summed PSI and JS, windows, samples,
    and the summed live counts of the windows that carried them (``counted`` of them)."""

    psi_max: float = 0.0
    psi_sum: float = 0.0
    js_max: float = 0.0
    js_sum: float = 0.0
    windows: int = 0
    samples: int = 0
    counts: list[int] | None = None
    counted: int = 0
    mismatched: int = 0  # windows whose counts had another number of bins (left out)

    def add(self, f: FeaturePoint) -> None:
        self._fold(f.psi, f.psi, f.js, f.js, 1, f.samples)
        if f.counts is not None:
            self._add_counts(list(f.counts), 1)

    def merge(self, other: FeatureAccumulator) -> None:
        self._fold(other.psi_max, other.psi_sum, other.js_max, other.js_sum, other.windows,
                   other.samples)
        self.mismatched += other.mismatched
        if other.counts is not None:
            self._add_counts(other.counts, other.counted)

    def _fold(self, psi_max: float, psi_sum: float, js_max: float, js_sum: float,
              windows: int, samples: int) -> None:
        self.psi_max, self.js_max = max(self.psi_max, psi_max), max(self.js_max, js_max)
        self.psi_sum += psi_sum
        self.js_sum += js_sum
        self.windows += windows
        self.samples += samples

    def _add_counts(self, counts: list[int], windows: int) -> None:
        if self.counts is None:
            self.counts, self.counted = list(counts), windows
        elif len(counts) == len(self.counts):
            self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
            self.counted += windows
        else:
            self.mismatched += windows


@dataclass
class Accumulator:
    """Requests, errors, latency and drift of any set of points (one device's interval, a
    version over a day, a whole fleet): add points, merge accumulators, read numbers."""

    requests: int = 0
    errors: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    intervals: int = 0
    windows: int = 0
    samples: int = 0  # predictions the drift windows cover
    max_psi: float | None = None
    features: dict[tuple[str, int], FeatureAccumulator] = field(default_factory=dict)
    _edges: tuple[float, ...] | None = None
    _counts: list[int] | None = None
    _low: float = math.inf
    _high: float = 0.0
    _mergeable: bool = True
    _worst: dict[str, float] = field(default_factory=dict)

    def add(self, point: MetricsPoint | DriftPoint) -> None:
        """Fold in one parsed record."""
        if isinstance(point, MetricsPoint):
            self.add_metrics(point)
        else:
            self.add_drift(point)

    def add_metrics(self, point: MetricsPoint) -> None:
        self.requests += point.requests
        self.errors += point.errors
        self.intervals += 1
        for kind, n in point.errors_by_kind.items():
            self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + n
        self._worse(point.reported)
        if not point.mergeable:
            self._mergeable = False
        elif point.histogram is not None:
            h = point.histogram
            self._add_histogram(h.edges, list(h.counts), h.low, h.high)

    def add_drift(self, point: DriftPoint) -> None:
        self.windows += 1
        self.samples += point.predictions
        self.max_psi = point.max_psi if self.max_psi is None else max(self.max_psi,
                                                                       point.max_psi)
        for f in point.features:
            self.features.setdefault((f.input, f.feature), FeatureAccumulator()).add(f)

    def merge(self, other: Accumulator) -> None:
        """Fold in everything ``other`` holds (it is left unchanged)."""
        self.requests += other.requests
        self.errors += other.errors
        self.intervals += other.intervals
        self.windows += other.windows
        self.samples += other.samples
        for kind, n in other.errors_by_kind.items():
            self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + n
        if other.max_psi is not None:
            self.max_psi = other.max_psi if self.max_psi is None else max(self.max_psi,
                                                                           other.max_psi)
        for key, f in other.features.items():
            self.features.setdefault(key, FeatureAccumulator()).merge(f)
        self._worse(other._worst)
        if not other._mergeable:
            self._mergeable = False
        elif other._edges is not None and other._counts is not None:
            self._add_histogram(other._edges, other._counts, other._low, other._high)

    def _worse(self, reported: Mapping[str, float]) -> None:
        for name, value in reported.items():
            self._worst[name] = max(self._worst.get(name, value), value)

    def _add_histogram(self, edges: tuple[float, ...], counts: list[int], low: float,
                       high: float) -> None:
        if self._edges is None or self._counts is None:
            self._edges, self._counts = edges, list(counts)
        elif edges != self._edges:
            self._mergeable = False
            return
        else:
            self._counts = [a + b for a, b in zip(self._counts, counts, strict=True)]
        self._low, self._high = min(self._low, low), max(self._high, high)

    @property
    def error_rate(self) -> float | None:
        """errors / requests; None without requests."""
        return self.errors / self.requests if self.requests else None

    def percentile(self, name: str) -> float | None:
        """``p50``, ``p95`` or ``p99`` latency in ms (module docstring); None without data.

        Raises:
            ValueError: another name.
        """
        if name not in _QUANTILES:
            raise ValueError(f"percentile: expected one of {', '.join(_QUANTILES)}, got "
                             f"{name!r}")
        if self._mergeable and self._edges is not None and self._counts is not None \
                and any(self._counts):
            return estimate_percentile(self._edges, self._counts, _QUANTILES[name],
                                       low=self._low, high=self._high)
        return self._worst.get(name)

    def health(self) -> Health:
        return Health(requests=self.requests, errors=self.errors,
                      p95_ms=self.percentile("p95"), max_psi=self.max_psi,
                      samples=self.samples)


def aggregate(model: str, version: str, bodies: Iterable[tuple[str, Mapping[str, Any]]]
              ) -> Health:
    """Fold ``(kind, body)`` records into the health of ``model`` ``version``.

    Records of other kinds, models or versions, and malformed bodies, are skipped.
    """
    acc = Accumulator()
    for kind, body in bodies:
        point = parse_record(kind, body)
        if point is not None and point.model == model and point.version == version:
            acc.add(point)
    return acc.health()
