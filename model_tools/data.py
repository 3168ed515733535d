"""Calibration and evaluation data: ``.npz`` files checked against the model's inputs.

An ``.npz`` holds one array per model input name (batch first) and optionally ``labels``
(integer class ids, one per sample). Every problem is a :class:`DataError` naming the file, the
input, and expected against actual. Synthetic inputs, used when no data is given, are drawn
from the input spec and marked as synthetic by the caller.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.protocol.manifest import TensorSpec
from model_tools.errors import DataError

__all__ = ["LABELS_KEY", "Dataset", "load_npz", "synthetic_dataset"]

LABELS_KEY = "labels"


@dataclass(frozen=True)
class Dataset:
    """Arrays per input name, optional labels, where they came from and their digest."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str  # "calibration" | "eval" | "synthetic"
    sha256: str | None  # of the .npz file; None for synthetic data

    @property
    def samples(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def head(self, n: int) -> dict[str, np.ndarray]:
        return {k: v[:n] for k, v in self.inputs.items()}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def load_npz(path: Path, specs: tuple[TensorSpec, ...], source: str) -> Dataset:
    """Load and check a calibration/eval ``.npz`` against the model's input specs.

    Raises:
        DataError: missing file, not an npz, an input missing, wrong dtype, wrong rank or fixed
            dimension, no samples, mismatched sample counts, non-finite values, bad labels.
    """
    path = Path(path)
    label = f"{source} data {path.name}"
    if not path.is_file():
        raise DataError(f"{label}: file does not exist")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{label}: not an .npz file: expected a zip archive written by "
                        f"numpy.savez (one array per model input), got {_sniff(path)}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{label}: not a readable .npz file ({exc})") from exc
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise DataError(f"{label}: missing array for model input {missing[0]!r}; expected "
                        f"arrays {names} (+ optional {LABELS_KEY!r}), found {sorted(arrays)}")
    extra = sorted(set(arrays) - set(names) - {LABELS_KEY})
    if extra:
        raise DataError(f"{label}: arrays {extra} match no model input; expected "
                        f"{names} (+ optional {LABELS_KEY!r})")
    inputs: dict[str, np.ndarray] = {}
    counts = set()
    for spec in specs:
        arr = arrays[spec.name]
        if str(arr.dtype) != spec.dtype:
            raise DataError(f"{label}: input {spec.name!r} has dtype {arr.dtype}, expected "
                            f"{spec.dtype} (cast it with .astype(np.{spec.dtype}))")
        if not spec.accepts_shape(arr.shape) and not _batch_ok(spec, arr.shape):
            raise DataError(f"{label}: input {spec.name!r} has shape {list(arr.shape)}, "
                            f"expected {spec.shape_str()} (? = any size)")
        if arr.ndim == 0 or arr.shape[0] == 0:
            raise DataError(f"{label}: input {spec.name!r} holds no samples (shape "
                            f"{list(arr.shape)}); expected at least one along the first axis")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise DataError(f"{label}: input {spec.name!r} has {bad} NaN/inf values; "
                            "expected finite numbers")
        inputs[spec.name] = np.ascontiguousarray(arr)
        counts.add(arr.shape[0])
    if len(counts) > 1:
        raise DataError(f"{label}: inputs disagree on the number of samples: "
                        f"{ {k: v.shape[0] for k, v in inputs.items()} }")
    n = counts.pop()
    labels = arrays.get(LABELS_KEY)
    if labels is not None:
        if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
            raise DataError(f"{label}: {LABELS_KEY!r} has dtype {labels.dtype} and shape "
                            f"{list(labels.shape)}, expected integer class ids of shape [{n}]")
        if labels.shape[0] != n:
            raise DataError(f"{label}: {LABELS_KEY!r} has {labels.shape[0]} entries, expected "
                            f"{n} (one per sample)")
        labels = labels.astype(np.int64)
    return Dataset(inputs=inputs, labels=labels, source=source, sha256=_file_sha256(path))


def _sniff(path: Path) -> str:
    """What a non-npz file looks like, for the error message."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(6)
    except OSError as exc:
        return f"an unreadable file ({exc.strerror})"
    if head == b"\x93NUMPY":
        return "a single-array .npy file (save it with numpy.savez(path, INPUT_NAME=array))"
    return "an empty file" if not head else "a file that is not a zip archive (truncated?)"


def _batch_ok(spec: TensorSpec, shape: tuple[int, ...]) -> bool:
    """A model with a fixed batch of 1 still takes a stack of samples (we feed them singly)."""
    want = spec.static_shape
    if len(shape) != len(want) or not want or want[0] != 1:
        return False
    return all(w is None or w == g for w, g in zip(want[1:], shape[1:], strict=True))


def synthetic_dataset(specs: tuple[TensorSpec, ...], samples: int, seed: int = 0) -> Dataset:
    """Random inputs drawn from the specs (dynamic dims become 1, batch becomes ``samples``).

    Floats are uniform in [0, 1), integers in [0, 10). Good enough to compare two versions of
    the same graph, never to measure accuracy: callers record the source as synthetic.

    Raises:
        DataError: a spec has a dtype we cannot synthesise.
    """
    rng = np.random.default_rng(seed)
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        dims = [samples] + [1 if d is None else d for d in spec.static_shape[1:]]
        if spec.dtype.startswith("float"):
            inputs[spec.name] = rng.random(dims, dtype=np.float32).astype(spec.dtype)
        elif spec.dtype in ("int8", "uint8", "int16", "int32", "int64"):
            inputs[spec.name] = rng.integers(0, 10, dims).astype(spec.dtype)
        elif spec.dtype == "bool":
            inputs[spec.name] = rng.random(dims) < 0.5
        else:
            raise DataError(f"cannot synthesise input {spec.name!r} of dtype {spec.dtype}")
    return Dataset(inputs=inputs, labels=None, source="synthetic", sha256=None)
