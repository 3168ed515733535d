"""The drift baseline a bundle manifest carries: pure numpy, arrays in, a JSON object out.

:func:`compute_baseline` summarises the calibration (or eval, or synthetic) inputs of a model and
the converted model's outputs on them, so that the device can later tell whether live traffic
still looks like it (``agent/drift/stats.py`` holds the statistics and the binning rule, and is
used here so both sides bin identically). The result is stored as ``drift_baseline`` in
``manifest.json``; it contains only dicts, lists, str, int and float.

Schema, version 1 (also in ``docs/manifest.md``, section ``drift_baseline``)::

    {
      "version": 1,                  # this schema's version (BASELINE_VERSION)
      "source": "calibration",       # "calibration" | "eval" | "synthetic": the data it was
                                     #   computed from; a synthetic baseline says so
      "samples": N,                  # batch size of the inputs (rows summarised)
      "bins": B,                     # requested bins per histogram (>= 2); a histogram may
                                     #   have fewer, never more
      "inputs":  {name: ENTRY, ...}, # one per model input, in the caller's order
      "outputs": {name: OUT_ENTRY, ...}
    }

    HIST = "edges": [e0, ..., e_k], "ref": [f0, ..., f_k+1]

    ENTRY, chosen by the rank of the input array (batch first):
      rank 2 [N, F]  {"kind": "tabular",
                      "features": [{"index": i, HIST, "mean": m, "std": s}, ...]}  # one per
                                                                                   # column
      rank 4         {"kind": "image", "layout": "NCHW" | "NHWC",
                      "channels": [{"mean": m, "std": s}, ...],  # one per channel
                      "intensity": {HIST}}                       # all values, all channels
      other ranks    {"kind": "tensor", "mean": m, "std": s, "intensity": {HIST}}

    OUT_ENTRY:
      {"kind": "classes", "ref": [f0, ..., f_C-1]}   # task "classification" only: fraction
          # of rows whose argmax is class c (float output [N, C >= 2]), or of labels equal
          # to c (integer 1-D output; C = the class count of a float [N, C] output if there
          # is one, and at least max label + 1)
      {"kind": "scores", HIST}                       # anything else: all values, flattened

Histograms (the binning rule, shared with ``agent.drift.stats``):

* ``edges`` are the *interior* edges: the reference values' quantiles at ``1/B, ..., (B-1)/B``
  taken as observed values (numpy ``method="inverted_cdf"``: no interpolated edge between two
  atoms of discrete data, so no empty bin there), rounded UP to 6 significant digits,
  de-duplicated. Few distinct values give fewer bins; a constant ``c`` gives ``edges == [c]``
  (``c`` rounded up) and ``ref == [1.0, 0.0]``.
* The bins are ``(-inf, e0], (e0, e1], ..., (e_k, +inf)``; value ``x`` goes to
  ``searchsorted(edges, x, side="left")`` compared as float64. So ``len(ref) == len(edges) + 1``.
* ``ref`` is the fraction of reference values in each bin, counted with the *stored* (rounded)
  edges, rounded to 6 decimal places: it sums to 1 within 1e-5. Rounding the edges up keeps a
  value equal to a quantile in the bin below, as before rounding.

``mean`` and ``std`` (population, ``ddof=0``) are rounded to 6 significant digits. The
intensity histogram of an image or tensor input, and a scores histogram, cover every value of
every sample.

Readers must ignore fields they do not know and refuse a ``version`` newer than they support.

Bad data (no inputs, an empty batch, batch sizes that differ, NaN or inf, non-numeric dtypes,
negative labels) and bad arguments raise ``ValueError`` naming the input and, where there is
one, the feature or channel. This module is pure, so it stays with ``ValueError``; the
caller that read the data file (the convert pipeline) re-raises it as ``DataError``.
"""

from __future__ import annotations

import decimal
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.drift.stats import StreamingHistogram
from agent.protocol.manifest import TASKS

__all__ = [
    "BASELINE_VERSION",
    "IMAGE_LAYOUTS",
    "SOURCES",
    "compute_baseline",
]

BASELINE_VERSION = 1
#: where the data a baseline summarises came from
SOURCES = ("calibration", "eval", "synthetic")
IMAGE_LAYOUTS = ("NCHW", "NHWC")

_DIGITS = 6  # significant digits of edges, means and stds
_FREQ_DECIMALS = 6  # decimal places of reference frequencies
_CHUNK = 1 << 20  # values binned per step, to bound the index array on big image sets
_CEILING = decimal.Context(prec=_DIGITS, rounding=decimal.ROUND_CEILING)


