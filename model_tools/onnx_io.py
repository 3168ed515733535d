"""Load, check and save ONNX models (adapter around ``onnx``).

Every onnx exception is translated here into :class:`ModelLoadError` naming the file; nothing
from ``onnx`` crosses this module's boundary except ``ModelProto`` values.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import ModelProto, TensorProto

from agent.protocol.manifest import TensorSpec
from model_tools.errors import ConversionError, ModelLoadError

__all__ = ["ONNX_DTYPES", "LoadedModel", "Prepare", "load_model", "save_model", "tensor_specs"]

# protobuf refuses single messages over 2 GiB; a one-file artifact must stay below it
_PROTOBUF_LIMIT = 2**31 - 1

ONNX_DTYPES: dict[int, str] = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.DOUBLE: "float64",
    TensorProto.INT8: "int8",
    TensorProto.UINT8: "uint8",
    TensorProto.INT16: "int16",
    TensorProto.INT32: "int32",
    TensorProto.INT64: "int64",
    TensorProto.BOOL: "bool",
}


#: rewrites a raw graph before it is checked (model, file name) -> (model, what it changed)
Prepare = Callable[[ModelProto, str], tuple[ModelProto, tuple[str, ...]]]


@dataclass(frozen=True)
class LoadedModel:
    """A checked model, with external data (if any) inlined."""

    model: ModelProto
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    had_external_data: bool
    opset: int
    prepared: tuple[str, ...] = ()  # what ``prepare`` changed, one note each


def _uses_external_data(model: ModelProto) -> bool:
    return any(
        init.data_location == TensorProto.EXTERNAL for init in model.graph.initializer
    )


def _check_external_files(model: ModelProto, path: Path) -> None:
    """Name the first external data file that is not beside the model (onnx's error does not)."""
    for init in model.graph.initializer:
        if init.data_location != TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in init.external_data if e.key == "location"), "")
        if not (path.parent / location).is_file():
            raise ModelLoadError(
                f"{path.name}: tensor {init.name!r} is stored in the external data file "
                f"{location!r}, expected at {str(path.parent / location)!r}, which does not "
                "exist; keep the weights file beside the model or save the model as one file")


def load_model(path: Path, prepare: Prepare | None = None) -> LoadedModel:
    """Read, check and shape-infer an ONNX model; inline its external data.

    ``prepare`` (e.g. :func:`model_tools.tflite.graph.cut_for_tflite`) rewrites the graph after
    its external data is inlined and before it is checked, so the checks see what will be
    converted.

    Raises:
        ModelLoadError: missing file, not ONNX, truncated, invalid graph, missing external data,
            unsupported tensor type, or too large for a one-file artifact.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file {str(path)!r} does not exist")
    try:
        raw = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends: not an ONNX file
        raise ModelLoadError(
            f"{path.name}: not an ONNX model (protobuf parse failed: {exc}); "
            "expected a file written by onnx.save or an exporter") from exc
    if not raw.graph.node:
        raise ModelLoadError(f"{path.name}: not an ONNX model (no graph nodes; truncated or "
                             "another format?)")
    external = _uses_external_data(raw)
    if external:
        _check_external_files(raw, path)
        try:
            onnx.load_external_data_for_model(raw, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise ModelLoadError(
                f"{path.name}: its weights live in external data files that could not be read "
                f"next to it ({exc}); keep them beside the model or save it as one file"
            ) from exc
        if raw.ByteSize() > _PROTOBUF_LIMIT:
            raise ModelLoadError(
                f"{path.name}: {raw.ByteSize()} bytes with its external data inlined, over the "
                f"{_PROTOBUF_LIMIT}-byte one-file limit; edgefleet artifacts are one file")
        for init in raw.graph.initializer:
            init.data_location = TensorProto.DEFAULT
            del init.external_data[:]
    prepared: tuple[str, ...] = ()
    if prepare is not None:
        raw, prepared = prepare(raw, path.name)
    try:
        onnx.checker.check_model(raw, full_check=False)
        inferred = onnx.shape_inference.infer_shapes(raw, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__  # onnx spreads it over lines
        if len(text) > 400:
            text = text[:397] + "..."
        raise ModelLoadError(f"{path.name}: invalid ONNX graph: {text}") from exc
    inputs, outputs = tensor_specs(inferred, path.name)
    opset = max((o.version for o in inferred.opset_import if o.domain in ("", "ai.onnx")),
                default=0)
    return LoadedModel(model=inferred, inputs=inputs, outputs=outputs,
                       had_external_data=external, opset=opset, prepared=prepared)


def tensor_specs(model: ModelProto, label: str = "model") -> tuple[
        tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Graph inputs (without initializers) and outputs as :class:`TensorSpec`.

    Raises:
        ModelLoadError: a graph input/output is not a tensor of a supported element type.
    """
    initializers = {i.name for i in model.graph.initializer}

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        ttype = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise ModelLoadError(f"{label}: graph value {value.name!r} is not a tensor "
                                 "(sequences/maps are not supported; for scikit-learn "
                                 "classifiers convert with options zipmap=False)")
        dtype = ONNX_DTYPES.get(ttype.elem_type)
        if dtype is None:
            raise ModelLoadError(
                f"{label}: tensor {value.name!r} has element type "
                f"{TensorProto.DataType.Name(ttype.elem_type)}, expected one of "
                f"{', '.join(sorted(set(ONNX_DTYPES.values())))}")
        dims: list[int | None] = []
        for d in ttype.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None)
        return TensorSpec(name=value.name, dtype=dtype, shape=tuple(dims))

    inputs = tuple(spec(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(spec(v) for v in model.graph.output)
    if not inputs:
        raise ModelLoadError(f"{label}: the graph has no inputs")
    return inputs, outputs


def save_model(model: ModelProto, path: Path) -> int:
    """Write ``model`` as ONE file (no external data), atomically; return its size in bytes.

    Raises:
        ConversionError: the model cannot be serialised as one file or written.
    """
    path = Path(path)
    if model.ByteSize() > _PROTOBUF_LIMIT:
        raise ConversionError(f"{path.name}: {model.ByteSize()} bytes, over the one-file limit")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(model.SerializeToString())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ConversionError(f"cannot write {path}: {exc}") from exc
    return path.stat().st_size
