"""model_tools.baseline: the drift_baseline manifest object, and its use by agent.drift."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from agent.drift import PSI_ALERT, PSI_WARN, bin_counts, compare, histograms_for
from model_tools.baseline import BASELINE_VERSION, compute_baseline

RNG_SEED = 20261101


def _rng() -> np.random.Generator:
    return np.random.default_rng(RNG_SEED)


def _plain_json(value: Any, path: str = "$") -> None:
    """Only dict/list/str/int/float/bool/None, exactly (no numpy scalars, no float subclasses)."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert type(key) is str, path
            _plain_json(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _plain_json(item, f"{path}[{i}]")
    else:
        assert type(value) in (str, int, float, bool, type(None)), (path, type(value))
        if type(value) is float:
            assert math.isfinite(value), path


def _check_hist(hist: dict[str, Any], bins: int) -> None:
    edges, ref = hist["edges"], hist["ref"]
    assert 1 <= len(edges) <= bins - 1
    assert edges == sorted(set(edges))
    assert len(ref) == len(edges) + 1
    assert sum(ref) == pytest.approx(1.0, abs=1e-5)
    assert all(f >= 0 for f in ref)


# ---------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------
def test_top_level_schema_and_json_round_trip() -> None:
    rng = _rng()
    x = rng.normal(size=(50, 3)).astype(np.float32)
    img = rng.random(size=(50, 3, 8, 8)).astype(np.float32)
    probs = rng.dirichlet(np.ones(4), size=50).astype(np.float32)
    baseline = compute_baseline(
        {"x": x, "img": img},
        {"probs": probs, "label": probs.argmax(axis=1).astype(np.int64)},
        task="classification",
        source="synthetic",
        bins=5,
    )
    assert list(baseline) == ["version", "source", "samples", "bins", "inputs", "outputs"]
    assert baseline["version"] == BASELINE_VERSION == 1
    assert baseline["source"] == "synthetic"
    assert baseline["samples"] == 50 and baseline["bins"] == 5
    assert list(baseline["inputs"]) == ["x", "img"]
    assert [e["kind"] for e in baseline["inputs"].values()] == ["tabular", "image"]
    assert [e["kind"] for e in baseline["outputs"].values()] == ["classes", "classes"]
    _plain_json(baseline)
    assert json.loads(json.dumps(baseline)) == baseline
    assert json.loads(json.dumps(baseline, allow_nan=False)) == baseline


INPUT_KINDS = [
    # (name, shape, image_layout, expected kind, expected layout, channel count)
    ("tabular", (20, 4), None, "tabular", None, None),
    ("image-nchw-rgb", (20, 3, 16, 16), None, "image", "NCHW", 3),
    ("image-nchw-gray", (20, 1, 28, 28), None, "image", "NCHW", 1),
    ("image-nhwc-rgb", (20, 16, 16, 3), None, "image", "NHWC", 3),
    ("image-nhwc-tiny-3x3", (20, 3, 3, 3), None, "image", "NHWC", 3),  # dim1 not < last dim
    ("image-nhwc-dim1-not-channels", (20, 8, 4, 2), None, "image", "NHWC", 2),
    ("image-layout-forced-nchw", (20, 8, 4, 2), "NCHW", "image", "NCHW", 8),
    ("image-layout-forced-nhwc", (20, 3, 16, 16), "NHWC", "image", "NHWC", 16),
    ("rank-1", (20,), None, "tensor", None, None),
    ("rank-3-sequence", (20, 5, 7), None, "tensor", None, None),
    ("rank-5-video", (20, 2, 3, 4, 4), None, "tensor", None, None),
]


@pytest.mark.parametrize(
    ("shape", "image_layout", "kind", "layout", "channels"),
    [c[1:] for c in INPUT_KINDS],
    ids=[c[0] for c in INPUT_KINDS],
)
def test_input_entry_kind_and_fields(
    shape: tuple[int, ...],
    image_layout: str | None,
    kind: str,
    layout: str | None,
    channels: int | None,
) -> None:
    data = _rng().random(size=shape).astype(np.float32)
    baseline = compute_baseline(
        {"in": data}, {}, task="generic", source="calibration", image_layout=image_layout
    )
    entry = baseline["inputs"]["in"]
    assert entry["kind"] == kind
    if kind == "tabular":
        assert [f["index"] for f in entry["features"]] == list(range(shape[1]))
        for i, feature in enumerate(entry["features"]):
            assert set(feature) == {"index", "edges", "ref", "mean", "std"}
            _check_hist(feature, 10)
            assert feature["mean"] == pytest.approx(float(data[:, i].mean()), rel=1e-5)
            assert feature["std"] == pytest.approx(float(data[:, i].std()), rel=1e-5)
    elif kind == "image":
        assert set(entry) == {"kind", "layout", "channels", "intensity"}
        assert entry["layout"] == layout
        assert len(entry["channels"]) == channels
        axis = 1 if layout == "NCHW" else 3
        means = data.mean(axis=tuple(a for a in range(4) if a != axis), dtype=np.float64)
        assert [c["mean"] for c in entry["channels"]] == pytest.approx(means.tolist(), rel=1e-5)
        _check_hist(entry["intensity"], 10)
    else:
        assert set(entry) == {"kind", "mean", "std", "intensity"}
        assert entry["mean"] == pytest.approx(float(data.mean()), rel=1e-5)
        _check_hist(entry["intensity"], 10)


OUTPUT_KINDS = [
    # (name, task, outputs, expected {name: (kind, ref or None)})
    (
        "probabilities",
        "classification",
        {"p": np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])},
        {"p": ("classes", [0.5, 0.25, 0.25])},
    ),
    (
        "labels-take-class-count-from-probabilities",
        "classification",
        {"label": np.array([0, 0, 1, 0]), "p": np.full((4, 4), 0.25, dtype=np.float32)},
        {"label": ("classes", [0.75, 0.25, 0.0, 0.0]), "p": ("classes", [1.0, 0.0, 0.0, 0.0])},
    ),
    (
        "labels-alone-max-plus-one",
        "classification",
        {"label": np.array([2, 0, 2, 2], dtype=np.int32)},
        {"label": ("classes", [0.25, 0.0, 0.75])},
    ),
    (
        "single-column-score-is-not-classes",
        "classification",
        {"logit": np.linspace(-1, 1, 8).reshape(4, 2)[:, :1]},
        {"logit": ("scores", None)},
    ),
    (
        "regression-probabilities-are-scores",
        "regression",
        {"p": np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.3, 0.7]])},
        {"p": ("scores", None)},
    ),
    (
        "generic-int-labels-are-scores",
        "generic",
        {"label": np.array([0, 1, 1, 3])},
        {"label": ("scores", None)},
    ),
]


