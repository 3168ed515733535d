"""Real models, every CPU onnxruntime profile: the bundle is accepted, small, accurate and
self-checking (TFLite profiles: test_tflite_convert.py).

Accuracy is re-measured here independently of the converter's own report: the bundle's model
file runs in a fresh onnxruntime session on the held-out split.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.protocol.manifest import Manifest
from model_tools.examples import ExampleModel
from model_tools.package import read_bundle
from model_tools.pipeline import ConvertRequest, ConvertResult, convert
from model_tools.profiles import all_profiles, get_profile

pytestmark = pytest.mark.slow

CPU_PROFILES = sorted(n for n, p in all_profiles().items()
                      if p.is_cpu_only and p.runtime == "onnxruntime")
MODELS = ["digits_mlp", "digits_cnn"]
_cache: dict[tuple[str, str], ConvertResult] = {}


@pytest.fixture
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    def run(model_fixture: str, profile: str) -> tuple[ExampleModel, ConvertResult]:
        example: ExampleModel = request.getfixturevalue(model_fixture)
        key = (model_fixture, profile)
        if key not in _cache:
            out = tmp_path_factory.mktemp(f"{model_fixture}-{profile}") / "bundle"
            _cache[key] = convert(ConvertRequest(
                model=example.onnx_path, profile=get_profile(profile), out=out,
                calibration=example.calibration_path, eval=example.eval_path,
                name=example.name, version="1.0.0", latency_runs=150))
        return example, _cache[key]
    return run


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _eval_accuracy(model_file: Path, example: ExampleModel, scores: str) -> float:
    with np.load(example.eval_path) as npz:
        x, labels = npz[example.input_name], npz["labels"]
    (probs,) = _session(model_file).run([scores], {example.input_name: x})
    return float((probs.argmax(axis=1) == labels).mean())


@pytest.mark.parametrize("profile", CPU_PROFILES)
@pytest.mark.parametrize("model", MODELS)
def test_every_cpu_profile_gets_an_accurate_small_bundle(converted, model: str,
                                                         profile: str) -> None:
    example, result = converted(model, profile)
    prof = get_profile(profile)
    checked = read_bundle(result.bundle)  # re-verifies sha256 and length
    manifest = checked.manifest
    assert manifest.profile == profile and manifest.precision in prof.candidates
    assert sorted(p.name for p in result.bundle.iterdir()) == ["manifest.json", "model.onnx"]

    model_file = result.bundle / "model.onnx"
    scores = manifest.validation["scores_output"]
    accuracy = _eval_accuracy(model_file, example, scores)
    source_accuracy = _eval_accuracy(example.onnx_path, example, scores)
    assert source_accuracy == pytest.approx(example.source_accuracy, abs=0.01)
    assert source_accuracy - accuracy <= prof.tolerances.max_accuracy_drop + 1e-9
    assert manifest.validation["accuracy_delta"] == pytest.approx(accuracy - source_accuracy)

    size = model_file.stat().st_size
    assert size <= prof.max_artifact_bytes
    if manifest.precision.startswith("int8"):
        assert example.onnx_path.stat().st_size / size >= 3.0

    chosen = [c for c in manifest.candidates if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["precision"] == manifest.precision
    gate = manifest.validation["latency_gate"]
    limit = gate["source_p50_ms"] * gate["ratio"] + gate["slack_ms"]
    assert gate["limit_ms"] == pytest.approx(limit)
    assert chosen[0]["p50_ms"] <= limit
    assert gate["mode"] == ("auto" if prof.precision == "auto" else "fixed")


@pytest.mark.parametrize("model", MODELS)
def test_golden_outputs_replay_on_the_bundle(converted, model: str) -> None:
    _, result = converted(model, "rpi4")
    m = Manifest.from_bytes((result.bundle / "manifest.json").read_bytes())
    feeds = {k: np.frombuffer(t.data, dtype=t.dtype).reshape(t.shape)
             for k, t in m.golden.inputs.items()}
    outs = _session(result.bundle / "model.onnx").run(list(m.golden.outputs), feeds)
    for (name, want), got in zip(m.golden.outputs.items(), outs, strict=True):
        expected = np.frombuffer(want.data, dtype=want.dtype).reshape(want.shape)
        np.testing.assert_allclose(got, expected, atol=m.golden.atol, rtol=m.golden.rtol,
                                   err_msg=name)
    assert m.golden.min_agreement == get_profile("rpi4").tolerances.min_top1_agreement


@pytest.mark.parametrize(("model", "kind"), [("digits_mlp", "tabular"), ("digits_cnn", "image")])
def test_drift_baseline_and_lineage(converted, model: str, kind: str) -> None:
    example, result = converted(model, "rpi4")
    m = result.manifest
    entry = m.drift_baseline["inputs"][example.input_name]
    assert entry["kind"] == kind
    assert m.drift_baseline["source"] == "calibration"
    if kind == "tabular":
        assert len(entry["features"]) == 64
        for feat in entry["features"]:
            assert len(feat["ref"]) == len(feat["edges"]) + 1
            assert sum(feat["ref"]) == pytest.approx(1.0, abs=1e-4)
    else:
        assert entry["layout"] == "NCHW" and len(entry["channels"]) == 1
    out = m.drift_baseline["outputs"]["probabilities"]
    assert out["kind"] == "classes" and len(out["ref"]) == 10
    assert m.lineage["source_sha256"] == read_sha(example.onnx_path)
    assert m.lineage["calibration_sha256"] == read_sha(example.calibration_path)
    assert {"onnx", "onnxruntime", "numpy", "edgefleet"} <= set(m.lineage["tools"])


def read_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_conv_net_dynamic_int8_is_timed_and_judged(converted) -> None:
    """Dynamic int8 on a conv net runs several times slower than fp32 in onnxruntime; it is
    measured, and never chosen when it is outside the latency gate."""
    _, result = converted("digits_cnn", "x86-generic")
    rows = {c["precision"]: c for c in result.manifest.candidates}
    dyn = rows["int8-dynamic"]
    assert dyn["p50_ms"] is not None
    latency_check = [c for c in dyn["checks"] if c["name"] == "latency"]
    assert latency_check and (latency_check[0]["ok"] or not dyn["chosen"])


@pytest.mark.parametrize("model", MODELS)
def test_jetson_fp16_validates_on_the_cpu_host(converted, model: str) -> None:
    _, result = converted(model, "jetson-orin-nano")
    m = result.manifest
    assert m.precision == "fp16"
    assert m.validation["top1_agreement"] >= 0.99
    assert m.validation["host_providers"] == ["CPUExecutionProvider"]
    assert m.validation["profile_providers"][0] == "TensorrtExecutionProvider"
    # fp16 keeps fp32 inputs/outputs, so the device's interface does not change
    assert [s.dtype for s in m.inputs] == ["float32"]


def test_cli_json_report_and_inspect(digits_mlp: ExampleModel, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    run = subprocess.run(
        [sys.executable, "-m", "model_tools", "convert", str(digits_mlp.onnx_path),
         "--profile", "rpi-zero2w", "--out", str(out), "--calibration",
         str(digits_mlp.calibration_path), "--eval", str(digits_mlp.eval_path),
         "--version", "2.0.0", "--latency-runs", "50", "--json"],
        capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["status"] == "accepted" and report["chosen"] == "int8-static"
    assert "building int8-static" in run.stderr  # progress goes to stderr
    shown = subprocess.run([sys.executable, "-m", "model_tools", "inspect", str(out)],
                           capture_output=True, text=True, check=False)
    assert shown.returncode == 0, shown.stderr
    assert "[verified]" in shown.stdout and "2.0.0" in shown.stdout
