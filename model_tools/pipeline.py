"""``convert``: model + profile -> a validated bundle, or a refusal with its report.

The steps, in order (each reported through ``progress``):

1. check the output directory (refuse early) and, for a TFLite profile, that the converter
   environment exists (else the error gives the command that creates it); load and check the
   model, inline external data (for TFLite, cut the graph to what TFLite can represent:
   :mod:`model_tools.tflite.graph`);
2. load calibration/eval data against the model's inputs (validation data: eval, else
   calibration, else synthetic inputs, marked as such);
3. build every candidate precision the profile allows (or the one it names): with
   onnxruntime's tooling (:mod:`model_tools.quantize`), or for TFLite in the converter
   environment (:mod:`model_tools.tflite.build`; the fp32 ``.tflite`` is always built, as the
   latency reference);
4. run source (onnxruntime) and candidates (onnxruntime, or ai-edge-litert for ``.tflite``) on
   the validation data; compare; time them interleaved;
5. decide with the pure :func:`model_tools.policy.decide`;
6. refused -> write ``report.json`` alone and raise :class:`ValidationRejected`;
   chosen -> golden I/O, drift baseline, lineage, manifest, and the bundle, atomically.

A ``.tflite`` bundle's manifest names inputs and outputs as the ``.tflite``'s
``serving_default`` signature does (the converter gives the signature the ONNX names, so they
are the source's names unless TensorFlow refused one), with the source's ONNX layout, dtypes and
shapes: the ``.tflite`` takes exactly what the ONNX model took.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
    TensorSpec,
    is_plain_name,
    sha256_file,
)
from agent.protocol.profiles import DeviceProfile
from model_tools import evaluate, policy
from model_tools.baseline import compute_baseline
from model_tools.data import Dataset, load_npz, synthetic_dataset
from model_tools.errors import ConversionError, DataError, InputError, ValidationRejected
from model_tools.onnx_io import LoadedModel, load_model, save_model
from model_tools.package import check_out_dir, write_bundle, write_report_only
from model_tools.quantize import build_variant
from model_tools.tflite.build import build_tflite
from model_tools.tflite.env import ConverterEnv, find_env, resolve_location
from model_tools.tflite.graph import cut_for_tflite
from model_tools.tflite.run import TFLiteSession, read_metadata

__all__ = ["TFLITE_HOST_THREADS", "ConvertRequest", "ConvertResult", "Progress", "convert",
           "tool_versions"]

Progress = Callable[[str], None]
SYNTHETIC_SAMPLES = 64
_AA = "reference (A/A)"
#: the latency reference of a TFLite conversion when fp32 is not among the candidates
_TFLITE_REF = "fp32 .tflite (reference)"
#: ai-edge-litert's XNNPACK thread pools spin after each invoke: several interpreters timed
#: interleaved on a shared host slow each other down by up to 2x (an A/A p50 ratio of 0.42 at 2
#: threads against 0.99 at 1 on this 2-core host), so .tflite candidates are timed on one
#: thread; the device's health check times the profile's own thread count
TFLITE_HOST_THREADS = 1
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
    tflite_env: Path | None = None  # the converter environment; default: resolve_location()


@dataclass(frozen=True)
class ConvertResult:
    bundle: Path
    manifest: Manifest
    report: dict[str, Any]


def tool_versions(*extra: str) -> dict[str, str]:
    """Versions of Python and the distributions a conversion used (plus ``extra`` ones)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("edgefleet", "onnx", "onnxruntime", "numpy", *extra):
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


@dataclass
class _Candidate:
    """One built candidate: its file and a session on it, or why it could not be built."""

    precision: str
    path: Path | None = None
    session: Any = None
    notes: tuple[str, ...] = ()
    error: str | None = None
    min_runtime_version: str | None = None


@dataclass
class _Built:
    """Every candidate of one conversion, plus what a runtime adds to the manifest."""

    candidates: list[_Candidate]
    reference: tuple[str, Any, Any] | None = None  # latency reference: (key, session A, B)
    input_names: dict[str, str] = field(default_factory=dict)  # ONNX -> artifact input name
    lineage: dict[str, Any] = field(default_factory=dict)
    tools: tuple[str, ...] = ()  # distributions of this process to record in the lineage


def _build_onnx(precisions: Sequence[str], source_path: Path, work: Path,
                calibration: Dataset | None, fixed: bool, threads: int, auto: bool,
                progress: Progress) -> _Built:
    out: list[_Candidate] = []
    for precision in precisions:
        progress(f"building {precision}")
        try:
            variant = build_variant(precision, source_path, work,
                                    calibration=calibration.inputs if calibration else None,
                                    fixed_batch=fixed)
            sess = evaluate.open_session(variant.path, threads)
        except ConversionError as exc:
            if not auto:
                raise
            out.append(_Candidate(precision, error=str(exc)))
            continue
        out.append(_Candidate(precision, variant.path, sess, tuple(variant.notes)))
    return _Built(out)


