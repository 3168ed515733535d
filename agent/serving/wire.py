"""The local inference API's bodies, both forms: JSON and the binary tensor framing (pure).

Shared by the server (:mod:`agent.serving.server`), the client (:mod:`agent.serving.client`),
tests and benchmarks. No I/O: bytes in, numpy arrays out, or :class:`InputRejected`.

JSON (``Content-Type: application/json``)::

    request   {"inputs": {"<input name>": <nested lists>, ...}}
    response  {"model": "<name>", "version": "<version>", "outputs": {"<name>": <lists>, ...}}

A request tensor takes its dtype from the model's input spec: numbers are cast to it, while
strings, ragged lists, fractions for an integer input and integers out of its range are refused
(:class:`InputRejected`, naming the input, expected against actual). Non-finite float outputs are
written as ``NaN``/``Infinity``, as Python's :mod:`json` reads them. Float outputs are written as
the float64 values they hold (a float32 ``0.1`` as ``0.10000000149011612``), so a reader gets
exactly the model's numbers back.

orjson, when importable, is an accelerator for the JSON form and nothing more: the standard
library's :mod:`json` defines what is accepted, what is refused and with which words. orjson
parses and writes the common case (digits MLP, 2-core VM: the server's decode 5 us against 16,
its encode 2.3 us against 8, the client's encode and decode 7 us against 19); whenever it
refuses something, or could differ from :mod:`json`, the body is handled by :mod:`json`, whose
answer stands:

- a request orjson cannot parse (``NaN``/``Infinity``, a UTF-16 body or a BOM, a lone
  surrogate, numbers past float64's range, nesting past 1024) and any request the fast path
  refuses are decoded again by :mod:`json`, so a refusal always has the standard path's words;
- orjson reads an integer past 64 bits as a float, :mod:`json` as an int (which no input
  dtype takes): a body with a run of 19 or more digits not after a ``.`` goes to :mod:`json`
  directly (the integer part of a float as Python or numpy write it has at most 17 digits;
  its fraction may have more, as in ``0.00012345678901234567``);
- orjson writes non-finite floats as ``null``: a body that holds ``null`` (or outputs that are
  not numeric arrays) is written by :mod:`json` instead. Its float text can differ (``1e-05``
  against ``1e-5``), never the double it parses to.

Duplicate keys keep the last value in both. One known difference: orjson reads nesting up to
1,024 levels, while :mod:`json` stops near the interpreter's recursion limit (about 990-995
levels, less in a deeper stack), so a request nested that deep *outside* ``inputs`` (a key the
server ignores) is answered rather than refused; inside ``inputs`` numpy refuses so many
dimensions and :mod:`json` decides. ``EDGEFLEET_JSON=stdlib`` in the environment (read
at import) turns the accelerator off.

Binary tensor framing (``Content-Type: application/x-edgefleet-tensors``), version 1::

    <header: one line of UTF-8 JSON, ended by b"\\n">
    <payload: the tensors' raw bytes back to back, in header order>

    header  {"v": 1,
             "tensors": [{"name": "input", "dtype": "float32", "shape": [1, 64],
                          "nbytes": 256}, ...],
             ...any other fields: metadata, kept as they are}

Each tensor's bytes are little-endian, C order, exactly ``prod(shape) * itemsize`` long
(``nbytes`` says it again so a reader can check before it allocates); ``bool`` is one byte,
0 or 1. The body is exactly the header line plus the sum of ``nbytes``: nothing before, between
or after. ``dtype`` is a numpy name from :data:`agent.protocol.manifest.DTYPES`. The header is
at most :data:`MAX_HEADER_BYTES` and lists at most :data:`MAX_TENSORS` tensors, names unique. A
response in this form (the request said ``Accept: application/x-edgefleet-tensors``) carries
``"model"`` and ``"version"`` in its header. Decoding is zero-copy on little-endian hosts: the
arrays are read-only views of the body. A header whose ``v`` is not 1 is refused; fields this
version does not know are kept in :attr:`TensorFrame.meta`.

Speed: a client sends the same header line with every request to a model (same names, dtypes,
shapes) and the server answers with the same one back, so both directions memoise it. Decoding
keeps the checked parse of up to :data:`_MEMO_ENTRIES` header lines of at most
:data:`_MEMO_LINE_BYTES` whose extra fields are plain scalars, keyed by the exact bytes;
encoding keeps the line built for each (names, dtypes, shapes, meta) the same way. A repeat
costs a dict lookup instead of a JSON parse or build and its checks (about 10 us each way on a
Pi-class core). The memos are bounded (cleared when full) and hold only immutable values, so
the functions stay pure and thread-safe.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from agent.errors import InputRejected
from agent.protocol.manifest import DTYPES, TensorSpec

__all__ = [
    "JSON_CONTENT_TYPE",
    "JSON_ENV_VAR",
    "MAX_HEADER_BYTES",
    "MAX_TENSORS",
    "TENSORS_CONTENT_TYPE",
    "WIRE_VERSION",
    "Prediction",
    "TensorFrame",
    "decode_json_inputs",
    "decode_json_prediction",
    "decode_tensors",
    "encode_json_inputs",
    "encode_json_prediction",
    "encode_tensors",
]

JSON_CONTENT_TYPE = "application/json"
TENSORS_CONTENT_TYPE = "application/x-edgefleet-tensors"
WIRE_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024  # the binary framing's JSON header line, newline included
MAX_TENSORS = 256  # tensors in one frame

_RESERVED = ("v", "tensors")
_LITTLE = sys.byteorder == "little"
_MEMO_ENTRIES = 256  # header lines memoised per direction (see the module docstring)
_MEMO_LINE_BYTES = 1024  # longer header lines are parsed or built every time
_SCALARS = (str, int, float, bool, type(None))
# dtype -> wire name, and wire name -> little-endian dtype: dict lookups, because
# ``dtype.name`` and ``str(dtype)`` cost microseconds per call
_WIRE_NAMES = {np.dtype(name): name for name in DTYPES}
_LE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in DTYPES}
# module-level encoders: json.dumps with any option builds a new encoder on every call
_dump_strict = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_dump = json.JSONEncoder(separators=(",", ":")).encode
#: the environment variable that turns the orjson accelerator off: ``stdlib`` (else ``auto``)
JSON_ENV_VAR = "EDGEFLEET_JSON"


def _accelerator(environ: Mapping[str, str]) -> ModuleType | None:
    choice = environ.get(JSON_ENV_VAR, "auto") or "auto"
    if choice == "stdlib":
        return None
    if choice != "auto":
        warnings.warn(f"{JSON_ENV_VAR}: expected auto or stdlib, got {choice[:40]!r}; using "
                      "auto", stacklevel=2)
    try:
        import orjson
    except ImportError:
        return None
    return orjson


#: orjson when importable and not turned off, else ``None`` (see the module docstring)
_orjson: ModuleType | None = _accelerator(os.environ)
_NUMERIC = frozenset("biuf")  # array kinds whose tolist() holds only bool, int and float
# digits -> b"0", b"." stays, anything else -> b" ": a body holding _LONG_RUN may hold an
# integer orjson reads as a float (it keeps 64 bits: 18 digits always fit, 19 may not)
_DIGITS = bytes(0x30 if 0x30 <= c <= 0x39 else c if c == 0x2E else 0x20 for c in range(256))
_LONG_RUN = b" " + b"0" * 19


def _fast_reader(body: bytes | bytearray | memoryview) -> ModuleType | None:
    """orjson, when it is on and reads ``body`` as :mod:`json` would (or refuses it)."""
    fast = _orjson
    # a body that starts with digits is a bare number, refused either way: no need to look
    if fast is None or _LONG_RUN in bytes(body).translate(_DIGITS):
        return None
    return fast


@dataclass(frozen=True)
class TensorFrame:
    """A decoded binary frame: tensors by name (header order) and the header's other fields."""

    tensors: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Prediction:
    """One predict response: which model and version answered, and its outputs by name."""

    model: str
    version: str
    outputs: dict[str, np.ndarray]


