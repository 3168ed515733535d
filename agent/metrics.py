"""Per-request serving metrics, aggregated per interval into outbox rows (pure, thread-safe).

The local inference API calls :meth:`RequestMetrics.observe` once per request, from whatever
thread serves it; the daemon calls :meth:`RequestMetrics.flush` every
``AgentConfig.metrics_interval_s`` and appends each returned body to the outbox as a
``telemetry`` row of kind :data:`METRICS_KIND`, priority ``"metrics"`` (the first rows to be
evicted when the outbox is full).

One body per model name and version that saw a request in the interval::

    {"version": 1, "model": "digits-mlp", "model_version": "3",
     "interval": {"start": 1700000000.0, "end": 1700000010.0},
     "count": 120, "ok": 117, "errors": {"4xx": 2, "5xx": 0, "runtime": 1},
     "latency_ms": {"edges": [0.5, 1, 2, ...], "counts": [0, 12, 80, ...],
                    "count": 117, "sum": 201.4, "min": 0.8, "max": 9.7,
                    "p50": 1.6, "p95": 4.1, "p99": 8.2}}

``latency_ms`` covers the successful requests (errors are counted by kind: ``4xx`` the
request was refused, ``5xx`` the server failed, ``runtime`` the model failed to run). Bucket
``i`` holds latencies in ``(edges[i-1], edges[i]]`` (``[0, edges[0]]`` for the first, and
``(edges[-1], inf)`` for the extra last one), the same "equal goes to the lower bin" rule as
:mod:`agent.drift.stats`. The percentiles are estimated from the buckets by linear
interpolation inside the bucket that holds the rank (as Prometheus' ``histogram_quantile``
does), clamped to the observed min and max; so an estimate is off by at most the width of its
bucket, and exact when every value of the interval is the same.

No clock inside: the interval's start is given at construction and each ``flush(now)`` ends
one interval and starts the next. Misuse raises ``ValueError``.

Running totals: :meth:`RequestMetrics.totals` gives the same counts since construction, never
reset (each flush folds its interval into them, under the same lock, so a reader never sees a
total go down). The agent's Prometheus ``/metrics`` reads them at scrape time
(:mod:`agent.serving.prom`), so a request pays for one aggregation, not two.
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "DEFAULT_BUCKETS_MS",
    "ERROR_KINDS",
    "METRICS_KIND",
    "METRICS_VERSION",
    "PERCENTILES",
    "LatencyHistogram",
    "RequestMetrics",
    "RequestTotals",
    "estimate_percentile",
]

#: upper bucket edges in milliseconds; one more bucket holds everything above the last
DEFAULT_BUCKETS_MS: Final = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0,
                             1000.0, 2000.0, 5000.0, 10000.0)
#: what a failed request may be counted as
ERROR_KINDS: Final = ("4xx", "5xx", "runtime")
#: outbox kind of a metrics row (stream ``"telemetry"``, priority ``"metrics"``)
METRICS_KIND: Final = "metrics.requests"
#: version of the body :meth:`RequestMetrics.flush` writes
METRICS_VERSION: Final = 1
#: the percentiles every body carries, by name
PERCENTILES: Final = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))


def _check_edges(edges: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(e) for e in edges)
    if not out:
        raise ValueError("latency bucket edges: expected at least one edge, got none")
    if any(not math.isfinite(e) or e <= 0 for e in out):
        raise ValueError(f"latency bucket edges: expected finite values > 0, got {list(out)}")
    if any(b <= a for a, b in itertools.pairwise(out)):
        raise ValueError(f"latency bucket edges: expected strictly increasing, got {list(out)}")
    return out


def estimate_percentile(edges: Sequence[float], counts: Sequence[int], q: float, *,
                        low: float, high: float) -> float | None:
    """The ``q`` quantile of bucketed latencies, interpolated inside its bucket.

    Args:
        edges: upper bucket edges (ms), strictly increasing.
        counts: ``len(edges) + 1`` counts; the last is the overflow bucket.
        q: in ``(0, 1]``.
        low: the smallest value counted (bounds the first bucket and the estimate).
        high: the largest value counted (bounds the overflow bucket and the estimate).

    Returns:
        The estimate in ms, or None when nothing was counted.

    Raises:
        ValueError: ``q`` out of range or ``counts`` of the wrong length.
    """
    if not 0 < q <= 1:
        raise ValueError(f"q: expected a value in (0, 1], got {q}")
    if len(counts) != len(edges) + 1:
        raise ValueError(f"counts: expected {len(edges) + 1} buckets, got {len(counts)}")
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            lower = edges[i - 1] if i > 0 else 0.0
            upper = edges[i] if i < len(edges) else high
            lower, upper = max(lower, low), min(upper, high)
            value = lower + (upper - lower) * (rank - seen) / count
            return min(max(value, low), high)
        seen += count
    return high  # unreachable: the last non-empty bucket always holds the rank


@dataclass
class LatencyHistogram:
    """Latencies of one interval in fixed buckets (not thread-safe: :class:`RequestMetrics`
    holds the lock)."""

    edges: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    low: float = math.inf
    high: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.edges) + 1)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def add(self, ms: float) -> None:
        self.counts[bisect.bisect_left(self.edges, ms)] += 1
        self.total += ms
        self.low = min(self.low, ms)
        self.high = max(self.high, ms)

    def percentile(self, q: float) -> float | None:
        return estimate_percentile(self.edges, self.counts, q, low=self.low, high=self.high)

    def to_body(self) -> dict[str, Any]:
        n = self.count
        body: dict[str, Any] = {"edges": list(self.edges), "counts": list(self.counts),
                                "count": n, "sum": round(self.total, 3),
                                "min": round(self.low, 3) if n else None,
                                "max": round(self.high, 3) if n else None}
        for name, q in PERCENTILES:
            value = self.percentile(q)
            body[name] = round(value, 3) if value is not None else None
        return body


@dataclass
class _Model:
    latency: LatencyHistogram
    count: int = 0
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_KINDS, 0))

    def add(self, other: _Model) -> None:
        """Fold ``other`` (same edges) into this one."""
        self.count += other.count
        for kind, n in other.errors.items():
            self.errors[kind] += n
        mine, theirs = self.latency, other.latency
        mine.counts = [a + b for a, b in zip(mine.counts, theirs.counts, strict=True)]
        mine.total += theirs.total
        mine.low = min(mine.low, theirs.low)
        mine.high = max(mine.high, theirs.high)


@dataclass(frozen=True)
class RequestTotals:
    """One model version's requests since the :class:`RequestMetrics` was made."""

    model: str
    version: str
    count: int  # every request counted, ok or not
    errors: Mapping[str, int]  # failed requests by kind (ERROR_KINDS)
    latency_counts: tuple[int, ...]  # successes per bucket: len(edges) + 1, the last overflow
    latency_sum_ms: float  # of the successes

    @property
    def ok(self) -> int:
        return sum(self.latency_counts)