@pytest.mark.parametrize(
    ("task", "outputs", "expected"),
    [c[1:] for c in OUTPUT_KINDS],
    ids=[c[0] for c in OUTPUT_KINDS],
)
def test_output_entries(
    task: str, outputs: dict[str, np.ndarray], expected: dict[str, tuple[str, Any]]
) -> None:
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    baseline = compute_baseline({"x": x}, outputs, task=task, source="eval")
    for name, (kind, ref) in expected.items():
        entry = baseline["outputs"][name]
        assert entry["kind"] == kind
        if kind == "classes":
            assert set(entry) == {"kind", "ref"}
            assert entry["ref"] == pytest.approx(ref)
        else:
            assert set(entry) == {"kind", "edges", "ref"}
            _check_hist(entry, 10)


# ---------------------------------------------------------------------------------------------
# the binning rule
# ---------------------------------------------------------------------------------------------
BINNING_CASES = [
    # (name, column values, bins, expected edges, expected ref)
    ("constant", [0.5] * 6, 10, [0.5], [1.0, 0.0]),
    ("constant-negative-int", [-3] * 4, 4, [-3.0], [1.0, 0.0]),
    ("two-values-two-bins", [0.0] * 6 + [1.0] * 4, 10, [0.0, 1.0], [0.6, 0.4, 0.0]),
    ("quartiles-of-1-to-8", [1, 2, 3, 4, 5, 6, 7, 8], 4, [2.0, 4.0, 6.0], [0.25, 0.25, 0.25, 0.25]),
    # float32 0.1 is 0.10000000149: the edge is rounded UP, so the value stays in the lower bin
    ("float32-constant-rounds-up", np.full(5, 0.1, np.float32), 10, [0.100001], [1.0, 0.0]),
    ("six-significant-digits", [1 / 3] * 3 + [2 / 3] * 3, 2, [0.333334], [0.5, 0.5]),
]


@pytest.mark.parametrize(
    ("column", "bins", "edges", "ref"),
    [c[1:] for c in BINNING_CASES],
    ids=[c[0] for c in BINNING_CASES],
)
def test_binning_rule(column: Any, bins: int, edges: list[float], ref: list[float]) -> None:
    data = np.asarray(column).reshape(-1, 1)
    (feature,) = compute_baseline({"x": data}, {}, task="generic", source="calibration", bins=bins)[
        "inputs"
    ]["x"]["features"]
    assert feature["edges"] == edges
    assert feature["ref"] == pytest.approx(ref)


