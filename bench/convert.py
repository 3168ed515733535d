"""Benchmark ``model_tools convert``: fp32 against the chosen precision, per model and profile.

Usage::

    .venv/bin/python bench/convert.py                # plain-text tables (also: make bench)
    .venv/bin/python bench/convert.py --markdown     # Markdown tables, for BENCHMARKS.md
    .venv/bin/python bench/convert.py --runs 5000 --out /tmp/bench-convert

What it does:

1. trains the two example models (``digits-mlp``: scikit-learn via skl2onnx; ``digits-cnn``:
   PyTorch) into ``OUT/models`` (default ``bench/out``, gitignored);
2. converts each with :func:`model_tools.pipeline.convert` for every profile whose runtime is
   onnxruntime, into ``OUT/bundles/<model>/<profile>``;
3. re-measures, independently of the converter's own numbers: size of the source file against
   the bundle's model file; p50/p95 single-sample latency of both with
   :func:`model_tools.evaluate.measure_latency`, interleaved, in two passes of ``--runs`` runs
   each (the second in reversed order; percentiles are the mean of both) at the profile's
   thread count (the peer is the fp32 source in onnxruntime, in the same run); and
   top-1 accuracy of both on the held-out eval split;
4. rebuilds every candidate precision of one profile (``--candidates-profile``, default rpi4)
   and measures them all the same way, next to the converter's verdict on each;
5. prints each goal as PASS or MISS. The goals are reported, never asserted;
6. for the TFLite profile (``--tflite-profile``, default rpi4-tflite; skipped with a note when
   the converter environment is missing: ``model_tools setup tflite``), converts each model
   with :func:`model_tools.pipeline.convert`, then builds every variant again with
   :func:`model_tools.tflite.build.build_tflite` and measures each ``.tflite`` in ai-edge-litert
   the same way, interleaved with the fp32 ONNX source in onnxruntime (the peer) and the fp32
   ``.tflite``, all on one thread as the converter times ``.tflite`` files
   (:data:`model_tools.pipeline.TFLITE_HOST_THREADS`): size, p50/p95, top-1 agreement with the
   source, accuracy, the runtime it needs, and the converter's verdict.

Two extra sessions run in every interleaved measurement: a second session of the same fp32
file (``A/A``: its p50 ratio against the first is the run's noise) and an ``Identity`` model
of the same input shape (``floor``: what one ``session.run`` call from Python costs with no
model at all).

Exit codes: 0 done (whatever the goals say), 1 error, 2 usage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from model_tools import evaluate
from model_tools.errors import ConverterEnvError, ModelToolsError, ValidationRejected
from model_tools.examples.digits import ExampleModel, train_digits_cnn, train_digits_mlp
from model_tools.onnx_io import load_model, save_model
from model_tools.pipeline import TFLITE_HOST_THREADS, ConvertRequest, convert
from model_tools.profiles import DeviceProfile, all_profiles
from model_tools.quantize import build_variant
from model_tools.tflite.build import build_tflite
from model_tools.tflite.env import ConverterEnv, find_env, resolve_location
from model_tools.tflite.graph import cut_for_tflite
from model_tools.tflite.run import TFLiteSession, read_metadata

__all__ = ["GOAL_MAX_DROP_POINTS", "GOAL_SIZE_RATIO", "NOISE_BAND", "main"]

GOAL_SIZE_RATIO = 3.5  # int8 must be at least this many times smaller than fp32
GOAL_MAX_DROP_POINTS = 1.0  # accuracy points (percent of the eval split) int8 may lose
NOISE_BAND = 0.05  # p50 ratio up to 1 + max(this, |A/A - 1|) counts as not slower (noise)
MIN_RUNS = 2000  # fewer runs than this are flagged as indicative only
WARMUP = 50
DEFAULT_OUT = Path(__file__).resolve().parent / "out"
LABELS = "labels"


# --- pure part: numbers in, verdicts and tables out ------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Interleaved p50/p95 in microseconds for one measurement round."""

    runs: int
    threads: int
    floor_p50: float
    fp32_p50: float
    fp32_p95: float
    aa_p50: float
    other: dict[str, tuple[float, float]]  # label -> (p50, p95)

    @property
    def aa_ratio(self) -> float:
        return self.aa_p50 / self.fp32_p50


@dataclass(frozen=True)
class Row:
    """One (model, profile) result."""

    model: str
    profile: str
    note: str  # e.g. "validated on CPU provider"
    chosen: str | None  # None: the converter refused
    refusal: str
    fp32_bytes: int
    chosen_bytes: int
    fp32_acc: float
    chosen_acc: float
    timing: Timing | None
    converter_p50_ratio: float | None