def _artifact_min_runtime(path: Path, notes: list[str]) -> str | None:
    """The ``.tflite``'s own ``min_runtime_version`` metadata, when it is a usable version."""
    text = read_metadata(path).get("min_runtime_version", "").strip()
    if not text:
        return None
    try:
        policy.version_key(text)
    except ValueError:
        notes.append(f"unusable min_runtime_version metadata {text!r} ignored")
        return None
    return text


def _build_tflite(env: ConverterEnv, loaded: LoadedModel, precisions: Sequence[str],
                  source_path: Path, work: Path, calibration: Dataset | None, auto: bool,
                  progress: Progress) -> _Built:
    wanted = list(dict.fromkeys(["fp32", *precisions]))  # fp32: the latency reference
    threads = TFLITE_HOST_THREADS
    built = build_tflite(env, source_path, work, wanted, inputs=loaded.inputs,
                         outputs=loaded.outputs,
                         calibration=calibration.inputs if calibration else None,
                         progress=progress)
    sessions: dict[str, _Candidate] = {}
    for precision in wanted:
        variant = built.variants[precision]
        try:
            if variant.error is not None or variant.path is None:
                raise ConversionError(f"{precision} .tflite conversion failed: {variant.error}")
            notes = list(variant.notes)
            minimum = _artifact_min_runtime(variant.path, notes)
            sess = TFLiteSession(variant.path, threads, loaded.inputs, loaded.outputs,
                                 built.input_names)
        except ConversionError as exc:
            if not auto and precision in precisions:
                raise
            sessions[precision] = _Candidate(precision, error=str(exc))
            continue
        sessions[precision] = _Candidate(precision, variant.path, sess,
                                         (*loaded.prepared, *notes), None, minimum)
    ref = sessions["fp32"]
    reference = None
    if ref.session is not None and ref.path is not None:
        key = "fp32" if "fp32" in precisions else _TFLITE_REF
        twin = TFLiteSession(ref.path, threads, loaded.inputs, loaded.outputs,
                             built.input_names)
        reference = (key, ref.session, twin)
    lineage = {"converter": {"tools": built.tools, "environment": str(env.root),
                             "onnxsim": built.details.get("onnxsim"),
                             "sample_images": built.details.get("sample_images"),
                             "network_calls": built.details.get("network_calls")},
               "graph_changes": list(loaded.prepared),
               "input_names": dict(built.input_names)}
    return _Built([sessions[p] for p in precisions], reference, dict(built.input_names),
                  lineage, ("ai-edge-litert",))


