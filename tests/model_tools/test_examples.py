"""Tests for the trained digits example models (model_tools.examples).

Fast tests cover the public surface, the data split and the drift shifts. Tests marked
``slow`` use the session-trained models from tests/conftest.py, run the exported ONNX file in
onnxruntime and compare it with the framework model trained a second time with the same seed
(which checks both export parity and training determinism).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model_tools import examples
from model_tools.examples import (
    SHIFT_KINDS,
    ExampleModel,
    digits_split,
    fit_digits_cnn,
    fit_digits_mlp,
    shifted,
    train_digits_cnn,
    train_digits_mlp,
)
from model_tools.examples import digits as digits_module

MIN_ACCURACY = 0.95
MIN_ARGMAX_AGREEMENT = 0.99
MAX_PROBABILITY_DIFF = 1e-4
N_DIGITS = 1797
N_EVAL = 540  # 30 % of 1797, rounded up by scikit-learn
N_CALIBRATION = 200
_CENTRE = [r * 8 + c for r in range(2, 6) for c in range(2, 6)]  # flat indices of the dead block


# --- public surface -------------------------------------------------------------------------


def test_package_exports_exactly_its_all() -> None:
    public = {name for name in dir(examples) if not name.startswith("_")} - {"digits"}
    assert set(examples.__all__) == public
    assert set(examples.__all__) == set(digits_module.__all__)
    for name in examples.__all__:
        assert getattr(examples, name) is getattr(digits_module, name)


def test_import_does_not_load_heavy_libraries() -> None:
    heavy = ("torch", "sklearn", "skl2onnx", "onnx", "onnxruntime")
    code = (
        "import sys, model_tools.examples; "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""


# --- data split -----------------------------------------------------------------------------


def test_digits_split_shapes_dtypes_and_ranges() -> None:
    x_train, y_train, x_cal, y_cal, x_eval, y_eval = digits_split()
    assert x_train.shape == (N_DIGITS - N_EVAL, 64)
    assert x_cal.shape == (N_CALIBRATION, 64)
    assert x_eval.shape == (N_EVAL, 64)
    for x in (x_train, x_cal, x_eval):
        assert x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
    for y, x in ((y_train, x_train), (y_cal, x_cal), (y_eval, x_eval)):
        assert y.dtype == np.int64
        assert y.shape == (len(x),)
        assert set(np.unique(y).tolist()) == set(range(10))  # stratified: every class present


def test_digits_split_is_deterministic_and_seeded() -> None:
    first, again, other = digits_split(0), digits_split(0), digits_split(1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[4], other[4])


def test_calibration_is_drawn_from_training_and_eval_is_held_out() -> None:
    x_train, _, x_cal, _, x_eval, _ = digits_split()
    train_rows = {row.tobytes() for row in x_train}
    assert all(row.tobytes() in train_rows for row in x_cal)
    # load_digits has a few duplicate images; held-out means disjoint indices, so allow those.
    shared = sum(row.tobytes() in train_rows for row in x_eval)
    assert shared <= 5


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda out: train_digits_mlp(out, seed=-1), "seed must be >= 0, got -1"),
        (lambda out: train_digits_mlp(out, hidden=()), "got ()"),
        (lambda out: train_digits_mlp(out, hidden=(8, 0)), "got (8, 0)"),
        (lambda out: train_digits_cnn(out, epochs=0), "epochs must be >= 1, got 0"),
        (
            lambda out: fit_digits_cnn(np.zeros((4, 10), np.float32), np.zeros(4, np.int64)),
            "got shape (4, 10)",
        ),
    ],
    ids=["negative-seed", "no-hidden-layer", "zero-width-layer", "zero-epochs", "cnn-bad-shape"],
)
def test_bad_arguments_are_rejected_before_any_work(
    call: Callable[[Path], Any], message: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=re.escape(message)):
        call(out)
    assert not out.exists()


# --- drift shifts ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_pixels() -> np.ndarray:
    return digits_split()[4]


@pytest.mark.parametrize("layout", ["flat", "image"])
@pytest.mark.parametrize(
    ("kind", "check"),
    [
        ("scale", lambda x, s: np.allclose(s, x * 1.8)),
        ("offset", lambda x, s: np.allclose(s, x + 0.5)),
        (
            "dead",
            lambda x, s: (
                not s.reshape(-1, 8, 8)[:, 2:6, 2:6].any()
                and np.array_equal(
                    np.delete(s.reshape(len(s), 64), _CENTRE, axis=1),
                    np.delete(x.reshape(len(x), 64), _CENTRE, axis=1),
                )
            ),
        ),
        ("noise", lambda x, s: 0.2 < float(np.std(s - x)) < 0.3),
    ],
    ids=["scale", "offset", "dead", "noise"],
)
def test_shifted_kinds(
    eval_pixels: np.ndarray,
    kind: str,
    check: Callable[[np.ndarray, np.ndarray], bool],
    layout: str,
) -> None:
    x = eval_pixels if layout == "flat" else eval_pixels.reshape(-1, 1, 8, 8)
    before = x.copy()
    out = shifted(x, kind)
    assert out.shape == x.shape and out.dtype == np.float32
    assert check(x, out)
    assert not np.array_equal(out, x)
    np.testing.assert_array_equal(x, before)  # input untouched


def test_shift_kinds_are_the_documented_ones() -> None:
    assert SHIFT_KINDS == ("scale", "offset", "dead", "noise")


def test_noise_shift_is_seeded(eval_pixels: np.ndarray) -> None:
    np.testing.assert_array_equal(
        shifted(eval_pixels, "noise", 3), shifted(eval_pixels, "noise", 3)
    )
    assert not np.array_equal(shifted(eval_pixels, "noise", 3), shifted(eval_pixels, "noise", 4))


@pytest.mark.parametrize(
    ("x", "kind", "message"),
    [
        (
            np.zeros((2, 64), np.float32),
            "rotate",
            "one of scale, offset, dead, noise; got 'rotate'",
        ),
        (np.zeros((2, 64), np.int64), "scale", "floating array .* got dtype int64"),
        (np.zeros((2, 10), np.float32), "dead", "needs 64 values .* got 10"),
    ],
    ids=["unknown-kind", "integer-input", "dead-needs-8x8"],
)
def test_shifted_rejects_bad_input(x: np.ndarray, kind: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        shifted(x, kind)


# --- trained models (slow) ------------------------------------------------------------------


# The trained models come from the session fixtures ``digits_mlp`` / ``digits_cnn`` in
# tests/conftest.py, so the whole suite trains each model once.


@pytest.fixture(params=["mlp", "cnn"])
def example(request: pytest.FixtureRequest) -> ExampleModel:
    model: ExampleModel = request.getfixturevalue(f"digits_{request.param}")
    return model


def _run_onnx(model: ExampleModel, x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model.onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {model.input_name: x}), strict=True))


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


@dataclass(frozen=True)
class Expected:
    input_name: str
    sample_shape: tuple[int, ...]
    outputs: list[str]
    opsets: dict[str, int]


EXPECTED = {
    "digits-mlp": Expected(
        input_name="input",
        sample_shape=(64,),
        outputs=["label", "probabilities"],
        opsets={"ai.onnx": 16, "ai.onnx.ml": 1},  # skl2onnx picks the lowest opset <= 17
    ),
    "digits-cnn": Expected(
        input_name="image",
        sample_shape=(1, 8, 8),
        outputs=["probabilities"],
        opsets={"ai.onnx": examples.ONNX_OPSET},
    ),
}


@pytest.mark.slow
def test_files_are_self_contained_and_no_temporary_file_is_left(example: ExampleModel) -> None:
    import onnx

    out_dir = example.onnx_path.parent
    names = {p.name for p in out_dir.iterdir()}
    expected = {f"{example.name}{s}" for s in (".onnx", ".calibration.npz", ".eval.npz")}
    assert expected <= names
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")]
    assert (example.onnx_path, example.calibration_path, example.eval_path) == tuple(
        out_dir / f"{example.name}{s}" for s in (".onnx", ".calibration.npz", ".eval.npz")
    )
    proto = onnx.load(str(example.onnx_path), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    onnx.checker.check_model(proto, full_check=True)
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    assert opsets == EXPECTED[example.name].opsets


@pytest.mark.slow
def test_graph_signature(example: ExampleModel) -> None:
    import onnxruntime as ort

    expected = EXPECTED[example.name]
    assert example.input_name == expected.input_name
    session = ort.InferenceSession(str(example.onnx_path), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert graph_input.name == example.input_name
    assert graph_input.type == "tensor(float)"
    assert graph_input.shape[1:] == list(expected.sample_shape)
    assert not isinstance(graph_input.shape[0], int)  # dynamic batch dimension
    assert [o.name for o in session.get_outputs()] == expected.outputs


@pytest.mark.slow
@pytest.mark.parametrize("split", ["calibration", "eval"])
def test_npz_holds_input_and_labels(example: ExampleModel, split: str) -> None:
    arrays = _load_npz(getattr(example, f"{split}_path"))
    assert sorted(arrays) == sorted([example.input_name, "labels"])
    x, y = arrays[example.input_name], arrays["labels"]
    n = N_CALIBRATION if split == "calibration" else N_EVAL
    assert x.dtype == np.float32 and x.shape == (n, *EXPECTED[example.name].sample_shape)
    assert y.dtype == np.int64 and y.shape == (n,)


@pytest.mark.slow
def test_onnx_model_is_accurate_and_batch_size_is_free(example: ExampleModel) -> None:
    arrays = _load_npz(example.eval_path)
    x, y = arrays[example.input_name], arrays["labels"]
    probabilities = _run_onnx(example, x)["probabilities"]
    assert probabilities.shape == (len(x), 10) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    accuracy = float(np.mean(probabilities.argmax(axis=1) == y))
    assert accuracy >= MIN_ACCURACY
    assert example.source_accuracy >= MIN_ACCURACY
    assert abs(accuracy - example.source_accuracy) <= 2 / len(y)
    single = _run_onnx(example, x[:1])["probabilities"]
    np.testing.assert_allclose(single, probabilities[:1], atol=1e-6)


@pytest.fixture(scope="module")
def mlp_refit() -> Any:
    """The scikit-learn MLP trained a second time with the same seed."""
    x_train, y_train, *_ = digits_split()
    return fit_digits_mlp(x_train, y_train)


@pytest.fixture(scope="module")
def cnn_refit() -> Any:
    """The torch CNN trained a second time with the same seed."""
    x_train, y_train, *_ = digits_split()
    return fit_digits_cnn(x_train, y_train)


def _framework_probabilities(name: str, request: pytest.FixtureRequest) -> np.ndarray:
    x_eval = digits_split()[4]
    if name == "digits-mlp":
        probabilities: np.ndarray = request.getfixturevalue("mlp_refit").predict_proba(x_eval)
        return probabilities
    import torch

    model = request.getfixturevalue("cnn_refit")
    with torch.no_grad():
        result: np.ndarray = model(torch.from_numpy(x_eval.reshape(-1, 1, 8, 8))).numpy()
    return result


@pytest.mark.slow
def test_onnx_agrees_with_framework_model(
    example: ExampleModel, request: pytest.FixtureRequest
) -> None:
    expected = _framework_probabilities(example.name, request)
    x = _load_npz(example.eval_path)[example.input_name]
    actual = _run_onnx(example, x)["probabilities"]
    agreement = np.mean(actual.argmax(axis=1) == expected.argmax(axis=1))
    assert agreement >= MIN_ARGMAX_AGREEMENT
    assert np.abs(actual - expected).max() <= MAX_PROBABILITY_DIFF


@pytest.mark.slow
def test_same_seed_gives_same_eval_predictions(
    example: ExampleModel, request: pytest.FixtureRequest
) -> None:
    # The ONNX file comes from the first training, the framework model from a second one.
    expected = _framework_probabilities(example.name, request).argmax(axis=1)
    arrays = _load_npz(example.eval_path)
    actual = _run_onnx(example, arrays[example.input_name])["probabilities"].argmax(axis=1)
    np.testing.assert_array_equal(actual, expected)
    assert float(np.mean(expected == arrays["labels"])) == example.source_accuracy


@pytest.mark.slow
def test_mlp_label_output_matches_sklearn_predict(digits_mlp: ExampleModel, mlp_refit: Any) -> None:
    x_eval = digits_split()[4]
    label = _run_onnx(digits_mlp, x_eval)["label"]
    assert label.dtype == np.int64 and label.shape == (len(x_eval),)
    np.testing.assert_array_equal(label, mlp_refit.predict(x_eval))


@pytest.mark.slow
def test_retraining_replaces_files_atomically(tmp_path: Path) -> None:
    first = train_digits_mlp(tmp_path, hidden=(16,))
    again = train_digits_mlp(tmp_path, hidden=(32,))
    assert again.onnx_path == first.onnx_path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"digits-mlp{suffix}" for suffix in (".onnx", ".calibration.npz", ".eval.npz")
    )
    import onnx

    proto = onnx.load(str(again.onnx_path))
    assert [tuple(t.dims) for t in proto.graph.initializer if t.name == "coefficient"] == [(64, 32)]


@pytest.mark.slow
def test_training_leaves_torch_global_state_alone() -> None:
    import torch

    threads = torch.get_num_threads()
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    x_train, y_train, *_ = digits_split()
    fit_digits_cnn(x_train[:64], y_train[:64], epochs=1)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads
