"""The bundle manifest: the ONE definition, shared by model_tools, fleet_server and agent.

A bundle is a directory (or tar) holding exactly one model file (``model.onnx`` or
``model.tflite``) and ``manifest.json``. This module is pure: standard library only, bytes and
dicts in, a verified :class:`Manifest` or :class:`ManifestError` out. It never imports numpy;
tensors (golden inputs/outputs) travel as :class:`Tensor` values holding raw little-endian bytes
in base64, decoded by whoever has numpy.

Forward compatibility (python-tuf ADR 0008): every object keeps the fields it does not know in
``unrecognized`` and writes them back unchanged, so an older tool can rewrite a newer manifest
without losing anything. A manifest whose ``schema_version`` *major* is newer than
:data:`SCHEMA_VERSION` is refused: it may mean something this code cannot check.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST_FILE",
    "MODEL_FILES",
    "RUNTIMES",
    "PRECISIONS",
    "TASKS",
    "DTYPES",
    "ManifestError",
    "TensorSpec",
    "Tensor",
    "ModelFile",
    "Golden",
    "Manifest",
    "sha256_file",
]

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
#: runtime -> the one model file name a bundle for that runtime holds
MODEL_FILES = {"onnxruntime": "model.onnx", "tflite": "model.tflite"}
RUNTIMES = tuple(MODEL_FILES)
PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-static")
TASKS = ("classification", "regression", "generic")
#: dtype names as numpy spells them; item sizes let us check tensor byte lengths without numpy
DTYPES = {
    "float32": 4,
    "float16": 2,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "bool": 1,
}


class ManifestError(ValueError):
    """A manifest (or part of one) is malformed. Names the field, expected against actual."""

    def __init__(self, path: str, expected: str, actual: object) -> None:
        self.path = path
        self.expected = expected
        self.actual = actual
        shown = actual if isinstance(actual, str) and actual else repr(actual)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        super().__init__(f"manifest field {path!r}: expected {expected}, got {shown}")


# ---------------------------------------------------------------------------------------------
# small typed readers: each names the field it reads, so errors say where they are
# ---------------------------------------------------------------------------------------------
_T = TypeVar("_T")


def _obj(value: object, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(path, "an object", type(value).__name__)
    return value


def _take(d: dict[str, Any], key: str, path: str, kind: type[_T] | tuple[type, ...]) -> Any:
    if key not in d:
        raise ManifestError(f"{path}.{key}" if path else key, "a value (required)", "missing")
    value = d.pop(key)
    _check_type(value, kind, f"{path}.{key}" if path else key)
    return value


def _take_opt(
    d: dict[str, Any], key: str, path: str, kind: type[_T] | tuple[type, ...], default: Any
) -> Any:
    if key not in d:
        return default
    value = d.pop(key)
    if value is None:
        return default
    _check_type(value, kind, f"{path}.{key}" if path else key)
    return value


def _check_type(value: object, kind: type | tuple[type, ...], path: str) -> None:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; a manifest saying `"length": true` is still wrong
    if isinstance(value, bool) and bool not in kinds:
        raise ManifestError(path, _kind_name(kinds), value)
    if not isinstance(value, kinds):
        raise ManifestError(path, _kind_name(kinds), value)


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", dict: "an object",
             list: "a list", bool: "a boolean"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _choice(value: str, allowed: Iterable[str], path: str) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ManifestError(path, "one of " + ", ".join(allowed), value)
    return value


def _finite(value: float, path: str) -> float:
    if not math.isfinite(value):
        raise ManifestError(path, "a finite number", value)
    return float(value)


# ---------------------------------------------------------------------------------------------
# parts
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, numpy dtype name, shape (``None`` = dynamic dim)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, data: object, path: str) -> TensorSpec:
        d = dict(_obj(data, path))
        name = _take(d, "name", path, str)
        if not name:
            raise ManifestError(f"{path}.name", "a non-empty string", name)
        dtype = _choice(_take(d, "dtype", path, str), DTYPES, f"{path}.dtype")
        raw_shape = _take(d, "shape", path, list)
        shape: list[int | None] = []
        for i, dim in enumerate(raw_shape):
            if dim is None or isinstance(dim, str):  # symbolic dims ("N", "batch") are dynamic
                shape.append(None)
            elif isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0:
                shape.append(dim)
            else:
                raise ManifestError(f"{path}.shape[{i}]", "a size >= 0, null or a name", dim)
        return cls(name=name, dtype=dtype, shape=tuple(shape), unrecognized=d)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                **self.unrecognized}

    def accepts_shape(self, shape: Iterable[int]) -> bool:
        """True when a concrete ``shape`` fits this spec (same rank, fixed dims equal)."""
        shape = tuple(shape)
        if len(shape) != len(self.shape):
            return False
        return all(want is None or want == got for want, got in zip(self.shape, shape))

    def shape_str(self) -> str:
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


@dataclass(frozen=True)
class Tensor:
    """A concrete tensor as raw little-endian bytes (C order), so manifests stay numpy-free."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    @classmethod
    def from_dict(cls, data: object, path: str) -> Tensor:
        d = dict(_obj(data, path))
        dtype = _choice(_take(d, "dtype", path, str), DTYPES, f"{path}.dtype")
        shape = tuple(_take(d, "shape", path, list))
        for i, dim in enumerate(shape):
            if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
                raise ManifestError(f"{path}.shape[{i}]", "a size >= 0", dim)
        b64 = _take(d, "b64", path, str)
        try:
            raw = base64.b64decode(b64, validate=True)
        except ValueError as exc:
            raise ManifestError(f"{path}.b64", "base64 text", b64[:40]) from exc
        want = math.prod(shape) * DTYPES[dtype]
        if len(raw) != want:
            raise ManifestError(f"{path}.b64", f"{want} bytes for {dtype}{list(shape)}",
                                f"{len(raw)} bytes")
        return cls(dtype=dtype, shape=shape, data=raw)

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape),
                "b64": base64.b64encode(self.data).decode("ascii")}


@dataclass(frozen=True)
class ModelFile:
    """The bundle's one model file, pinned by sha256 and length."""

    path: str
    sha256: str
    length: int
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, data: object, path: str) -> ModelFile:
        d = dict(_obj(data, path))
        name = _take(d, "path", path, str)
        if name not in MODEL_FILES.values():
            raise ManifestError(f"{path}.path", "one of " + ", ".join(MODEL_FILES.values()),
                                name)
        digest = _take(d, "sha256", path, str)
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ManifestError(f"{path}.sha256", "64 lowercase hex digits", digest)
        length = _take(d, "length", path, int)
        if length <= 0:
            raise ManifestError(f"{path}.length", "a length > 0", length)
        return cls(path=name, sha256=digest, length=length, unrecognized=d)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "length": self.length,
                **self.unrecognized}


@dataclass(frozen=True)
class Golden:
    """Inputs and the artifact's own outputs on the build host, replayed by the health check.

    ``atol``/``rtol`` bound how far the device's outputs may stray (numpy ``allclose``);
    ``min_agreement`` is the top-1 agreement the device must reach for classifiers.
    """

    inputs: Mapping[str, Tensor]
    outputs: Mapping[str, Tensor]
    atol: float
    rtol: float
    min_agreement: float | None = None
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, data: object, path: str) -> Golden:
        d = dict(_obj(data, path))
        inputs = {k: Tensor.from_dict(v, f"{path}.inputs.{k}")
                  for k, v in _obj(_take(d, "inputs", path, dict), f"{path}.inputs").items()}
        outputs = {k: Tensor.from_dict(v, f"{path}.outputs.{k}")
                   for k, v in _obj(_take(d, "outputs", path, dict), f"{path}.outputs").items()}
        if not inputs:
            raise ManifestError(f"{path}.inputs", "at least one tensor", "{}")
        atol = _finite(_take(d, "atol", path, (int, float)), f"{path}.atol")
        rtol = _finite(_take(d, "rtol", path, (int, float)), f"{path}.rtol")
        for key, value in (("atol", atol), ("rtol", rtol)):
            if value < 0:
                raise ManifestError(f"{path}.{key}", "a tolerance >= 0", value)
        agree = _take_opt(d, "min_agreement", path, (int, float), None)
        if agree is not None and not 0.0 <= agree <= 1.0:
            raise ManifestError(f"{path}.min_agreement", "a fraction in [0, 1]", agree)
        return cls(inputs=inputs, outputs=outputs, atol=atol, rtol=rtol,
                   min_agreement=None if agree is None else float(agree), unrecognized=d)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "inputs": {k: v.to_dict() for k, v in self.inputs.items()},
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
            "atol": self.atol,
            "rtol": self.rtol,
        }
        if self.min_agreement is not None:
            out["min_agreement"] = self.min_agreement
        out.update(self.unrecognized)
        return out


# ---------------------------------------------------------------------------------------------
# the manifest
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Manifest:
    """A verified bundle manifest.

    ``validation``, ``candidates``, ``drift_baseline`` and ``lineage`` are kept as plain JSON
    objects: their producers (model_tools) and consumers (dashboard, drift) own their inner
    shape, which is documented in docs/manifest.md; this class checks only what every reader
    relies on.
    """

    name: str
    version: str
    profile: str
    runtime: str
    precision: str
    task: str
    file: ModelFile
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    golden: Golden
    validation: Mapping[str, Any]
    drift_baseline: Mapping[str, Any]
    lineage: Mapping[str, Any]
    candidates: tuple[Mapping[str, Any], ...] = ()
    min_runtime_version: str | None = None
    schema_version: int = SCHEMA_VERSION
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    # -- parsing --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: object) -> Manifest:
        """Build and check a manifest from parsed JSON.

        Raises:
            ManifestError: a field is missing, of the wrong type or out of range.
        """
        d = dict(_obj(data, "manifest"))
        version = _take(d, "schema_version", "", int)
        if version < 1 or version > SCHEMA_VERSION:
            raise ManifestError("schema_version", f"1..{SCHEMA_VERSION}", version)
        model = dict(_obj(_take(d, "model", "", dict), "model"))
        name = _take(model, "name", "model", str)
        if not name or any(c in name for c in "/\\\0") or name.startswith("."):
            raise ManifestError("model.name", "a plain name (no path separators)", name)
        mversion = _take(model, "version", "model", str)
        if not mversion or any(c in mversion for c in "/\\\0"):
            raise ManifestError("model.version", "a plain version string", mversion)
        if model:
            d["model_unrecognized"] = model  # keep it: round-trip below
        runtime = _choice(_take(d, "runtime", "", str), RUNTIMES, "runtime")
        file = ModelFile.from_dict(_take(d, "file", "", dict), "file")
        if file.path != MODEL_FILES[runtime]:
            raise ManifestError("file.path", f"{MODEL_FILES[runtime]!r} for runtime {runtime}",
                                file.path)
        inputs = tuple(TensorSpec.from_dict(x, f"inputs[{i}]")
                       for i, x in enumerate(_take(d, "inputs", "", list)))
        outputs = tuple(TensorSpec.from_dict(x, f"outputs[{i}]")
                        for i, x in enumerate(_take(d, "outputs", "", list)))
        for label, specs in (("inputs", inputs), ("outputs", outputs)):
            if not specs:
                raise ManifestError(label, "at least one tensor", "[]")
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise ManifestError(label, "unique names", names)
        golden = Golden.from_dict(_take(d, "golden", "", dict), "golden")
        known_in = {s.name: s for s in inputs}
        for gname, tensor in golden.inputs.items():
            spec = known_in.get(gname)
            if spec is None:
                raise ManifestError(f"golden.inputs.{gname}", "a declared input name",
                                    sorted(known_in))
            if spec.dtype != tensor.dtype or not spec.accepts_shape(tensor.shape):
                raise ManifestError(f"golden.inputs.{gname}",
                                    f"{spec.dtype}{spec.shape_str()}",
                                    f"{tensor.dtype}{list(tensor.shape)}")
        missing = sorted(set(known_in) - set(golden.inputs))
        if missing:
            raise ManifestError("golden.inputs", "a tensor for every input", f"missing {missing}")
        known_out = {s.name for s in outputs}
        for gname in golden.outputs:
            if gname not in known_out:
                raise ManifestError(f"golden.outputs.{gname}", "a declared output name",
                                    sorted(known_out))
        candidates = tuple(_obj(c, f"candidates[{i}]")
                           for i, c in enumerate(_take_opt(d, "candidates", "", list, [])))
        return cls(
            schema_version=version,
            name=name,
            version=mversion,
            profile=_nonempty(_take(d, "profile", "", str), "profile"),
            runtime=runtime,
            precision=_choice(_take(d, "precision", "", str), PRECISIONS, "precision"),
            task=_choice(_take(d, "task", "", str), TASKS, "task"),
            file=file,
            inputs=inputs,
            outputs=outputs,
            golden=golden,
            validation=_take(d, "validation", "", dict),
            drift_baseline=_take(d, "drift_baseline", "", dict),
            lineage=_take(d, "lineage", "", dict),
            candidates=candidates,
            min_runtime_version=_take_opt(d, "min_runtime_version", "", str, None),
            unrecognized=d,
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        """Parse ``manifest.json`` bytes.

        Raises:
            ManifestError: not UTF-8 JSON, or not a valid manifest.
        """
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError("manifest", "UTF-8 JSON", f"{type(exc).__name__}: {exc}") from exc
        return cls.from_dict(data)

    # -- writing --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        extra = dict(self.unrecognized)
        model: dict[str, Any] = {"name": self.name, "version": self.version}
        model.update(extra.pop("model_unrecognized", {}))
        out: dict[str, Any] = {
            "schema_version": self.schema_version,
            "model": model,
            "profile": self.profile,
            "runtime": self.runtime,
            "precision": self.precision,
            "task": self.task,
            "file": self.file.to_dict(),
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "golden": self.golden.to_dict(),
            "validation": dict(self.validation),
            "candidates": [dict(c) for c in self.candidates],
            "drift_baseline": dict(self.drift_baseline),
            "lineage": dict(self.lineage),
        }
        if self.min_runtime_version is not None:
            out["min_runtime_version"] = self.min_runtime_version
        out.update(extra)
        return out

    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, compact, UTF-8): the same manifest, the same bytes.

        Compact because golden tensors and drift baselines dominate the size; ``model_tools
        inspect`` is the human view.
        """
        return (json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False) + "\n").encode("utf-8")

    # -- checks ---------------------------------------------------------------------------
    def verify_model_bytes(self, length: int, sha256: str) -> None:
        """Check a model file's measured length and digest against the manifest.

        Raises:
            ManifestError: length or sha256 differ (the file is not the one described).
        """
        if length != self.file.length:
            raise ManifestError("file.length", f"{self.file.length} bytes", f"{length} bytes")
        if sha256 != self.file.sha256:
            raise ManifestError("file.sha256", self.file.sha256, sha256)


def _nonempty(value: str, path: str) -> str:
    if not value:
        raise ManifestError(path, "a non-empty string", value)
    return value


def sha256_file(path: str | bytes | Any, chunk: int = 1 << 20) -> tuple[int, str]:
    """Stream a file once; return ``(length, sha256 hex)``.

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    length = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
            length += len(block)
    return length, digest.hexdigest()