# ---------------------------------------------------------------------------------------------
# rounding: small manifests, plain floats
# ---------------------------------------------------------------------------------------------
def _sig(x: float) -> float:
    """``x`` to 6 significant digits (nearest), as a plain float without ``-0.0``."""
    return float(f"{x:.{_DIGITS}g}") + 0.0


def _sig_up(x: float) -> float:
    """The smallest 6-significant-digit float that is >= ``x``."""
    near = float(f"{x:.{_DIGITS}g}")
    if near >= x:
        return near + 0.0
    # exact decimal ceiling; float() of it is >= x because rounding to nearest is monotone
    return float(_CEILING.create_decimal_from_float(x)) + 0.0


def _freqs(fractions: npt.NDArray[np.float64]) -> list[float]:
    return [round(float(f), _FREQ_DECIMALS) + 0.0 for f in fractions]


# ---------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------
def _histogram(values: npt.NDArray[Any], bins: int) -> dict[str, Any]:
    """``{"edges", "ref"}`` of all values under the binning rule (values are finite, not empty)."""
    flat = values.ravel()
    raw = np.quantile(flat, np.arange(1, bins) / bins, method="inverted_cdf")
    edges = sorted({_sig_up(float(v)) for v in raw})
    hist = StreamingHistogram(edges)
    for start in range(0, flat.size, _CHUNK):
        hist.update(flat[start : start + _CHUNK])
    return {"edges": edges, "ref": _freqs(hist.freqs())}


def _moments(values: npt.NDArray[Any], axis: tuple[int, ...] | int | None) -> tuple[Any, Any]:
    return (
        np.mean(values, axis=axis, dtype=np.float64),
        np.std(values, axis=axis, dtype=np.float64),
    )


def _numeric(name: str, what: str, value: object) -> npt.NDArray[Any]:
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{what} {name!r}: expected a real numeric array, got dtype {arr.dtype}")
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    return arr


def _reject_non_finite(name: str, what: str, arr: npt.NDArray[Any], axis: int | None) -> None:
    """Raise naming the first feature/channel (along ``axis``) that holds NaN or inf."""
    if arr.dtype.kind != "f":
        return
    bad = ~np.isfinite(arr)
    if not bad.any():
        return
    count = int(bad.sum())
    if axis is None:
        raise ValueError(f"{what} {name!r}: expected finite values, got {count} NaN/inf")
    other = tuple(a for a in range(arr.ndim) if a != axis)
    index = int(np.flatnonzero(bad.any(axis=other))[0])
    label = "feature" if arr.ndim == 2 else "channel"
    raise ValueError(
        f"{what} {name!r} {label} {index}: expected finite values, got {count} NaN/inf"
    )


def _layout(shape: tuple[int, ...], image_layout: str | None) -> str:
    if image_layout is not None:
        return image_layout
    if shape[1] in (1, 3, 4) and shape[1] < shape[3]:
        return "NCHW"
    return "NHWC"


def _input_entry(name: str, arr: npt.NDArray[Any], bins: int, image_layout: str | None) -> Any:
    if arr.ndim == 2:
        _reject_non_finite(name, "input", arr, axis=1)
        means, stds = _moments(arr, axis=0)
        features = []
        for i in range(arr.shape[1]):
            feature: dict[str, Any] = {"index": i}
            feature.update(_histogram(arr[:, i], bins))
            feature["mean"] = _sig(float(means[i]))
            feature["std"] = _sig(float(stds[i]))
            features.append(feature)
        return {"kind": "tabular", "features": features}
    if arr.size == 0:
        raise ValueError(f"input {name!r}: expected values, got shape {arr.shape}")
    if arr.ndim == 4:
        layout = _layout(arr.shape, image_layout)
        channel_axis = 1 if layout == "NCHW" else 3
        _reject_non_finite(name, "input", arr, axis=channel_axis)
        reduce = tuple(a for a in range(4) if a != channel_axis)
        means, stds = _moments(arr, axis=reduce)
        return {
            "kind": "image",
            "layout": layout,
            "channels": [
                {"mean": _sig(float(m)), "std": _sig(float(s))}
                for m, s in zip(means, stds, strict=True)
            ],
            "intensity": _histogram(arr, bins),
        }
    _reject_non_finite(name, "input", arr, axis=None)
    mean, std = _moments(arr, axis=None)
    return {
        "kind": "tensor",
        "mean": _sig(float(mean)),
        "std": _sig(float(std)),
        "intensity": _histogram(arr, bins),
    }


