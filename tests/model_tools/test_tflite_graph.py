"""Cutting scikit-learn graphs to what TFLite can hold, and the runtime-version check (pure).

Real skl2onnx exports: a ZipMap becomes the probability tensor it reads, the ``ai.onnx.ml``
label is dropped, and a classifier whose probabilities themselves need ``ai.onnx.ml`` (logistic
regression's ``LinearClassifier``) is refused naming the node. The cut graph must still compute
the same probabilities in onnxruntime.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from agent.protocol.profiles import ProfileError, parse_profile
from device_profiles import PROFILE_DIR
from model_tools.errors import ModelLoadError
from model_tools.examples import ExampleModel
from model_tools.onnx_io import load_model
from model_tools.policy import Measured, judge, version_key
from model_tools.profiles import get_profile
from model_tools.tflite.graph import ML_DOMAIN, cut_for_tflite


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y


def _export(clf: Any, zipmap: bool) -> onnx.ModelProto:
    from skl2onnx import to_onnx

    x, _ = _digits()
    return to_onnx(clf, x[:1], options={id(clf): {"zipmap": zipmap}}, target_opset=16)


@pytest.fixture(scope="module")
def small_mlp() -> Any:
    from sklearn.neural_network import MLPClassifier

    x, y = _digits()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: a few iterations are enough here
        return MLPClassifier(hidden_layer_sizes=(16,), max_iter=30, random_state=0).fit(x, y)


def _run(model: onnx.ModelProto, x: np.ndarray) -> dict[str, Any]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x}), strict=True))


def test_zipmap_becomes_the_probability_tensor(small_mlp: Any) -> None:
    model = _export(small_mlp, zipmap=True)
    assert [o.name for o in model.graph.output] == ["output_label", "output_probability"]
    cut, notes = cut_for_tflite(model, "mlp.onnx")
    assert [o.name for o in cut.graph.output] == ["output_probability"]
    assert cut.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(n.domain != ML_DOMAIN for n in cut.graph.node)
    assert ML_DOMAIN not in {o.domain for o in cut.opset_import}
    assert any("'output_probability'" in n and "ZipMap" in n for n in notes)
    assert any("'output_label' dropped" in n and "ArrayFeatureExtractor" in n for n in notes)
    onnx.checker.check_model(cut, full_check=True)
    x, _ = _digits()
    got = _run(cut, x[:50])["output_probability"]
    np.testing.assert_allclose(got, small_mlp.predict_proba(x[:50]), atol=1e-5)
    assert [o.name for o in model.graph.output] == ["output_label", "output_probability"]


def test_the_digits_mlp_loses_only_its_label(digits_mlp: ExampleModel) -> None:
    plain = load_model(digits_mlp.onnx_path)
    loaded = load_model(digits_mlp.onnx_path, prepare=cut_for_tflite)
    assert [s.name for s in plain.outputs] == ["label", "probabilities"]
    assert [s.name for s in loaded.outputs] == ["probabilities"]
    assert loaded.inputs == plain.inputs
    assert len(loaded.prepared) == 1 and "'label' dropped" in loaded.prepared[0]
    with np.load(digits_mlp.eval_path) as npz:
        x = npz["input"]
    np.testing.assert_array_equal(_run(loaded.model, x)["probabilities"],
                                  _run(plain.model, x)["probabilities"])


def test_a_graph_without_ml_operators_is_untouched(digits_cnn: ExampleModel) -> None:
    model = onnx.load(str(digits_cnn.onnx_path))
    cut, notes = cut_for_tflite(model)
    assert cut is model and notes == ()


@pytest.mark.parametrize(("zipmap", "says"), [(True, "node 'LinearClassifier'"),
                                               (False, "every output needs")])
def test_probabilities_that_need_ml_operators_are_refused(zipmap: bool, says: str) -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = _digits()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: the graph is what matters here
        clf = LogisticRegression(max_iter=50).fit(x[:300], y[:300])
    with pytest.raises(ModelLoadError) as info:
        cut_for_tflite(_export(clf, zipmap=zipmap), "logreg.onnx")
    text = str(info.value)
    assert text.startswith("logreg.onnx:") and says in text and "LinearClassifier" in text
    assert "standard ONNX operators" in text


def test_version_key() -> None:
    assert version_key("2.17.0") == (2, 17, 0)
    assert version_key("1.14") == (1, 14, 0)
    assert version_key("2.22.0-dev0") == (2, 22, 0)
    assert version_key("1.6.0") < version_key("1.14.0") < version_key("2.14.0")
    with pytest.raises(ValueError, match="expected dotted numbers"):
        version_key("latest")


@pytest.mark.parametrize(("needs", "ok"), [("1.14.0", True), ("2.14.0", True),
                                           ("2.17.0", False)])
def test_an_artifact_needing_a_newer_runtime_is_refused(needs: str, ok: bool) -> None:
    profile = get_profile("rpi-zero2w-tflite")
    assert profile.min_runtime_version == "2.14.0"
    judged = judge(Measured("int8-dynamic", size_bytes=1000, min_runtime_version=needs),
                   profile, None)
    check = next(c for c in judged.checks if c.name == "min_runtime_version")
    assert (check.ok, judged.ok) == (ok, ok)
    if not ok:
        want = ("min_runtime_version 2.17.0 (limit <= 2.14.0: the runtime on the profile's "
                "devices)")
        assert judged.reasons == (want,)


def test_runtime_check_is_skipped_when_either_side_is_silent() -> None:
    onnx_profile = get_profile("rpi4")
    assert onnx_profile.min_runtime_version is None
    judged = judge(Measured("fp32", size_bytes=10, min_runtime_version="9.0.0"), onnx_profile,
                   None)
    assert judged.ok and "min_runtime_version" not in {c.name for c in judged.checks}
    tflite_profile = get_profile("rpi4-tflite")
    judged = judge(Measured("fp32", size_bytes=10), tflite_profile, None)
    assert judged.ok and "min_runtime_version" not in {c.name for c in judged.checks}


def test_tflite_profiles_ship_and_state_their_runtime() -> None:
    for name in ("rpi4-tflite", "rpi-zero2w-tflite"):
        profile = get_profile(name)
        assert profile.runtime == "tflite" and profile.min_runtime_version is not None
        version_key(profile.min_runtime_version)
    zero = get_profile("rpi-zero2w-tflite")
    assert zero.memory_mb == 512 and all(p.startswith("int8") for p in zero.candidates)


@pytest.mark.parametrize("bad", ["latest", "2.x", "", 2.14, "2.14.0rc1"])
def test_a_profile_min_runtime_version_must_be_a_version(bad: object) -> None:
    import tomllib

    data = tomllib.loads((PROFILE_DIR / "rpi4-tflite.toml").read_text())
    data["min_runtime_version"] = bad
    with pytest.raises(ProfileError) as info:
        parse_profile(data, "custom.toml")
    assert info.value.field == "min_runtime_version" and "dotted numbers" in str(info.value)


def test_profiles_without_a_runtime_version_still_load(tmp_path: Path) -> None:
    import tomllib

    data = tomllib.loads((PROFILE_DIR / "rpi4.toml").read_text())
    assert "min_runtime_version" not in data
    assert parse_profile(data, "rpi4.toml").min_runtime_version is None
