"""The ``Runtime`` seam: load a model file, run it. One interface for every engine.

Serving, health checks, drift and metrics only ever see :class:`LoadedModel`. The onnxruntime
adapter is here; a TFLite adapter (ai-edge-litert) plugs in behind the same protocol.
onnxruntime exceptions are translated into :class:`RuntimeLoadError` / :class:`InputRejected`
in this module and never leave it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agent.errors import InputRejected, RuntimeLoadError
from agent.protocol.manifest import TensorSpec

__all__ = ["LoadedModel", "OnnxRuntime", "Runtime", "check_feeds", "runtime_for"]


class LoadedModel(Protocol):
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. Raises: InputRejected (bad feeds), RuntimeLoadError (engine)."""
        ...

    def close(self) -> None: ...


class Runtime(Protocol):
    name: str

    def load(self, path: Path, *, threads: int, providers: Sequence[str] = ()) -> LoadedModel:
        """Raises: RuntimeLoadError."""
        ...


def check_feeds(specs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray]) -> None:
    """Refuse feeds that do not fit the model, naming the input, expected against actual.

    Raises:
        InputRejected: a missing or unknown input, wrong dtype, wrong rank or fixed dim.
    """
    names = [s.name for s in specs]
    unknown = sorted(set(feeds) - set(names))
    if unknown:
        raise InputRejected(f"unknown input {unknown[0]!r}; the model's inputs are {names}")
    for spec in specs:
        if spec.name not in feeds:
            raise InputRejected(f"missing input {spec.name!r}; the model's inputs are {names}")
        arr = feeds[spec.name]
        if str(arr.dtype) != spec.dtype:
            raise InputRejected(f"input {spec.name!r}: expected dtype {spec.dtype}, got "
                                f"{arr.dtype}")
        if not spec.accepts_shape(arr.shape):
            raise InputRejected(f"input {spec.name!r}: expected shape {spec.shape_str()}, got "
                                f"{list(arr.shape)}")


_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool",
}


def _spec(arg: Any) -> TensorSpec:
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None:
        raise RuntimeLoadError(f"tensor {arg.name!r} has unsupported type {arg.type}")
    shape = tuple(d if isinstance(d, int) and d > 0 else None for d in arg.shape)
    return TensorSpec(name=arg.name, dtype=dtype, shape=shape)


@dataclass
class _OnnxModel:
    session: Any
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.inputs, feeds)
        names = [o.name for o in self.outputs]
        try:
            values = self.session.run(names, dict(feeds))
        except Exception as exc:  # seam: onnxruntime's Fail/InvalidArgument/RuntimeException
            raise RuntimeLoadError(f"onnxruntime failed: {exc}") from exc
        return dict(zip(names, values, strict=True))

    def close(self) -> None:
        self.session = None


class OnnxRuntime:
    """onnxruntime adapter. Sessions are thread-safe for ``run``; one per model version."""

    name = "onnxruntime"
    _lock = threading.Lock()

    def load(self, path: Path, *, threads: int, providers: Sequence[str] = ()) -> LoadedModel:
        """Load ``path`` with the profile's threads, on the providers this host has.

        Raises:
            RuntimeLoadError: the file is missing or onnxruntime cannot load it.
        """
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - the agent extra installs it
            raise RuntimeLoadError("onnxruntime is not installed") from exc
        if not Path(path).is_file():
            raise RuntimeLoadError(f"model file {path} does not exist")
        available = set(ort.get_available_providers())
        use = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(path), sess_options=opts, providers=use)
        except Exception as exc:  # seam
            raise RuntimeLoadError(f"onnxruntime cannot load {path}: {exc}") from exc
        return _OnnxModel(session, tuple(_spec(a) for a in session.get_inputs()),
                          tuple(_spec(a) for a in session.get_outputs()))


def runtime_for(name: str) -> Runtime:
    """The adapter for a manifest's ``runtime`` field.

    Raises:
        RuntimeLoadError: no adapter for that runtime on this device.
    """
    if name == "onnxruntime":
        return OnnxRuntime()
    raise RuntimeLoadError(f"runtime {name!r} is not available on this device (supported: "
                           "onnxruntime)")
