"""agent.drift.stats: binning rule, PSI, JS divergence, streaming histograms, entry comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest

import agent.drift
from agent.drift import (
    DEFAULT_EPS,
    PSI_ALERT,
    FeatureDrift,
    StreamingHistogram,
    bin_counts,
    bin_index,
    compare,
    histograms_for,
    js_divergence,
    psi,
    validate_edges,
)


def test_public_surface_is_exported() -> None:
    for name in agent.drift.__all__:
        assert hasattr(agent.drift, name), name
    # the package exports both modules' public names, nothing else
    expected = agent.drift.stats.__all__ + agent.drift.summary.__all__
    assert sorted(agent.drift.__all__) == sorted(expected)


# ---------------------------------------------------------------------------------------------
# binning
# ---------------------------------------------------------------------------------------------
BIN_CASES = [
    # (name, values, edges, expected bins)
    ("equal-to-edge-goes-to-lower-bin", [1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0, 1, 2]),
    ("just-above-edge-goes-up", [1.0 + 1e-12, 2.5], [1.0, 2.0, 3.0], [1, 2]),
    ("below-first-edge", [-5.0, 0.999], [1.0, 2.0], [0, 0]),
    ("above-last-edge", [2.0001, 1e9], [1.0, 2.0], [2, 2]),
    ("infinities-go-to-outer-bins", [-math.inf, math.inf], [0.0, 1.0], [0, 2]),
    ("constant-feature-single-edge", [0.5, 0.5, 0.5], [0.5], [0, 0, 0]),
    ("no-edges-one-bin", [-1.0, 0.0, 7.0], [], [0, 0, 0]),
    ("integers-and-bools", np.array([0, 1, 2], dtype=np.int8), [0.5, 1.5], [0, 1, 2]),
    # float32 0.1 is 0.10000000149 > 0.1: compared as float64 it lies above the edge 0.1
    ("float32-compared-as-float64", np.array([0.1], dtype=np.float32), [0.1], [1]),
]


@pytest.mark.parametrize(
    ("values", "edges", "expected"),
    [case[1:] for case in BIN_CASES],
    ids=[case[0] for case in BIN_CASES],
)
def test_bin_index(values: object, edges: list[float], expected: list[int]) -> None:
    got = bin_index(values, edges)  # type: ignore[arg-type]
    assert got.dtype == np.int64
    assert got.tolist() == expected
    counts = bin_counts(values, edges)  # type: ignore[arg-type]
    assert counts.dtype == np.int64
    assert counts.tolist() == np.bincount(expected, minlength=len(edges) + 1).tolist()


def test_bin_index_keeps_shape() -> None:
    values = np.array([[0.0, 1.0], [2.0, 3.0]])
    assert bin_index(values, [0.5, 2.5]).tolist() == [[0, 1], [1, 2]]
    assert bin_counts(values, [0.5, 2.5]).tolist() == [1, 2, 1]


BAD_EDGES = [
    ("nan-edge", [0.0, math.nan], r"expected finite numbers, got nan at position 1"),
    ("inf-edge", [-math.inf, 1.0], r"expected finite numbers, got -inf at position 0"),
    ("repeated-edge", [0.0, 1.0, 1.0], r"strictly increasing values, got 1.0 then 1.0"),
    ("decreasing-edges", [2.0, 1.0], r"strictly increasing values, got 2.0 then 1.0"),
    ("two-dimensional", [[0.0, 1.0]], r"expected a 1-D sequence, got shape \(1, 2\)"),
]


@pytest.mark.parametrize(
    ("edges", "message"), [c[1:] for c in BAD_EDGES], ids=[c[0] for c in BAD_EDGES]
)
def test_bad_edges_are_rejected(edges: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_edges(edges)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        bin_counts([0.0], edges)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        StreamingHistogram(edges)  # type: ignore[arg-type]


BAD_VALUES = [
    ("nan-value", [0.0, math.nan, math.nan], r"expected no NaN, got 2 NaN of 3"),
    ("strings", ["a", "b"], r"expected real numbers, got dtype <U1"),
    ("complex", [1j], r"expected real numbers, got dtype complex128"),
]


@pytest.mark.parametrize(
    ("values", "message"), [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES]
)
def test_bad_values_are_rejected(values: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bin_index(values, [0.0])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# PSI
# ---------------------------------------------------------------------------------------------
EPS = DEFAULT_EPS
PSI_CASES = [
    # (name, ref, live, expected)
    ("identical", [0.2, 0.3, 0.5], [0.2, 0.3, 0.5], 0.0),
    ("identical-counts-vs-freqs", [0.2, 0.3, 0.5], [20, 30, 50], 0.0),
    # (0.25 - 0.5) ln(0.5) + (0.75 - 0.5) ln(1.5) = 0.25 ln 3
    ("half-half-vs-quarter", [0.5, 0.5], [0.25, 0.75], 0.25 * math.log(3)),
    ("same-as-counts", [0.5, 0.5], [1, 3], 0.25 * math.log(3)),
    # both empty bins are smoothed to eps: 2 (1 - eps) ln(1 / eps)
    ("disjoint-smoothed", [1.0, 0.0], [0.0, 1.0], 2 * (1 - EPS) * math.log(1 / EPS)),
    # (0.6 - 0.5) ln(1.2) + (0.4 - 0.5) ln(0.8)
    ("small-shift", [0.5, 0.5], [0.6, 0.4], 0.1 * math.log(1.2) - 0.1 * math.log(0.8)),
    ("empty-bin-in-both", [0.5, 0.5, 0.0], [0.5, 0.5, 0.0], 0.0),
]


@pytest.mark.parametrize(
    ("ref", "live", "expected"), [c[1:] for c in PSI_CASES], ids=[c[0] for c in PSI_CASES]
)
def test_psi_known_values(ref: list[float], live: list[float], expected: float) -> None:
    assert psi(ref, live) == pytest.approx(expected, abs=1e-12)
    # PSI is symmetric: (q - p) ln(q/p) == (p - q) ln(p/q) term by term
    assert psi(live, ref) == pytest.approx(psi(ref, live), abs=1e-12)


@pytest.mark.parametrize("seed", range(5), ids=[f"seed-{s}" for s in range(5)])
def test_psi_is_non_negative_and_symmetric_on_random_pairs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p, q = rng.dirichlet(np.ones(8)), rng.integers(0, 50, size=8)
    assert psi(p, q) >= 0
    assert psi(p, q) == pytest.approx(psi(q, p), rel=1e-12)


def test_psi_grows_with_the_shift() -> None:
    ref = [0.25, 0.25, 0.25, 0.25]
    shifts = [psi(ref, [0.25 - d, 0.25, 0.25, 0.25 + d]) for d in (0.0, 0.05, 0.1, 0.2)]
    assert shifts == sorted(shifts)
    assert shifts[0] == 0.0 and shifts[-1] > PSI_ALERT


DIST_ERRORS = [
    ("length-mismatch", [0.5, 0.5], [1, 2, 3], r"live: expected 2 bins like the reference, got 3"),
    ("negative-live", [0.5, 0.5], [3, -1], r"live: expected counts .* >= 0, got -1.0 in bin 1"),
    ("negative-ref", [-0.5, 1.5], [1, 1], r"reference: expected .* >= 0, got -0.5 in bin 0"),
    ("empty-live", [0.5, 0.5], [0, 0], r"live: expected a positive total, got 0.0"),
    ("nan-ref", [math.nan, 1.0], [1, 1], r"reference: expected finite numbers"),
    ("two-dimensional", [[0.5, 0.5]], [1, 1], r"reference: expected a 1-D sequence"),
]


@pytest.mark.parametrize(
    ("ref", "live", "message"), [c[1:] for c in DIST_ERRORS], ids=[c[0] for c in DIST_ERRORS]
)
def test_psi_and_js_reject_bad_distributions(ref: object, live: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        psi(ref, live)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        js_divergence(ref, live)  # type: ignore[arg-type]


@pytest.mark.parametrize("eps", [0.0, -1e-3, 1.0], ids=["zero", "negative", "one"])
def test_psi_rejects_bad_eps(eps: float) -> None:
    with pytest.raises(ValueError, match=r"eps: expected a value in \(0, 1\)"):
        psi([0.5, 0.5], [0.5, 0.5], eps=eps)


# ---------------------------------------------------------------------------------------------
# Jensen-Shannon
# ---------------------------------------------------------------------------------------------
# p = [1, 0], q = [.5, .5], m = [.75, .25]:
# KL(p||m) = log2(4/3); KL(q||m) = .5 log2(2/3) + .5 log2(2); JS = mean of the two
_JS_HALF = 0.5 * math.log2(4 / 3) + 0.5 * (0.5 * math.log2(2 / 3) + 0.5)
JS_CASES = [
    ("identical", [0.2, 0.8], [2, 8], 0.0),
    ("disjoint", [1.0, 0.0], [0.0, 1.0], 1.0),
    ("disjoint-wide", [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 3, 1], 1.0),
    ("point-vs-uniform", [1.0, 0.0], [0.5, 0.5], _JS_HALF),
]


@pytest.mark.parametrize(
    ("ref", "live", "expected"), [c[1:] for c in JS_CASES], ids=[c[0] for c in JS_CASES]
)
def test_js_known_values(ref: list[float], live: list[float], expected: float) -> None:
    assert js_divergence(ref, live) == pytest.approx(expected, abs=1e-12)
    assert js_divergence(live, ref) == pytest.approx(expected, abs=1e-12)


def test_js_hand_value_is_what_we_think() -> None:
    assert pytest.approx(0.311278, abs=1e-6) == _JS_HALF


@pytest.mark.parametrize("seed", range(10), ids=[f"seed-{s}" for s in range(10)])
def test_js_is_bounded(seed: int) -> None:
    rng = np.random.default_rng(seed)
    size = int(rng.integers(2, 20))
    p = rng.integers(0, 5, size=size) + (np.arange(size) == 0)  # never all zero
    q = rng.integers(0, 5, size=size) + (np.arange(size) == size - 1)
    assert 0.0 <= js_divergence(p, q) <= 1.0


# ---------------------------------------------------------------------------------------------
# streaming histogram
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 100, 1000], ids=lambda c: f"chunks-of-{c}")
def test_streaming_over_chunks_equals_one_shot(chunk: int) -> None:
    rng = np.random.default_rng(0)
    values = np.round(rng.normal(size=1000), 1)  # ties on the edges too
    edges = [-1.0, -0.5, 0.0, 0.5, 1.0]
    hist = StreamingHistogram(edges)
    for start in range(0, values.size, chunk):
        hist.update(values[start : start + chunk])
    assert hist.counts.tolist() == bin_counts(values, edges).tolist()
    assert hist.total == 1000
    assert hist.freqs().sum() == pytest.approx(1.0)


def test_streaming_histogram_reset_copy_and_empty() -> None:
    hist = StreamingHistogram([0.0])
    with pytest.raises(ValueError, match="expected at least one value, got 0"):
        hist.freqs()
    hist.update([[-1.0, 1.0], [2.0, 3.0]])
    counts = hist.counts
    counts[:] = 99  # a copy: the histogram is unchanged
    assert hist.counts.tolist() == [1, 3]
    assert hist.freqs().tolist() == [0.25, 0.75]
    with pytest.raises(ValueError, match="NaN"):
        hist.update([1.0, math.nan])
    assert hist.total == 4  # a rejected batch counts nothing
    with pytest.raises(ValueError):
        hist.edges[0] = 5.0  # read-only
    hist.reset()
    assert hist.total == 0 and hist.counts.tolist() == [0, 0]
    assert hist.edges.tolist() == [0.0]


# ---------------------------------------------------------------------------------------------
# baseline entries
# ---------------------------------------------------------------------------------------------
TABULAR = {
    "kind": "tabular",
    "features": [
        {"index": 0, "edges": [0.0, 1.0], "ref": [0.25, 0.5, 0.25], "mean": 0.5, "std": 1.0},
        {"index": 1, "edges": [5.0], "ref": [1.0, 0.0], "mean": 5.0, "std": 0.0},
    ],
}


def test_compare_tabular_entry() -> None:
    hists = histograms_for(TABULAR)
    assert [h.edges.tolist() for h in hists] == [[0.0, 1.0], [5.0]]
    live = np.array([[-1.0, 5.0], [0.5, 5.0], [0.5, 5.0], [2.0, 5.0]])
    for i, hist in enumerate(hists):
        hist.update(live[:, i])
    drift = compare(TABULAR, hists)
    assert drift == [FeatureDrift(0, 0.0, 0.0, 4, (1, 2, 1)), FeatureDrift(1, 0.0, 0.0, 4, (4, 0))]
    assert not drift[0].alert

    hists[1].update([6.0] * 12)  # the constant feature moves: 12 of 16 above its edge
    moved = compare(TABULAR, hists)[1]
    assert moved.feature == 1 and moved.samples == 16 and moved.counts == (4, 12)
    assert moved.psi == pytest.approx(psi([1.0, 0.0], [4, 12]))
    assert moved.alert and 0 < moved.js < 1


def test_compare_skips_empty_histograms() -> None:
    hists = histograms_for(TABULAR)
    hists[1].update([5.0])
    assert [d.feature for d in compare(TABULAR, hists)] == [1]


@pytest.mark.parametrize(
    ("entry", "live", "expected_edges"),
    [
        ({"kind": "classes", "ref": [0.5, 0.25, 0.25]}, [0, 0, 1, 2], [0.5, 1.5]),
        ({"kind": "scores", "edges": [0.3], "ref": [0.5, 0.5]}, [0.1, 0.9], [0.3]),
        (
            {
                "kind": "image",
                "layout": "NHWC",
                "channels": [],
                "intensity": {"edges": [0.5], "ref": [0.5, 0.5]},
            },
            np.array([[[[0.0], [1.0]]]]),
            [0.5],
        ),
        (
            {"kind": "tensor", "mean": 0, "std": 1, "intensity": {"edges": [], "ref": [1.0]}},
            [3.0, 4.0],
            [],
        ),
    ],
    ids=["classes", "scores", "image", "tensor-one-bin"],
)
def test_compare_single_distribution_entries(
    entry: dict[str, object], live: object, expected_edges: list[float]
) -> None:
    (hist,) = histograms_for(entry)
    assert hist.edges.tolist() == expected_edges
    hist.update(live)  # type: ignore[arg-type]
    (drift,) = compare(entry, [hist])
    assert drift.feature == 0 and drift.psi == pytest.approx(0.0, abs=1e-12)


ENTRY_ERRORS = [
    ("unknown-kind", {"kind": "sketch"}, r"expected kind tabular, .* got 'sketch'"),
    ("missing-kind", {}, r"baseline entry: expected a 'kind' field"),
    ("missing-intensity", {"kind": "image"}, r"image entry: expected a 'intensity' field"),
    (
        "ref-length",
        {"kind": "scores", "edges": [0.0, 1.0], "ref": [1.0, 0.0]},
        r"expected 3 reference frequencies for 2 edges, got shape \(2,\)",
    ),
    (
        "bad-edges",
        {"kind": "scores", "edges": [1.0, 0.0], "ref": [1.0, 0.0, 0.0]},
        r"strictly increasing",
    ),
]


@pytest.mark.parametrize(
    ("entry", "message"), [c[1:] for c in ENTRY_ERRORS], ids=[c[0] for c in ENTRY_ERRORS]
)
def test_malformed_entries_are_rejected(entry: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        histograms_for(entry)


def test_compare_rejects_mismatched_histograms() -> None:
    with pytest.raises(ValueError, match="histograms: expected 2 for this entry, got 1"):
        compare(TABULAR, [StreamingHistogram([0.0, 1.0])])
    with pytest.raises(ValueError, match=r"feature 1: expected edges \[5.0\], got \[4.0\]"):
        compare(TABULAR, [StreamingHistogram([0.0, 1.0]), StreamingHistogram([4.0])])
