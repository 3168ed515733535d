"""Real TFLite conversions: ONNX -> onnx2tf -> TFLiteConverter in the converter environment,
validated with ai-edge-litert against onnxruntime, packed, and accepted by the agent.

The environment is created once per session by the code ``model_tools setup tflite`` runs
(CI runs that command first, so here it is found, not built). Each model is converted once per
profile (``auto``: every variant is built, run and judged in that one conversion) and the tests
assert on all variants from that run. Accuracy and I/O are re-checked independently of the
converter's report, with a fresh ai-edge-litert interpreter.

While converting, an import hook refuses TensorFlow, onnx2tf and their helpers in this process:
only the converter environment's python may load them.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest
from ai_edge_litert.interpreter import Interpreter
from onnx import TensorProto, helper

from agent.updater.health import RuntimeHealthChecker
from agent.updater.verify import check_compatible
from model_tools.errors import DataError
from model_tools.examples import ExampleModel
from model_tools.package import read_bundle
from model_tools.pipeline import ConvertRequest, ConvertResult, convert
from model_tools.policy import version_key
from model_tools.profiles import get_profile
from model_tools.tflite.build import WORKER
from model_tools.tflite.env import ConverterEnv, create_env, resolve_location

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
#: what only the converter environment may import
FORBIDDEN = ("tensorflow", "onnx2tf", "tf_keras", "keras", "onnxsim", "onnx_graphsurgeon",
             "sng4onnx")
VARIANTS = ("int8-static", "int8-dynamic", "fp16", "fp32")


class _Refuse(importlib.abc.MetaPathFinder):
    """Records and refuses every import of a converter-only package."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> None:
        if fullname.split(".", 1)[0] in FORBIDDEN:
            self.attempts.append(fullname)
            raise ImportError(f"{fullname} may only be imported in the converter environment")


@pytest.fixture(scope="session")
def converter_env() -> ConverterEnv:
    """The environment ``model_tools setup tflite`` makes (built here only if CI did not)."""
    return create_env(resolve_location(), progress=lambda m: print(m, file=sys.stderr))


@dataclass
class Converted:
    example: ExampleModel | None
    result: ConvertResult
    source_sha256_before: str
    source_sha256_after: str
    source_mtime_unchanged: bool
    refused_imports: list[str]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _convert(env: ConverterEnv, model: Path, profile: str, out: Path,
             calibration: Path | None, eval_path: Path | None, *, name: str | None = None,
             precision: str | None = None) -> Converted:
    before, mtime = _sha(model), model.stat().st_mtime_ns
    hook = _Refuse()
    sys.meta_path.insert(0, hook)
    try:
        result = convert(ConvertRequest(
            model=model, profile=get_profile(profile), out=out, calibration=calibration,
            eval=eval_path, name=name, precision=precision, latency_runs=100,
            tflite_env=env.root))
    finally:
        sys.meta_path.remove(hook)
    return Converted(None, result, before, _sha(model), model.stat().st_mtime_ns == mtime,
                     hook.attempts)


_cache: dict[tuple[str, str], Converted] = {}


@pytest.fixture
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
              converter_env: ConverterEnv):
    def run(model_fixture: str, profile: str) -> Converted:
        key = (model_fixture, profile)
        if key not in _cache:
            example: ExampleModel = request.getfixturevalue(model_fixture)
            out = tmp_path_factory.mktemp(f"{model_fixture}-{profile}") / "bundle"
            done = _convert(converter_env, example.onnx_path, profile, out,
                            example.calibration_path, example.eval_path, name=example.name)
            done.example = example
            _cache[key] = done
        return _cache[key]
    return run


# both models on rpi4-tflite (every variant), the CNN also on rpi-zero2w-tflite (old runtime)
CASES = [("digits_cnn", "rpi4-tflite"), ("digits_mlp", "rpi4-tflite"),
         ("digits_cnn", "rpi-zero2w-tflite")]


