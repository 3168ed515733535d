"""Build ``.tflite`` candidates by running the converter worker in its environment (adapter).

This is the main-process side of :mod:`model_tools.tflite.worker`: it writes the worker's
request (a private copy of the checked ONNX model, since onnx2tf rewrites its input; the
calibration arrays; the precisions), runs the environment's python on the worker with the
environment's ``bin/`` first on ``PATH``, and reads back what was built. Every failure of the
subprocess (it could not start, it crashed, it timed out, it reported an error) becomes a
:class:`ConversionError` that quotes the end of its log; a single precision that fails to
convert is returned as an error for that precision, so ``auto`` can go on with the others.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.protocol.manifest import TensorSpec
from model_tools.errors import ConversionError
from model_tools.tflite.env import ConverterEnv

__all__ = ["WORKER", "Built", "BuiltVariant", "build_tflite"]

WORKER = Path(__file__).resolve().with_name("worker.py")
#: the request format :mod:`model_tools.tflite.worker` reads
_REQUEST_SCHEMA = 1
#: onnx2tf + four TFLiteConverter runs take ~15 s for the digits models on this 2-core host
_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class BuiltVariant:
    precision: str
    path: Path | None
    error: str | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Built:
    """What the worker built, and how."""

    variants: dict[str, BuiltVariant]
    input_names: dict[str, str]  # ONNX input name -> the .tflite signature's input name
    tools: dict[str, str]  # versions in the converter environment
    log: Path
    details: dict[str, object] = field(default_factory=dict)  # onnxsim, sample images, network


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _spec(s: TensorSpec) -> dict[str, object]:
    return {"name": s.name, "dtype": s.dtype, "shape": list(s.static_shape)}


def build_tflite(env: ConverterEnv, source: Path, work: Path, precisions: Sequence[str], *,
                 inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 calibration: Mapping[str, np.ndarray] | None = None,
                 progress: Callable[[str], None] = lambda _msg: None,
                 timeout_s: float = _TIMEOUT_S) -> Built:
    """Convert ``source`` (a checked one-file ONNX model) to one ``.tflite`` per precision.

    ``source`` itself is never handed to onnx2tf: a copy is, in ``work/tflite``.

    Raises:
        ConversionError: the worker could not run, crashed, timed out, or onnx2tf failed (the
            message quotes the end of the log, which stays in ``work/tflite``).
    """
    out = work / "tflite"
    out.mkdir(parents=True, exist_ok=True)
    private = out / "input.onnx"
    shutil.copyfile(source, private)
    request: dict[str, object] = {
        "schema_version": _REQUEST_SCHEMA,
        "onnx": str(private),
        "out_dir": str(out),
        "precisions": list(precisions),
        "inputs": [_spec(s) for s in inputs],
        "outputs": [_spec(s) for s in outputs],
        "calibration": None,
    }
    if calibration:
        cal_path = out / "calibration.npz"
        arrays = {k: np.ascontiguousarray(v) for k, v in calibration.items()}
        np.savez(cal_path, allow_pickle=False, **arrays)
        request["calibration"] = str(cal_path)
    request_path = out / "request.json"
    request_path.write_text(json.dumps(request, indent=1), encoding="utf-8")
    log = out / "worker.log"
    progress(f"converting to TFLite with onnx2tf + TFLiteConverter ({', '.join(precisions)})")
    cmd = [str(env.python), "-I", str(WORKER), str(request_path)]
    try:
        with log.open("w", encoding="utf-8") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=out,
                                  env=env.subprocess_env(), timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ConversionError(f"the TFLite converter did not finish within {timeout_s:.0f} s; "
                              f"last lines of {log}:\n{_tail(log)}") from exc
    except OSError as exc:
        raise ConversionError(f"cannot run the TFLite converter {env.python}: {exc}") from exc
    result_path = out / "result.json"
    if proc.returncode != 0 or not result_path.is_file():
        raise ConversionError(f"the TFLite converter exited with code {proc.returncode} and no "
                              f"result; last lines of {log}:\n{_tail(log)}")
    try:
        result = json.loads(result_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConversionError(f"the TFLite converter's result {result_path} is unreadable: "
                              f"{exc}") from exc
    if "error" in result:
        raise ConversionError(f"TFLite conversion failed: {result['error']}; last lines of "
                              f"{log}:\n{_tail(log, 8)}")
    variants: dict[str, BuiltVariant] = {}
    for precision in precisions:
        entry = result["variants"].get(precision, {"error": "the converter skipped it"})
        if "error" in entry:
            variants[precision] = BuiltVariant(precision, None, error=str(entry["error"]))
        else:
            variants[precision] = BuiltVariant(precision, Path(entry["path"]),
                                               notes=tuple(entry.get("notes", ())))
    details = {k: result.get(k) for k in ("onnxsim", "sample_images", "network_calls")}
    return Built(variants=variants, input_names=dict(result["signature"]["inputs"]),
                 tools=dict(result["tools"]), log=log, details=details)
