"""The TFLite adapter behind the ``Runtime`` seam (``runtime = "tflite"`` in a manifest).

Serving, health checks, drift and metrics see the same :class:`LoadedModel` as for ONNX; this
module is the only code that knows a ``.tflite`` file exists.

Engine. ``ai-edge-litert`` (``pip install 'edgefleet[agent,tflite]'``: wheels for Python
3.10-3.14 on x86_64 and aarch64, no TensorFlow) is the runtime. ``tflite-runtime`` is a fallback
only where it can work: when ai-edge-litert cannot be imported AND numpy is older than 2 (its
last release, 2.14.0, fails with numpy 2). Anything else is a :class:`RuntimeLoadError` that
says how to install the runtime. The engine is imported on first use, never when this module or
:mod:`agent.serving.runtime` is imported, so an ONNX-only agent stays light.

Names. When the model has a signature (TensorFlow's converter writes ``serving_default``;
onnx2tf keeps the ONNX names there), the model's inputs and outputs are the signature's names and
it runs through the engine's signature runner. A model with several signatures must have one
called ``serving_default``. A model without a signature (BlazeFace as MediaPipe ships it) uses
the raw tensor names of its primary subgraph.

Specs. Dtypes are numpy names (:data:`agent.protocol.manifest.DTYPES`); a tensor of any other
type (string, complex, 4-bit...) refuses the load. Shapes come from ``shape_signature``, where
``-1`` (dynamic) becomes ``None``.

Batch. A feed must fit the spec (:func:`check_feeds`: a fixed dim is fixed, so a batch of 4 on a
model whose batch dim is 1 is an :class:`InputRejected` naming expected against actual). Dynamic
dims are resized to the feed's shape, and the tensors re-allocated only when the shape changed
since the previous run.

Quantized I/O is exposed as the model has it: an ``int8`` input stays ``int8``, and the caller
quantizes. For a per-tensor quantized input or output the spec carries the parameters in
``TensorSpec.unrecognized["quantization"] = {"scale": s, "zero_point": z}`` (``real = (q - z) *
s``), so ``GET /v1/models`` tells clients how. model_tools gives full-int8 models float I/O
where it can, so most clients never see this.

Threads. A TFLite interpreter is not thread-safe, and the host runs requests on several
threads. Each loaded model owns ONE interpreter and serializes ``run`` with a lock. Not one
interpreter per thread: every copy holds its own tensor arena (memory is the constraint on a
512 MB Pi Zero 2 W), and each invoke already spreads over the profile's ``threads`` cores, so a
second one at the same time would only compete for them. Outputs are copies, so they stay valid
after the lock is released.

Versions. For ``runtime = "tflite"``, a manifest's ``min_runtime_version`` is on TensorFlow
Lite's version line: the value TFLiteConverter writes into the model's metadata from its op
versions (``1.14.0`` for a full-int8 MLP from TF 2.21), which model_tools copies. tflite-runtime's
versions are on that line (its last release is 2.14.0), so the fallback compares and refuses a
newer minimum before loading. ai-edge-litert numbers its releases on its own line (2.3.0 runs
what TF 2.21 writes), so its version says nothing about TF op versions: :meth:`version` is
``None`` and :meth:`check_version` lets it through, because the engine itself checks every op
and op version of the model when it loads it, and refuses one it lacks ("Didn't find op for
builtin opcode ... version ..."), which :meth:`TFLiteRuntime.load` reports as a
:class:`RuntimeLoadError` naming the file.

Execution providers are onnxruntime names and do not apply: TFLite runs on the CPU (with the
XNNPACK delegate the engine applies by default).

Errors. The engine raises ``ValueError``/``RuntimeError``; they become :class:`RuntimeLoadError`
here, with ``from exc``, and never leave this module.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from agent.errors import RuntimeLoadError
from agent.protocol.manifest import DTYPES, TensorSpec
from agent.serving.runtime import FeedCheck, LoadedModel, require_version, version_release

__all__ = [
    "FALLBACK_ENGINE",
    "INSTALL_HINT",
    "PRIMARY_ENGINE",
    "Engine",
    "TFLiteRuntime",
    "find_engine",
]

#: how to get the TFLite runtime onto a device
INSTALL_HINT = "pip install 'edgefleet[agent,tflite]'"
#: the TFLite engine (its versions are on its own line, not TensorFlow Lite's)
PRIMARY_ENGINE = "ai-edge-litert"
#: the fallback engine (its versions are TensorFlow Lite's)
FALLBACK_ENGINE = "tflite-runtime"
#: the signature a model with several must have
_SIGNATURE = "serving_default"

ImportModule = Callable[[str], ModuleType]


@dataclass(frozen=True)
class Engine:
    """The TFLite engine found on this device."""

    package: str  # the pip name: "ai-edge-litert" or "tflite-runtime"
    version: str  # that package's version
    interpreter: Callable[..., Any]  # its ``Interpreter`` class


def find_engine(*, import_module: ImportModule = importlib.import_module,
                numpy_version: str = np.__version__) -> Engine:
    """ai-edge-litert if it imports; else tflite-runtime, only under numpy < 2.

    Args:
        import_module: how modules are imported (a seam for tests).
        numpy_version: this process's numpy version.

    Raises:
        RuntimeLoadError: no engine can run here; the message says how to install one.
    """
    try:
        return _engine(import_module, "ai_edge_litert", PRIMARY_ENGINE)
    except ImportError as exc:
        primary_error = exc
    major = numpy_version.split(".", 1)[0]
    if not major.isdigit() or int(major) >= 2:
        raise RuntimeLoadError(
            f"no TFLite runtime on this device: {PRIMARY_ENGINE} cannot be imported "
            f"({primary_error}); install it with {INSTALL_HINT}. The {FALLBACK_ENGINE} "
            f"fallback needs numpy < 2, this device has numpy {numpy_version}") from primary_error
    try:
        return _engine(import_module, "tflite_runtime", FALLBACK_ENGINE)
    except ImportError as exc:
        raise RuntimeLoadError(
            f"no TFLite runtime on this device: neither {PRIMARY_ENGINE} ({primary_error}) nor "
            f"{FALLBACK_ENGINE} ({exc}) can be imported; install one with {INSTALL_HINT}"
        ) from exc


def _engine(import_module: ImportModule, module: str, package: str) -> Engine:
    interpreter = import_module(f"{module}.interpreter").Interpreter
    version = getattr(import_module(module), "__version__", "unknown")
    return Engine(package, str(version), interpreter)


class TFLiteRuntime:
    """The TFLite adapter (see the module docstring). Finds its engine on first use."""

    name = "tflite"

    def __init__(self, *, import_module: ImportModule = importlib.import_module,
                 numpy_version: str = np.__version__) -> None:
        """Nothing is imported until :meth:`load`, :meth:`version` or :meth:`check_version`.

        Args:
            import_module: how the engine is imported (a seam for tests).
            numpy_version: this process's numpy version (a seam for tests).
        """
        self._import_module = import_module
        self._numpy_version = numpy_version
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        """The engine this runtime uses.

        Raises:
            RuntimeLoadError: none can run here.
        """
        if self._engine is None:
            self._engine = find_engine(import_module=self._import_module,
                                       numpy_version=self._numpy_version)
        return self._engine

    def version(self) -> str | None:
        """The engine's version on TensorFlow Lite's line (tflite-runtime), or ``None`` for
        ai-edge-litert, whose own versions are not on it (see the module docstring).

        Raises:
            RuntimeLoadError: no engine can run here.
        """
        engine = self.engine
        return engine.version if engine.package == FALLBACK_ENGINE else None

    def check_version(self, minimum: str) -> None:
        """Refuse tflite-runtime older than a manifest's ``min_runtime_version``.

        ai-edge-litert passes: it checks the model's op versions itself when loading it.

        Raises:
            RuntimeLoadError: tflite-runtime older than ``minimum``, no engine, or ``minimum``
                is not a version.
        """
        installed = self.version()
        if installed is None:
            version_release(minimum, "min_runtime_version")  # refuse one that is no version
            return
        require_version(FALLBACK_ENGINE, installed, minimum)

    def load(self, path: Path, *, threads: int, providers: Sequence[str] = ()) -> LoadedModel:
        """Load ``path`` with ``threads`` CPU threads (``providers`` do not apply to TFLite).

        Raises:
            RuntimeLoadError: no engine, the file is missing, not a valid TFLite model, uses an
                op the engine lacks, or has a tensor type the agent cannot serve.
        """
        engine = self.engine
        if not Path(path).is_file():
            raise RuntimeLoadError(f"model file {path} does not exist")
        try:
            interpreter = engine.interpreter(model_path=str(path), num_threads=max(1, threads))
            interpreter.allocate_tensors()
            signatures = interpreter.get_signature_list()
        except (ValueError, RuntimeError) as exc:  # seam: the engine's load errors
            raise RuntimeLoadError(f"{engine.package} cannot load {path}: {exc}") from exc
        if signatures:
            return _load_signature(interpreter, signatures, path, engine)
        inputs = interpreter.get_input_details()
        outputs = interpreter.get_output_details()
        return _TFLiteModel(interpreter, engine.package, _specs(inputs, "input", path),
                            _specs(outputs, "output", path), raw_inputs=inputs,
                            raw_outputs=outputs)


def _load_signature(interpreter: Any, signatures: Mapping[str, Any], path: Path,
                    engine: Engine) -> LoadedModel:
    if len(signatures) == 1:
        key = next(iter(signatures))
    elif _SIGNATURE in signatures:
        key = _SIGNATURE
    else:
        raise RuntimeLoadError(f"{path}: the model has signatures {sorted(signatures)}; "
                               f"expected one, or one named {_SIGNATURE!r}")
    try:
        runner = interpreter.get_signature_runner(key)
        inputs = runner.get_input_details()
        outputs = runner.get_output_details()
    except (ValueError, RuntimeError) as exc:  # seam
        raise RuntimeLoadError(f"{engine.package} cannot load signature {key!r} of {path}: "
                               f"{exc}") from exc
    return _TFLiteModel(interpreter, engine.package,
                        _specs([{**d, "name": n} for n, d in inputs.items()], "input", path),
                        _specs([{**d, "name": n} for n, d in outputs.items()], "output", path),
                        runner=runner)


def _specs(details: Sequence[Mapping[str, Any]], kind: str, path: Path
           ) -> tuple[TensorSpec, ...]:
    specs = tuple(_spec(d, kind, path) for d in details)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise RuntimeLoadError(f"{path}: the model's {kind} names are not unique: {names}")
    return specs


def _spec(details: Mapping[str, Any], kind: str, path: Path) -> TensorSpec:
    name = str(details["name"])
    dtype = np.dtype(details["dtype"]).name
    if dtype not in DTYPES:
        raise RuntimeLoadError(f"{path}: {kind} {name!r} has type {dtype}; the agent serves "
                               f"{', '.join(DTYPES)}")
    signature = details.get("shape_signature")
    dims = details["shape"] if signature is None else signature
    shape = tuple(None if int(d) < 0 else int(d) for d in dims)
    quant = details.get("quantization_parameters") or {}
    scales, zeros = quant.get("scales", ()), quant.get("zero_points", ())
    extra: dict[str, Any] = {}
    if len(scales) == 1 and len(zeros) == 1:
        extra["quantization"] = {"scale": float(scales[0]), "zero_point": int(zeros[0])}
    return TensorSpec(name=name, dtype=dtype, shape=shape, unrecognized=extra)


class _TFLiteModel:
    """One interpreter, run under a lock: by signature runner, or by raw tensor index."""

    def __init__(self, interpreter: Any, package: str, inputs: tuple[TensorSpec, ...],
                 outputs: tuple[TensorSpec, ...], *, runner: Any = None,
                 raw_inputs: Sequence[Mapping[str, Any]] = (),
                 raw_outputs: Sequence[Mapping[str, Any]] = ()) -> None:
        """Run by ``runner`` (a signature runner), else by the tensors ``raw_*`` detail."""
        self.inputs = inputs
        self.outputs = outputs
        self._check = FeedCheck(inputs)
        self._interpreter: Any = interpreter
        self._runner: Any = runner
        self._package = package
        self._lock = threading.Lock()
        # raw: (name, tensor index) of each input and output, and the input shapes the tensors
        # are allocated for (None after an error: resize them all)
        raw = runner is None
        self._in = tuple((s.name, int(d["index"]))
                         for s, d in zip(inputs if raw else (), raw_inputs, strict=True))
        self._out = tuple((s.name, int(d["index"]))
                          for s, d in zip(outputs if raw else (), raw_outputs, strict=True))
        self._shapes: dict[str, tuple[int, ...]] | None = {
            s.name: tuple(int(x) for x in d["shape"])
            for s, d in zip(inputs if raw else (), raw_inputs, strict=True)}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch, one caller at a time.

        Raises:
            InputRejected: the feeds do not fit the model (name, dtype, rank, fixed dim).
            RuntimeLoadError: the engine failed, or the model was closed.
        """
        self._check(feeds)
        arrays = {name: arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)
                  for name, arr in feeds.items()}
        with self._lock:
            if self._interpreter is None:
                raise RuntimeLoadError("the TFLite model was closed")
            try:
                if self._runner is not None:  # it resizes inputs to the feeds' shapes itself
                    result = self._runner(**arrays)
                    return {spec.name: result[spec.name] for spec in self.outputs}
                return self._invoke_raw(arrays)
            except (ValueError, RuntimeError) as exc:  # seam: resize/allocate/invoke errors
                self._shapes = None
                shapes = {k: list(v.shape) for k, v in arrays.items()}
                raise RuntimeLoadError(f"{self._package} failed on inputs {shapes}: "
                                       f"{exc}") from exc

    def _invoke_raw(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The primary subgraph by tensor index; resize only when a feed's shape changed."""
        it = self._interpreter
        shapes = {name: arr.shape for name, arr in arrays.items()}
        if shapes != self._shapes:
            for name, index in self._in:
                it.resize_tensor_input(index, list(shapes[name]))
            it.allocate_tensors()
            self._shapes = shapes
        for name, index in self._in:
            it.set_tensor(index, arrays[name])
        it.invoke()
        return {name: it.get_tensor(index) for name, index in self._out}

    def close(self) -> None:
        with self._lock:
            self._interpreter = None
            self._runner = None