class RequestMetrics:
    """Request counts, errors and latency per model and version, one interval at a time."""

    def __init__(self, *, start: float, edges_ms: Sequence[float] = DEFAULT_BUCKETS_MS) -> None:
        """Start the first interval at ``start``.

        Raises:
            ValueError: edges not finite, not > 0 or not strictly increasing.
        """
        self.edges_ms = _check_edges(edges_ms)
        self._lock = threading.Lock()
        self._start = float(start)
        self._models: dict[tuple[str, str], _Model] = {}
        self._totals: dict[tuple[str, str], _Model] = {}  # the flushed intervals, folded

    def observe(self, model: str, version: str, latency_ms: float, ok: bool,
                error_kind: str | None = None) -> None:
        """Count one request (thread-safe).

        Args:
            model: the model's name.
            version: the model's version.
            latency_ms: how long the request took; counted for successful requests only.
            ok: whether it succeeded.
            error_kind: one of :data:`ERROR_KINDS` when ``ok`` is False, else None.

        Raises:
            ValueError: an empty model or version, a negative or non-finite latency, or an
                ``error_kind`` that does not match ``ok``.
        """
        if not model or not version:
            raise ValueError(f"model and version: expected non-empty strings, got "
                             f"{model!r} and {version!r}")
        if isinstance(latency_ms, bool) or not isinstance(latency_ms, (int, float)) \
                or not math.isfinite(latency_ms) or latency_ms < 0:
            raise ValueError(f"latency_ms: expected a finite number >= 0, got {latency_ms!r}")
        if ok and error_kind is not None:
            raise ValueError(f"error_kind: expected None for a successful request, got "
                             f"{error_kind!r}")
        if not ok and error_kind not in ERROR_KINDS:
            raise ValueError(f"error_kind: expected one of {', '.join(ERROR_KINDS)} for a "
                             f"failed request, got {error_kind!r}")
        with self._lock:
            entry = self._models.get((model, version))
            if entry is None:
                entry = self._models[(model, version)] = _Model(LatencyHistogram(self.edges_ms))
            entry.count += 1
            if ok:
                entry.latency.add(float(latency_ms))
            else:
                entry.errors[str(error_kind)] += 1

    def flush(self, now: float) -> list[dict[str, Any]]:
        """End the interval at ``now``: one body per model and version seen, and reset.

        Returns:
            Bodies for ``metrics`` outbox rows, sorted by model and version; empty when no
            request came in the interval (the next interval starts at ``now`` either way).
        """
        with self._lock:
            models, self._models = self._models, {}
            start, self._start = self._start, float(now)
            for key, entry in models.items():
                self._fold(self._totals, key, entry)
        bodies = []
        for (model, version), entry in sorted(models.items()):
            bodies.append({
                "version": METRICS_VERSION, "model": model, "model_version": version,
                "interval": {"start": start, "end": float(now)},
                "count": entry.count, "ok": entry.latency.count, "errors": dict(entry.errors),
                "latency_ms": entry.latency.to_body(),
            })
        return bodies

    def totals(self) -> list[RequestTotals]:
        """Counts per model and version since construction (the running interval included),
        sorted by model and version (thread-safe)."""
        with self._lock:
            merged: dict[tuple[str, str], _Model] = {}
            for source in (self._totals, self._models):
                for key, entry in source.items():
                    self._fold(merged, key, entry)
        return [RequestTotals(model, version, entry.count, dict(entry.errors),
                              tuple(entry.latency.counts), entry.latency.total)
                for (model, version), entry in sorted(merged.items())]

    def _fold(self, into: dict[tuple[str, str], _Model], key: tuple[str, str],
              entry: _Model) -> None:
        target = into.get(key)
        if target is None:
            target = into[key] = _Model(LatencyHistogram(self.edges_ms))
        target.add(entry)
