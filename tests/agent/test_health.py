"""The on-device health check on a real onnxruntime model.

Also home of :func:`make_bundle` (a real float32 [N,4] -> MatMul -> Softmax [N,3] classifier
with a manifest whose golden I/O comes from onnxruntime), shared by the updater tests.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from agent.errors import HealthCheckFailed
from agent.protocol.manifest import (
    Golden,
    Manifest,
    ModelFile,
    Tensor,
    TensorSpec,
    sha256_file,
)
from agent.protocol.messages import DesiredModel
from agent.protocol.profiles import DeviceProfile, parse_profile
from agent.serving.runtime import LoadedModel, OnnxRuntime
from agent.updater.health import RuntimeHealthChecker, decode_tensor, health_check

PROFILE_NAME = "test-cpu"
#: the same shape, every weight nudged (a constant shift would cancel out in the softmax)
WEIGHTS_PERTURBED_BY = np.array([[0.05, -0.02, 0.0], [0.0, 0.04, -0.03], [-0.05, 0.0, 0.02],
                                 [0.01, 0.03, -0.04]], dtype=np.float32)
WEIGHTS = np.array([[2.0, -1.0, 0.5], [0.0, 1.5, -2.0], [1.0, 1.0, 1.0], [-0.5, 0.3, 2.5]],
                   dtype=np.float32)


def make_profile(budget_ms: float = 50.0) -> DeviceProfile:
    return parse_profile({
        "name": PROFILE_NAME, "arch": "x86_64", "memory_mb": 1024, "runtime": "onnxruntime",
        "execution_providers": ["CPUExecutionProvider"], "precision": "fp32",
        "max_artifact_bytes": 1 << 20, "latency_budget_ms": budget_ms, "threads": 1,
        "tolerances": {"min_top1_agreement": 1.0, "max_accuracy_drop": 0.01,
                       "max_abs_error": 1e-5},
    })


def onnx_model_bytes(weights: np.ndarray) -> bytes:
    """float32 x[N,4] -> MatMul(W[4,3]) -> Softmax -> probs[N,3]."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)],
        "clf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(weights.astype(np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _tensor(arr: np.ndarray) -> Tensor:
    arr = np.ascontiguousarray(arr)
    return Tensor(dtype=str(arr.dtype), shape=tuple(int(d) for d in arr.shape),
                  data=arr.astype(arr.dtype.newbyteorder("<")).tobytes())


@dataclass(frozen=True)
class Bundle:
    model_file: Path
    manifest_file: Path
    manifest: Manifest
    desired: DesiredModel

    @property
    def manifest_bytes(self) -> bytes:
        return self.manifest_file.read_bytes()


def make_bundle(out: Path, *, name: str = "clf", version: str = "1",
                weights: np.ndarray = WEIGHTS, golden_weights: np.ndarray | None = None,
                profile: str = PROFILE_NAME, samples: int = 8, seed: int = 0) -> Bundle:
    """Write ``model.onnx`` and ``manifest.json`` into ``out``; golden I/O by onnxruntime.

    ``golden_weights`` (default: ``weights``) computes the golden outputs, so a bundle whose
    model file was perturbed after its golden outputs were recorded can be built.
    """
    import onnxruntime as ort

    out.mkdir(parents=True, exist_ok=True)
    model_file = out / "model.onnx"
    model_file.write_bytes(onnx_model_bytes(weights))
    x = np.random.default_rng(seed).normal(size=(samples, 4)).astype(np.float32)
    reference = onnx_model_bytes(weights if golden_weights is None else golden_weights)
    sess = ort.InferenceSession(reference, providers=["CPUExecutionProvider"])
    (probs,) = sess.run(["probs"], {"x": x})
    length, digest = sha256_file(model_file)
    manifest = Manifest(
        name=name, version=version, profile=profile, runtime="onnxruntime", precision="fp32",
        task="classification", file=ModelFile(path="model.onnx", sha256=digest, length=length),
        inputs=(TensorSpec("x", "float32", ("N", 4)),),
        outputs=(TensorSpec("probs", "float32", ("N", 3)),),
        golden=Golden(inputs={"x": _tensor(x)}, outputs={"probs": _tensor(probs)},
                      atol=1e-5, rtol=1e-4, min_agreement=1.0),
        validation={"scores_output": "probs", "task": "classification"},
        drift_baseline={}, lineage={},
    )
    manifest_file = out / "manifest.json"
    manifest_file.write_bytes(manifest.to_bytes())
    desired = DesiredModel(name=name, version=version, target_path=f"{name}/{version}/model.onnx",
                           manifest_target=f"{name}/{version}/manifest.json", sha256=digest,
                           length=length, profile=profile)
    return Bundle(model_file, manifest_file, manifest, desired)


def step_clock(step_s: float) -> Callable[[], float]:
    """A monotonic clock that advances ``step_s`` on every reading."""
    ticks: Iterator[int] = itertools.count()
    return lambda: next(ticks) * step_s


# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def load(path: Path) -> LoadedModel:
    return OnnxRuntime().load(path, threads=1, providers=["CPUExecutionProvider"])


