"""``convert``: model + profile -> a validated bundle, or a refusal with its report.

The steps, in order (each reported through ``progress``):

1. check the output directory (refuse early), load and check the model, inline external data;
2. load calibration/eval data against the model's inputs (validation data: eval, else
   calibration, else synthetic inputs, marked as such);
3. build every candidate precision the profile allows (or the one it names);
4. run source and candidates on the validation data; compare; time them interleaved;
5. decide with the pure :func:`model_tools.policy.decide`;
6. refused -> write ``report.json`` alone and raise :class:`ValidationRejected`;
   chosen -> golden I/O, drift baseline, lineage, manifest, and the bundle, atomically.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.protocol.manifest import (
    MAX_MANIFEST_BYTES,
    MODEL_FILES,
    PLAIN_NAME_RULE,
    Golden,
    Manifest,
    ManifestError,
    ModelFile,
    Tensor,
    is_plain_name,
    sha256_file,
)
from agent.protocol.profiles import DeviceProfile
from model_tools import evaluate, policy
from model_tools.baseline import compute_baseline
from model_tools.data import Dataset, load_npz, synthetic_dataset
from model_tools.errors import ConversionError, DataError, InputError, ValidationRejected
from model_tools.onnx_io import load_model, save_model
from model_tools.package import check_out_dir, write_bundle, write_report_only
from model_tools.quantize import build_variant

__all__ = ["ConvertRequest", "ConvertResult", "Progress", "convert", "tool_versions"]

Progress = Callable[[str], None]
SYNTHETIC_SAMPLES = 64
_AA = "source (A/A)"
GOLDEN_SAMPLES = 8
#: raw bytes the golden tensors may take: base64 grows them by 4/3, to half the manifest limit
GOLDEN_BUDGET_BYTES = MAX_MANIFEST_BYTES * 3 // 8


@dataclass(frozen=True)
class ConvertRequest:
    model: Path
    profile: DeviceProfile
    out: Path
    calibration: Path | None = None
    eval: Path | None = None
    name: str | None = None
    version: str = "1.0.0"
    precision: str | None = None  # overrides the profile's precision (may be "auto")
    force: bool = False
    latency_runs: int = 300
    now: dt.datetime | None = None  # injected for reproducible lineage; default: UTC now


@dataclass(frozen=True)
class ConvertResult:
    bundle: Path
    manifest: Manifest
    report: dict[str, Any]


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("edgefleet", "onnx", "onnxruntime", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "unknown"
    return out


def _candidates(req: ConvertRequest) -> tuple[tuple[str, ...], bool]:
    """The precisions to try, and whether this is an automatic choice."""
    precision = req.precision or req.profile.precision
    if precision == "auto":
        return req.profile.allowed_precisions, True
    if precision not in req.profile.allowed_precisions:
        raise InputError(
            f"precision {precision!r} is not allowed by profile {req.profile.name!r}; "
            f"allowed: {', '.join(req.profile.allowed_precisions)} (or auto)")
    return (precision,), False


def _fixed_batch(ds_specs: Any) -> bool:
    return any(s.shape and s.shape[0] == 1 for s in ds_specs)


def _check_names(req: ConvertRequest) -> str:
    """The manifest's model name; it and the version become paths on the device."""
    name = req.name or req.model.stem
    if not is_plain_name(name):
        how = "pass --name" if req.name is None else "choose another --name"
        raise InputError(f"model name {name!r} cannot be used ({how}): expected "
                         f"{PLAIN_NAME_RULE}")
    if not is_plain_name(req.version):
        raise InputError(f"version {req.version!r} cannot be used: expected {PLAIN_NAME_RULE}")
    return name


