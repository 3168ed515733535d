"""Drift statistics over binned numbers: pure numpy, no I/O, O(1) memory per monitored feature.

This is what the device compares live traffic against the ``drift_baseline`` that
``model_tools`` wrote into the bundle manifest (schema: ``model_tools/baseline.py`` and
``docs/manifest.md``). Both sides use the ONE binning rule defined here:

* ``edges`` are the *interior* bin edges, a 1-D, finite, strictly increasing sequence
  ``e0 < e1 < ... < e_last`` (possibly empty: then there is one bin);
* the bins are ``(-inf, e0], (e0, e1], ..., (e_last, +inf)``, so there are ``len(edges) + 1``;
* a value ``x`` goes to bin ``np.searchsorted(edges, x, side="left")``: a value equal to an edge
  goes to the lower bin, ``-inf`` to the first bin and ``+inf`` to the last. NaN has no bin and
  is rejected.

Values are compared as float64, so float32 traffic is binned exactly like the float64 edges
stored in JSON.

Two distances between a reference distribution and a live one:

* :func:`psi`, the population stability index ``sum((q - p) * ln(q / p))``, with empty bins
  smoothed to ``eps``. Usual reading: below :data:`PSI_WARN` (0.1) no meaningful change,
  0.1 to :data:`PSI_ALERT` (0.25) a moderate shift worth watching, above 0.25 a significant
  shift. PSI is symmetric in its two arguments and grows with the number of bins; with ``N``
  reference and ``M`` live samples and ``B`` bins, sampling noise alone gives about
  ``(B - 1) * (1/N + 1/M)``, so compare small windows with care.
* :func:`js_divergence`, the Jensen-Shannon divergence in bits: symmetric, bounded in
  ``[0, 1]`` (1 for disjoint supports), needs no smoothing.

:class:`StreamingHistogram` accumulates live counts for one feature over fixed edges in
``len(edges) + 1`` integers, however many values it has seen. :func:`histograms_for` builds the
histograms a baseline entry needs and :func:`compare` turns them into :class:`FeatureDrift`
results.

Misuse (mismatched lengths, negative counts, bad edges, NaN values, malformed entries) raises
``ValueError`` naming the expected and actual values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_EPS",
    "PSI_ALERT",
    "PSI_WARN",
    "FeatureDrift",
    "StreamingHistogram",
    "bin_counts",
    "bin_index",
    "compare",
    "histograms_for",
    "js_divergence",
    "psi",
    "validate_edges",
]

#: PSI at or above this: a moderate shift, worth watching
PSI_WARN = 0.1
#: PSI at or above this: a significant shift, worth an alert
PSI_ALERT = 0.25
#: frequency that stands in for an empty bin in :func:`psi` (``ln(q / 0)`` is undefined)
DEFAULT_EPS = 1e-4

_F64 = npt.NDArray[np.float64]
_I64 = npt.NDArray[np.int64]


# ---------------------------------------------------------------------------------------------
# binning
# ---------------------------------------------------------------------------------------------
def validate_edges(edges: npt.ArrayLike) -> _F64:
    """Check interior bin edges and return them as a 1-D float64 array.

    Args:
        edges: finite, strictly increasing numbers; may be empty (one bin).

    Returns:
        The edges as a new float64 array.

    Raises:
        ValueError: the edges are not 1-D, not finite or not strictly increasing.
    """
    arr = np.array(edges, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"bin edges: expected a 1-D sequence, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"bin edges: expected finite numbers, got {arr[bad]} at position {bad}")
    if arr.size > 1:
        steps = np.diff(arr)
        if not (steps > 0).all():
            i = int(np.flatnonzero(steps <= 0)[0])
            raise ValueError(
                "bin edges: expected strictly increasing values, "
                f"got {arr[i]} then {arr[i + 1]} at positions {i}, {i + 1}"
            )
    return arr


def _values(values: npt.ArrayLike) -> _F64:
    arr = np.asarray(values)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"values: expected real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    nan = np.isnan(arr)
    if nan.any():
        raise ValueError(f"values: expected no NaN, got {int(nan.sum())} NaN of {arr.size}")
    return arr


def bin_index(values: npt.ArrayLike, edges: npt.ArrayLike) -> _I64:
    """Bin of every value under the module's binning rule.

    Args:
        values: real numbers of any shape; ``±inf`` go to the outer bins.
        edges: interior bin edges (see :func:`validate_edges`).

    Returns:
        An int64 array of the shape of ``values``, each in ``0 .. len(edges)``.

    Raises:
        ValueError: bad edges, non-numeric values or NaN values.
    """
    e = validate_edges(edges)
    return np.searchsorted(e, _values(values), side="left").astype(np.int64, copy=False)


def bin_counts(values: npt.ArrayLike, edges: npt.ArrayLike) -> _I64:
    """How many values fall in each of the ``len(edges) + 1`` bins.

    Args:
        values: real numbers of any shape (flattened).
        edges: interior bin edges (see :func:`validate_edges`).

    Returns:
        An int64 array of length ``len(edges) + 1``.

    Raises:
        ValueError: bad edges, non-numeric values or NaN values.
    """
    e = validate_edges(edges)
    idx = np.searchsorted(e, _values(values).ravel(), side="left")
    return np.bincount(idx, minlength=e.size + 1).astype(np.int64, copy=False)


# ---------------------------------------------------------------------------------------------
# distances
# ---------------------------------------------------------------------------------------------
def _distribution(x: npt.ArrayLike, what: str) -> _F64:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D sequence, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}: expected finite numbers, got {arr.tolist()}")
    if (arr < 0).any():
        i = int(np.flatnonzero(arr < 0)[0])
        raise ValueError(f"{what}: expected counts or frequencies >= 0, got {arr[i]} in bin {i}")
    total = float(arr.sum())
    if total <= 0:
        raise ValueError(f"{what}: expected a positive total, got {total}")
    return arr / total


def _pair(ref: npt.ArrayLike, live: npt.ArrayLike) -> tuple[_F64, _F64]:
    p = _distribution(ref, "reference")
    q = _distribution(live, "live")
    if p.shape != q.shape:
        raise ValueError(f"live: expected {p.size} bins like the reference, got {q.size}")
    return p, q


def psi(ref_freqs: npt.ArrayLike, live: npt.ArrayLike, eps: float = DEFAULT_EPS) -> float:
    """Population stability index between a reference and a live distribution.

    ``sum((q - p) * ln(q / p))`` over bins, where ``p`` and ``q`` are the two inputs scaled to
    sum to 1 and any frequency below ``eps`` is raised to ``eps``. Every term is >= 0, so the
    result is >= 0, exactly 0 for identical distributions and symmetric in its arguments.
    Thresholds: < 0.1 (:data:`PSI_WARN`) stable, 0.1-0.25 moderate shift, >= 0.25
    (:data:`PSI_ALERT`) significant shift.

    Args:
        ref_freqs: reference frequencies (or counts), one per bin.
        live: live counts or frequencies, one per bin.
        eps: floor for empty bins; must be in ``(0, 1)``.

    Returns:
        The PSI as a float.

    Raises:
        ValueError: lengths differ, a value is negative or not finite, a total is 0, or ``eps``
            is out of range.
    """
    if not 0 < eps < 1:
        raise ValueError(f"eps: expected a value in (0, 1), got {eps}")
    p, q = _pair(ref_freqs, live)
    p = np.maximum(p, eps)
    q = np.maximum(q, eps)
    return float(np.sum((q - p) * np.log(q / p)))


def js_divergence(ref: npt.ArrayLike, live: npt.ArrayLike) -> float:
    """Jensen-Shannon divergence in bits between two binned distributions.

    ``0.5 * KL(p || m) + 0.5 * KL(q || m)`` with ``m = (p + q) / 2`` and ``log2``; empty bins
    contribute nothing (``0 * log 0 = 0``). Symmetric, in ``[0, 1]``: 0 for identical
    distributions, 1 for disjoint ones.

    Args:
        ref: reference counts or frequencies, one per bin.
        live: live counts or frequencies, one per bin.

    Returns:
        The divergence as a float in ``[0, 1]``.

    Raises:
        ValueError: lengths differ, a value is negative or not finite, or a total is 0.
    """
    p, q = _pair(ref, live)
    m = (p + q) / 2

    def _kl(a: _F64) -> float:
        nz = a > 0  # m > 0 wherever a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return min(1.0, max(0.0, 0.5 * _kl(p) + 0.5 * _kl(q)))


# ---------------------------------------------------------------------------------------------
# streaming
# ---------------------------------------------------------------------------------------------
class StreamingHistogram:
    """Counts of one feature over fixed bins, accumulated batch by batch.

    Memory is ``len(edges) + 1`` integers whatever the number of values seen; each
    :meth:`update` is one vectorised ``searchsorted`` over the batch.
    """

    def __init__(self, edges: npt.ArrayLike) -> None:
        """Start an empty histogram.

        Args:
            edges: interior bin edges (see :func:`validate_edges`).

        Raises:
            ValueError: bad edges.
        """
        self._edges = validate_edges(edges)
        self._edges.flags.writeable = False
        self._counts = np.zeros(self._edges.size + 1, dtype=np.int64)

    def __repr__(self) -> str:
        return f"StreamingHistogram(bins={self._counts.size}, total={self.total})"

    @property
    def edges(self) -> _F64:
        """The interior bin edges (read-only)."""
        return self._edges

    @property
    def counts(self) -> _I64:
        """A copy of the counts, one per bin."""
        return self._counts.copy()

    @property
    def total(self) -> int:
        """How many values were counted since the last :meth:`reset`."""
        return int(self._counts.sum())

    def update(self, values: npt.ArrayLike) -> None:
        """Add every value (any shape, flattened) to its bin.

        Raises:
            ValueError: non-numeric or NaN values; nothing is counted then.
        """
        self._counts += bin_counts(values, self._edges)

    def freqs(self) -> _F64:
        """Counts divided by :attr:`total`.

        Raises:
            ValueError: nothing was counted since the last reset.
        """
        total = self.total
        if total == 0:
            raise ValueError("histogram: expected at least one value, got 0 since last reset")
        return self._counts / total

    def reset(self) -> None:
        """Forget every count (the edges stay)."""
        self._counts[:] = 0


# ---------------------------------------------------------------------------------------------
# baseline entries
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureDrift:
    """Drift of one monitored distribution against its reference.

    ``feature`` is the feature index for a tabular entry and 0 for the single distribution of
    the other kinds; ``samples`` is how many live values were compared; ``counts`` how many of
    them fell in each reference bin (``len(edges) + 1`` integers summing to ``samples``).
    """

    feature: int
    psi: float
    js: float
    samples: int
    counts: tuple[int, ...] = ()

    @property
    def alert(self) -> bool:
        """True when the PSI reaches :data:`PSI_ALERT`."""
        return self.psi >= PSI_ALERT


def _key(entry: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in entry:
        raise ValueError(f"{where}: expected a {key!r} field, got fields {sorted(entry)}")
    return entry[key]


def _references(entry: Mapping[str, Any]) -> list[tuple[int, _F64, _F64]]:
    """``(feature, edges, ref)`` for every distribution an entry monitors, checked."""
    kind = _key(entry, "kind", "baseline entry")
    if kind == "tabular":
        parts = [
            (
                int(_key(f, "index", "feature")),
                _key(f, "edges", "feature"),
                _key(f, "ref", "feature"),
            )
            for f in _key(entry, "features", "tabular entry")
        ]
    elif kind in ("image", "tensor"):
        hist = _key(entry, "intensity", f"{kind} entry")
        parts = [(0, _key(hist, "edges", "intensity"), _key(hist, "ref", "intensity"))]
    elif kind == "scores":
        parts = [(0, _key(entry, "edges", "scores entry"), _key(entry, "ref", "scores entry"))]
    elif kind == "classes":
        ref = _key(entry, "ref", "classes entry")
        # class c goes to bin c: edges 0.5, 1.5, ..., C - 1.5 under the side="left" rule
        parts = [(0, np.arange(len(ref) - 1, dtype=np.float64) + 0.5, ref)]
    else:
        raise ValueError(
            f"baseline entry: expected kind tabular, image, tensor, scores or classes, got {kind!r}"
        )
    out = []
    for feature, edges, ref in parts:
        e = validate_edges(edges)
        r = np.asarray(ref, dtype=np.float64)
        if r.shape != (e.size + 1,):
            raise ValueError(
                f"baseline feature {feature}: expected {e.size + 1} reference frequencies "
                f"for {e.size} edges, got shape {r.shape}"
            )
        out.append((feature, e, r))
    return out


def histograms_for(entry: Mapping[str, Any]) -> list[StreamingHistogram]:
    """Empty histograms for every distribution a baseline entry monitors, in order.

    A ``tabular`` entry gets one per feature (feed it column ``index``); ``image``, ``tensor``
    and ``scores`` entries get one over all values; a ``classes`` entry gets one over class
    indices (feed it the argmax or the integer label).

    Raises:
        ValueError: the entry is malformed or of an unknown kind.
    """
    return [StreamingHistogram(edges) for _, edges, _ in _references(entry)]


def compare(
    entry: Mapping[str, Any],
    histograms: Sequence[StreamingHistogram],
    *,
    eps: float = DEFAULT_EPS,
) -> list[FeatureDrift]:
    """Drift of each live histogram against the matching reference of a baseline entry.

    Histograms that have counted nothing are skipped (there is nothing to compare).

    Args:
        entry: one ``inputs`` or ``outputs`` entry of a ``drift_baseline``.
        histograms: live histograms as built by :func:`histograms_for` for that entry.
        eps: PSI smoothing (see :func:`psi`).

    Returns:
        One :class:`FeatureDrift` per non-empty histogram, in entry order.

    Raises:
        ValueError: the entry is malformed, or the histograms do not match it in number or in
            edges.
    """
    refs = _references(entry)
    if len(refs) != len(histograms):
        raise ValueError(f"histograms: expected {len(refs)} for this entry, got {len(histograms)}")
    out = []
    for (feature, edges, ref), hist in zip(refs, histograms, strict=True):
        if hist.edges.shape != edges.shape or not np.array_equal(hist.edges, edges):
            raise ValueError(
                f"histogram for feature {feature}: expected edges {edges.tolist()}, "
                f"got {hist.edges.tolist()}"
            )
        total = hist.total
        if total == 0:
            continue
        counts = hist.counts
        value = psi(ref, counts, eps)
        out.append(FeatureDrift(feature, value, js_divergence(ref, counts), total,
                                tuple(counts.tolist())))
    return out
