"""The on-device health check: golden outputs and the latency budget, on a loaded model.

:func:`health_check` replays the manifest's golden inputs through a loaded model and compares
with the golden outputs the build host recorded for *this artifact*:

- float outputs: ``numpy.allclose(actual, golden, atol, rtol)`` (non-finite values fail);
- classifiers (``golden.min_agreement`` set): top-1 agreement, argmax over the scores output
  named by ``validation.scores_output`` (else the first float ``[N, C]`` output), must reach
  ``min_agreement``;
- integer and bool outputs (labels): the fraction of equal elements must reach
  ``min_agreement`` (all of them when it is not set).

Then latency: ``latency_runs`` single-sample runs after ``warmup`` untimed ones; the p95 must be
within the profile's ``latency_budget_ms``. The clock is injected, so tests can make a model
"slow" without sleeping.

:class:`RuntimeHealthChecker` is the runner's ``HealthChecker`` seam, for ONNX and TFLite bundles
alike. It refuses a manifest whose ``min_runtime_version`` is newer than this device's engine,
before reading the file (``Runtime.check_version``; ai-edge-litert checks the model's op versions
itself when loading it), loads the staged file through the ``Runtime`` seam with the profile's
threads and providers, checks, and closes it. Every failure is a :class:`HealthCheckFailed`
naming the output, expected against actual.

Hand-over (``hand_over=True``, what the daemon uses): a model that *passed* is kept loaded
instead of closed, and the activation that follows takes it (:meth:`RuntimeHealthChecker.take`)
instead of loading the same file a second time (~2 ms of a ~25 ms update on the build host,
far more on a Pi). Serving then runs the very session that was checked. ``take`` hands it over
only for the same path whose file still has the identity it had when it was loaded (device,
inode, size, mtime); anything else, and a model that was never taken, is closed (by the next
check, by ``take`` or by :meth:`RuntimeHealthChecker.release`), so the activation loads the file
itself. A failed check never keeps anything, so a rollback never sees the rejected model; after
a crash between the check and the activation nothing is kept (it lived in the dead process) and
the resumed HealthCheck loads and checks again.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.errors import AgentError, HealthCheckFailed
from agent.protocol.manifest import Manifest, Tensor, TensorSpec
from agent.protocol.profiles import DeviceProfile
from agent.serving.runtime import LoadedModel, Runtime, runtime_for

__all__ = ["HealthReport", "RuntimeHealthChecker", "decode_tensor", "health_check"]

Clock = Callable[[], float]


@dataclass(frozen=True)
class HealthReport:
    """What the health check measured (all of it passed)."""

    samples: int  # golden samples replayed
    outputs: tuple[str, ...]  # golden outputs compared
    max_abs_error: float  # over float outputs (0.0 when there are none)
    agreement: float | None  # lowest top-1 / label agreement measured, None if none measured
    p50_ms: float
    p95_ms: float
    budget_ms: float
    runs: int  # timed runs


def decode_tensor(tensor: Tensor) -> np.ndarray:
    """A manifest tensor (little-endian raw bytes) as a native-endian numpy array."""
    dtype = np.dtype(tensor.dtype)
    arr = np.frombuffer(tensor.data, dtype=dtype.newbyteorder("<")).reshape(tensor.shape)
    return arr.astype(dtype, copy=True)


def _batch(arr: np.ndarray, start: int, stop: int) -> np.ndarray:
    return arr[start:stop] if arr.ndim else arr


def _run(model: LoadedModel, feeds: Mapping[str, np.ndarray], what: str
         ) -> dict[str, np.ndarray]:
    try:
        return model.run(feeds)
    except AgentError as exc:  # InputRejected / RuntimeLoadError from the Runtime seam
        raise HealthCheckFailed(f"{what}: the golden inputs do not run: {exc}") from exc


def _replay(model: LoadedModel, inputs: Mapping[str, np.ndarray], what: str
            ) -> dict[str, np.ndarray]:
    """All golden samples at once, or one by one when the model's batch dim is fixed."""
    specs = {s.name: s for s in model.inputs}
    whole = all(name in specs and specs[name].accepts_shape(arr.shape)
                for name, arr in inputs.items())
    if whole:
        return _run(model, inputs, what)
    n = next(iter(inputs.values())).shape[0]
    parts = [_run(model, {k: _batch(v, i, i + 1) for k, v in inputs.items()}, what)
             for i in range(n)]
    return {k: np.concatenate([np.asarray(p[k]) for p in parts], axis=0) for k in parts[0]}


