"""Strict, canonical JSON for every wire format (private): the ONE definition.

:mod:`agent.protocol.manifest` and :mod:`agent.protocol.messages` (and through it
:mod:`agent.protocol.signed`) read and write JSON only through these functions. They raise the
neutral :class:`JSONError`; each public module translates it into its own error
(``ManifestError``, ``MessageError``) with ``raise ... from exc``, so a caller never sees a
``JSONError``. Pure: standard library only.

- :func:`canonical_json`: sorted keys, ``,``/``:`` separators, UTF-8 (not ``\\u``-escaped),
  NaN/Infinity refused. The same value always gives the same bytes.
- :func:`parse_json`: untrusted bytes in, refusing oversize input before looking at it, and
  anything :func:`canonical_json` could not write back (NaN, Infinity, lone surrogates), plus
  duplicate keys, integers over Python's digit limit and nesting past the recursion limit.
- :func:`copy_json`: a deep copy of JSON data that refuses anything else (so a frozen
  object never shares, and never holds, what its caller may still change).
- :func:`nesting_depth`: how deeply objects and arrays nest in parsed JSON data, without
  recursion (so it answers for data nested up to the parser's own limit).
- :func:`canonical_text` and :func:`parse_unchecked`: the two halves of a faster strict read,
  for a caller that proves the text canonical (``canonical_text(parse_unchecked(t)) == t``).
  Canonical text holds every key of an object once, and no ``\\u`` escape but those of
  control characters (so no lone surrogate smuggled in as ``\\ud800`` can match): that one
  comparison replaces the duplicate-key hook, which runs in Python once per object.
  ``messages`` reads telemetry this way and falls back to :func:`parse_json` otherwise.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["MAX_COPY_DEPTH", "JSONError", "canonical_json", "canonical_text", "copy_json",
           "nesting_depth", "parse_json", "parse_unchecked"]

#: how deep :func:`copy_json` follows nested objects and arrays
MAX_COPY_DEPTH = 100
# one encoder for all: json.dumps with options builds one per call (stateless, thread-safe)
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                              allow_nan=False)


class JSONError(Exception):
    """Neutral JSON failure; translated by the public module that called us.

    ``where`` is ``"<root>"`` for the whole document, else a path relative to the copied
    value (``""``, ``".key"``, ``"[3].key"``) that the caller prefixes with its field name.
    """

    def __init__(self, expected: str, actual: str, where: str = "<root>") -> None:
        self.expected = expected
        self.actual = actual
        self.where = where
        super().__init__(f"{where}: expected {expected}, got {actual}")


def canonical_json(value: object) -> bytes:
    """Canonical JSON bytes: sorted keys, ``,``/``:`` separators, UTF-8, NaN/Infinity refused.

    Raises:
        JSONError: the value holds NaN/Infinity, a lone surrogate, a non-JSON type, an int
            over Python's digit limit, or nests past the recursion limit.
    """
    try:
        return _CANONICAL.encode(value).encode("utf-8")
    except (ValueError, TypeError, UnicodeEncodeError, RecursionError) as exc:
        raise JSONError("JSON-encodable data (no NaN, no lone surrogates)",
                        f"{type(exc).__name__}: {exc}") from exc


def canonical_text(value: object) -> str:
    """:func:`canonical_json` as text, before the UTF-8 encoding (which is what refuses lone
    surrogates: this does not).

    Raises:
        JSONError: the value holds NaN/Infinity, a non-JSON type, an int over Python's digit
            limit, or nests past the recursion limit.
    """
    try:
        return _CANONICAL.encode(value)
    except (ValueError, TypeError, RecursionError) as exc:
        raise JSONError("JSON-encodable data (no NaN)", f"{type(exc).__name__}: {exc}") from exc


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


#: a number that may overflow a float (over 1.8e308): an exponent of 3+ digits, or else 200+
#: digits in a row (a 2-digit exponent needs 210 digits before the point to get there)
_MAY_OVERFLOW = re.compile(rb"[eE][+]?[0-9]{3}|[0-9]{200}")


def parse_json(raw: bytes, *, limit: int, finite: bool = False) -> Any:
    """Parse untrusted JSON bytes, refusing input over ``limit`` bytes before looking at it.

    Strict: UTF-8 only, no NaN/Infinity, no duplicate keys, no lone surrogates. A number too
    large for a float (``1e999``) parses as infinity, which :func:`canonical_json` cannot write
    back: with ``finite`` it is refused here (at the root), else the caller finds it (the
    manifest does, to name the field).

    Raises:
        JSONError: not bytes, too large, not UTF-8, not strict JSON, or nested too deeply.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise JSONError("bytes", type(raw).__name__)
    if len(raw) > limit:
        raise JSONError(f"at most {limit} bytes", f"{len(raw)} bytes")
    try:
        data = json.loads(bytes(raw).decode("utf-8"), parse_constant=_no_constant,
                          object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # JSONDecodeError is a ValueError; so are the int-digits limit and our hooks' errors
        raise JSONError("strict UTF-8 JSON", f"{type(exc).__name__}: {exc}") from exc
    # strict UTF-8 already refuses raw surrogates; only a "\ud800"-style escape can smuggle a
    # lone one in, and only a long exponent or a 200-digit number can overflow to infinity.
    # Re-encoding to catch them costs more than the parse: check only then
    if (b"\\ud" in raw or b"\\uD" in raw
            or (finite and _MAY_OVERFLOW.search(raw) is not None)):
        canonical_json(data)  # they would otherwise fail only later, on the way out
    return data


_UNCHECKED = json.JSONDecoder(parse_constant=_no_constant)


def parse_unchecked(text: str) -> Any:
    """Parse JSON text refusing NaN/Infinity, but NOT duplicate keys or lone surrogates: only
    for a caller that then proves the text canonical (module docstring).

    Raises:
        JSONError: not JSON, NaN/Infinity, an int over the digit limit, or nested too deeply.
    """
    try:
        return _UNCHECKED.decode(text)
    except (ValueError, RecursionError) as exc:
        raise JSONError("strict JSON", f"{type(exc).__name__}: {exc}") from exc


def nesting_depth(value: object, limit: int) -> int:
    """How many objects and arrays nest in ``value``: 0 for a scalar, 1 for ``{}`` or
    ``[1]``, 2 for ``{"a": []}``; mappings and tuples count as objects and arrays. Counts as
    :func:`copy_json`'s ``max_depth`` does, and stops looking past ``limit``: a deeper value
    answers ``limit + 1``.

    Raises:
        ValueError: ``limit`` < 0.
    """
    if limit < 0:
        raise ValueError(f"nesting_depth: expected limit >= 0, got {limit}")
    if not isinstance(value, _CONTAINERS):
        return 0
    deepest = 1
    stack: list[tuple[Any, int]] = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        node, depth = pop()
        if depth > limit:
            return limit + 1
        deepest = max(deepest, depth)
        for item in (node.values() if isinstance(node, Mapping) else node):
            if type(item) not in _SCALARS and isinstance(item, _CONTAINERS):
                push((item, depth + 1))
    return deepest


_SCALARS = frozenset({str, int, float, bool, type(None)})
_CONTAINERS = (Mapping, list, tuple)


def copy_json(value: object, *, max_depth: int = MAX_COPY_DEPTH) -> Any:
    """A deep copy of JSON data: mappings become dicts, lists and tuples become lists.

    Raises:
        JSONError: a value is not JSON (a non-string key, NaN/Infinity, another type), or
            objects and arrays nest deeper than ``max_depth``; ``where`` says where.
    """
    return _copy(value, "", max_depth, max_depth)


def _copy(value: object, where: str, depth: int, max_depth: int) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)  # an IntEnum or other subclass becomes the plain number it writes
    if isinstance(value, float):
        if not math.isfinite(value):
            raise JSONError("a finite number (JSON has no NaN/Infinity)", repr(value), where)
        return float(value)
    if depth <= 0:
        raise JSONError(f"at most {max_depth} levels of nesting", "deeper nesting", where)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise JSONError("string keys", repr(key), where)
            out[key] = _copy(item, f"{where}.{key}", depth - 1, max_depth)
        return out
    if isinstance(value, (list, tuple)):
        return [_copy(item, f"{where}[{i}]", depth - 1, max_depth) for i, item in enumerate(value)]
    raise JSONError("JSON data (object, array, string, number, boolean or null)",
                    type(value).__name__, where)