def _bad(what: str) -> InputRejected:
    return InputRejected(f"bad tensor framing: {what}")


def _cut(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _wire_array(name: str, value: np.ndarray) -> np.ndarray:
    """``value`` as a C-contiguous little-endian array of a wire dtype.

    Raises:
        ValueError: the dtype has no wire name (programmer misuse: models never make one).
    """
    arr = value if isinstance(value, np.ndarray) and value.flags.c_contiguous \
        else np.ascontiguousarray(value)
    # a non-native byte order is another dtype: look up its native twin
    if arr.dtype not in _WIRE_NAMES and arr.dtype.newbyteorder("=") not in _WIRE_NAMES:
        raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be framed; expected one "
                         f"of {', '.join(DTYPES)}")
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not _LITTLE):
        arr = arr.astype(_LE_DTYPES[_wire_name(arr)])
    return arr


def _wire_name(arr: np.ndarray) -> str:
    name = _WIRE_NAMES.get(arr.dtype)
    return name if name is not None else _WIRE_NAMES[arr.dtype.newbyteorder("=")]


def encode_tensors(tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None
                   ) -> bytes:
    """Frame ``tensors`` (in mapping order) with ``meta`` as extra header fields.

    Raises:
        ValueError: a tensor's dtype has no wire name, too many tensors, or ``meta`` uses a
            reserved field (``v``, ``tensors``) or is not JSON-serialisable.
    """
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"at most {MAX_TENSORS} tensors per frame, got {len(tensors)}")
    extra = dict(meta or {})
    clash = [k for k in _RESERVED if k in extra]
    if clash:
        raise ValueError(f"meta field {clash[0]!r} is reserved by the framing")
    arrays = [(name, _wire_array(name, value)) for name, value in tensors.items()]
    key: tuple[Any, ...] | None = None
    if all(type(v) in _SCALARS for v in extra.values()):
        # the value's type is part of the key: 1, 1.0 and True are equal but frame differently
        key = (tuple((name, arr.dtype, arr.shape) for name, arr in arrays),
               tuple((k, type(v), v) for k, v in extra.items()))
        line = _encoded_lines.get(key)
        if line is not None:
            return b"".join([line, *(arr.tobytes() for _, arr in arrays)])
    header = {"v": WIRE_VERSION,
              "tensors": [{"name": name, "dtype": _wire_name(arr), "shape": list(arr.shape),
                           "nbytes": arr.nbytes} for name, arr in arrays],
              **extra}
    try:
        line = _dump_strict(header).encode() + b"\n"
    except (TypeError, ValueError) as exc:
        raise ValueError(f"frame meta is not plain JSON: {exc}") from exc
    if key is not None and len(line) <= _MEMO_LINE_BYTES:
        _remember(_encoded_lines, key, line)
    return b"".join([line, *(arr.tobytes() for _, arr in arrays)])