def size_verdict(precision: str, ratio: float) -> str:
    if not precision.startswith("int8"):
        return f"n/a ({precision})"
    return "PASS" if ratio >= GOAL_SIZE_RATIO else "MISS"


def noise_band(aa_ratio: float) -> float:
    """The run's noise: the stated floor, or the A/A disagreement if that is larger."""
    return max(NOISE_BAND, abs(aa_ratio - 1.0))


def latency_verdict(ratio: float, aa_ratio: float) -> str:
    if ratio <= 1.0:
        return "PASS"
    if ratio <= 1.0 + noise_band(aa_ratio):
        return "PASS (noise)"
    return "MISS"


def accuracy_verdict(delta_points: float) -> str:
    return "PASS" if -delta_points <= GOAL_MAX_DROP_POINTS + 1e-9 else "MISS"


def kib(n: int) -> str:
    return f"{n / 1024:.1f}"


def us(x: float) -> str:
    return f"{x:.1f}"


def render(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    """A Markdown table or an aligned plain-text one."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r) for r in rows]
    return "\n".join(out)


def result_table(rows: Sequence[Row], markdown: bool) -> str:
    headers = ["profile", "chosen", "size KiB fp32 -> chosen", "x smaller",
               "p50 us fp32 -> chosen", "p50 ratio", "p95 us fp32 -> chosen", "p95 ratio",
               "accuracy % fp32 -> chosen", "delta pts",
               f">= {GOAL_SIZE_RATIO}x smaller", "not slower",
               f"<= {GOAL_MAX_DROP_POINTS:g} pt lost"]
    body: list[list[str]] = []
    for r in rows:
        name = r.profile + (f" ({r.note})" if r.note else "")
        if r.chosen is None or r.timing is None:
            body.append([name, f"refused: {r.refusal}"] + [""] * (len(headers) - 2))
            continue
        t = r.timing
        c50, c95 = t.other["chosen"]
        size_ratio = r.fp32_bytes / r.chosen_bytes
        delta = (r.chosen_acc - r.fp32_acc) * 100
        body.append([
            name, r.chosen,
            f"{kib(r.fp32_bytes)} -> {kib(r.chosen_bytes)}", f"{size_ratio:.2f}",
            f"{us(t.fp32_p50)} -> {us(c50)}", f"{c50 / t.fp32_p50:.2f}",
            f"{us(t.fp32_p95)} -> {us(c95)}", f"{c95 / t.fp32_p95:.2f}",
            f"{r.fp32_acc * 100:.2f} -> {r.chosen_acc * 100:.2f}", f"{delta:+.2f}",
            size_verdict(r.chosen, size_ratio),
            latency_verdict(c50 / t.fp32_p50, t.aa_ratio) + (" (CPU stand-in)" if r.note else ""),
            accuracy_verdict(delta),
        ])
    return render(headers, body, markdown)


def noise_table(rows: Sequence[Row], markdown: bool) -> str:
    headers = ["profile", "threads", "runs", "floor p50 us", "fp32 p50 us", "A/A p50 ratio",
               "noise band", "chosen p50 us", "p50 ratio (here)",
               "p50 ratio (converter, its own runs)"]
    body: list[list[str]] = []
    for r in rows:
        if r.timing is None:
            continue
        t = r.timing
        c50 = t.other["chosen"][0]
        conv = f"{r.converter_p50_ratio:.2f}" if r.converter_p50_ratio is not None else "-"
        body.append([r.profile, str(t.threads), str(t.runs), us(t.floor_p50), us(t.fp32_p50),
                     f"{t.aa_ratio:.2f}", f"+/-{noise_band(t.aa_ratio):.0%}", us(c50),
                     f"{c50 / t.fp32_p50:.2f}", conv])
    return render(headers, body, markdown)


# --- I/O shell: training, converting, timing ------------------------------------------------


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: keep platform.processor()
    info = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": f"{os.cpu_count()} logical, {len(os.sched_getaffinity(0))} usable",
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
    }
    for dist in ("onnxruntime", "ai-edge-litert", "onnx", "numpy", "scikit-learn", "skl2onnx",
                 "torch"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = "not installed"
    import onnxruntime as ort

    info["onnxruntime providers"] = ", ".join(ort.get_available_providers())
    info["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def load_eval(model: ExampleModel) -> tuple[dict[str, np.ndarray], np.ndarray]:
    with np.load(model.eval_path, allow_pickle=False) as npz:
        return {model.input_name: npz[model.input_name]}, npz[LABELS]


def load_calibration(model: ExampleModel) -> dict[str, np.ndarray]:
    with np.load(model.calibration_path, allow_pickle=False) as npz:
        return {model.input_name: npz[model.input_name]}


def accuracy(session: Any, inputs: Mapping[str, np.ndarray], labels: np.ndarray) -> float:
    """Top-1 accuracy read from the first [N, C>=2] float output."""
    out = evaluate.run_all(session, inputs)
    for o in session.get_outputs():
        arr = out[o.name]
        if arr.ndim == 2 and arr.shape[1] >= 2 and np.issubdtype(arr.dtype, np.floating):
            return float((arr.argmax(axis=1) == labels).mean())
    raise RuntimeError("model has no [N, C] score output to read a top-1 from")


def write_floor_model(path: Path, input_name: str, sample_shape: tuple[int, ...]) -> Path:
    """An ``Identity`` model with the given input: the cost of a ``run`` call and nothing else."""
    import onnx
    from onnx import TensorProto, helper

    dims: list[Any] = ["N", *sample_shape]
    graph = helper.make_graph(
        [helper.make_node("Identity", [input_name], ["y"])], "floor",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def time_against_fp32(source: Path, floor: Path, others: Mapping[str, Path], threads: int,
                      inputs: Mapping[str, np.ndarray], runs: int) -> Timing:
    """Interleave floor, fp32, ``others`` and a second fp32 session (A/A); microseconds.

    Two passes of ``runs`` rounds each, the second in reverse session order, and each
    percentile is the mean of the two passes: a session's place in the round (whose cache
    and thread pool it follows) then favours none of them.
    """
    return time_sessions(source, floor, {k: evaluate.open_session(p, threads)
                                         for k, p in others.items()}, threads, inputs, runs)


def time_sessions(source: Path, floor: Path, others: Mapping[str, Any], threads: int,
                  inputs: Mapping[str, np.ndarray], runs: int) -> Timing:
    """:func:`time_against_fp32` for sessions already open (e.g. ``.tflite`` ones)."""
    sessions = {"floor": evaluate.open_session(floor, threads),
                "fp32": evaluate.open_session(source, threads)}
    # others are keyed apart: a candidate may itself be called "fp32"
    sessions.update({f"other:{k}": sess for k, sess in others.items()})
    sessions["fp32 A/A"] = evaluate.open_session(source, threads)
    passes = [evaluate.measure_latency(order, inputs, runs=runs, warmup=WARMUP)
              for order in (sessions, dict(reversed(sessions.items())))]

    def p50(key: str) -> float:
        return float(np.mean([lat[key].p50_ms for lat in passes]) * 1e3)

    def p95(key: str) -> float:
        return float(np.mean([lat[key].p95_ms for lat in passes]) * 1e3)

    return Timing(
        runs=runs * len(passes), threads=threads,
        floor_p50=p50("floor"), fp32_p50=p50("fp32"), fp32_p95=p95("fp32"),
        aa_p50=p50("fp32 A/A"),
        other={k: (p50(f"other:{k}"), p95(f"other:{k}")) for k in others},
    )


def cpu_note(profile: DeviceProfile) -> str:
    import onnxruntime as ort

    first = profile.execution_providers[0] if profile.execution_providers else ""
    if first and first not in ort.get_available_providers():
        return "validated on CPU provider"
    return ""


def converter_ratio(report: Mapping[str, Any]) -> float | None:
    lat = report["validation"]["latency_ms"]
    if lat.get("artifact") is None:
        return None
    return float(lat["artifact"]["p50"] / lat["source"]["p50"])


def bench_profile(model: ExampleModel, profile: DeviceProfile, out: Path, floor: Path,
                  runs: int, fp32_acc: float, log: Any) -> tuple[Row, dict[str, Any]]:
    bundle = out / "bundles" / model.name / profile.name
    req = ConvertRequest(model=model.onnx_path, profile=profile, out=bundle,
                         calibration=model.calibration_path, eval=model.eval_path,
                         name=model.name, force=True)
    started = time.perf_counter()
    try:
        report = convert(req).report
    except ValidationRejected as exc:
        log(f"  {profile.name}: refused ({time.perf_counter() - started:.1f} s)")
        reasons = "; ".join(f"{c['precision']}: {', '.join(c['reasons'])}"
                            for c in exc.report["candidates"])
        return Row(model.name, profile.name, cpu_note(profile), None, reasons,
                   model.onnx_path.stat().st_size, 0, fp32_acc, 0.0, None, None), exc.report
    log(f"  {profile.name}: converted to {report['chosen']} "
        f"({time.perf_counter() - started:.1f} s), timing {runs} runs")
    model_file = bundle / "model.onnx"
    inputs, labels = load_eval(model)
    timing = time_against_fp32(model.onnx_path, floor, {"chosen": model_file},
                               profile.threads, inputs, runs)
    chosen_acc = accuracy(evaluate.open_session(model_file, profile.threads), inputs, labels)
    row = Row(model.name, profile.name, cpu_note(profile), report["chosen"], "",
              model.onnx_path.stat().st_size, model_file.stat().st_size, fp32_acc, chosen_acc,
              timing, converter_ratio(report))
    return row, report


def candidates_table(model: ExampleModel, profile: DeviceProfile, report: Mapping[str, Any],
                     out: Path, floor: Path, runs: int, fp32_acc: float,
                     markdown: bool) -> str:
    """Rebuild every candidate precision of ``profile`` and time them all interleaved."""
    work = out / "candidates" / model.name / profile.name
    work.mkdir(parents=True, exist_ok=True)
    calibration = load_calibration(model)
    paths: dict[str, Path] = {}
    for precision in profile.allowed_precisions:
        paths[precision] = build_variant(precision, model.onnx_path, work,
                                         calibration=calibration).path
    inputs, labels = load_eval(model)
    timing = time_against_fp32(model.onnx_path, floor, paths, profile.threads, inputs, runs)
    verdicts = {c["precision"]: c for c in report["candidates"]}
    src_p50 = report["validation"]["latency_ms"]["source"]["p50"]
    fp32_bytes = model.onnx_path.stat().st_size
    headers = ["candidate", "size KiB", "x smaller", "p50 us", "p50 ratio", "p95 us",
               "accuracy %", "delta pts", "converter p50 ratio", "converter verdict"]
    body: list[list[str]] = [["fp32 source", kib(fp32_bytes), "1.00", us(timing.fp32_p50),
                              "1.00", us(timing.fp32_p95), f"{fp32_acc * 100:.2f}", "+0.00",
                              "1.00", "(peer)"]]
    for precision, path in paths.items():
        p50, p95 = timing.other[precision]
        sess = evaluate.open_session(path, profile.threads)
        acc = accuracy(sess, inputs, labels)
        v = verdicts.get(precision, {})
        if v.get("chosen"):
            verdict = "chosen"
        elif v.get("ok"):
            verdict = "passed, not chosen (larger)"
        else:
            verdict = "refused: " + "; ".join(v.get("reasons", ["not in report"]))
        if any("fell back to per-tensor" in n for n in v.get("notes", [])):
            verdict += " (per-channel failed, built per-tensor)"
        conv = f"{v['p50_ms'] / src_p50:.2f}" if v.get("p50_ms") is not None else "-"
        size = path.stat().st_size
        body.append([precision, kib(size), f"{fp32_bytes / size:.2f}", us(p50),
                     f"{p50 / timing.fp32_p50:.2f}", us(p95), f"{acc * 100:.2f}",
                     f"{(acc - fp32_acc) * 100:+.2f}", conv, verdict])
    note = (f"{profile.name}, {profile.threads} threads, {timing.runs} interleaved runs; "
            f"floor p50 {us(timing.floor_p50)} us, A/A p50 ratio {timing.aa_ratio:.2f}")
    return note + "\n\n" + render(headers, body, markdown)


def tflite_table(model: ExampleModel, profile: DeviceProfile, env: ConverterEnv, out: Path,
                 floor: Path, runs: int, fp32_acc: float, markdown: bool, log: Any) -> str:
    """Convert for a TFLite ``profile``, rebuild every variant, time them all interleaved."""
    bundle = out / "bundles" / model.name / profile.name
    started = time.perf_counter()
    try:
        report = convert(ConvertRequest(model=model.onnx_path, profile=profile, out=bundle,
                                        calibration=model.calibration_path,
                                        eval=model.eval_path, name=model.name, force=True,
                                        tflite_env=env.root)).report
    except ValidationRejected as exc:
        report = exc.report
    log(f"  {profile.name}: converter chose {report['chosen']} "
        f"({time.perf_counter() - started:.1f} s); rebuilding every variant")
    work = out / "candidates" / model.name / profile.name
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model(model.onnx_path, prepare=cut_for_tflite)
    source = work / "source.onnx"
    save_model(loaded.model, source)
    built = build_tflite(env, source, work, profile.allowed_precisions, inputs=loaded.inputs,
                         outputs=loaded.outputs, calibration=load_calibration(model))
    sessions: dict[str, TFLiteSession] = {}
    for precision, variant in built.variants.items():
        if variant.path is None:
            log(f"  {precision}: not built: {variant.error}")
            continue
        sessions[precision] = TFLiteSession(variant.path, TFLITE_HOST_THREADS, loaded.inputs,
                                            loaded.outputs, built.input_names)
    inputs, labels = load_eval(model)
    timing = time_sessions(model.onnx_path, floor, sessions, TFLITE_HOST_THREADS, inputs, runs)
    scores = next(s.name for s in loaded.outputs if s.name == "probabilities")
    src_top = evaluate.run_all(evaluate.open_session(source, profile.threads),
                               inputs)[scores].argmax(axis=1)
    verdicts = {c["precision"]: c for c in report["candidates"]}
    fp32_bytes = model.onnx_path.stat().st_size
    tfl32 = timing.other["fp32"][0] if "fp32" in timing.other else None
    headers = ["candidate", "size KiB", "x smaller", "p50 us", "p50 ratio",
               "p50 / fp32 .tflite", "p95 us", "top-1 agreement", "accuracy %", "delta pts",
               "needs TFLite", "converter verdict"]
    body: list[list[str]] = [[f"fp32 ONNX source (onnxruntime, {TFLITE_HOST_THREADS} thread)",
                              kib(fp32_bytes), "1.00",
                              us(timing.fp32_p50), "1.00", "-", us(timing.fp32_p95), "1.0000",
                              f"{fp32_acc * 100:.2f}", "+0.00", "-", "(peer)"]]
    for precision, sess in sessions.items():
        p50, p95 = timing.other[precision]
        top = evaluate.run_all(sess, inputs)[scores].argmax(axis=1)
        acc = float((top == labels).mean())
        v = verdicts.get(precision, {})
        verdict = ("chosen" if v.get("chosen") else "passed, not chosen" if v.get("ok")
                   else "refused: " + "; ".join(v.get("reasons", ["not in report"])))
        size = sess.path.stat().st_size
        body.append([f"{precision} .tflite", kib(size), f"{fp32_bytes / size:.2f}", us(p50),
                     f"{p50 / timing.fp32_p50:.2f}",
                     f"{p50 / tfl32:.2f}" if tfl32 else "-", us(p95),
                     f"{float((top == src_top).mean()):.4f}", f"{acc * 100:.2f}",
                     f"{(acc - fp32_acc) * 100:+.2f}",
                     read_metadata(sess.path).get("min_runtime_version", "?"), verdict])
    note = (f"{profile.name} (ai-edge-litert), {TFLITE_HOST_THREADS} thread (as the converter "
            f"times .tflite files; the device uses {profile.threads}), {timing.runs} "
            f"interleaved runs; floor p50 {us(timing.floor_p50)} us, A/A p50 ratio "
            f"{timing.aa_ratio:.2f}; profile's runtime: TFLite >= {profile.min_runtime_version}")
    return note + "\n\n" + render(headers, body, markdown)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/convert.py",
        description="Benchmark model_tools convert: size, p50/p95 latency and accuracy of "
                    "fp32 against the chosen precision, per example model and profile.",
        epilog="example: .venv/bin/python bench/convert.py --markdown --runs 3000. "
               "Exit codes: 0 done (goals are reported, not asserted), 1 error, 2 usage.")
    p.add_argument("--runs", type=int, default=MIN_RUNS,
                   help="single-sample runs per model in each of the two passes (forward and "
                        f"reversed session order) of every measurement (default {MIN_RUNS})")
    p.add_argument("--markdown", action="store_true", help="print tables in Markdown")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="work directory for models and bundles (default bench/out)")
    p.add_argument("--candidates-profile", default="rpi4",
                   help="profile whose candidates are all rebuilt and timed (default rpi4)")
    p.add_argument("--tflite-profile", default="rpi4-tflite",
                   help="TFLite profile whose variants are all built and timed (default "
                        "rpi4-tflite; 'none' skips TFLite)")
    p.add_argument("--tflite-env", type=Path, default=None,
                   help="the TFLite converter environment (default: model_tools's own)")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error(f"--runs must be >= 1, got {args.runs}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    md: bool = args.markdown
    out: Path = args.out.resolve()
    logging.getLogger("model_tools").setLevel(logging.ERROR)  # notes carry the same text

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def heading(text: str, level: int = 3) -> None:
        print(f"\n{'#' * level} {text}\n" if md else f"\n== {text} ==\n")

    started = time.perf_counter()
    info = machine_info()
    everything = all_profiles()
    profiles = {n: p for n, p in everything.items() if p.runtime == "onnxruntime"}
    tflite = {n: p for n, p in everything.items() if p.runtime == "tflite"}
    if args.tflite_profile not in (*tflite, "none"):
        log(f"error: --tflite-profile {args.tflite_profile!r} is not a TFLite profile; valid: "
            f"{', '.join(sorted(tflite))}, none")
        return 2
    if args.candidates_profile not in profiles:
        log(f"error: --candidates-profile {args.candidates_profile!r} is not an onnxruntime "
            f"profile; valid: {', '.join(sorted(profiles))}")
        return 2

    log(f"training the example models into {out / 'models'}")
    models = []
    for train in (train_digits_mlp, train_digits_cnn):
        model = train(out / "models")
        log(f"  {model.name}: trained in {model.train_seconds:.1f} s")
        models.append(model)

    heading("Machine")
    if md:
        print("\n".join(f"- {k}: {v}" for k, v in info.items()))
    else:
        print("\n".join(f"{k:>24}: {v}" for k, v in info.items()))
    print(f"\nruns per model per measurement: 2 x {args.runs} (forward and reversed order)"
          + ("" if args.runs >= MIN_RUNS else f" (below {MIN_RUNS}: indicative only)")
          + f"; a p50 ratio within 1 + max({NOISE_BAND:.2f}, |A/A - 1|) counts as not slower "
          "(PASS (noise))")

    candidate_tables: list[str] = []
    for model in models:
        log(f"{model.name}: converting for {len(profiles)} profiles")
        inputs, labels = load_eval(model)
        sample_shape = tuple(int(d) for d in inputs[model.input_name].shape[1:])
        floor = write_floor_model(out / "models" / f"{model.name}.floor.onnx",
                                  model.input_name, sample_shape)
        fp32_acc = accuracy(evaluate.open_session(model.onnx_path, 1), inputs, labels)
        rows: list[Row] = []
        reports: dict[str, dict[str, Any]] = {}
        for name in sorted(profiles):
            row, reports[name] = bench_profile(model, profiles[name], out, floor, args.runs,
                                               fp32_acc, log)
            rows.append(row)
        heading(f"{model.name}: fp32 against the chosen precision")
        print(f"eval split: {labels.shape[0]} held-out samples; fp32 = the source ONNX file "
              "in onnxruntime on this host, same threads, interleaved in the same run\n")
        print(result_table(rows, md))
        heading(f"{model.name}: latency noise (same runs)", 4)
        print(noise_table(rows, md))
        log(f"{model.name}: rebuilding and timing every {args.candidates_profile} candidate")
        candidate_tables.append(
            f"{model.name}: " + candidates_table(
                model, profiles[args.candidates_profile], reports[args.candidates_profile],
                out, floor, args.runs, fp32_acc, md))

    heading(f"All candidates on {args.candidates_profile}")
    print("\n\n".join(candidate_tables))
    if args.tflite_profile != "none":
        tflite_section(tflite[args.tflite_profile], args, models, out, md, log, heading)
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"total time {time.perf_counter() - started:.0f} s")
    return 0


def tflite_section(profile: DeviceProfile, args: argparse.Namespace,
                   models: Sequence[ExampleModel], out: Path, md: bool, log: Any,
                   heading: Any) -> None:
    """Every TFLite variant of each model on ``profile`` (see the module docstring)."""
    heading(f"All TFLite variants on {profile.name}")
    try:
        env = find_env(resolve_location(args.tflite_env))
    except ConverterEnvError as exc:
        print(f"skipped: {exc}")
        return
    for model in models:
        inputs, labels = load_eval(model)
        sample_shape = tuple(int(d) for d in inputs[model.input_name].shape[1:])
        floor = write_floor_model(out / "models" / f"{model.name}.floor.onnx",
                                  model.input_name, sample_shape)
        fp32_acc = accuracy(evaluate.open_session(model.onnx_path, 1), inputs, labels)
        log(f"{model.name}: TFLite variants for {profile.name}")
        print(f"{model.name}: " + tflite_table(model, profile, env, out, floor, args.runs,
                                                fp32_acc, md, log) + "\n")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ModelToolsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
