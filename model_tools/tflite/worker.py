"""The converter subprocess: ONNX -> SavedModel (onnx2tf) -> one ``.tflite`` per precision.

Run ONLY by the converter environment's python (:mod:`model_tools.tflite.env`), as a script::

    <env>/bin/python -I worker.py REQUEST.json

It imports TensorFlow and onnx2tf, so it must never be imported by model_tools itself; it
imports nothing from model_tools either (the environment does not have it). The request and the
result are JSON files (TensorFlow and onnx2tf write freely to stdout and stderr, which the
caller keeps as a log). The caller (:mod:`model_tools.tflite.build`) owns validation: this
script converts, and says what it did.

The traps it handles, each on purpose:

- onnx2tf rewrites its input file in place (onnxsim, op renaming): the caller hands it a
  private copy, never the user's file.
- onnx2tf runs ``onnxsim`` as a program from ``PATH`` and silently skips the simplification
  when it is missing: the caller puts the environment's ``bin/`` first; this script records
  which ``onnxsim`` it found and refuses to run without it.
- onnx2tf downloads sample images from the internet for 3-channel fixed-batch image inputs,
  and for integer quantization without data. Integer quantization here is TensorFlow's own
  ``TFLiteConverter`` with the calibration set as ``representative_dataset``; the download
  function is replaced by the calibration set in NHWC (synthetic data when there is none, said
  in the result) and any HTTP request from ``requests`` raises.
- onnx2tf turns NCHW into NHWC: every input of rank 3-5 is kept in the ONNX layout
  (``keep_ncw_or_nchw_or_ncdhw_input_names``), and an output whose shape no longer matches the
  ONNX output is refused instead of shipped.
- onnx2tf names signature outputs ``output_0``, ``output_1``...: the SavedModel is re-exported
  with a ``serving_default`` signature whose inputs and outputs carry the ONNX names, so the
  ``.tflite`` signature runner speaks the same names as the source model.
- Every ``.tflite`` uses TFLite builtin ops only (onnx2tf's own files allow Select TF ops, which
  the device runtime cannot run); they are not used.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("edgefleet.tflite.worker")
REQUEST_SCHEMA = 1
SIGNATURE_KEY = "serving_default"
#: names TensorFlow accepts as op/placeholder names (what a signature input is called)
_TF_NAME = re.compile(r"[A-Za-z0-9.][A-Za-z0-9_.\\/>-]*")


class WorkerError(Exception):
    """A conversion step failed; the message goes into the result for the caller."""


def _sanitized(name: str) -> str:
    """onnx2tf 1.28's renaming of graph inputs (``sanitizing`` in onnx2tf.py): each ``:``
    becomes ``__``, a leading ``/`` becomes ``wa/``."""
    return re.sub("^/", "wa/", name.replace(":", "__"))


def _compatible(want: list[int | None], got: list[int | None]) -> bool:
    return len(want) == len(got) and all(
        w is None or g is None or w == g for w, g in zip(want, got, strict=True))


def _dims(shape: Any) -> list[int | None]:
    return [None if d is None else int(d) for d in shape]


class _NoNetwork:
    """Stands in for ``requests`` functions: the converter never goes online."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(str(args[0]) if args else "?")
        raise RuntimeError("network access refused by edgefleet's converter: pass the data "
                           "explicitly (the calibration set)")


