"""Build one precision variant of an ONNX model with onnxruntime's tooling (adapter).

``fp32`` is the checked source; ``fp16`` keeps fp32 inputs/outputs (so the bundle's interface
does not change); ``int8-dynamic`` quantizes weights; ``int8-static`` writes QDQ with
activations calibrated on the calibration set. onnxruntime 1.31's static quantizer crashes on
some graphs with per-channel weights (seen: ``_adjust_weight_scale_for_int32_bias`` on MatMul
biases); we then retry per-tensor and say so in the variant's notes.

onnxruntime/onnx exceptions become :class:`ConversionError` here, ``from`` the original.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from model_tools.errors import ConversionError, DataError
from model_tools.onnx_io import save_model

__all__ = ["CALIBRATION_BATCH", "Variant", "build_variant"]

CALIBRATION_BATCH = 32
log = logging.getLogger(__name__)


@dataclass
class Variant:
    precision: str
    path: Path
    notes: list[str] = field(default_factory=list)


def _batches(inputs: dict[str, np.ndarray], fixed_batch: bool) -> Iterator[dict[str, np.ndarray]]:
    n = next(iter(inputs.values())).shape[0]
    step = 1 if fixed_batch else CALIBRATION_BATCH
    for start in range(0, n, step):
        yield {k: v[start:start + step] for k, v in inputs.items()}


def _reader(inputs: dict[str, np.ndarray], fixed_batch: bool):  # type: ignore[no-untyped-def]
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it = _batches(inputs, fixed_batch)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    return _Reader()


def _preprocess(src: Path, dst: Path, notes: list[str]) -> Path:
    """onnxruntime's quantization pre-processing (shape inference + optimisation).

    Symbolic shape inference fails on many real models, so it is skipped (DESIGN.md). If the
    pre-processing itself fails, quantize the model as it is and say so.
    """
    try:
        _run_preprocess(src, dst)
        return dst
    except ConversionError as exc:  # only means "quantize without it"
        cause = exc.__cause__ or exc
        notes.append(f"quantization pre-processing skipped ({type(cause).__name__}: {cause})")
        return src


def _run_preprocess(src: Path, dst: Path) -> None:
    """The seam: whatever onnxruntime raises becomes :class:`ConversionError`.

    Raises:
        ConversionError: the pre-processing failed (``from`` onnxruntime's exception).
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    except Exception as exc:  # seam: onnxruntime's errors derive from Exception only
        raise ConversionError(f"quantization pre-processing failed: {exc}") from exc


def build_variant(
    precision: str,
    source: Path,
    workdir: Path,
    *,
    calibration: dict[str, np.ndarray] | None = None,
    fixed_batch: bool = False,
) -> Variant:
    """Write ``workdir/model.<precision>.onnx`` and return it with notes on what happened.

    Args:
        precision: one of fp32, fp16, int8-dynamic, int8-static.
        source: the checked one-file fp32 model.
        workdir: a scratch directory that this call may write into.
        calibration: input arrays for int8-static (batch first).
        fixed_batch: the model takes one sample at a time.

    Raises:
        DataError: int8-static without calibration data.
        ConversionError: the quantizer/converter failed (even after the per-tensor retry).
        ValueError: an unknown precision (programmer error).
    """
    out = workdir / f"model.{precision}.onnx"
    notes: list[str] = []
    if precision == "fp32":
        shutil.copyfile(source, out)
        return Variant(precision, out, notes)
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        try:
            model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        except Exception as exc:  # seam: translate the converter's failure
            raise ConversionError(f"fp16 conversion failed: {type(exc).__name__}: {exc}") from exc
        save_model(model, out)
        notes.append("weights and activations fp16; inputs and outputs stay fp32")
        return Variant(precision, out, notes)

    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    pre = _preprocess(source, workdir / "model.pre.onnx", notes)
    if precision == "int8-dynamic":
        try:
            quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8)
        except Exception as exc:  # seam
            raise ConversionError(
                f"int8-dynamic quantization failed: {type(exc).__name__}: {exc}") from exc
        notes.append("weights int8 (per-tensor), activations quantized at run time")
        return Variant(precision, out, notes)
    if precision != "int8-static":
        raise ValueError(f"unknown precision {precision!r}")
    if not calibration:
        raise DataError("int8-static needs calibration data (--calibration FILE.npz)")
    first_error: Exception | None = None
    for per_channel in (True, False):
        try:
            quantize_static(
                str(pre), str(out), _reader(calibration, fixed_batch),
                quant_format=QuantFormat.QDQ, per_channel=per_channel,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            )
        except Exception as exc:  # seam: onnxruntime raises bare ValueError/IndexError here
            if first_error is None:
                first_error = exc
                notes.append(f"per-channel static quantization failed "
                             f"({type(exc).__name__}: {exc}); fell back to per-tensor")
                log.warning("per-channel quantization failed (%s); retrying per-tensor", exc)
                continue
            err = ConversionError(
                f"int8-static quantization failed per-channel and per-tensor: "
                f"{type(exc).__name__}: {exc}")
            err.add_note(f"per-channel attempt: {type(first_error).__name__}: {first_error}")
            raise err from exc
        notes.append(f"QDQ, weights int8 {'per-channel' if per_channel else 'per-tensor'}, "
                     f"activations uint8 calibrated (MinMax) on "
                     f"{next(iter(calibration.values())).shape[0]} samples")
        return Variant(precision, out, notes)
    raise AssertionError("unreachable")  # pragma: no cover
