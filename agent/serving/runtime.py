"""The ``Runtime`` seam: load a model file, run it. One interface for every engine.

Serving, health checks, drift and metrics only ever see :class:`LoadedModel`. The onnxruntime
adapter is here; the TFLite adapter (ai-edge-litert) is :mod:`agent.serving.tflite`, behind the
same protocol. :func:`runtime_for` maps a manifest's ``runtime`` to its adapter. Engines are
imported when a model is loaded (or a version asked for), never when this module is imported,
so an agent only ever imports the engine its models use.

Versions: a manifest's ``min_runtime_version`` counts on the version line of its runtime
(onnxruntime's releases; TensorFlow Lite's for ``tflite``, see :mod:`agent.serving.tflite`).
:meth:`Runtime.version` is the installed engine's version on that line, or ``None`` when the
engine numbers its releases otherwise and checks a model's needs itself when loading it
(ai-edge-litert). :meth:`Runtime.check_version` refuses an engine older than a manifest asks
for, compared on the numeric release (``2.3`` == ``2.3.0`` < ``2.10``). :func:`installed_runtimes`
says what this device can run, for the artifact verifier.

onnxruntime exceptions are translated into :class:`RuntimeLoadError` / :class:`InputRejected`
in this module and never leave it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agent.errors import InputRejected, RuntimeLoadError
from agent.protocol.manifest import DTYPES, TensorSpec

__all__ = [
    "FeedCheck",
    "LoadedModel",
    "OnnxRuntime",
    "Runtime",
    "check_feeds",
    "installed_runtimes",
    "require_version",
    "runtime_for",
    "version_release",
]

log = logging.getLogger(__name__)


class LoadedModel(Protocol):
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. Raises: InputRejected (bad feeds), RuntimeLoadError (engine)."""
        ...

    def close(self) -> None: ...


class Runtime(Protocol):
    name: str  # the manifest's ``runtime`` value this adapter serves

    def version(self) -> str | None:
        """The engine's version on the line ``min_runtime_version`` counts on, or ``None``
        (not on that line). Raises: RuntimeLoadError (no engine here)."""
        ...

    def check_version(self, minimum: str) -> None:
        """Refuse an engine older than a manifest's ``min_runtime_version``.

        Raises: RuntimeLoadError (older, no engine, or ``minimum`` is not a version).
        """
        ...

    def load(self, path: Path, *, threads: int, providers: Sequence[str] = ()) -> LoadedModel:
        """Raises: RuntimeLoadError."""
        ...


#: manifest dtype name -> numpy dtype, so checking a feed compares dtypes, not strings (the
#: str() cost ~2.5 us per input on every request)
_NP_DTYPES = {name: np.dtype(name) for name in DTYPES}


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
        if arr.dtype != _NP_DTYPES.get(spec.dtype):
            raise InputRejected(f"input {spec.name!r}: expected dtype {spec.dtype}, got "
                                f"{arr.dtype}")
        if not spec.accepts_shape(arr.shape):
            raise InputRejected(f"input {spec.name!r}: expected shape {spec.shape_str()}, got "
                                f"{list(arr.shape)}")


class FeedCheck:
    """:func:`check_feeds` for one model's inputs, with the specs worked out once.

    A served model checks every request's feeds. Calling the object answers from a plan made
    at load (name, numpy dtype, rank, fixed dims), which costs about a third of the general
    function per request; feeds that do not pass go to :func:`check_feeds`, so the error
    message is always the one it writes. The plan accepts exactly what :func:`check_feeds`
    accepts: every input present and no other, same dtype, same rank, fixed dims equal.
    """

    __slots__ = ("_plan", "specs")

    def __init__(self, specs: Sequence[TensorSpec]) -> None:
        self.specs = tuple(specs)
        self._plan = tuple(
            (s.name, _NP_DTYPES.get(s.dtype), len(s.shape),
             tuple((axis, dim) for axis, dim in enumerate(s.static_shape) if dim is not None))
            for s in self.specs)

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Raises: InputRejected, as :func:`check_feeds`."""
        if len(feeds) == len(self._plan):
            for name, dtype, rank, fixed in self._plan:
                arr = feeds.get(name)
                if arr is None or arr.dtype != dtype or arr.ndim != rank:
                    break
                shape = arr.shape
                if any(shape[axis] != dim for axis, dim in fixed):
                    break
            else:
                return
        check_feeds(self.specs, feeds)


_RELEASE = re.compile(r"\s*v?(\d+(?:\.\d+)*)")


def version_release(text: str, what: str) -> tuple[int, ...]:
    """The numeric release of a version, trailing zeros dropped: ``v2.3.0rc1`` -> ``(2, 3)``.

    Raises:
        RuntimeLoadError: ``text`` does not start with a number; ``what`` names it.
    """
    match = _RELEASE.match(text)
    if match is None:
        raise RuntimeLoadError(f"{what} {text!r} is not a version (expected digits and dots, "
                               "e.g. 2.3.0)")
    parts = [int(p) for p in match.group(1).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def require_version(package: str, installed: str, minimum: str) -> None:
    """Refuse ``installed`` older than ``minimum`` (numeric release only: ``2.3.0rc1`` is 2.3).

    Raises:
        RuntimeLoadError: older, naming both; or either is not a version.
    """
    if version_release(installed, f"installed {package} version") < version_release(
            minimum, "min_runtime_version"):
        raise RuntimeLoadError(f"the model needs {package} >= {minimum}, this device has "
                               f"{package} {installed}")


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

    def __post_init__(self) -> None:
        self._check = FeedCheck(self.inputs)
        self._names = [o.name for o in self.outputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check(feeds)
        names = self._names
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

    def version(self) -> str:
        """onnxruntime's version.

        Raises:
            RuntimeLoadError: onnxruntime is not installed.
        """
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - the agent extra installs it
            raise RuntimeLoadError("onnxruntime is not installed") from exc
        return str(ort.__version__)

    def check_version(self, minimum: str) -> None:
        """See :meth:`Runtime.check_version`.

        Raises:
            RuntimeLoadError: onnxruntime is older than ``minimum``, or not installed.
        """
        require_version("onnxruntime", self.version(), minimum)

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
    if name == "tflite":
        from agent.serving.tflite import TFLiteRuntime  # it imports this module

        return TFLiteRuntime()
    raise RuntimeLoadError(f"runtime {name!r} is not available on this device (supported: "
                           "onnxruntime, tflite)")


def installed_runtimes(names: Iterable[str]) -> dict[str, str | None]:
    """Of the runtimes ``names``, those whose engine is installed here, with
    :meth:`Runtime.version` (``None``: installed, but not on the manifests' version line).

    For an :class:`~agent.updater.verify.ArtifactVerifier`: ``runtimes`` are the keys,
    ``runtime_versions`` the items whose version is not ``None``. Asking imports the engine,
    so ask only for the runtimes this device's profile uses. A runtime that is not installed
    is logged (a warning) and left out.
    """
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = runtime_for(name).version()
        except RuntimeLoadError as exc:
            log.warning("runtime %s is not available on this device: %s", name, exc)
    return out