def _is_probabilities(arr: npt.NDArray[Any]) -> bool:
    return arr.dtype.kind == "f" and arr.ndim == 2 and arr.shape[1] >= 2


def _output_entry(
    name: str, arr: npt.NDArray[Any], bins: int, task: str, n_classes: int | None
) -> dict[str, Any]:
    if arr.size == 0:
        raise ValueError(f"output {name!r}: expected values, got shape {arr.shape}")
    _reject_non_finite(name, "output", arr, axis=None)
    if task == "classification" and _is_probabilities(arr):
        counts = np.bincount(np.argmax(arr, axis=1), minlength=arr.shape[1])
        return {"kind": "classes", "ref": _freqs(counts / arr.shape[0])}
    if task == "classification" and arr.ndim == 1 and arr.dtype.kind in "iu":
        low = int(arr.min())
        if low < 0:
            raise ValueError(f"output {name!r}: expected class labels >= 0, got {low}")
        classes = max(int(arr.max()) + 1, n_classes or 0)
        counts = np.bincount(arr.astype(np.int64), minlength=classes)
        return {"kind": "classes", "ref": _freqs(counts / arr.shape[0])}
    entry: dict[str, Any] = {"kind": "scores"}
    entry.update(_histogram(arr, bins))
    return entry


# ---------------------------------------------------------------------------------------------
# the one entry point
# ---------------------------------------------------------------------------------------------
def compute_baseline(
    inputs: Mapping[str, npt.ArrayLike],
    outputs: Mapping[str, npt.ArrayLike],
    *,
    task: str,
    source: str,
    bins: int = 10,
    image_layout: str | None = None,
) -> dict[str, Any]:
    """Build the ``drift_baseline`` manifest object (schema in the module docstring).

    Args:
        inputs: model input name -> reference array, batch first; every input has the same,
            non-zero batch size.
        outputs: model output name -> the converted model's output on ``inputs``.
        task: one of ``agent.protocol.manifest.TASKS``; only ``"classification"`` makes
            ``classes`` output entries.
        source: one of :data:`SOURCES`, recorded as given.
        bins: bins per histogram (at least 2); fewer where the data has few distinct values.
        image_layout: ``"NCHW"`` or ``"NHWC"`` to force the layout of rank-4 inputs; ``None``
            guesses NCHW when dim 1 is 1, 3 or 4 and smaller than the last dim, else NHWC.

    Returns:
        A JSON-serialisable dict of plain dicts, lists, str, int and float.

    Raises:
        ValueError: an argument is out of range, there are no inputs, the batch is empty,
            batch sizes differ, an array is not real numeric, holds NaN or inf, or a class
            label is negative.
    """
    if task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    if source not in SOURCES:
        raise ValueError(f"source: expected one of {', '.join(SOURCES)}, got {source!r}")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins: expected an integer >= 2, got {bins!r}")
    if image_layout is not None and image_layout not in IMAGE_LAYOUTS:
        raise ValueError(
            f"image_layout: expected one of {', '.join(IMAGE_LAYOUTS)} or None, "
            f"got {image_layout!r}"
        )
    if not inputs:
        raise ValueError("inputs: expected at least one model input, got none")

    arrays = {name: _numeric(name, "input", value) for name, value in inputs.items()}
    samples: int | None = None
    for name, arr in arrays.items():
        if arr.ndim == 0:
            raise ValueError(f"input {name!r}: expected a batch-first array, got a scalar")
        if samples is None:
            samples = arr.shape[0]
        elif arr.shape[0] != samples:
            first = next(iter(arrays))
            raise ValueError(
                f"input {name!r}: expected batch size {samples} like input {first!r}, "
                f"got {arr.shape[0]}"
            )
    assert samples is not None
    if samples == 0:
        raise ValueError(f"inputs: the calibration set is empty (batch size 0 in {list(arrays)})")

    results = {name: _numeric(name, "output", value) for name, value in outputs.items()}
    n_classes = max((a.shape[1] for a in results.values() if _is_probabilities(a)), default=None)
    return {
        "version": BASELINE_VERSION,
        "source": source,
        "samples": int(samples),
        "bins": bins,
        "inputs": {
            name: _input_entry(name, arr, bins, image_layout) for name, arr in arrays.items()
        },
        "outputs": {
            name: _output_entry(name, arr, bins, task, n_classes) for name, arr in results.items()
        },
    }