def convert(req: ConvertRequest, progress: Progress = lambda _msg: None) -> ConvertResult:
    """Convert ``req.model`` for ``req.profile`` and write the bundle to ``req.out``.

    Raises:
        InputError: bad model, data, precision or output directory (subclasses say which).
        ConverterEnvError: a TFLite profile, and the converter environment is not set up.
        ConversionError: every candidate failed to build, or a runtime failed.
        ValidationRejected: no candidate meets the profile; ``report.json`` was written.
    """
    profile = req.profile
    tflite = profile.runtime == "tflite"
    name = _check_names(req)
    check_out_dir(req.out, req.force)
    precisions, auto = _candidates(req)
    now = req.now or dt.datetime.now(dt.UTC)
    env = find_env(resolve_location(req.tflite_env)) if tflite else None

    progress(f"loading {req.model.name}")
    loaded = load_model(req.model, prepare=cut_for_tflite if tflite else None)
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

        buildable = [p for p in precisions if p != "int8-static" or calibration is not None]
        if env is not None:
            built = _build_tflite(env, loaded, buildable, source_path, work, calibration, auto,
                                  progress)
        else:
            built = _build_onnx(buildable, source_path, work, calibration, fixed, threads, auto,
                                progress)
        by_precision = {c.precision: c for c in built.candidates}
        measured: list[policy.Measured] = []
        sessions: dict[str, Any] = {"source": src_sess}
        for precision in precisions:
            cand = by_precision.get(precision)
            if cand is None:
                measured.append(policy.Measured(precision, error="no calibration set given "
                                                "(--calibration FILE.npz)"))
                continue
            if cand.error is not None or cand.path is None:
                measured.append(policy.Measured(precision, error=cand.error))
                continue
            progress(f"validating {precision}")
            try:
                art_out = evaluate.run_all(cand.session, validation.inputs, fixed)
            except ConversionError as exc:
                if not auto:
                    raise
                measured.append(policy.Measured(precision, error=str(exc)))
                continue
            cmp = evaluate.compare_outputs(task, scores, src_out, art_out, validation.labels)
            sessions[precision] = cand.session
            measured.append(policy.Measured(
                precision=precision,
                size_bytes=cand.path.stat().st_size,
                top1_agreement=cmp.top1_agreement,
                accuracy_delta=cmp.accuracy_delta,
                max_abs_error=cmp.max_abs_error,
                notes=cand.notes,
                min_runtime_version=cand.min_runtime_version,
            ))

        # a second session of the very reference model: its p50 against the first is this
        # host's own noise in this run (an A/A test), which sets how tight the gate can be.
        # The reference runs in the artifact's runtime: the ONNX source, or the fp32 .tflite
        ref_key, ref_a, ref_b = built.reference or ("source", src_sess,
                                                     evaluate.open_session(source_path, threads))
        sessions.setdefault(ref_key, ref_a)
        sessions[_AA] = ref_b
        progress(f"timing {len(sessions)} models ({req.latency_runs} runs each)")
        lat = evaluate.measure_latency(sessions, validation.inputs, runs=req.latency_runs)
        measured = [_with_latency(m, lat.get(m.precision)) for m in measured]
        ref_p50 = lat[ref_key].p50_ms
        noise = abs(lat[_AA].p50_ms / ref_p50 - 1.0) if ref_p50 > 0 else 0.0
        reference = ("source" if ref_key == "source"
                     else "fp32 .tflite (ai-edge-litert, the device's runtime)")
        gate = policy.LatencyGate(source_p50_ms=ref_p50, noise=noise, auto=auto,
                                  reference=reference)
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
        art = by_precision[chosen.precision]
        assert art.path is not None  # a measured candidate was built
        progress("writing golden I/O and drift baseline")
        # a fixed batch of 1 (fed singly elsewhere) means one golden sample, as the spec says
        golden_in = validation.head(1 if fixed else GOLDEN_SAMPLES)
        golden_out = evaluate.run_all(art.session, golden_in, fixed)
        keep = _golden_samples(golden_in, golden_out)
        golden_in = {k: v[:keep] for k, v in golden_in.items()}
        golden_out = {k: v[:keep] for k, v in golden_out.items()}
        base_data = calibration or evaluation or validation
        base_out = evaluate.run_all(art.session, base_data.inputs, fixed)
        rename = built.input_names
        baseline = compute_baseline({rename.get(k, k): v for k, v in base_data.inputs.items()},
                                    base_out, task=task, source=base_data.source)
        length, digest = sha256_file(art.path)
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
            inputs=tuple(TensorSpec(rename.get(s.name, s.name), s.dtype, s.shape)
                         for s in loaded.inputs),
            outputs=loaded.outputs,
            golden=Golden(
                inputs={rename.get(k, k): _tensor(v) for k, v in golden_in.items()},
                outputs={k: _tensor(v) for k, v in golden_out.items()},
                atol=profile.tolerances.max_abs_error,
                rtol=0.0,
                min_agreement=(profile.tolerances.min_top1_agreement
                               if task == "classification" else None),
            ),
            validation=report["validation"],
            candidates=tuple(report["candidates"]),
            drift_baseline=baseline,
            min_runtime_version=art.min_runtime_version,
            lineage={
                "source_sha256": src_digest,
                "source_length": src_len,
                "source_file": req.model.name,
                "source_opset": loaded.opset,
                "source_had_external_data": loaded.had_external_data,
                "calibration_sha256": calibration.sha256 if calibration else None,
                "eval_sha256": evaluation.sha256 if evaluation else None,
                "tools": tool_versions(*built.tools),
                "build_host": {"machine": platform.machine(), "system": platform.system()},
                "created_at": now.isoformat(timespec="seconds"),
                **({"tflite": built.lineage} if built.lineage else {}),
            },
        )
        try:  # what readers will see, checked
            manifest = Manifest.from_bytes(manifest.to_bytes())
        except ManifestError as exc:
            raise ConversionError(f"the manifest for this model would be refused: {exc}") from exc
        progress(f"writing bundle {req.out}")
        write_bundle(req.out, art.path, manifest, force=req.force)
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
        "runtime": req.profile.runtime,
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
            "profile_min_runtime_version": req.profile.min_runtime_version,
            "min_runtime_version": m.min_runtime_version if m else None,
            "checks": [c.__dict__ for c in chosen.checks] if chosen else [],
            "host_runtime": _host_runtime(req.profile.runtime),
            "host_providers": (["CPUExecutionProvider"] if req.profile.runtime == "onnxruntime"
                               else ["ai-edge-litert CPU (XNNPACK)"]),
            "host_threads": (min(req.profile.threads, os.cpu_count() or 1)
                             if req.profile.runtime == "onnxruntime" else TFLITE_HOST_THREADS),
            "profile_providers": list(req.profile.execution_providers),
            "passed": chosen is not None,
        },
    }


def _host_runtime(runtime: str) -> str:
    """The runtime that ran the candidates on this host, with its version."""
    from importlib.metadata import PackageNotFoundError, version

    dist = "onnxruntime" if runtime == "onnxruntime" else "ai-edge-litert"
    try:
        return f"{dist} {version(dist)}"
    except PackageNotFoundError:
        return f"{dist} (version unknown)"
