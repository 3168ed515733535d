"""The bundle manifest: the ONE definition, shared by model_tools, fleet_server and agent.

A bundle is a directory (or tar) holding exactly one model file (``model.onnx`` or
``model.tflite``) and ``manifest.json``. This module is pure: standard library only, bytes and
dicts in, a verified :class:`Manifest` or :class:`ManifestError` out. It never imports numpy;
tensors (golden inputs/outputs) travel as :class:`Tensor` values holding raw little-endian bytes
in base64, decoded by whoever has numpy.

Reading and writing:

- ``manifest.json`` is strict JSON, read and written by ``agent.protocol._json`` (shared with
  the MQTT messages): UTF-8, no NaN/Infinity, no duplicate keys, at most
  :data:`MAX_MANIFEST_BYTES`. :meth:`Manifest.to_bytes` is canonical (sorted keys, compact,
  one trailing newline): the same manifest always gives the same bytes.
- ``model.name``, ``model.version`` and ``profile`` become paths on the device and parts of
  TUF target names, so each must match :data:`PLAIN_NAME_PATTERN` (see :func:`is_plain_name`).
- A tensor dim is a size (int), a symbolic name (``"N"``) or ``null``; names and nulls are
  both dynamic, and a name is written back as it was read.
- An optional field (``min_runtime_version``, ``golden.min_agreement``) that is ``null`` means
  the same as an absent one, and is written back absent; ``candidates`` absent or ``null`` is
  written back as ``[]``. One meaning, one canonical form.
- A :class:`Manifest` and its parts copy the JSON they are given (and :meth:`Manifest.to_dict`
  returns fresh copies), so they never share mutable state with their caller.

Forward compatibility (python-tuf ADR 0008): every object keeps the fields it does not know in
``unrecognized`` (the ``model`` object's in :attr:`Manifest.model_unrecognized`) and writes them
back unchanged, so an older tool can rewrite a newer manifest without losing anything. A
manifest whose ``schema_version`` is newer than :data:`SCHEMA_VERSION` is refused: it may mean
something this code cannot check.

Errors: :class:`ManifestError` (an :class:`agent.protocol.ProtocolError`, so a ``ValueError``)
names the field, expected against actual. Constructing a part with an ``unrecognized`` key that
is one of its known fields is a programmer error (plain ``ValueError``).
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeGuard, TypeVar

from agent.protocol import _json
from agent.protocol._errors import ProtocolError, shown

__all__ = [
    "DTYPES",
    "MANIFEST_FILE",
    "MAX_MANIFEST_BYTES",
    "MODEL_FILES",
    "PLAIN_NAME_PATTERN",
    "PLAIN_NAME_RULE",
    "PRECISIONS",
    "RUNTIMES",
    "SCHEMA_VERSION",
    "TASKS",
    "Golden",
    "Manifest",
    "ManifestError",
    "ModelFile",
    "Tensor",
    "TensorSpec",
    "is_plain_name",
    "sha256_file",
]

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
#: the largest ``manifest.json`` we read or write (bytes); golden tensors dominate its size
MAX_MANIFEST_BYTES = 8 * 1024 * 1024
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
#: model names, versions and profile names: ASCII letters, digits, ``. _ + -``; no leading dot
#: (so never ``.``, ``..``, a hidden file, a path separator, NUL, whitespace or a newline)
PLAIN_NAME_PATTERN = r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*"
#: what an error says when a name breaks :data:`PLAIN_NAME_PATTERN`
PLAIN_NAME_RULE = ("a plain name of letters, digits, '.', '_', '+' or '-', not starting with "
                   "'.' (it becomes a path on the device and part of a TUF target name)")
_PLAIN_NAME = re.compile(PLAIN_NAME_PATTERN)


class ManifestError(ProtocolError):
    """A manifest (or part of one) is malformed. Names the field, expected against actual."""

    def __init__(self, path: str, expected: str, actual: object) -> None:
        self.path = path
        self.expected = expected
        self.actual = actual
        super().__init__(f"manifest field {path!r}: expected {expected}, "
                         f"got {shown(actual, quote_strings=False)}")


def is_plain_name(value: object) -> TypeGuard[str]:
    """True when ``value`` may be a model name, model version or profile name.

    It must fully match :data:`PLAIN_NAME_PATTERN`: non-empty ASCII letters, digits, ``.``,
    ``_``, ``+`` and ``-``, not starting with ``.``. That rules out ``""``, ``.``, ``..``,
    ``/``, ``\\``, NUL, whitespace and hidden files, since the value becomes a path on the
    device and part of a TUF target name.
    """
    return isinstance(value, str) and _PLAIN_NAME.fullmatch(value) is not None


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
    """An optional field: absent and ``null`` both read as ``default``."""
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


def _plain_name(value: str, path: str) -> str:
    if not is_plain_name(value):
        raise ManifestError(path, PLAIN_NAME_RULE, value)
    return value


def _copied(value: object, path: str) -> Any:
    """A deep copy of JSON data held by a manifest, refusing what is not JSON."""
    try:
        return _json.copy_json(value)
    except _json.JSONError as exc:
        raise ManifestError(f"{path}{exc.where}", exc.expected, exc.actual) from exc


class _Parsed(dict[str, Any]):
    """A JSON object this module parsed or copied itself and hands to a constructor: checked
    JSON that nobody else holds, so the constructor takes it without another deep copy."""


def _is_plain_json(value: object, max_depth: int = _json.MAX_COPY_DEPTH) -> bool:
    """True when what ``parse_json`` returned is what ``copy_json`` would accept as it is.

    ``parse_json`` already refuses NaN/Infinity literals, duplicate keys and non-JSON types;
    what it lets through is a float literal too large for a double (``1e999`` parses as
    infinity) and nesting deeper than ``max_depth``. This walk finds both, ~6x cheaper than a
    copy; on ``False`` the caller runs ``copy_json`` for the exact error and its path.
    """
    if type(value) is float:
        return math.isfinite(value)
    if type(value) is not dict and type(value) is not list:
        return True  # a scalar: not a manifest, which _build says
    stack: list[tuple[Any, int]] = [(value, max_depth)]
    pop, push = stack.pop, stack.append
    while stack:
        node, depth = pop()
        if depth <= 0:
            return False
        for item in (node.values() if type(node) is dict else node):
            kind = type(item)
            if kind is float:
                if not math.isfinite(item):
                    return False
            elif kind is dict or kind is list:
                push((item, depth - 1))
    return True


def _json_copy(data: object) -> Any:
    """``copy_json`` for a whole manifest: a private copy, or the error naming the field.

    Raises:
        ManifestError: a value is not JSON.
    """
    try:
        return _json.copy_json(data)
    except _json.JSONError as exc:
        raise ManifestError(exc.where.lstrip(".") or "manifest", exc.expected,
                            exc.actual) from exc


def _own(obj: object, attr: str, known: Iterable[str], path: str) -> None:
    """Replace a frozen dataclass's mapping ``attr`` by a checked deep copy of it (or, for a
    :class:`_Parsed` object, by a plain dict of it: already checked and not shared).

    Raises:
        ValueError: it holds a known field's name (it would overwrite that field on write).
        ManifestError: it holds something that is not JSON.
    """
    given = getattr(obj, attr)
    value = dict(given) if type(given) is _Parsed else _copied(given, path)
    if not isinstance(value, dict):
        raise ManifestError(path, "an object", type(value).__name__)
    clash = sorted(set(value) & set(known))
    if clash:
        raise ValueError(f"{type(obj).__name__}.{attr}: expected only unknown fields, got the "
                         f"known field(s) {clash}")
    object.__setattr__(obj, attr, value)


# ---------------------------------------------------------------------------------------------
# parts
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, numpy dtype name and shape.

    A dim is a size, a symbolic name (``"N"``, ``"batch"``) or ``None``; names and ``None``
    are both dynamic. :attr:`static_shape` is the shape with every dynamic dim as ``None``.
    """

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    _FIELDS: ClassVar[tuple[str, ...]] = ("name", "dtype", "shape")

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        _own(self, "unrecognized", self._FIELDS, "TensorSpec.unrecognized")

    @classmethod
    def from_dict(cls, data: object, path: str) -> TensorSpec:
        """Build and check one from parsed JSON; ``path`` names it in errors.

        Raises:
            ManifestError: a field is missing, of the wrong type or out of range.
        """
        d = dict(_obj(data, path))
        name = _take(d, "name", path, str)
        if not name:
            raise ManifestError(f"{path}.name", "a non-empty string", name)
        dtype = _choice(_take(d, "dtype", path, str), DTYPES, f"{path}.dtype")
        raw_shape = _take(d, "shape", path, list)
        shape: list[int | str | None] = []
        for i, dim in enumerate(raw_shape):
            # a size, or dynamic: null or a symbolic name ("N", "batch"), kept as written
            size = isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0
            if not (size or dim is None or isinstance(dim, str)):
                raise ManifestError(f"{path}.shape[{i}]", "a size >= 0, null or a name", dim)
            shape.append(dim)
        return cls(name=name, dtype=dtype, shape=tuple(shape), unrecognized=d)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data, unrecognized fields included."""
        return {**_json.copy_json(self.unrecognized), "name": self.name, "dtype": self.dtype,
                "shape": list(self.shape)}

    @property
    def static_shape(self) -> tuple[int | None, ...]:
        """The shape with every dynamic dim (symbolic name or ``None``) as ``None``."""
        return tuple(d if isinstance(d, int) else None for d in self.shape)

    def accepts_shape(self, shape: Iterable[int]) -> bool:
        """True when a concrete ``shape`` fits this spec (same rank, fixed dims equal)."""
        shape = tuple(shape)
        if len(shape) != len(self.shape):
            return False
        return all(want is None or want == got
                   for want, got in zip(self.static_shape, shape, strict=True))

    def shape_str(self) -> str:
        """The shape for people: ``[N, 64]``; a nameless dynamic dim is ``?``."""
        return "[" + ", ".join("?" if d is None or d == "" else str(d) for d in self.shape) + "]"


@dataclass(frozen=True)
class Tensor:
    """A concrete tensor as raw little-endian bytes (C order), so manifests stay numpy-free."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    _FIELDS: ClassVar[tuple[str, ...]] = ("dtype", "shape", "b64")

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        object.__setattr__(self, "data", bytes(self.data))
        _own(self, "unrecognized", self._FIELDS, "Tensor.unrecognized")

    @classmethod
    def from_dict(cls, data: object, path: str) -> Tensor:
        """Build and check one from parsed JSON; ``path`` names it in errors.

        Raises:
            ManifestError: a field is missing, of the wrong type, not base64, or the byte
                count does not fit dtype and shape.
        """
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
        return cls(dtype=dtype, shape=shape, data=raw, unrecognized=d)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data, unrecognized fields included."""
        return {**_json.copy_json(self.unrecognized), "dtype": self.dtype,
                "shape": list(self.shape), "b64": base64.b64encode(self.data).decode("ascii")}


@dataclass(frozen=True)
class ModelFile:
    """The bundle's one model file, pinned by sha256 and length."""

    path: str
    sha256: str
    length: int
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    _FIELDS: ClassVar[tuple[str, ...]] = ("path", "sha256", "length")

    def __post_init__(self) -> None:
        _own(self, "unrecognized", self._FIELDS, "ModelFile.unrecognized")

    @classmethod
    def from_dict(cls, data: object, path: str) -> ModelFile:
        """Build and check one from parsed JSON; ``path`` names it in errors.

        Raises:
            ManifestError: a field is missing, of the wrong type or out of range.
        """
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
        """Plain JSON data, unrecognized fields included."""
        return {**_json.copy_json(self.unrecognized), "path": self.path, "sha256": self.sha256,
                "length": self.length}


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

    _FIELDS: ClassVar[tuple[str, ...]] = ("inputs", "outputs", "atol", "rtol", "min_agreement")

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", dict(self.inputs))
        object.__setattr__(self, "outputs", dict(self.outputs))
        _own(self, "unrecognized", self._FIELDS, "Golden.unrecognized")

    @classmethod
    def from_dict(cls, data: object, path: str) -> Golden:
        """Build and check one from parsed JSON; ``path`` names it in errors.

        Raises:
            ManifestError: a field is missing, of the wrong type or out of range.
        """
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
        """Plain JSON data, unrecognized fields included (``min_agreement`` only if set)."""
        out: dict[str, Any] = {
            **_json.copy_json(self.unrecognized),
            "inputs": {k: v.to_dict() for k, v in self.inputs.items()},
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
            "atol": self.atol,
            "rtol": self.rtol,
        }
        if self.min_agreement is not None:
            out["min_agreement"] = self.min_agreement
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
    relies on. ``model_unrecognized`` holds the fields of the ``model`` object this code does
    not know, ``unrecognized`` those of the top level.
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
    model_unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    _FIELDS: ClassVar[tuple[str, ...]] = (
        "schema_version", "model", "profile", "runtime", "precision", "task", "file", "inputs",
        "outputs", "golden", "validation", "candidates", "drift_baseline", "lineage",
        "min_runtime_version")
    _MODEL_FIELDS: ClassVar[tuple[str, ...]] = ("name", "version")

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        for attr in ("validation", "drift_baseline", "lineage"):
            _own(self, attr, (), attr)
        candidates = tuple(dict(c) if type(c) is _Parsed else _copied(c, f"candidates[{i}]")
                           for i, c in enumerate(self.candidates))
        for i, c in enumerate(candidates):
            _obj(c, f"candidates[{i}]")
        object.__setattr__(self, "candidates", candidates)
        _own(self, "unrecognized", self._FIELDS, "Manifest.unrecognized")
        _own(self, "model_unrecognized", self._MODEL_FIELDS, "Manifest.model_unrecognized")

    # -- parsing --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: object) -> Manifest:
        """Build and check a manifest from parsed JSON (``data`` is copied, not kept).

        Raises:
            ManifestError: a field is missing, of the wrong type or out of range, or a value
                is not JSON (NaN, Infinity, a non-string key, another type).
        """
        return cls._build(_json_copy(data))

    @classmethod
    def _build(cls, data: object) -> Manifest:
        """Check and build from JSON data that is ours alone (a private copy or a fresh parse):
        its objects go into the manifest as they are (:class:`_Parsed`), not copied again.

        Raises:
            ManifestError: as :meth:`from_dict`.
        """
        d = _obj(data, "manifest")
        version = _take(d, "schema_version", "", int)
        if version < 1 or version > SCHEMA_VERSION:
            raise ManifestError("schema_version", f"1..{SCHEMA_VERSION}", version)
        model = dict(_obj(_take(d, "model", "", dict), "model"))
        name = _plain_name(_take(model, "name", "model", str), "model.name")
        mversion = _plain_name(_take(model, "version", "model", str), "model.version")
        profile = _plain_name(_take(d, "profile", "", str), "profile")
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
        _check_golden("inputs", inputs, golden.inputs)
        _check_golden("outputs", outputs, golden.outputs)
        missing = sorted({s.name for s in inputs} - set(golden.inputs))
        if missing:
            raise ManifestError("golden.inputs", "a tensor for every input", f"missing {missing}")
        candidates = tuple(_Parsed(_obj(c, f"candidates[{i}]"))
                           for i, c in enumerate(_take_opt(d, "candidates", "", list, [])))
        return cls(
            schema_version=version,
            name=name,
            version=mversion,
            profile=profile,
            runtime=runtime,
            precision=_choice(_take(d, "precision", "", str), PRECISIONS, "precision"),
            task=_choice(_take(d, "task", "", str), TASKS, "task"),
            file=file,
            inputs=inputs,
            outputs=outputs,
            golden=golden,
            validation=_Parsed(_take(d, "validation", "", dict)),
            drift_baseline=_Parsed(_take(d, "drift_baseline", "", dict)),
            lineage=_Parsed(_take(d, "lineage", "", dict)),
            candidates=candidates,
            min_runtime_version=_take_opt(d, "min_runtime_version", "", str, None),
            unrecognized=_Parsed(d),
            model_unrecognized=_Parsed(model),
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        """Parse ``manifest.json`` bytes.

        Raises:
            ManifestError: over :data:`MAX_MANIFEST_BYTES`, not strict UTF-8 JSON (NaN,
                Infinity, duplicate keys, integers past Python's digit limit and nesting past
                its recursion limit are all refused), or not a valid manifest.
        """
        try:
            data = _json.parse_json(raw, limit=MAX_MANIFEST_BYTES)
        except _json.JSONError as exc:
            raise ManifestError("manifest", exc.expected, exc.actual) from exc
        # a fresh parse is ours alone: only what parse_json lets through (an overflowing float,
        # deep nesting) needs checking, and copy_json then says where
        return cls._build(data if _is_plain_json(data) else _json_copy(data))

    # -- writing --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (fresh copies), unrecognized fields included at every level."""
        model: dict[str, Any] = {**_json.copy_json(self.model_unrecognized),
                                 "name": self.name, "version": self.version}
        out: dict[str, Any] = {
            **_json.copy_json(self.unrecognized),
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
            "validation": _json.copy_json(self.validation),
            "candidates": _json.copy_json(self.candidates),
            "drift_baseline": _json.copy_json(self.drift_baseline),
            "lineage": _json.copy_json(self.lineage),
        }
        if self.min_runtime_version is not None:
            out["min_runtime_version"] = self.min_runtime_version
        return out

    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, compact, UTF-8, newline): same manifest, same bytes.

        Compact because golden tensors and drift baselines dominate the size; ``model_tools
        inspect`` is the human view.

        Raises:
            ManifestError: a value is not JSON-encodable (NaN, Infinity, a lone surrogate), or
                the result is over :data:`MAX_MANIFEST_BYTES` (``from_bytes`` would refuse it).
        """
        try:
            raw = _json.canonical_json(self.to_dict()) + b"\n"
        except _json.JSONError as exc:
            raise ManifestError("manifest", exc.expected, exc.actual) from exc
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ManifestError("manifest", f"at most {MAX_MANIFEST_BYTES} bytes",
                                f"{len(raw)} bytes")
        return raw

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


def _check_golden(label: str, specs: tuple[TensorSpec, ...],
                  tensors: Mapping[str, Tensor]) -> None:
    """Every golden tensor names a declared input/output and fits its dtype and shape."""
    known = {s.name: s for s in specs}
    for gname, tensor in tensors.items():
        spec = known.get(gname)
        if spec is None:
            raise ManifestError(f"golden.{label}.{gname}", f"a declared {label[:-1]} name",
                                sorted(known))
        if spec.dtype != tensor.dtype or not spec.accepts_shape(tensor.shape):
            raise ManifestError(f"golden.{label}.{gname}", f"{spec.dtype}{spec.shape_str()}",
                                f"{tensor.dtype}{list(tensor.shape)}")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> tuple[int, str]:
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