@pytest.mark.parametrize(("model", "profile"), CASES)
def test_bundle_is_a_verified_tflite_that_the_agent_accepts(converted, model: str,
                                                            profile: str) -> None:
    done = converted(model, profile)
    bundle = done.result.bundle
    assert sorted(p.name for p in bundle.iterdir()) == ["manifest.json", "model.tflite"]
    manifest = read_bundle(bundle).manifest  # re-verifies sha256 and length
    prof = get_profile(profile)
    assert manifest.runtime == "tflite" and manifest.file.path == "model.tflite"
    assert manifest.precision in prof.candidates
    assert manifest.min_runtime_version is not None
    assert version_key(manifest.min_runtime_version) <= version_key(prof.min_runtime_version or "")
    # what the device does with it: verify against its profile, load, replay golden I/O, time
    check_compatible(manifest, prof, runtimes=("onnxruntime", "tflite"))
    report = RuntimeHealthChecker(prof).check(manifest, bundle / "model.tflite")
    assert report.max_abs_error <= manifest.golden.atol
    assert report.agreement is not None and report.agreement >= prof.tolerances.min_top1_agreement


@pytest.mark.parametrize("model", ["digits_cnn", "digits_mlp"])
def test_every_variant_is_built_and_validated_in_one_run(converted, model: str) -> None:
    done = converted(model, "rpi4-tflite")
    prof = get_profile("rpi4-tflite")
    rows = {c["precision"]: c for c in done.result.manifest.candidates}
    assert set(rows) == set(VARIANTS)
    for precision, row in rows.items():
        assert not any(r.startswith("could not be built") for r in row["reasons"]), row
        assert row["top1_agreement"] >= prof.tolerances.min_top1_agreement, precision
        assert row["max_abs_error"] <= prof.tolerances.max_abs_error, precision
        assert -row["accuracy_delta"] <= prof.tolerances.max_accuracy_drop, precision
        assert row["p50_ms"] is not None and row["min_runtime_version"], precision
        names = {c["name"] for c in row["checks"]}
        assert {"size", "latency", "min_runtime_version"} <= names, precision
    fp32 = rows["fp32"]["size_bytes"]
    assert 1.8 <= fp32 / rows["fp16"]["size_bytes"] <= 2.2
    for precision in ("int8-static", "int8-dynamic"):
        assert fp32 / rows[precision]["size_bytes"] >= 3.0, precision
    assert rows["fp32"]["max_abs_error"] < 1e-4  # fp32 is the same function
    # TF 2.21's dynamic-range ops need a newer TFLite than full-integer ones do
    assert version_key(rows["int8-dynamic"]["min_runtime_version"]) > version_key("2.14.0")
    assert version_key(rows["int8-static"]["min_runtime_version"]) <= version_key("2.14.0")
    gate = done.result.manifest.validation["latency_gate"]
    assert gate["reference"].startswith("fp32 .tflite")
    assert gate["source_p50_ms"] == pytest.approx(rows["fp32"]["p50_ms"])
    chosen = [p for p, r in rows.items() if r["chosen"]]
    assert chosen == [done.result.manifest.precision]


def _signature(path: Path) -> tuple[Interpreter, dict, dict]:
    interp = Interpreter(model_path=str(path), num_threads=2)
    runner = interp.get_signature_runner("serving_default")
    return runner, runner.get_input_details(), runner.get_output_details()


@pytest.mark.parametrize(("model", "profile"), CASES)
def test_manifest_io_is_what_the_tflite_takes_and_it_is_accurate(converted, model: str,
                                                                  profile: str) -> None:
    done = converted(model, profile)
    example = done.example
    assert example is not None
    m = done.result.manifest
    runner, ins, outs = _signature(done.result.bundle / "model.tflite")
    for specs, details in ((m.inputs, ins), (m.outputs, outs)):
        assert sorted(s.name for s in specs) == sorted(details)
        for spec in specs:
            d = details[spec.name]
            assert np.dtype(d["dtype"]).name == spec.dtype
            assert [None if x < 0 else int(x) for x in d["shape_signature"]] == list(
                spec.static_shape)
    assert [s.name for s in m.inputs] == [example.input_name]  # the ONNX name, ONNX layout
    assert [s.name for s in m.outputs] == ["probabilities"]
    # golden I/O replays through the bundle's own file
    feeds = {k: np.frombuffer(t.data, dtype=t.dtype).reshape(t.shape)
             for k, t in m.golden.inputs.items()}
    got = runner(**feeds)
    for name, want in m.golden.outputs.items():
        expected = np.frombuffer(want.data, dtype=want.dtype).reshape(want.shape)
        np.testing.assert_allclose(got[name], expected, atol=m.golden.atol, err_msg=name)
    # accuracy on the held-out split, measured here, not read from the report
    with np.load(example.eval_path) as npz:
        x, labels = npz[example.input_name], npz["labels"]
    probs = runner(**{example.input_name: x})["probabilities"]
    accuracy = float((probs.argmax(axis=1) == labels).mean())
    prof = get_profile(profile)
    assert example.source_accuracy - accuracy <= prof.tolerances.max_accuracy_drop + 1e-9
    assert m.validation["accuracy_delta"] == pytest.approx(accuracy - example.source_accuracy,
                                                           abs=1e-9)