def _golden_samples(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> int:
    """How many golden samples fit :data:`GOLDEN_BUDGET_BYTES` (at least 1, at most 8)."""
    per_sample = sum(a.nbytes // a.shape[0] if a.ndim and a.shape[0] else a.nbytes
                     for a in (*inputs.values(), *outputs.values()))
    return max(1, min(GOLDEN_SAMPLES, GOLDEN_BUDGET_BYTES // max(per_sample, 1)))


def _tensor(arr: np.ndarray) -> Tensor:
    arr = np.ascontiguousarray(arr)
    return Tensor(dtype=str(arr.dtype), shape=tuple(int(d) for d in arr.shape),
                  data=arr.astype(arr.dtype.newbyteorder("<")).tobytes())


def convert(req: ConvertRequest, progress: Progress = lambda _msg: None) -> ConvertResult:
    """Convert ``req.model`` for ``req.profile`` and write the bundle to ``req.out``.

    Raises:
        InputError: bad model, data, precision or output directory (subclasses say which).
        ConversionError: every candidate failed to build, or onnxruntime failed.
        ValidationRejected: no candidate meets the profile; ``report.json`` was written.
    """
    profile = req.profile
    if profile.runtime != "onnxruntime":
        raise InputError(f"profile {profile.name!r} uses runtime {profile.runtime!r}; this "
                         "converter builds onnxruntime artifacts (TFLite conversion is not "
                         "available yet)")
    name = _check_names(req)
    check_out_dir(req.out, req.force)
    precisions, auto = _candidates(req)
    now = req.now or dt.datetime.now(dt.UTC)

    progress(f"loading {req.model.name}")
    loaded = load_model(req.model)
    fixed = _fixed_batch(loaded.inputs)
    calibration = (load_npz(req.calibration, loaded.inputs, "calibration")
                   if req.calibration else None)
    evaluation = load_npz(req.eval, loaded.inputs, "eval") if req.eval else None
    validation: Dataset = evaluation or calibration or synthetic_dataset(
        loaded.inputs, SYNTHETIC_SAMPLES)
    needs_cal = "int8-static" in precisions
    if needs_cal and calibration is None and not auto:
        raise DataError(f"precision int8-static (profile {profile.name!r}) needs a "
                        "calibration set: pass --calibration FILE.npz")

    with tempfile.TemporaryDirectory(prefix="edgefleet-convert-") as work_s:
        work = Path(work_s)
        source_path = work / "source.onnx"
        source_size = save_model(loaded.model, source_path)
        # never time with more threads than the build host has: oversubscribed cores turn
        # p95 into scheduler noise (the device runs the profile's own thread count)
        threads = min(profile.threads, os.cpu_count() or 1)
        src_sess = evaluate.open_session(source_path, threads)
        progress(f"running the source model on {validation.samples} {validation.source} "
                 "samples")
        src_out = evaluate.run_all(src_sess, validation.inputs, fixed)
        task = evaluate.detect_task(loaded.outputs, src_out)
        scores = evaluate.scores_output(loaded.outputs) if task == "classification" else None
        source_accuracy = None
        if scores is not None and validation.labels is not None:
            source_accuracy = float((src_out[scores].argmax(axis=1) == validation.labels).mean())

        measured: list[policy.Measured] = []
        sessions: dict[str, Any] = {"source": src_sess}
        variants: dict[str, Path] = {}
        for precision in precisions:
            if precision == "int8-static" and calibration is None:
                measured.append(policy.Measured(precision, error="no calibration set given "
                                                "(--calibration FILE.npz)"))
                continue
            progress(f"building {precision}")
            try:
                variant = build_variant(precision, source_path, work,
                                        calibration=calibration.inputs if calibration else None,
                                        fixed_batch=fixed)
                sess = evaluate.open_session(variant.path, threads)
                progress(f"validating {precision}")
                art_out = evaluate.run_all(sess, validation.inputs, fixed)
            except ConversionError as exc:
                if not auto:
                    raise
                measured.append(policy.Measured(precision, error=str(exc)))
                continue
            cmp = evaluate.compare_outputs(task, scores, src_out, art_out, validation.labels)
            sessions[precision] = sess
            variants[precision] = variant.path
            measured.append(policy.Measured(
                precision=precision,
                size_bytes=variant.path.stat().st_size,
                top1_agreement=cmp.top1_agreement,
                accuracy_delta=cmp.accuracy_delta,
                max_abs_error=cmp.max_abs_error,
                notes=tuple(variant.notes),
            ))

        # a second session of the very same source model: its p50 against the first is this
        # host's own noise in this run (an A/A test), which sets how tight the gate can be
        sessions[_AA] = evaluate.open_session(source_path, threads)
        progress(f"timing {len(sessions)} models ({req.latency_runs} runs each)")
        lat = evaluate.measure_latency(sessions, validation.inputs, runs=req.latency_runs)
        measured = [_with_latency(m, lat.get(m.precision)) for m in measured]
        src_p50 = lat["source"].p50_ms
        noise = abs(lat[_AA].p50_ms / src_p50 - 1.0) if src_p50 > 0 else 0.0
        gate = policy.LatencyGate(source_p50_ms=src_p50, noise=noise, auto=auto)
        decision = policy.decide(measured, profile, gate)

        report = _report(req, loaded, validation, task, scores, source_size, lat, decision,
                         auto, now, source_accuracy)
        if decision.chosen is None:
            report["status"] = "rejected"
            where = write_report_only(req.out, report, force=req.force)
            reasons = "; ".join(f"{j.measured.precision}: {', '.join(j.reasons)}"
                                for j in decision.judged)
            raise ValidationRejected(
                f"no artifact meets profile {profile.name!r}: {reasons}. "
                f"Report written to {where}", report)

        chosen = decision.chosen.measured
        art_path = variants[chosen.precision]
        progress("writing golden I/O and drift baseline")
        art_sess = sessions[chosen.precision]
        # a fixed batch of 1 (fed singly elsewhere) means one golden sample, as the spec says
        golden_in = validation.head(1 if fixed else GOLDEN_SAMPLES)
        golden_out = evaluate.run_all(art_sess, golden_in, fixed)
        keep = _golden_samples(golden_in, golden_out)
        golden_in = {k: v[:keep] for k, v in golden_in.items()}
        golden_out = {k: v[:keep] for k, v in golden_out.items()}
        base_data = calibration or evaluation or validation
        base_out = evaluate.run_all(art_sess, base_data.inputs, fixed)
        baseline = compute_baseline(base_data.inputs, base_out, task=task,
                                    source=base_data.source)
        length, digest = sha256_file(art_path)
        src_len, src_digest = sha256_file(req.model)
        report["status"] = "accepted"
        manifest = Manifest(
            name=name,
            version=req.version,
            profile=profile.name,
            runtime=profile.runtime,
            precision=chosen.precision,
            task=task,
            file=ModelFile(path=MODEL_FILES[profile.runtime], sha256=digest, length=length),
            inputs=loaded.inputs,
            outputs=loaded.outputs,
            golden=Golden(
                inputs={k: _tensor(v) for k, v in golden_in.items()},
                outputs={k: _tensor(v) for k, v in golden_out.items()},
                atol=profile.tolerances.max_abs_error,
                rtol=0.0,
                min_agreement=(profile.tolerances.min_top1_agreement
                               if task == "classification" else None),
            ),
            validation=report["validation"],
            candidates=tuple(report["candidates"]),
            drift_baseline=baseline,
            lineage={
                "source_sha256": src_digest,
                "source_length": src_len,
                "source_file": req.model.name,
                "source_opset": loaded.opset,
                "source_had_external_data": loaded.had_external_data,
                "calibration_sha256": calibration.sha256 if calibration else None,
                "eval_sha256": evaluation.sha256 if evaluation else None,
                "tools": tool_versions(),
                "build_host": {"machine": platform.machine(), "system": platform.system()},
                "created_at": now.isoformat(timespec="seconds"),
            },
        )
        try:  # what readers will see, checked
            manifest = Manifest.from_bytes(manifest.to_bytes())
        except ManifestError as exc:
            raise ConversionError(f"the manifest for this model would be refused: {exc}") from exc
        progress(f"writing bundle {req.out}")
        write_bundle(req.out, art_path, manifest, force=req.force)
    return ConvertResult(bundle=req.out, manifest=manifest, report=report)


def _with_latency(m: policy.Measured, lat: evaluate.Latency | None) -> policy.Measured:
    if lat is None:
        return m
    return policy.Measured(**{**m.__dict__, "p50_ms": lat.p50_ms, "p95_ms": lat.p95_ms})


def _report(req: ConvertRequest, loaded: Any, validation: Dataset, task: str,
            scores: str | None, source_size: int, lat: dict[str, evaluate.Latency],
            decision: policy.Decision, auto: bool, now: dt.datetime,
            source_accuracy: float | None) -> dict[str, Any]:
    chosen = decision.chosen
    src = lat["source"]
    m = chosen.measured if chosen else None
    return {
        "schema_version": 1,
        "model": str(req.model),
        "profile": req.profile.name,
        "mode": "auto" if auto else "fixed",
        "created_at": now.isoformat(timespec="seconds"),
        "chosen": m.precision if m else None,
        "candidates": decision.table(),
        "validation": {
            "data_source": validation.source,
            "samples": validation.samples,
            "synthetic": validation.source == "synthetic",
            "task": task,
            "scores_output": scores,
            "precision": m.precision if m else None,
            "top1_agreement": m.top1_agreement if m else None,
            "max_abs_error": m.max_abs_error if m else None,
            "accuracy_delta": m.accuracy_delta if m else None,
            "source_accuracy": source_accuracy,
            "size_bytes": m.size_bytes if m else None,
            "source_size_bytes": source_size,
            "size_ratio": (source_size / m.size_bytes) if m and m.size_bytes else None,
            "latency_ms": {
                "source": {"p50": src.p50_ms, "p95": src.p95_ms, "runs": src.runs},
                "artifact": ({"p50": m.p50_ms, "p95": m.p95_ms} if m else None),
            },
            "latency_gate": decision.latency_gate,
            "profile_latency_budget_ms": req.profile.latency_budget_ms,
            "tolerances": req.profile.tolerances.__dict__,
            "max_artifact_bytes": req.profile.max_artifact_bytes,
            "checks": [c.__dict__ for c in chosen.checks] if chosen else [],
            "host_providers": ["CPUExecutionProvider"],
            "host_threads": min(req.profile.threads, os.cpu_count() or 1),
            "profile_providers": list(req.profile.execution_providers),
            "passed": chosen is not None,
        },
    }