class _SampleImages:
    """onnx2tf's ``download_test_image_data`` replacement: the calibration set in NHWC.

    onnx2tf asks for sample images when every model input is a 3-channel NHWC image of a fixed
    batch (it checks its outputs against onnxruntime on them). Inputs keep their ONNX layout
    here, so such an input is NHWC in the ONNX model too, and its calibration array is used as
    it is; a 3-channel NCHW array is transposed.
    """

    def __init__(self, calibration: dict[str, np.ndarray], inputs: list[dict[str, Any]]) -> None:
        self.calls = 0
        self.source = "synthetic"
        images: np.ndarray | None = None
        for spec in inputs:
            arr = calibration.get(spec["name"])
            if arr is None or arr.ndim != 4:
                continue
            if arr.shape[-1] == 3:
                images = arr.astype(np.float32)
                self.source = f"calibration input {spec['name']!r} (NHWC)"
                break
            if arr.shape[1] == 3:
                images = np.transpose(arr, (0, 2, 3, 1)).astype(np.float32)
                self.source = f"calibration input {spec['name']!r} (NCHW -> NHWC)"
                break
        if images is None:
            rng = np.random.default_rng(0)
            images = rng.random((20, 128, 128, 3), dtype=np.float32)
        self.images = images

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return self.images


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for dist in ("tensorflow", "onnx2tf", "onnx", "onnxsim", "tf-keras"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "unknown"
    return out


def _onnx2tf(request: dict[str, Any], work: Path, guards: tuple[_NoNetwork, _SampleImages]
             ) -> Path:
    """onnx2tf: the private ONNX copy -> ``work/onnx2tf`` (a SavedModel). Returns its path."""
    onnx2tf: Any = importlib.import_module("onnx2tf")
    main: Any = importlib.import_module("onnx2tf.onnx2tf")
    common: Any = importlib.import_module("onnx2tf.utils.common_functions")
    requests: Any = importlib.import_module("requests")
    no_net, samples = guards
    for module in (main, common):
        if hasattr(module, "download_test_image_data"):
            module.download_test_image_data = samples
    requests.get = requests.post = requests.request = no_net
    requests.Session.request = lambda _self, *a, **k: no_net(*a, **k)
    # onnx2tf matches these against its sanitised names: pass both spellings
    keep = sorted({n for s in request["inputs"] if 3 <= len(s["shape"]) <= 5
                   for n in (s["name"], _sanitized(s["name"]))})
    out = work / "onnx2tf"
    try:
        onnx2tf.convert(
            input_onnx_file_path=request["onnx"],
            output_folder_path=str(out),
            output_signaturedefs=True,
            keep_ncw_or_nchw_or_ncdhw_input_names=keep or None,
            non_verbose=True,
            verbosity="error",
        )
    except SystemExit as exc:  # onnx2tf calls sys.exit(1) on some failures
        raise WorkerError(f"onnx2tf gave up (exit {exc.code}); see the log") from exc
    except Exception as exc:  # seam: onnx2tf raises whatever its op converters raise
        raise WorkerError(f"onnx2tf failed: {type(exc).__name__}: {exc}") from exc
    if not (out / "saved_model.pb").is_file():
        raise WorkerError("onnx2tf wrote no SavedModel (saved_model.pb missing); see the log")
    return out


def _rename_signature(tf: Any, raw: Path, request: dict[str, Any], work: Path
                      ) -> tuple[Path, dict[str, str]]:
    """Re-export ``raw`` with a signature whose inputs/outputs carry the ONNX names.

    An input keeps onnx2tf's name only when TensorFlow refuses the ONNX one as a placeholder
    name; outputs are signature keys, which may be any string. Returns the new SavedModel and
    the ONNX -> signature input names.
    """
    loaded = tf.saved_model.load(str(raw))
    fn = loaded.signatures[SIGNATURE_KEY]
    tf_inputs: dict[str, Any] = dict(fn.structured_input_signature[1])
    tf_outputs: dict[str, Any] = dict(fn.structured_outputs)
    in_map: dict[str, str] = {}
    specs = []
    for spec in request["inputs"]:
        onnx_name = spec["name"]
        found = next((n for n in (onnx_name, _sanitized(onnx_name)) if n in tf_inputs), None)
        if found is None:
            raise WorkerError(f"onnx2tf's SavedModel has no input for ONNX input {onnx_name!r} "
                              f"(it has {sorted(tf_inputs)})")
        have = _dims(tf_inputs[found].shape)
        if not _compatible(spec["shape"], have):
            raise WorkerError(f"onnx2tf changed input {onnx_name!r} from {spec['shape']} to "
                              f"{have}; the .tflite must take the ONNX layout")
        name = onnx_name if _TF_NAME.fullmatch(onnx_name) else found
        in_map[onnx_name] = name
        specs.append((found, tf.TensorSpec(tf_inputs[found].shape, tf_inputs[found].dtype,
                                           name=name)))
    if len(tf_outputs) != len(request["outputs"]):
        raise WorkerError(f"onnx2tf's SavedModel has {len(tf_outputs)} outputs "
                          f"{sorted(tf_outputs)}, the ONNX model {len(request['outputs'])}")
    order: list[tuple[str, str]] = []
    for i, spec in enumerate(request["outputs"]):
        key = f"output_{i}"
        if key not in tf_outputs:
            raise WorkerError(f"onnx2tf's SavedModel has no {key!r} for ONNX output "
                              f"{spec['name']!r} (it has {sorted(tf_outputs)})")
        have = _dims(tf_outputs[key].shape)
        if not _compatible(spec["shape"], have):
            raise WorkerError(
                f"onnx2tf changed output {spec['name']!r} from {spec['shape']} to {have} "
                "(a layout change, NCHW -> NHWC); edgefleet ships .tflite files whose outputs "
                "keep the ONNX layout, so this model cannot be converted as it is")
        order.append((key, spec["name"]))

    @tf.function(input_signature=[s for _, s in specs])  # type: ignore[untyped-decorator]
    def serve(*args: Any) -> dict[str, Any]:
        result = fn(**{found: arg for (found, _), arg in zip(specs, args, strict=True)})
        return {onnx: result[key] for key, onnx in order}

    target = work / "saved_model"
    tf.saved_model.save(loaded, str(target), signatures={SIGNATURE_KEY: serve})
    return target, in_map


def _representative(calibration: dict[str, np.ndarray], in_map: dict[str, str]
                    ) -> Iterator[dict[str, np.ndarray]]:
    n = next(iter(calibration.values())).shape[0]
    for i in range(n):
        yield {in_map[k]: v[i:i + 1] for k, v in calibration.items()}


def _convert_one(tf: Any, saved_model: Path, precision: str,
                 calibration: dict[str, np.ndarray] | None, in_map: dict[str, str]
                 ) -> tuple[bytes, list[str]]:
    """One ``.tflite`` of ``precision``, builtin ops only."""
    builtins = tf.lite.OpsSet.TFLITE_BUILTINS

    def converter() -> Any:
        conv = tf.lite.TFLiteConverter.from_saved_model(str(saved_model),
                                                        signature_keys=[SIGNATURE_KEY])
        conv.target_spec.supported_ops = [builtins]
        return conv

    conv = converter()
    if precision == "fp32":
        return conv.convert(), ["float32 weights and activations"]
    if precision == "fp16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
        return conv.convert(), [("weights fp16 (dequantized to fp32 on CPUs); inputs and "
                                 "outputs stay float32")]
    if precision == "int8-dynamic":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        return conv.convert(), [("dynamic range: weights int8, activations quantized at run "
                                 "time; inputs and outputs stay float32")]
    if precision != "int8-static":
        raise WorkerError(f"unknown precision {precision!r}")
    if not calibration:
        # never fall back to onnx2tf's own int8 path: without data it downloads sample images
        raise WorkerError("int8-static needs the calibration set (--calibration FILE.npz); "
                          "none was given")
    samples = next(iter(calibration.values())).shape[0]
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: _representative(calibration, in_map)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.float32
    conv.inference_output_type = tf.float32
    note = (f"full integer: weights and activations int8, calibrated on {samples} samples; "
            "inputs and outputs stay float32")
    try:
        return conv.convert(), [note]
    except Exception as exc:  # seam: some ops have no int8 kernel; keep those in float
        log.warning("int8-only conversion failed; retrying with float fallback", exc_info=True)
        conv = converter()
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: _representative(calibration, in_map)
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, builtins]
        first = " ".join(str(exc).split())[:300]
        return conv.convert(), [note, (f"int8-only conversion failed ({first}); ops without "
                                       "an int8 kernel stay float")]