def test_passes_on_the_right_model(bundle: Bundle) -> None:
    report = health_check(load(bundle.model_file), bundle.manifest, make_profile(),
                          clock=step_clock(0.001), latency_runs=10)
    assert report.samples == 8 and report.outputs == ("probs",)
    assert report.max_abs_error <= 1e-6
    assert report.agreement == 1.0
    assert report.p95_ms == pytest.approx(1.0) and report.runs == 10
    assert report.budget_ms == 50.0


def test_fails_when_weights_were_perturbed(bundle: Bundle, tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(onnx_model_bytes(WEIGHTS + WEIGHTS_PERTURBED_BY))
    with pytest.raises(HealthCheckFailed, match=r"output 'probs' differs .* max \|error\|"):
        health_check(load(bad), bundle.manifest, make_profile(), clock=step_clock(0.001))


def test_fails_on_top1_agreement_even_within_loose_tolerance(bundle: Bundle,
                                                             tmp_path: Path) -> None:
    swapped = tmp_path / "model.onnx"
    swapped.write_bytes(onnx_model_bytes(WEIGHTS[:, ::-1].copy()))  # classes reversed
    loose = replace(bundle.manifest, golden=replace(bundle.manifest.golden, atol=1.0))
    with pytest.raises(HealthCheckFailed, match=r"top-1 agreement on 'probs' is .*need 100"):
        health_check(load(swapped), loose, make_profile(), clock=step_clock(0.001))


def test_fails_on_a_slow_clock_over_the_latency_budget(bundle: Bundle) -> None:
    with pytest.raises(HealthCheckFailed,
                       match=r"p95 latency 250\.0 ms over 20 runs is over the 50 ms budget "
                             r"of profile 'test-cpu'"):
        health_check(load(bundle.model_file), bundle.manifest, make_profile(),
                     clock=step_clock(0.25))


def test_within_budget_on_the_real_clock(bundle: Bundle) -> None:
    report = health_check(load(bundle.model_file), bundle.manifest, make_profile(10_000.0))
    assert 0.0 < report.p95_ms < 10_000.0


def test_integer_outputs_are_compared_by_agreement(bundle: Bundle) -> None:
    class Labels:
        inputs: tuple[TensorSpec, ...] = (TensorSpec("x", "float32", ("N", 4)),)
        outputs: tuple[TensorSpec, ...] = (TensorSpec("label", "int64", ("N",)),)

        def __init__(self, flip: int) -> None:
            self.flip = flip

        def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            n = feeds["x"].shape[0]
            out = np.zeros(n, dtype=np.int64)
            out[: min(self.flip, n)] = 1
            return {"label": out}

        def close(self) -> None: ...

    labels = Manifest.from_dict({
        **bundle.manifest.to_dict(),
        "outputs": [{"name": "label", "dtype": "int64", "shape": ["N"]}],
        "golden": {**bundle.manifest.golden.to_dict(), "min_agreement": 0.8,
                   "outputs": {"label": _tensor(np.zeros(8, dtype=np.int64)).to_dict()}},
    })
    ok = health_check(Labels(flip=1), labels, make_profile(), clock=step_clock(0.001))
    assert ok.agreement == pytest.approx(7 / 8)
    with pytest.raises(HealthCheckFailed, match=r"'label' agrees .* on 62\.5% .* need 80\.0%"):
        health_check(Labels(flip=3), labels, make_profile(), clock=step_clock(0.001))


def test_missing_or_non_finite_outputs_fail(bundle: Bundle) -> None:
    class Broken:
        inputs: tuple[TensorSpec, ...] = (TensorSpec("x", "float32", ("N", 4)),)
        outputs: tuple[TensorSpec, ...] = (TensorSpec("probs", "float32", ("N", 3)),)

        def __init__(self, out: dict[str, np.ndarray]) -> None:
            self.out = out

        def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return self.out

        def close(self) -> None: ...

    with pytest.raises(HealthCheckFailed, match="output 'probs' is missing"):
        health_check(Broken({}), bundle.manifest, make_profile(), clock=step_clock(0.001))
    nan = np.full((8, 3), np.nan, dtype=np.float32)
    with pytest.raises(HealthCheckFailed, match="NaN or infinity"):
        health_check(Broken({"probs": nan}), bundle.manifest, make_profile(),
                     clock=step_clock(0.001))
    wrong = np.zeros((8, 2), dtype=np.float32)
    with pytest.raises(HealthCheckFailed, match=r"shape \[8, 2\], golden is \[8, 3\]"):
        health_check(Broken({"probs": wrong}), bundle.manifest, make_profile(),
                     clock=step_clock(0.001))


def test_runtime_checker_loads_checks_and_refuses_a_broken_file(bundle: Bundle,
                                                                tmp_path: Path) -> None:
    checker = RuntimeHealthChecker(make_profile(), clock=step_clock(0.001), latency_runs=5)
    assert checker.check(bundle.manifest, bundle.model_file).p95_ms == pytest.approx(1.0)
    junk = tmp_path / "model.onnx"
    junk.write_bytes(b"not onnx")
    with pytest.raises(HealthCheckFailed, match="cannot be loaded") as info:
        checker.check(bundle.manifest, junk)
    assert info.value.__cause__ is not None


def test_runtime_checker_refuses_a_runtime_older_than_the_manifest_needs(bundle: Bundle) -> None:
    import onnxruntime

    checker = RuntimeHealthChecker(make_profile(), clock=step_clock(0.001), latency_runs=5)
    checker.check(replace(bundle.manifest, min_runtime_version="1.0"), bundle.model_file)
    checker.check(replace(bundle.manifest, min_runtime_version=onnxruntime.__version__),
                  bundle.model_file)
    with pytest.raises(HealthCheckFailed,
                       match=r"clf 1: the model cannot be loaded: the model needs onnxruntime >= "
                             rf"99\.0, this device has onnxruntime {onnxruntime.__version__}"):
        checker.check(replace(bundle.manifest, min_runtime_version="99.0"), bundle.model_file)


def test_golden_tensors_decode_little_endian(bundle: Bundle) -> None:
    x = decode_tensor(bundle.manifest.golden.inputs["x"])
    assert x.dtype == np.float32 and x.shape == (8, 4) and x.flags.writeable
    assert json.loads(bundle.manifest_bytes)["golden"]["min_agreement"] == 1.0


# ---------------------------------------------------------------------------------------------
# hand-over: the model that passed is the one activation serves (no second load)
# ---------------------------------------------------------------------------------------------
class Tracked:
    """A real onnxruntime model that records whether it was closed."""

    def __init__(self, inner: LoadedModel) -> None:
        self.inner = inner
        self.inputs = inner.inputs
        self.outputs = inner.outputs
        self.closed = False

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.inner.run(feeds)

    def close(self) -> None:
        self.closed = True
        self.inner.close()


class CountingRuntime:
    """The real OnnxRuntime behind the ``Runtime`` seam, recording every model it loads."""

    name = "onnxruntime"

    def __init__(self) -> None:
        self.inner = OnnxRuntime()
        self.loaded: list[Tracked] = []

    def version(self) -> str | None:
        return self.inner.version()

    def check_version(self, minimum: str) -> None:
        self.inner.check_version(minimum)

    def load(self, path: Path, *, threads: int, providers: Sequence[str] = ()) -> LoadedModel:
        model = Tracked(self.inner.load(path, threads=threads, providers=providers))
        self.loaded.append(model)
        return model


def _rewrite(path: Path) -> None:
    """Same bytes, new file (a new inode): what a re-staged version looks like."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)


HAND_OVER = [
    # (id, hand_over, what happens between the passed check and take, take() returns the model)
    ("taken-for-the-checked-file", True, None, True),
    ("other-path-is-refused", True, "other-path", False),
    ("file-replaced-since-the-check", True, "rewrite", False),
    ("released-before-take", True, "release", False),
    ("a-second-check-closes-the-first", True, "check-again", False),
    ("off-closes-after-the-check", False, None, False),
]


@pytest.mark.parametrize(("hand_over", "between", "handed"), [r[1:] for r in HAND_OVER],
                         ids=[r[0] for r in HAND_OVER])
def test_a_passed_model_is_handed_over_only_for_the_same_unchanged_file(
        bundle: Bundle, tmp_path: Path, hand_over: bool, between: str | None,
        handed: bool) -> None:
    staged = make_bundle(tmp_path / "staged")
    runtime = CountingRuntime()
    checker = RuntimeHealthChecker(make_profile(), clock=step_clock(0.001), latency_runs=3,
                                   runtimes=lambda name: runtime, hand_over=hand_over)
    checker.check(staged.manifest, staged.model_file)
    first = runtime.loaded[0]
    asked = staged.model_file
    if between == "other-path":
        asked = bundle.model_file
    elif between == "rewrite":
        _rewrite(staged.model_file)
    elif between == "release":
        checker.release()
    elif between == "check-again":
        checker.check(staged.manifest, staged.model_file)
        assert runtime.loaded[1].closed is False  # the second one is kept in its place
        checker.release()
    got = checker.take(asked)
    if handed:
        assert got is first and not first.closed
        x = decode_tensor(staged.manifest.golden.inputs["x"])
        assert got.run({"x": x})["probs"].shape == (8, 3)  # a live session, not a closed one
        assert checker.take(asked) is None  # handed over once
    else:
        assert got is None
        assert first.closed  # nothing loaded is left open
    checker.release()
    assert all(m.closed for m in runtime.loaded if m is not got)


def test_a_failed_check_keeps_nothing(bundle: Bundle, tmp_path: Path) -> None:
    bad = make_bundle(tmp_path / "bad", weights=WEIGHTS + WEIGHTS_PERTURBED_BY,
                      golden_weights=WEIGHTS)
    runtime = CountingRuntime()
    checker = RuntimeHealthChecker(make_profile(), clock=step_clock(0.001), latency_runs=3,
                                   runtimes=lambda name: runtime, hand_over=True)
    with pytest.raises(HealthCheckFailed, match="differs from the golden output"):
        checker.check(bad.manifest, bad.model_file)
    assert runtime.loaded[0].closed
    assert checker.take(bad.model_file) is None