def test_ref_is_what_the_agent_counts_with_the_stored_edges() -> None:
    # discrete float32 data with ties on the quantiles, continuous data, and integers
    rng = _rng()
    data = np.stack(
        [
            (rng.integers(0, 17, size=400) / 16 * 0.7).astype(np.float32),
            rng.normal(size=400).astype(np.float32),
            rng.poisson(2.0, size=400).astype(np.float32),
        ],
        axis=1,
    )
    features = compute_baseline({"x": data}, {}, task="generic", source="calibration")["inputs"][
        "x"
    ]["features"]
    for i, feature in enumerate(features):
        counts = bin_counts(data[:, i], feature["edges"])
        assert feature["ref"] == pytest.approx((counts / 400).tolist(), abs=1e-6)
        assert len(feature["edges"]) <= 9


def test_few_distinct_values_give_fewer_bins() -> None:
    data = np.repeat([[0.0], [1.0], [2.0]], [50, 30, 20], axis=0)
    (feature,) = compute_baseline({"x": data}, {}, task="generic", source="calibration")["inputs"][
        "x"
    ]["features"]
    assert feature["edges"] == [0.0, 1.0, 2.0]
    assert feature["ref"] == pytest.approx([0.5, 0.3, 0.2, 0.0])


def test_sixty_four_features_stay_small() -> None:
    # worst-ish case for size: continuous, small-magnitude values (every edge printed in
    # scientific notation with 6 significant digits), 10 bins, default json.dumps separators
    data = (_rng().normal(size=(1000, 64)) * 1e-3).astype(np.float32)
    outputs = {"y": data @ np.ones((64, 3), np.float32)}
    baseline = compute_baseline({"x": data}, outputs, task="regression", source="calibration")
    size = len(json.dumps(baseline))
    assert size < 17_000, size


# ---------------------------------------------------------------------------------------------
# rejected data and arguments
# ---------------------------------------------------------------------------------------------
def _x(n: int = 4) -> np.ndarray:
    return np.arange(n * 3, dtype=np.float32).reshape(n, 3)


def _with(value: float, at: tuple[int, ...], data: np.ndarray) -> np.ndarray:
    data = data.copy()
    data[at] = value
    return data


ERRORS: list[tuple[str, dict[str, Any], str]] = [
    (
        "nan-in-feature",
        {"inputs": {"x": _with(math.nan, (1, 2), _x())}},
        r"input 'x' feature 2: expected finite values, got 1 NaN/inf",
    ),
    (
        "inf-in-feature",
        {"inputs": {"x": _with(-math.inf, (0, 0), _x())}},
        r"input 'x' feature 0: expected finite",
    ),
    (
        "nan-in-image-channel",
        {"inputs": {"img": _with(math.nan, (0, 2, 1, 1), np.zeros((2, 3, 4, 4)))}},
        r"input 'img' channel 2: expected finite",
    ),
    (
        "nan-in-tensor",
        {"inputs": {"seq": np.full((2, 3, 3), math.nan)}},
        r"input 'seq': expected finite values, got 18",
    ),
    (
        "nan-in-output",
        {"outputs": {"y": np.array([0.5, math.nan, 0, 0])}},
        r"output 'y': expected finite",
    ),
    ("no-inputs", {"inputs": {}}, r"inputs: expected at least one model input, got none"),
    ("empty-calibration-set", {"inputs": {"x": np.zeros((0, 3))}}, r"the calibration set is empty"),
    (
        "batch-mismatch",
        {"inputs": {"x": _x(4), "z": _x(5)}},
        r"input 'z': expected batch size 4 like input 'x', got 5",
    ),
    (
        "scalar-input",
        {"inputs": {"x": np.float32(1.0)}},
        r"input 'x': expected a batch-first array",
    ),
    (
        "string-input",
        {"inputs": {"x": np.array([["a"], ["b"]])}},
        r"input 'x': expected a real numeric array",
    ),
    ("empty-image", {"inputs": {"img": np.zeros((2, 3, 0, 4))}}, r"input 'img': expected values"),
    (
        "negative-label",
        {"outputs": {"label": np.array([0, -1, 1, 1])}},
        r"output 'label': expected class labels >= 0, got -1",
    ),
    (
        "bad-task",
        {"task": "detection"},
        r"task: expected one of classification, regression, generic, got 'detection'",
    ),
    (
        "bad-source",
        {"source": "prod"},
        r"source: expected one of calibration, eval, synthetic, got 'prod'",
    ),
    ("one-bin", {"bins": 1}, r"bins: expected an integer >= 2, got 1"),
    ("float-bins", {"bins": 2.5}, r"bins: expected an integer >= 2, got 2.5"),
    (
        "bad-layout",
        {"image_layout": "CHW"},
        r"image_layout: expected one of NCHW, NHWC or None, got 'CHW'",
    ),
]


