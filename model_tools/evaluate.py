"""Run models on the build host and compare an artifact with its source.

The numbers here feed the pure selection policy (:mod:`model_tools.policy`). onnxruntime
exceptions are translated into :class:`ConversionError` at this boundary.

Latency is measured one sample at a time (the device serves single requests), interleaving the
sessions being compared round by round so that a noisy neighbour slows all of them alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.protocol.manifest import TensorSpec
from model_tools.errors import ConversionError

__all__ = [
    "Comparison",
    "Latency",
    "compare_outputs",
    "detect_task",
    "measure_latency",
    "open_session",
    "run_all",
    "scores_output",
]

RUN_BATCH = 256


def open_session(path: Path, threads: int, providers: Sequence[str] = ("CPUExecutionProvider",)
                 ) -> Any:
    """An onnxruntime session with the profile's threads, on the providers this host has.

    Raises:
        ConversionError: onnxruntime cannot load the model.
    """
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    use = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=use)
    except Exception as exc:  # seam: onnxruntime raises its own Fail/InvalidGraph types
        raise ConversionError(f"onnxruntime cannot load {Path(path).name}: {exc}") from exc


def run_all(session: Any, inputs: Mapping[str, np.ndarray], fixed_batch: bool = False
            ) -> dict[str, np.ndarray]:
    """Run every sample through ``session`` in chunks; outputs concatenated per output name.

    Raises:
        ConversionError: onnxruntime failed on the data.
    """
    names = [o.name for o in session.get_outputs()]
    n = next(iter(inputs.values())).shape[0]
    step = 1 if fixed_batch else RUN_BATCH
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    try:
        for start in range(0, n, step):
            feed = {k: v[start:start + step] for k, v in inputs.items()}
            for name, value in zip(names, session.run(names, feed), strict=True):
                parts[name].append(np.asarray(value))
    except Exception as exc:  # seam
        raise ConversionError(f"inference failed: {exc}") from exc
    return {k: np.concatenate(v, axis=0) if v[0].ndim else v[0] for k, v in parts.items()}


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p95_ms: float
    runs: int


def measure_latency(
    sessions: Mapping[str, Any],
    inputs: Mapping[str, np.ndarray],
    *,
    runs: int = 300,
    warmup: int = 20,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Latency]:
    """p50/p95 single-sample latency for each session, interleaved round by round.

    Raises:
        ConversionError: onnxruntime failed on a sample.
    """
    n = next(iter(inputs.values())).shape[0]
    samples = [{k: v[i % n:i % n + 1] for k, v in inputs.items()} for i in range(min(n, 64))]
    times: dict[str, list[float]] = {k: [] for k in sessions}
    try:
        for r in range(warmup + runs):
            feed = samples[r % len(samples)]
            for key, sess in sessions.items():
                t0 = clock()
                sess.run(None, feed)
                if r >= warmup:
                    times[key].append(clock() - t0)
    except Exception as exc:  # seam
        raise ConversionError(f"inference failed while timing: {exc}") from exc
    return {
        k: Latency(float(np.percentile(v, 50) * 1e3), float(np.percentile(v, 95) * 1e3), len(v))
        for k, v in times.items()
    }


def scores_output(outputs: Sequence[TensorSpec]) -> str | None:
    """The output a classifier's top-1 is read from: the first float output of rank 2."""
    for spec in outputs:
        if (spec.dtype.startswith("float") and len(spec.shape) == 2
                and spec.static_shape[1] != 1):
            return spec.name
    return None


def detect_task(outputs: Sequence[TensorSpec], observed: Mapping[str, np.ndarray]) -> str:
    """"classification" when some float output is [N, C>=2] (scores/probabilities), else
    "regression" when all outputs are float, else "generic"."""
    name = scores_output(outputs)
    if name is not None and observed[name].ndim == 2 and observed[name].shape[1] >= 2:
        return "classification"
    if all(s.dtype.startswith("float") for s in outputs):
        return "regression"
    return "generic"


@dataclass(frozen=True)
class Comparison:
    samples: int
    top1_agreement: float | None
    max_abs_error: float
    mean_abs_error: float
    source_accuracy: float | None
    artifact_accuracy: float | None

    @property
    def accuracy_delta(self) -> float | None:
        if self.source_accuracy is None or self.artifact_accuracy is None:
            return None
        return self.artifact_accuracy - self.source_accuracy


def compare_outputs(
    task: str,
    scores: str | None,
    source: Mapping[str, np.ndarray],
    artifact: Mapping[str, np.ndarray],
    labels: np.ndarray | None,
) -> Comparison:
    """Agreement, errors and accuracy of ``artifact`` outputs against ``source`` outputs.

    Float outputs give the abs errors; integer outputs must match exactly and count through
    agreement. Accuracy needs labels and a classification task.

    Raises:
        ValueError: the two output sets differ in names or shapes (programmer error).
    """
    if set(source) != set(artifact):
        raise ValueError(f"output names differ: {sorted(source)} vs {sorted(artifact)}")
    errs: list[np.ndarray] = []
    n = 0
    for name, ref in source.items():
        got = artifact[name]
        if ref.shape != got.shape:
            raise ValueError(f"output {name!r} shape {got.shape} != source {ref.shape}")
        n = ref.shape[0] if ref.ndim else 1
        if np.issubdtype(ref.dtype, np.floating):
            errs.append(np.abs(ref.astype(np.float64) - got.astype(np.float64)).ravel())
    err = np.concatenate(errs) if errs else np.zeros(1)
    agreement = src_acc = art_acc = None
    if task == "classification" and scores is not None:
        src_top = source[scores].argmax(axis=1)
        art_top = artifact[scores].argmax(axis=1)
        agreement = float((src_top == art_top).mean())
        if labels is not None:
            src_acc = float((src_top == labels).mean())
            art_acc = float((art_top == labels).mean())
    return Comparison(
        samples=n,
        top1_agreement=agreement,
        max_abs_error=float(err.max()),
        mean_abs_error=float(err.mean()),
        source_accuracy=src_acc,
        artifact_accuracy=art_acc,
    )