def _scores_name(manifest: Manifest) -> str | None:
    named = manifest.validation.get("scores_output")
    if isinstance(named, str) and named in manifest.golden.outputs:
        return named
    for spec in manifest.outputs:  # model_tools' rule: first float output of rank 2, C != 1
        if (spec.dtype.startswith("float") and len(spec.shape) == 2
                and spec.static_shape[1] != 1 and spec.name in manifest.golden.outputs):
            return spec.name
    return None


def _compare(manifest: Manifest, actual: Mapping[str, np.ndarray],
             golden: Mapping[str, np.ndarray], what: str) -> tuple[float, float | None]:
    g = manifest.golden
    max_err = 0.0
    agreements: list[float] = []
    for name, want in golden.items():
        if name not in actual:
            raise HealthCheckFailed(f"{what}: output {name!r} is missing; the model gave "
                                    f"{sorted(actual)}")
        got = np.asarray(actual[name])
        if got.shape != want.shape:
            raise HealthCheckFailed(f"{what}: output {name!r} has shape {list(got.shape)}, "
                                    f"golden is {list(want.shape)}")
        if np.issubdtype(want.dtype, np.floating):
            if not np.all(np.isfinite(got)):
                raise HealthCheckFailed(f"{what}: output {name!r} holds NaN or infinity")
            err = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)),
                               initial=0.0))
            max_err = max(max_err, err)
            if not np.allclose(got, want, atol=g.atol, rtol=g.rtol):
                raise HealthCheckFailed(
                    f"{what}: output {name!r} differs from the golden output: max |error| "
                    f"{err:.6g}, allowed atol {g.atol:g} + rtol {g.rtol:g} * |golden|")
        else:
            need = 1.0 if g.min_agreement is None else g.min_agreement
            agree = float(np.mean(got == want)) if want.size else 1.0
            agreements.append(agree)
            if agree < need:
                raise HealthCheckFailed(f"{what}: output {name!r} agrees with the golden "
                                        f"output on {agree:.1%} of elements, need {need:.1%}")
    scores = _scores_name(manifest)
    if g.min_agreement is not None and scores is not None:
        want, got = golden[scores], np.asarray(actual[scores])
        if want.ndim >= 1 and want.shape[0]:
            top1 = float(np.mean(np.argmax(got, axis=-1) == np.argmax(want, axis=-1)))
            agreements.append(top1)
            if top1 < g.min_agreement:
                raise HealthCheckFailed(f"{what}: top-1 agreement on {scores!r} is {top1:.1%}, "
                                        f"need {g.min_agreement:.1%}")
    return max_err, (min(agreements) if agreements else None)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def health_check(model: LoadedModel, manifest: Manifest, profile: DeviceProfile, *,
                 clock: Clock = time.perf_counter, latency_runs: int = 20,
                 warmup: int = 2) -> HealthReport:
    """Golden outputs within tolerance, then p95 single-sample latency within budget.

    Args:
        model: the new model, loaded with the profile's threads and providers.
        manifest: its verified manifest (golden I/O, tolerances, scores output).
        profile: this device's profile (``latency_budget_ms``).
        clock: monotonic seconds; injected so tests need no real slowness.
        latency_runs: timed single-sample runs (>= 1).
        warmup: untimed runs first (>= 0).

    Raises:
        HealthCheckFailed: an output is missing, of the wrong shape, non-finite, out of
            tolerance or below agreement; the golden inputs do not run; or p95 latency is over
            the budget.
        ValueError: ``latency_runs`` < 1 or ``warmup`` < 0.
    """
    if latency_runs < 1 or warmup < 0:
        raise ValueError(f"health_check: latency_runs >= 1 and warmup >= 0, got "
                         f"{latency_runs}, {warmup}")
    what = f"health check of {manifest.name} {manifest.version}"
    inputs = {k: decode_tensor(t) for k, t in manifest.golden.inputs.items()}
    golden = {k: decode_tensor(t) for k, t in manifest.golden.outputs.items()}
    actual = _replay(model, inputs, what)
    max_err, agreement = _compare(manifest, actual, golden, what)

    n = next(iter(inputs.values())).shape[0] if next(iter(inputs.values())).ndim else 1
    samples = [{k: _batch(v, i, i + 1) for k, v in inputs.items()} for i in range(max(n, 1))]
    times: list[float] = []
    for r in range(warmup + latency_runs):
        feed = samples[r % len(samples)]
        if r < warmup:
            _run(model, feed, what)
            continue
        t0 = clock()
        _run(model, feed, what)
        times.append((clock() - t0) * 1e3)
    p95 = _percentile(times, 95)
    if p95 > profile.latency_budget_ms:
        raise HealthCheckFailed(f"{what}: p95 latency {p95:.1f} ms over {latency_runs} runs is "
                                f"over the {profile.latency_budget_ms:g} ms budget of profile "
                                f"{profile.name!r}")
    return HealthReport(samples=n, outputs=tuple(golden), max_abs_error=max_err,
                        agreement=agreement, p50_ms=_percentile(times, 50), p95_ms=p95,
                        budget_ms=profile.latency_budget_ms, runs=latency_runs)


