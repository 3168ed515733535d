"""Windowed drift summaries: live traffic against the bundle's ``drift_baseline`` (pure).

:class:`DriftMonitor` is fed every prediction's inputs and outputs (batch-first arrays, by
name, as the runtime sees them). It bins them with :class:`agent.drift.stats.StreamingHistogram`
under the baseline's own edges, so its memory is a fixed number of counters per monitored
feature however much traffic it sees. When a window is complete (``window`` predictions, or
the next prediction arrives ``window_s`` seconds or more after the window's first one), it
returns a :class:`DriftSummary` and starts a new window. :meth:`DriftMonitor.due` and
:meth:`DriftMonitor.flush` close a window that traffic stopped feeding.

Only statistics leave the device: a summary holds, per input and feature, the PSI, the
Jensen-Shannon divergence and the number of values compared; the same for each output's
distribution (predicted classes, or scores); the largest input PSI and how many input
features reach the alert threshold (:data:`agent.drift.stats.PSI_ALERT`, 0.25); the window's
start, end and size; the model's name and version. Never an input value.

:meth:`DriftSummary.to_body` is the ``body`` of a ``drift`` outbox row of kind
:data:`DRIFT_SUMMARY_KIND` (priority ``"summary"``)::

    {"version": 1, "model": "digits-mlp", "model_version": "3",
     "window": {"start": 1700000000.0, "end": 1700000290.5, "predictions": 500},
     "baseline": {"version": 1, "source": "calibration", "samples": 200},
     "threshold": 0.25, "max_psi": 0.079, "alerts": 0,
     "output_max_psi": 0.002, "output_alerts": 0,
     "inputs":  {"input": {"kind": "tabular",
                           "features": [{"feature": 0, "psi": 0.0, "js": 0.0, "samples": 500,
                                         "counts": [500, 0]}, ...]}},
     "outputs": {"probabilities": {"kind": "classes",
                                   "features": [{"feature": 0, "psi": ..., ...}]}}}

``feature`` is the column index of a tabular input and 0 for the single distribution of the
other kinds. PSI and JS are rounded to 6 significant digits. With ``N`` reference samples,
``M`` live ones and ``B`` bins, sampling noise alone gives a PSI of about
``(B - 1) (1/N + 1/M)``: windows much smaller than a few hundred predictions over-report drift.

``counts`` (input features only) are the window's live counts per bin of the feature's
reference: integers, statistics like the rest. The server sums them over windows and devices
to draw the live distribution against the reference. They were added without a version bump
(readers skip fields they do not know, and servers read bodies without them). A summary that
would carry more than :data:`MAX_SUMMARY_COUNTS` of them (a very wide tabular input) carries
none, so the body stays small; its PSI and JS are there either way.

Misuse (a malformed baseline, arrays that do not fit it, NaN) raises ``ValueError``; nothing of
the offending call is counted then. Pure: numpy and the standard library, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from agent.drift.stats import PSI_ALERT, FeatureDrift, StreamingHistogram, compare, histograms_for

__all__ = [
    "BASELINE_VERSIONS",
    "DRIFT_SUMMARY_KIND",
    "MAX_SUMMARY_COUNTS",
    "SUMMARY_VERSION",
    "DriftMonitor",
    "DriftSummary",
    "EntryDrift",
]

#: version of the summary body written by :meth:`DriftSummary.to_body`
SUMMARY_VERSION: Final = 1
#: ``drift_baseline`` versions this module reads (schema: ``model_tools/baseline.py``)
BASELINE_VERSIONS: Final = (1,)
#: outbox kind of a summary row (stream ``"drift"``, priority ``"summary"``)
DRIFT_SUMMARY_KIND: Final = "drift.summary"
#: most live bin counts a summary body carries (over every input feature); past it the body
#: has none (a few bytes each: 4096 of them stay far below an outbox row's limit)
MAX_SUMMARY_COUNTS: Final = 4096

_INPUT_KINDS = ("tabular", "image", "tensor")
_OUTPUT_KINDS = ("classes", "scores")
#: tabular rows are buffered up to this many values per input, then binned in one call per
#: feature: a per-request call per feature costs ~10 us each, 0.7 ms for 64 features
_BUFFER_VALUES = 1 << 15


def _sig(x: float) -> float:
    return float(f"{x:.6g}") + 0.0


@dataclass(frozen=True)
class EntryDrift:
    """Drift of one model input or output: one :class:`FeatureDrift` per monitored feature."""

    name: str
    kind: str
    features: tuple[FeatureDrift, ...]

    @property
    def max_psi(self) -> float:
        return max((f.psi for f in self.features), default=0.0)

    def alerts(self, threshold: float) -> int:
        return sum(1 for f in self.features if f.psi >= threshold)

    @property
    def count_size(self) -> int:
        """How many live bin counts :meth:`to_body` writes with ``counts=True``."""
        return sum(len(f.counts) for f in self.features)

    def to_body(self, *, counts: bool = True) -> dict[str, Any]:
        """The entry's body; ``counts`` includes each feature's live bin counts."""
        features = []
        for f in self.features:
            item: dict[str, Any] = {"feature": f.feature, "psi": _sig(f.psi), "js": _sig(f.js),
                                    "samples": f.samples}
            if counts:
                item["counts"] = list(f.counts)
            features.append(item)
        return {"kind": self.kind, "features": features}


@dataclass(frozen=True)
class DriftSummary:
    """One closed window: statistics only (see the module docstring)."""

    model: str | None
    model_version: str | None
    start: float  # unix seconds of the window's first prediction
    end: float  # unix seconds of its last prediction
    predictions: int
    inputs: tuple[EntryDrift, ...]
    outputs: tuple[EntryDrift, ...]
    baseline: Mapping[str, Any]  # version, source, samples of the baseline compared against
    threshold: float = PSI_ALERT

    @property
    def max_psi(self) -> float:
        """The largest PSI of any input feature (0.0 when none was compared)."""
        return max((e.max_psi for e in self.inputs), default=0.0)

    @property
    def alerts(self) -> int:
        """Input features whose PSI reaches :attr:`threshold`."""
        return sum(e.alerts(self.threshold) for e in self.inputs)

    @property
    def output_max_psi(self) -> float:
        return max((e.max_psi for e in self.outputs), default=0.0)

    @property
    def output_alerts(self) -> int:
        return sum(e.alerts(self.threshold) for e in self.outputs)

    def to_body(self) -> dict[str, Any]:
        """The JSON-serialisable body of a drift outbox row (plain dicts, lists, numbers)."""
        counts = sum(e.count_size for e in self.inputs) <= MAX_SUMMARY_COUNTS
        return {
            "version": SUMMARY_VERSION,
            "model": self.model,
            "model_version": self.model_version,
            "window": {"start": float(self.start), "end": float(self.end),
                       "predictions": self.predictions},
            "baseline": dict(self.baseline),
            "threshold": self.threshold,
            "max_psi": _sig(self.max_psi),
            "alerts": self.alerts,
            "output_max_psi": _sig(self.output_max_psi),
            "output_alerts": self.output_alerts,
            "inputs": {e.name: e.to_body(counts=counts) for e in self.inputs},
            "outputs": {e.name: e.to_body(counts=False) for e in self.outputs},
        }


# ---------------------------------------------------------------------------------------------
# one monitored baseline entry
# ---------------------------------------------------------------------------------------------
def _numeric(what: str, value: object) -> npt.NDArray[Any]:
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{what}: expected a real numeric array, got dtype {arr.dtype}")
    if arr.ndim == 0:
        raise ValueError(f"{what}: expected a batch-first array, got a scalar")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError(f"{what}: expected no NaN, got {int(np.isnan(arr).sum())} of "
                         f"{arr.size} values")
    return arr


class _Entry:
    """Histograms of one ``inputs``/``outputs`` entry, and how to feed them from an array."""

    def __init__(self, name: str, io: str, entry: Mapping[str, Any]) -> None:
        if not isinstance(entry, Mapping):  # bad manifest data (not misuse): ValueError
            raise ValueError(  # noqa: TRY004
                f"baseline {io} {name!r}: expected an object, got {type(entry).__name__}")
        kinds = _INPUT_KINDS if io == "input" else _OUTPUT_KINDS
        self.kind = entry.get("kind")
        if self.kind not in kinds:
            raise ValueError(f"baseline {io} {name!r}: expected kind {' or '.join(kinds)}, "
                             f"got {self.kind!r}")
        self.name, self.io, self.entry = name, io, entry
        self.hists: list[StreamingHistogram] = histograms_for(entry)
        self.columns = np.zeros(0, dtype=np.int64)
        self.buffer = np.zeros((0, 0))
        self.buffered = 0
        if self.kind == "tabular":
            self.columns = np.array([int(f["index"]) for f in entry["features"]], dtype=np.int64)
            rows = max(1, _BUFFER_VALUES // max(1, self.columns.size))
            self.buffer = np.empty((rows, self.columns.size), dtype=np.float64)
        self.classes = len(entry["ref"]) if self.kind == "classes" else 0

    def prepare(self, value: object) -> tuple[int, npt.NDArray[Any]]:
        """``(batch size, what to bin)`` for one array, checked; counts nothing."""
        what = f"{self.io} {self.name!r}"
        arr = _numeric(what, value)
        if self.kind == "tabular":
            if arr.ndim != 2 or (self.columns.size and arr.shape[1] <= self.columns.max()):
                raise ValueError(f"{what}: expected shape [N, {int(self.columns.max()) + 1}] "
                                 f"(tabular baseline), got {list(arr.shape)}")
            return arr.shape[0], arr[:, self.columns].astype(np.float64, copy=False)
        if self.kind == "classes":
            if arr.ndim == 2 and arr.dtype.kind == "f":
                return arr.shape[0], np.argmax(arr, axis=1)
            if arr.ndim == 1 and arr.dtype.kind in "iub":
                if arr.size and arr.min() < 0:
                    raise ValueError(f"{what}: expected class labels >= 0, got {arr.min()}")
                return arr.shape[0], arr
            raise ValueError(f"{what}: expected float scores [N, C] or integer labels [N] "
                             f"(classes baseline), got {arr.dtype} {list(arr.shape)}")
        return arr.shape[0], arr  # image, tensor, scores: every value

    def add(self, values: npt.NDArray[Any]) -> None:
        if self.kind != "tabular":
            self.hists[0].update(values)
            return
        n = values.shape[0]
        if self.buffered + n > self.buffer.shape[0]:
            self.drain()
        if n >= self.buffer.shape[0]:
            for j, hist in enumerate(self.hists):
                hist.update(values[:, j])
            return
        self.buffer[self.buffered:self.buffered + n] = values
        self.buffered += n

    def drain(self) -> None:
        if self.buffered:
            for j, hist in enumerate(self.hists):
                hist.update(self.buffer[:self.buffered, j])
            self.buffered = 0

    def close(self) -> EntryDrift:
        self.drain()
        result = EntryDrift(self.name, str(self.kind), tuple(compare(self.entry, self.hists)))
        for hist in self.hists:
            hist.reset()
        return result


# ---------------------------------------------------------------------------------------------
# the monitor
# ---------------------------------------------------------------------------------------------
class DriftMonitor:
    """Windowed drift of one model's traffic against its baseline (module docstring)."""

    def __init__(self, baseline: Mapping[str, Any], *, window: int, window_s: float,
                 model: str | None = None, version: str | None = None) -> None:
        """Check the baseline and start with an empty window.

        Args:
            baseline: the manifest's ``drift_baseline`` object.
            window: predictions per window (``AgentConfig.drift_window``), >= 1.
            window_s: longest window in seconds (``AgentConfig.drift_window_s``), > 0.
            model: the model's name, copied into every summary.
            version: the model's version, copied into every summary.

        Raises:
            ValueError: the baseline is malformed or of an unsupported version, or a window
                bound is out of range.
        """
        if not isinstance(baseline, Mapping):  # bad manifest data (not misuse): ValueError
            raise ValueError(  # noqa: TRY004
                f"baseline: expected an object, got {type(baseline).__name__}")
        if baseline.get("version") not in BASELINE_VERSIONS:
            raise ValueError(f"baseline version: expected one of {list(BASELINE_VERSIONS)}, "
                             f"got {baseline.get('version')!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window: expected an integer >= 1, got {window!r}")
        if not isinstance(window_s, (int, float)) or not math.isfinite(window_s) \
                or window_s <= 0:
            raise ValueError(f"window_s: expected seconds > 0, got {window_s!r}")
        inputs, outputs = baseline.get("inputs"), baseline.get("outputs", {})
        if not isinstance(inputs, Mapping) or not inputs or not isinstance(outputs, Mapping):
            raise ValueError("baseline: expected a non-empty 'inputs' object and an 'outputs' "
                             f"object, got inputs {inputs!r:.60} and outputs {outputs!r:.60}")
        self.window, self.window_s = window, float(window_s)
        self.model, self.version = model, version
        self._baseline_info = {k: baseline[k] for k in ("version", "source", "samples")
                               if k in baseline}
        self._inputs = [_Entry(str(n), "input", e) for n, e in inputs.items()]
        self._outputs = [_Entry(str(n), "output", e) for n, e in outputs.items()]
        self._n = 0
        self._start = 0.0
        self._last = 0.0

    def __repr__(self) -> str:
        return (f"DriftMonitor(model={self.model!r}, window={self.window}, "
                f"window_s={self.window_s}, predictions={self._n})")

    @property
    def predictions(self) -> int:
        """Predictions counted in the open window."""
        return self._n

    def due(self, now: float) -> bool:
        """True when the open window holds predictions and ``window_s`` has passed since its
        first one: call :meth:`flush` (for a daemon timer, when traffic stops)."""
        return self._n > 0 and now - self._start >= self.window_s

    def observe(self, inputs: Mapping[str, npt.ArrayLike], outputs: Mapping[str, npt.ArrayLike],
                now: float) -> DriftSummary | None:
        """Count one batch of predictions; return a summary when this closes a window.

        The open window is closed *before* the batch when ``window_s`` has passed since its
        first prediction, and *after* it when the batch brings it to ``window`` predictions
        (a batch is never split, so a window may hold a little more than ``window``). At
        most one summary is returned per call.

        Args:
            inputs: every input of the baseline by name, batch first (others are ignored).
            outputs: every output of the baseline by name, batch first (others are ignored).
            now: unix seconds of this prediction.

        Returns:
            The closed window's summary, or None.

        Raises:
            ValueError: a monitored input or output is missing, not numeric, NaN, of the
                wrong shape, or batch sizes differ. Nothing is counted then.
        """
        prepared: list[tuple[_Entry, npt.NDArray[Any]]] = []
        sizes: set[int] = set()
        for entries, given, io in ((self._inputs, inputs, "input"),
                                   (self._outputs, outputs, "output")):
            for entry in entries:
                if entry.name not in given:
                    raise ValueError(f"{io} {entry.name!r}: expected by the baseline, got only "
                                     f"{sorted(given)}")
                size, values = entry.prepare(given[entry.name])
                sizes.add(size)
                prepared.append((entry, values))
        if len(sizes) != 1:
            raise ValueError(f"batch: expected one batch size for every input and output, "
                             f"got {sorted(sizes)}")
        batch = sizes.pop()
        if batch == 0:
            return None
        summary = None
        if self._n and (self._n >= self.window or now - self._start >= self.window_s):
            summary = self._close()
        if self._n == 0:
            self._start = now
        for entry, values in prepared:
            entry.add(values)
        self._n += batch
        self._last = now
        if summary is None and self._n >= self.window:
            summary = self._close()
        return summary

    def flush(self) -> DriftSummary | None:
        """Close the open window now; None when it holds no prediction."""
        return self._close() if self._n else None

    def _close(self) -> DriftSummary:
        summary = DriftSummary(
            model=self.model, model_version=self.version, start=self._start, end=self._last,
            predictions=self._n, inputs=tuple(e.close() for e in self._inputs),
            outputs=tuple(e.close() for e in self._outputs), baseline=self._baseline_info)
        self._n = 0
        return summary