def run(request: dict[str, Any]) -> dict[str, Any]:
    """Convert as ``request`` asks; the result document (never raises for a failed step)."""
    if request.get("schema_version") != REQUEST_SCHEMA:
        raise WorkerError(f"request schema_version {request.get('schema_version')!r}, this "
                          f"worker reads {REQUEST_SCHEMA}")
    work = Path(request["out_dir"])
    result: dict[str, Any] = {"schema_version": REQUEST_SCHEMA, "tools": _versions(),
                              "variants": {}}
    onnxsim = shutil.which("onnxsim")
    result["onnxsim"] = onnxsim
    env_bin = Path(sys.prefix) / "bin"
    if onnxsim is None or Path(onnxsim).parent.resolve() != env_bin.resolve():
        raise WorkerError(f"onnxsim must be on PATH from {env_bin} (onnx2tf runs it as a "
                          f"program), found {onnxsim}")
    calibration: dict[str, np.ndarray] = {}
    if request.get("calibration"):
        with np.load(request["calibration"], allow_pickle=False) as npz:
            calibration = {k: npz[k] for k in npz.files}
    guards = (_NoNetwork(), _SampleImages(calibration, request["inputs"]))
    tf = importlib.import_module("tensorflow")
    raw = _onnx2tf(request, work, guards)
    result["sample_images"] = {"calls": guards[1].calls, "source": guards[1].source}
    saved_model, in_map = _rename_signature(tf, raw, request, work)
    result["signature"] = {"key": SIGNATURE_KEY, "inputs": in_map}
    for precision in request["precisions"]:
        try:
            data, notes = _convert_one(tf, saved_model, precision, calibration or None, in_map)
        except Exception as exc:  # seam: TFLiteConverter raises ConverterError and friends
            log.exception("%s conversion failed", precision)
            text = " ".join(f"{type(exc).__name__}: {exc}".split())
            result["variants"][precision] = {"error": text[:600]}
            continue
        path = work / f"model.{precision}.tflite"
        path.write_bytes(data)
        result["variants"][precision] = {"path": str(path), "notes": notes}
    result["network_calls"] = guards[0].calls
    return result


def main(argv: list[str]) -> int:
    """Read the request, write ``<out_dir>/result.json``; exit 0 when it was written."""
    if len(argv) != 1:
        print("usage: worker.py REQUEST.json", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    target = Path(request["out_dir"]) / "result.json"
    try:
        result = run(request)
    except Exception as exc:  # seam: report every failure to the caller, with its traceback
        log.exception("conversion failed")
        result = {"schema_version": REQUEST_SCHEMA, "error": f"{type(exc).__name__}: {exc}"}
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    os.replace(tmp, target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