def _identity(path: Path) -> tuple[int, int, int, int]:
    """What a handed-over model is matched on: a replaced or rewritten file never matches.

    Raises:
        OSError: ``path`` cannot be stat'ed.
    """
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class _Kept:
    path: Path
    identity: tuple[int, int, int, int]
    model: LoadedModel


class RuntimeHealthChecker:
    """Load a staged model through the ``Runtime`` seam, :func:`health_check` it, close it (or,
    with ``hand_over``, keep a model that passed for :meth:`take`; module docstring)."""

    def __init__(self, profile: DeviceProfile, *, clock: Clock = time.perf_counter,
                 runtimes: Callable[[str], Runtime] = runtime_for, latency_runs: int = 20,
                 warmup: int = 2, hand_over: bool = False) -> None:
        self.profile = profile
        self._clock = clock
        self._runtimes = runtimes
        self._runs = latency_runs
        self._warmup = warmup
        self._hand_over = hand_over
        self._kept: _Kept | None = None
        self._lock = threading.Lock()  # take/release may come from another thread than check

    def take(self, model_path: Path) -> LoadedModel | None:
        """The model the last passed check loaded from ``model_path``, if that file is unchanged.

        The caller owns what is returned (it closes it, or hands it to serving, which does).
        Whatever was kept is given up either way: a kept model for another path, or whose file
        changed since, is closed and ``None`` returned (load the file then).
        """
        with self._lock:
            kept, self._kept = self._kept, None
        if kept is None:
            return None
        try:
            same = kept.path == Path(model_path) and kept.identity == _identity(kept.path)
        except OSError:
            same = False
        if not same:
            kept.model.close()
            return None
        return kept.model

    def release(self) -> None:
        """Close a model kept by a passed check and never taken (e.g. its activation failed)."""
        with self._lock:
            kept, self._kept = self._kept, None
        if kept is not None:
            kept.model.close()

    def check(self, manifest: Manifest, model_path: Path) -> HealthReport:
        """Health-check the model file at ``model_path`` described by ``manifest``.

        With ``hand_over``, a model that passed stays loaded for :meth:`take` (the one kept
        before is closed first, taken or not).

        Raises:
            HealthCheckFailed: it cannot be loaded here (no such runtime, the engine is older
                than the manifest's ``min_runtime_version``, a bad file), its inputs are not
                the manifest's, or :func:`health_check` fails.
        """
        self.release()
        try:
            identity = _identity(model_path) if self._hand_over else None
        except OSError as exc:
            raise HealthCheckFailed(f"health check of {manifest.name} {manifest.version}: the "
                                    f"model file cannot be read: {exc}") from exc
        try:
            runtime = self._runtimes(manifest.runtime)
            if manifest.min_runtime_version is not None:
                runtime.check_version(manifest.min_runtime_version)
            model = runtime.load(model_path, threads=self.profile.threads,
                                 providers=self.profile.execution_providers)
        except AgentError as exc:  # RuntimeLoadError from the seam
            raise HealthCheckFailed(f"health check of {manifest.name} {manifest.version}: the "
                                    f"model cannot be loaded: {exc}") from exc
        try:
            _check_specs(manifest, model)
            report = health_check(model, manifest, self.profile, clock=self._clock,
                                  latency_runs=self._runs, warmup=self._warmup)
        except BaseException:
            model.close()
            raise
        if identity is None:
            model.close()
        else:  # identity taken before loading: a file replaced meanwhile never matches take()
            with self._lock:
                self._kept = _Kept(Path(model_path), identity, model)
        return report


def _check_specs(manifest: Manifest, model: LoadedModel) -> None:
    """The loaded model has the inputs the manifest declares (names and dtypes)."""
    def sig(specs: tuple[TensorSpec, ...]) -> list[tuple[str, str]]:
        return sorted((s.name, s.dtype) for s in specs)

    if sig(model.inputs) != sig(manifest.inputs):
        raise HealthCheckFailed(f"health check of {manifest.name} {manifest.version}: the model's "
                                f"inputs are {sig(model.inputs)}, the manifest declares "
                                f"{sig(manifest.inputs)}")