@dataclass(frozen=True, slots=True)
class _Header:
    """A checked header line: per tensor (name, little-endian dtype, shape, count, nbytes,
    is bool), the extra fields as items, and the payload length it announces."""

    tensors: tuple[tuple[str, np.dtype[Any], tuple[int, ...], int, int, bool], ...]
    meta: tuple[tuple[str, Any], ...]
    payload: int


#: encode side: (names, dtypes, shapes; meta items) -> header line with its newline
_encoded_lines: dict[tuple[Any, ...], bytes] = {}
#: decode side: header line (without its newline) -> its checked parse
_decoded_headers: dict[bytes, _Header] = {}


def _remember(memo: dict[Any, Any], key: Any, value: Any) -> None:
    if len(memo) >= _MEMO_ENTRIES:
        memo.clear()  # bounded: a client cycling through shapes costs re-parsing, not memory
    memo[key] = value


def _tensor_entry(entry: object, i: int) -> tuple[str, str, tuple[int, ...], int]:
    if not isinstance(entry, dict):
        raise _bad(f"tensors[{i}]: expected an object, got {_cut(entry)}")
    name, dtype, shape, nbytes = (entry.get(k) for k in ("name", "dtype", "shape", "nbytes"))
    if not isinstance(name, str) or not name:
        raise _bad(f"tensors[{i}].name: expected a non-empty string, got {_cut(name)}")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _bad(f"tensor {name!r}: expected dtype one of {', '.join(DTYPES)}, got "
                   f"{_cut(dtype)}")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _bad(f"tensor {name!r}: expected shape a list of sizes >= 0, got {_cut(shape)}")
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise _bad(f"tensor {name!r}: expected nbytes a size >= 0, got {_cut(nbytes)}")
    want = math.prod(shape) * DTYPES[dtype]
    if nbytes != want:
        raise _bad(f"tensor {name!r}: {dtype}{shape} needs {want} bytes, header says "
                   f"nbytes {nbytes}")
    return name, dtype, tuple(shape), nbytes