@pytest.mark.parametrize(("model", "profile"), CASES)
def test_traps_the_users_file_onnxsim_no_network_no_tensorflow_here(
        converted, model: str, profile: str, converter_env: ConverterEnv) -> None:
    done = converted(model, profile)
    # onnx2tf rewrites its input in place: it only ever saw a private copy
    assert done.source_sha256_after == done.source_sha256_before
    assert done.source_mtime_unchanged
    conv = done.result.manifest.lineage["tflite"]["converter"]
    # onnx2tf runs `onnxsim` from PATH: the environment's own, found first
    assert Path(conv["onnxsim"]).parent == converter_env.bin_dir
    assert conv["network_calls"] == []
    assert conv["tools"]["tensorflow"] == "2.21.0" and conv["tools"]["onnx2tf"] == "1.28.8"
    assert done.refused_imports == []  # not even tried in this process


def test_mlp_label_is_cut_and_said(converted) -> None:
    m = converted("digits_mlp", "rpi4-tflite").result.manifest
    changes = m.lineage["tflite"]["graph_changes"]
    assert len(changes) == 1 and "'label' dropped" in changes[0]
    assert "ArrayFeatureExtractor" in changes[0]
    assert all(changes[0] in c["notes"] for c in m.candidates)
    assert list(m.drift_baseline["outputs"]) == ["probabilities"]


def test_old_runtime_profile_refuses_dynamic_range_and_ships_full_int8(converted) -> None:
    """rpi-zero2w-tflite devices may run TFLite 2.14, which rejects TF 2.21's dynamic-range
    FULLY_CONNECTED (v12): the converter refuses that variant instead of the device."""
    m = converted("digits_cnn", "rpi-zero2w-tflite").result.manifest
    rows = {c["precision"]: c for c in m.candidates}
    dyn = rows["int8-dynamic"]
    assert not dyn["ok"]
    want = (f"min_runtime_version {dyn['min_runtime_version']} (limit <= 2.14.0: the runtime "
            "on the profile's devices)")
    assert [r for r in dyn["reasons"] if r.startswith("min_runtime_version")] == [want]
    assert m.precision == "int8-static" and rows["int8-static"]["chosen"]
    assert version_key(m.min_runtime_version or "") <= version_key("2.14.0")