@pytest.mark.parametrize(
    ("override", "message"), [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS]
)
def test_bad_data_and_arguments_are_rejected(override: dict[str, Any], message: str) -> None:
    kwargs: dict[str, Any] = {
        "inputs": {"x": _x()},
        "outputs": {},
        "task": "classification",
        "source": "calibration",
    }
    kwargs.update(override)
    with pytest.raises(ValueError, match=message):
        compute_baseline(**kwargs)


# ---------------------------------------------------------------------------------------------
# realistic: scikit-learn's bundled digits (8x8 pixels, values 0..16), no download
# ---------------------------------------------------------------------------------------------
# Pixels 26-29 and 34-37: two central rows (rows 3 and 4, columns 2-5), where digits differ most.
DEAD_BLOCK = [8 * row + col for row in (3, 4) for col in (2, 3, 4, 5)]
DIGITS_TRAIN = 300


@pytest.fixture(scope="module")
def digits() -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    datasets = pytest.importorskip("sklearn.datasets")
    pixels = (datasets.load_digits().data / 16).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(pixels))
    train, held_out = pixels[order[:DIGITS_TRAIN]], pixels[order[DIGITS_TRAIN:]]
    baseline = compute_baseline({"pixels": train}, {}, task="classification", source="eval")
    entry = baseline["inputs"]["pixels"]
    # Degenerate features: the reference puts more than 95% of its mass in one bin (the border
    # pixels that are (almost) always 0). Their minority bins hold fewer than 15 of the 300
    # reference samples, so their PSI is decided by a handful of values and by the eps
    # smoothing, and they carry no signal about the digit; an alert on them would be noise.
    degenerate = np.array([max(f["ref"]) > 0.95 for f in entry["features"]])
    return entry, held_out, degenerate


def _feature_psi(entry: dict[str, Any], data: np.ndarray) -> np.ndarray:
    hists = histograms_for(entry)
    for i, hist in enumerate(hists):
        hist.update(data[:, i])
    return np.array([d.psi for d in compare(entry, hists)])


def test_digits_baseline_is_small_and_sane(digits: tuple[dict[str, Any], Any, Any]) -> None:
    entry, _, degenerate = digits
    assert len(entry["features"]) == 64
    assert len(json.dumps(entry)) < 12_000
    assert 5 <= degenerate.sum() <= 25  # border pixels
    assert not degenerate[DEAD_BLOCK].any()  # the dead block is informative


def test_digits_in_distribution_is_stable(digits: tuple[dict[str, Any], Any, Any]) -> None:
    entry, held_out, degenerate = digits
    psi = _feature_psi(entry, held_out)
    # Aggregate: the median over all features says whether the input as a whole moved; the
    # alert uses the max over non-degenerate features, so that one drifting pixel is enough to
    # fire. With 300 reference and ~1500 live samples, sampling noise alone gives a PSI of about
    # (bins - 1) * (1/300 + 1/1497) ~ 0.036 per feature; the max of ~50 such values stays well
    # under the 0.25 alert threshold, which leaves the margin that makes the max usable.
    assert np.median(psi) < PSI_WARN
    assert psi[~degenerate].max() < PSI_ALERT


SHIFTS = [
    ("scaled-x1.5", lambda x: x * 1.5),
    ("offset-plus-0.3", lambda x: x + 0.3),
]


@pytest.mark.parametrize("shift", [s[1] for s in SHIFTS], ids=[s[0] for s in SHIFTS])
def test_digits_global_shift_alerts(
    shift: Any, digits: tuple[dict[str, Any], np.ndarray, np.ndarray]
) -> None:
    entry, held_out, degenerate = digits
    psi = _feature_psi(entry, shift(held_out))
    # every informative pixel is affected; a few mostly-zero pixels whose bins cannot see
    # a rescaling of their rare non-zero values (edges [0.0] or [0.0, 0.125]) barely move
    assert np.median(psi[~degenerate]) > PSI_ALERT
    assert np.mean(psi[~degenerate] > PSI_ALERT) > 0.75


def test_digits_offset_moves_every_informative_pixel(
    digits: tuple[dict[str, Any], np.ndarray, np.ndarray],
) -> None:
    entry, held_out, degenerate = digits
    psi = _feature_psi(entry, held_out + 0.3)
    assert psi[~degenerate].min() > PSI_ALERT


def test_digits_dead_block_is_localised(
    digits: tuple[dict[str, Any], np.ndarray, np.ndarray],
) -> None:
    entry, held_out, degenerate = digits
    dead = held_out.copy()
    dead[:, DEAD_BLOCK] = 0.0
    psi = _feature_psi(entry, dead)
    others = np.ones(64, dtype=bool)
    others[DEAD_BLOCK] = False
    assert psi[DEAD_BLOCK].min() > PSI_ALERT
    assert psi[others & ~degenerate].max() < PSI_ALERT