def decode_tensors(body: bytes | bytearray | memoryview) -> TensorFrame:
    """Parse a binary frame into read-only arrays (views of ``body`` on little-endian hosts).

    Raises:
        InputRejected: no header line, header not JSON or too long, unsupported ``v``, a
            tensor entry wrong, duplicate names, or the payload length does not match.
    """
    data = body if isinstance(body, (bytes, bytearray)) else memoryview(body).cast("B").tobytes()
    end = data.find(b"\n", 0, MAX_HEADER_BYTES)
    if end < 0:
        if len(data) >= MAX_HEADER_BYTES:
            raise _bad(f"header line longer than {MAX_HEADER_BYTES} bytes")
        raise _bad("no header line (a JSON object ended by a newline)")
    line = bytes(data[:end])
    header = _decoded_headers.get(line)
    if header is None:
        header = _parse_header(line)
        if end <= _MEMO_LINE_BYTES and all(type(v) in _SCALARS for _, v in header.meta):
            _remember(_decoded_headers, line, header)
    expected = end + 1 + header.payload
    if expected != len(data):
        raise _bad(f"header announces a body of {expected} bytes, got {len(data)}")
    tensors: dict[str, np.ndarray] = {}
    offset = end + 1
    for name, dtype, shape, count, nbytes, is_bool in header.tensors:
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
        offset += nbytes
        if is_bool and nbytes and int(arr.view(np.uint8).max()) > 1:
            raise _bad(f"tensor {name!r}: bool bytes must be 0 or 1")
        if not _LITTLE:
            arr = arr.astype(dtype.newbyteorder("="))
        tensors[name] = arr
    return TensorFrame(tensors, dict(header.meta))


def _parse_header(line: bytes) -> _Header:
    """Check a header line (without its newline); see the module docstring.

    Raises:
        InputRejected: not JSON, not an object, unsupported ``v``, a tensor entry wrong, too
            many tensors, or a name twice.
    """
    try:
        header = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise _bad(f"header: expected a JSON object, got {_cut(header)}")
    if header.get("v") != WIRE_VERSION:
        raise _bad(f"expected framing version {WIRE_VERSION}, got {_cut(header.get('v'))}")
    entries = header.get("tensors")
    if not isinstance(entries, list):
        raise _bad(f"header.tensors: expected a list, got {_cut(entries)}")
    if len(entries) > MAX_TENSORS:
        raise _bad(f"expected at most {MAX_TENSORS} tensors, got {len(entries)}")
    tensors = []
    names: set[str] = set()
    for i, entry in enumerate(entries):
        name, dtype, shape, nbytes = _tensor_entry(entry, i)
        if name in names:
            raise _bad(f"tensor {name!r} appears twice")
        names.add(name)
        tensors.append((name, _LE_DTYPES[dtype], shape, nbytes // DTYPES[dtype], nbytes,
                        dtype == "bool"))
    return _Header(tuple(tensors), tuple((k, v) for k, v in header.items() if k not in _RESERVED),
                   sum(t[4] for t in tensors))


def _cast(name: str, value: object, dtype: str) -> np.ndarray:
    """A JSON value as an array of ``dtype``, refusing what a cast would silently change."""
    try:
        raw = np.asarray(value)
    except ValueError as exc:  # ragged nesting: numpy refuses inhomogeneous shapes
        raise InputRejected(f"input {name!r}: expected a rectangular nested list of numbers "
                            f"({dtype}), got a ragged one") from exc
    target = np.dtype(dtype)
    kind = raw.dtype.kind
    if raw.size == 0:  # [] and [[], []] carry no values to check
        return np.zeros(raw.shape, dtype=target)
    if kind not in _NUMERIC:
        got = {"U": "strings", "S": "strings", "O": "mixed values"}.get(kind, str(raw.dtype))
        raise InputRejected(f"input {name!r}: expected dtype {dtype}, got {got}")
    if target.kind == "b" and kind != "b":
        raise InputRejected(f"input {name!r}: expected dtype bool (true/false), got numbers")
    if target.kind in "iu":
        if kind == "f":
            raise InputRejected(f"input {name!r}: expected dtype {dtype} (integers), got "
                                "fractional numbers")
        if kind in "iu" and raw.size:
            info = np.iinfo(target)
            lo, hi = int(raw.min()), int(raw.max())
            if lo < info.min or hi > info.max:
                raise InputRejected(f"input {name!r}: expected {dtype} values in "
                                    f"[{info.min}, {info.max}], got [{lo}, {hi}]")
    return raw.astype(target, copy=False)