def _rgb_model(path: Path) -> None:
    """NHWC [1, 8, 8, 3] (as tf2onnx exports) -> conv -> pool -> dense -> softmax [1, 5]:
    onnx2tf's download trigger (every input 4-D, fixed batch <= 20, 3 channels last). The
    input is named as tf2onnx names it, ``pixels:0``, which TensorFlow refuses as a name."""
    rng = np.random.default_rng(0)
    inits = [
        onnx.numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w"),
        onnx.numpy_helper.from_array(np.zeros(4, np.float32), "b"),
        onnx.numpy_helper.from_array(rng.normal(0, 0.5, (4, 5)).astype(np.float32), "fc"),
    ]
    nodes = [
        helper.make_node("Transpose", ["pixels:0"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["scores"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "rgb",
        [helper.make_tensor_value_info("pixels:0", TensorProto.FLOAT, [1, 8, 8, 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_rgb_image_model_never_downloads_sample_images(tmp_path: Path,
                                                       converter_env: ConverterEnv) -> None:
    model = tmp_path / "rgb.onnx"
    _rgb_model(model)
    cal = tmp_path / "cal.npz"
    np.savez(cal, **{"pixels:0": np.random.default_rng(1).random((24, 8, 8, 3),
                                                               dtype=np.float32)})
    done = _convert(converter_env, model, "rpi4-tflite", tmp_path / "out", cal, None,
                    precision="fp32")
    m = done.result.manifest
    conv = m.lineage["tflite"]["converter"]
    assert conv["sample_images"]["calls"] >= 1  # onnx2tf asked for its sample images...
    assert conv["sample_images"]["source"] == "calibration input 'pixels:0' (NHWC)"  # ...ours
    assert conv["network_calls"] == []
    # the manifest speaks the .tflite signature's name, and says where it came from
    assert m.lineage["tflite"]["input_names"] == {"pixels:0": "pixels__0"}
    assert [s.name for s in m.inputs] == ["pixels__0"] and list(m.golden.inputs) == ["pixels__0"]
    assert list(m.drift_baseline["inputs"]) == ["pixels__0"]
    assert m.inputs[0].shape == (1, 8, 8, 3)  # the ONNX layout, as given
    runner, ins, _ = _signature(done.result.bundle / "model.tflite")
    assert ins["pixels__0"]["shape"].tolist() == [1, 8, 8, 3]
    golden = m.golden.inputs["pixels__0"]
    got = runner(pixels__0=np.frombuffer(golden.data, np.float32).reshape(golden.shape))
    want = m.golden.outputs["scores"]
    np.testing.assert_allclose(got["scores"], np.frombuffer(want.data, np.float32).reshape(
        want.shape), atol=1e-6)
    assert m.validation["max_abs_error"] < 1e-4
    assert done.source_sha256_after == done.source_sha256_before


def test_worker_refuses_an_onnxsim_that_is_not_the_environments(
        tmp_path: Path, converter_env: ConverterEnv) -> None:
    """Without the environment's bin/ first on PATH, onnx2tf would silently skip onnxsim."""
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"schema_version": 1, "onnx": "x.onnx", "out_dir": str(tmp_path),
                                   "precisions": ["fp32"], "inputs": [], "outputs": [],
                                   "calibration": None}))
    env = {**converter_env.subprocess_env(), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([str(converter_env.python), "-I", str(WORKER), str(request)], env=env,
                         capture_output=True, text=True, check=False, timeout=120)
    assert run.returncode == 0, run.stderr
    error = json.loads((tmp_path / "result.json").read_text())["error"]
    assert "onnxsim must be on PATH" in error and str(converter_env.bin_dir) in error


def test_int8_static_without_calibration_stops_before_converting(
        digits_mlp: ExampleModel, tmp_path: Path, converter_env: ConverterEnv) -> None:
    """No calibration set: refused up front, never handed to a converter that would go and
    download one."""
    with pytest.raises(DataError, match="needs a calibration set"):
        convert(ConvertRequest(model=digits_mlp.onnx_path, profile=get_profile("rpi4-tflite"),
                               out=tmp_path / "out", precision="int8-static",
                               tflite_env=converter_env.root))
    assert not (tmp_path / "out").exists()


_NO_TF_SCRIPT = """
import importlib.abc, sys
from pathlib import Path
FORBIDDEN = {forbidden!r}
seen = []
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".", 1)[0] in FORBIDDEN:
            seen.append(name)
            raise ImportError(name)
sys.meta_path.insert(0, Refuse())
import model_tools.cli, model_tools.pipeline, model_tools.tflite.env, model_tools.tflite.build
import model_tools.tflite.run, model_tools.tflite.graph
from model_tools.pipeline import ConvertRequest, convert
from model_tools.profiles import get_profile
convert(ConvertRequest(model=Path({model!r}), profile=get_profile("x86-generic"),
                       out=Path({out!r}), precision="fp32", latency_runs=10))
print(seen, sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN))
"""


def test_onnx_conversion_never_imports_the_converter_stack(digits_mlp: ExampleModel,
                                                           tmp_path: Path) -> None:
    script = _NO_TF_SCRIPT.format(forbidden=FORBIDDEN, model=str(digits_mlp.onnx_path),
                                  out=str(tmp_path / "out"))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[] []"
    assert (tmp_path / "out" / "model.onnx").is_file()