def _stdlib_loads(body: bytes | bytearray | memoryview, what: str) -> Any:
    try:
        return json.loads(bytes(body))
    except RecursionError as exc:
        raise InputRejected(f"{what} body is not JSON this server reads: nested too deeply "
                            f"({exc})") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputRejected(f"{what} body is not JSON: {exc}") from exc


def decode_json_inputs(body: bytes | bytearray | memoryview, specs: Sequence[TensorSpec]
                       ) -> dict[str, np.ndarray]:
    """Parse a JSON predict request into arrays of the model's input dtypes.

    Missing inputs, shapes and the final dtype check are left to the model's feed check
    (:func:`agent.serving.runtime.check_feeds`). orjson parses it when importable; the result
    and any refusal are :mod:`json`'s (see the module docstring).

    Raises:
        InputRejected: not JSON, not ``{"inputs": {...}}``, an input the model does not have,
            or a value that cannot be cast to its input's dtype.
    """
    fast = _fast_reader(body)
    if fast is not None:
        try:
            return _inputs(fast.loads(body), specs)
        except (fast.JSONDecodeError, InputRejected):
            pass  # the standard path decides, in its own words
    return _inputs(_stdlib_loads(body, "request"), specs)


def _inputs(doc: Any, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    if not isinstance(inputs, dict):
        raise InputRejected('expected a JSON object {"inputs": {"<input name>": [...]}}, got '
                            f"{_cut(doc)}")
    dtypes = {s.name: s.dtype for s in specs}
    feeds: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        dtype = dtypes.get(name)
        if dtype is None:  # same words as runtime.check_feeds, before any conversion work
            raise InputRejected(f"unknown input {name!r}; the model's inputs are "
                                f"{list(dtypes)}")
        feeds[name] = _cast(name, value, dtype)
    return feeds


def _dumps(doc: dict[str, Any], numeric: bool) -> bytes:
    """``doc`` as compact JSON; by orjson when it writes what :mod:`json` would mean.

    Raises:
        TypeError: ``doc`` holds something :mod:`json` cannot write.
    """
    fast = _orjson
    if fast is not None and numeric:
        try:
            text: bytes = fast.dumps(doc)
        except TypeError:
            pass  # e.g. a key that is not a string, which json converts: json decides
        else:
            if b"null" not in text:  # orjson writes NaN and infinities as null
                return text
    return _dump(doc).encode()


def encode_json_inputs(inputs: Mapping[str, Any]) -> bytes:
    """A JSON predict request body for ``inputs`` (arrays or nested lists).

    Raises:
        ValueError: a value is not JSON-serialisable as numbers.
    """
    arrays = [(name, np.asarray(v)) for name, v in inputs.items()]
    doc = {"inputs": {name: arr.tolist() for name, arr in arrays}}
    try:
        return _dumps(doc, all(arr.dtype.kind in _NUMERIC for _, arr in arrays))
    except TypeError as exc:
        raise ValueError(f"inputs are not numbers: {exc}") from exc


def encode_json_prediction(model: str, version: str, outputs: Mapping[str, np.ndarray]) -> bytes:
    """A JSON predict response body.

    Raises:
        TypeError: an output holds values JSON cannot carry (models never make one).
    """
    arrays = [(name, np.asarray(v)) for name, v in outputs.items()]
    doc = {"model": model, "version": version,
           "outputs": {name: arr.tolist() for name, arr in arrays}}
    return _dumps(doc, all(arr.dtype.kind in _NUMERIC for _, arr in arrays))


def decode_json_prediction(body: bytes | bytearray | memoryview) -> Prediction:
    """Parse a JSON predict response; outputs become arrays of numpy's inferred dtype.

    Raises:
        InputRejected: not JSON or not the response shape.
    """
    fast = _fast_reader(body)
    if fast is not None:
        try:
            return _prediction(fast.loads(body))
        except (fast.JSONDecodeError, InputRejected):
            pass  # the standard path decides, in its own words
    return _prediction(_stdlib_loads(body, "response"))


def _prediction(doc: Any) -> Prediction:
    if not (isinstance(doc, dict) and isinstance(doc.get("model"), str)
            and isinstance(doc.get("version"), str) and isinstance(doc.get("outputs"), dict)):
        raise InputRejected('expected {"model": str, "version": str, "outputs": {...}}, got '
                            f"{_cut(doc)}")
    return Prediction(doc["model"], doc["version"],
                      {name: np.asarray(v) for name, v in doc["outputs"].items()})
