"""Real, trained example models on scikit-learn's bundled 8x8 ``load_digits`` data set.

The converter's tests, the demo and the benchmarks need models that are small enough to train
in seconds on two CPU cores, yet real enough that quantization and drift behave as they would
on a production model. This module trains two of them and writes, for each, three files:

``<name>.onnx``
    One self-contained ONNX file (no external data), opset <= :data:`ONNX_OPSET`.
``<name>.calibration.npz``
    About 200 training samples: one float32 array per model input name, plus ``labels``
    (int64). This is what a quantizer calibrates on.
``<name>.eval.npz``
    The held-out ~30 % split in the same layout. Nothing in it was seen during training.

``digits-mlp``
    scikit-learn ``MLPClassifier`` converted by skl2onnx. Input ``input`` float32 ``[N, 64]``;
    outputs ``label`` int64 ``[N]`` and ``probabilities`` float32 ``[N, 10]`` (no ZipMap).
``digits-cnn``
    A small PyTorch CNN exported by the dynamo exporter. Input ``image`` float32
    ``[N, 1, 8, 8]`` (``N`` dynamic); output ``probabilities`` float32 ``[N, 10]`` (softmax is
    inside the graph). The fully connected layer holds ~87 % of the weights, so int8
    quantization shrinks the file about 4x.

Nothing is downloaded. Heavy libraries (scikit-learn, skl2onnx, torch, onnx) are imported inside
the functions that need them, so importing this module costs only numpy.

Pixel values are scaled from ``0..16`` to ``[0, 1]``. :func:`shifted` makes drifted copies of
such inputs for drift tests.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from model_tools.errors import ConversionError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ONNX_OPSET",
    "SHIFT_KINDS",
    "ExampleModel",
    "digits_split",
    "fit_digits_cnn",
    "fit_digits_mlp",
    "shifted",
    "train_digits_cnn",
    "train_digits_mlp",
]

ONNX_OPSET: Final[int] = 17
"""Highest default-domain opset of the example models.

The CNN is stamped exactly 17. skl2onnx stamps the lowest opset <= 17 that covers the
graph's ops, which is 16 for the MLP (plus ``ai.onnx.ml`` 1).
"""

SHIFT_KINDS: Final = ("scale", "offset", "dead", "noise")
"""The drift kinds :func:`shifted` knows."""

LABELS_KEY: Final = "labels"
"""Name of the int64 label array in the calibration and eval ``.npz`` files."""

_EVAL_FRACTION: Final = 0.3
_CALIBRATION_SIZE: Final = 200
_N_FEATURES: Final = 64
_IMAGE_SIDE: Final = 8
_N_CLASSES: Final = 10
_MAX_PIXEL: Final = 16.0

_SCALE_FACTOR: Final = 1.8
_OFFSET: Final = 0.5
_NOISE_SIGMA: Final = 0.25
_DEAD_BLOCK: Final = (slice(2, 6), slice(2, 6))  # the central 4x4 pixels of an 8x8 digit

_CNN_BATCH_SIZE: Final = 64
_CNN_LEARNING_RATE: Final = 1e-3
# One torch thread: the model is tiny, so a second thread gains ~10 % on an idle 2-core box but
# is 2-3x slower when other processes share the cores (OpenMP spin-waits), and one thread makes
# the float reductions, hence the trained weights, bitwise reproducible.
_TORCH_THREADS: Final = 1
_MLP_MAX_ITER: Final = 300
_EXPORTER_OPSET: Final[int] = 18  # torch 2.13's lowest native opset


@dataclass(frozen=True)
class ExampleModel:
    """A trained example model and its data files, as written by ``train_digits_*``.

    Attributes:
        name: Model name, also the file stem: ``"digits-mlp"`` or ``"digits-cnn"``.
        onnx_path: A single self-contained ``.onnx`` file (no external data).
        calibration_path: ``.npz`` with one float32 array per model input name and
            ``labels`` (int64); about 200 samples from the training part.
        eval_path: ``.npz`` of the held-out split, same layout as ``calibration_path``.
        input_name: Name of the model's only input.
        source_accuracy: Accuracy of the framework model (scikit-learn or torch) on the eval
            split, in ``[0, 1]``.
        train_seconds: Wall-clock seconds spent fitting the framework model (not exporting).
    """

    name: str
    onnx_path: Path
    calibration_path: Path
    eval_path: Path
    input_name: str
    source_accuracy: float
    train_seconds: float = 0.0


def digits_split(
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split ``load_digits`` into training, calibration and eval parts.

    The eval part is a stratified, held-out 30 % of the 1797 digits (540 samples). The
    training part is the other 1257. The calibration part is a stratified sample of 200 drawn
    *from the training part* (it is a subset of ``X_train``, not removed from it), as a real
    calibration set would be. The same seed always gives the same split.

    Args:
        seed: Seed of both stratified shuffles; must be >= 0.

    Returns:
        ``(X_train, y_train, X_cal, y_cal, X_eval, y_eval)``. Every ``X`` is float32 of shape
        ``[N, 64]`` with pixels scaled to ``[0, 1]``; every ``y`` is int64 of shape ``[N]``
        with values ``0..9``.

    Raises:
        ValueError: If ``seed`` is negative.
    """
    _check_seed(seed)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (np.asarray(digits.data, dtype=np.float64) / _MAX_PIXEL).astype(np.float32)
    y = np.asarray(digits.target, dtype=np.int64)
    x_train, x_eval, y_train, y_eval = train_test_split(
        x, y, test_size=_EVAL_FRACTION, stratify=y, random_state=seed
    )
    _, x_cal, _, y_cal = train_test_split(
        x_train, y_train, test_size=_CALIBRATION_SIZE, stratify=y_train, random_state=seed
    )
    parts = (x_train, y_train, x_cal, y_cal, x_eval, y_eval)
    return tuple(np.ascontiguousarray(p) for p in parts)  # type: ignore[return-value]


def train_digits_mlp(
    out_dir: Path, *, seed: int = 0, hidden: tuple[int, ...] = (256, 128)
) -> ExampleModel:
    """Train a scikit-learn MLP on the digits and write it as ONNX with its data files.

    Writes ``digits-mlp.onnx``, ``digits-mlp.calibration.npz`` and ``digits-mlp.eval.npz``
    into ``out_dir`` (created if missing), each atomically, replacing older ones.

    The ONNX graph has input ``input`` float32 ``[N, 64]`` and outputs ``label`` int64
    ``[N]`` and ``probabilities`` float32 ``[N, 10]`` (``zipmap`` disabled). Opsets: 16 for
    the default domain (skl2onnx's choice under the :data:`ONNX_OPSET` cap), 1 for
    ``ai.onnx.ml`` (the label output goes through ``ArrayFeatureExtractor``).

    Args:
        out_dir: Directory to write the three files into.
        seed: Seed of the data split and of the MLP's weight init and shuffling; >= 0.
        hidden: Sizes of the hidden layers; at least one, each >= 1.

    Returns:
        The written model; ``source_accuracy`` is the MLP's accuracy on the eval split.

    Raises:
        ValueError: If ``seed`` is negative or ``hidden`` is empty or has a size < 1.
        ConversionError: If skl2onnx cannot convert the trained model or the result is not a
            valid ONNX model.
        OSError: If ``out_dir`` cannot be created or written.
    """
    _check_seed(seed)
    _check_hidden(hidden)
    name, input_name = "digits-mlp", "input"
    x_train, y_train, x_cal, y_cal, x_eval, y_eval = digits_split(seed)

    started = time.perf_counter()
    clf = fit_digits_mlp(x_train, y_train, seed=seed, hidden=hidden)
    train_seconds = time.perf_counter() - started
    accuracy = float(np.mean(clf.predict(x_eval) == y_eval))

    model_bytes = _sklearn_to_onnx_bytes(clf, input_name)
    return _write_example(
        out_dir,
        name=name,
        input_name=input_name,
        model_bytes=model_bytes,
        calibration=(x_cal, y_cal),
        evaluation=(x_eval, y_eval),
        source_accuracy=accuracy,
        train_seconds=train_seconds,
    )


def train_digits_cnn(out_dir: Path, *, seed: int = 0, epochs: int = 10) -> ExampleModel:
    """Train a small PyTorch CNN on the 8x8 digits and write it as ONNX with its data files.

    Architecture: ``Conv(1->32, 3x3, pad 1) + ReLU``, ``Conv(32->64, 3x3, pad 1) + ReLU``,
    ``MaxPool(2)``, ``Linear(1024->128) + ReLU``, ``Linear(128->10)``, ``Softmax`` (151k
    parameters, ~0.6 MB of float32 weights). Trained with Adam (lr 1e-3, batch 64) for
    ``epochs`` epochs on one torch thread: about 1.5 s for ten epochs on an idle core, plus
    about 2 s the first time for torch's lazy import of ``torch._dynamo``.

    Writes ``digits-cnn.onnx``, ``digits-cnn.calibration.npz`` and ``digits-cnn.eval.npz``
    into ``out_dir`` (created if missing), each atomically, replacing older ones. The ONNX
    graph (default-domain opset :data:`ONNX_OPSET`) has input ``image`` float32
    ``[batch, 1, 8, 8]`` with a dynamic ``batch`` dimension and output ``probabilities``
    float32 ``[batch, 10]``. The data files hold ``image`` arrays of shape ``[N, 1, 8, 8]``.

    Args:
        out_dir: Directory to write the three files into.
        seed: Seed of the data split, the weight init and the batch order; >= 0.
        epochs: Number of passes over the training part; >= 1.

    Returns:
        The written model; ``source_accuracy`` is the torch model's accuracy on the eval
        split.

    Raises:
        ValueError: If ``seed`` is negative or ``epochs`` is < 1.
        ConversionError: If the torch exporter fails or its result is not a valid,
            self-contained ONNX model.
        OSError: If ``out_dir`` cannot be created or written.
    """
    _check_seed(seed)
    _check_epochs(epochs)
    import torch

    name, input_name = "digits-cnn", "image"
    x_train, y_train, x_cal, y_cal, x_eval, y_eval = digits_split(seed)
    x_train, x_cal, x_eval = (_as_images(x) for x in (x_train, x_cal, x_eval))

    started = time.perf_counter()
    model = fit_digits_cnn(x_train, y_train, seed=seed, epochs=epochs)
    train_seconds = time.perf_counter() - started
    with _torch_threads(_TORCH_THREADS), torch.no_grad():
        probabilities = model(torch.from_numpy(x_eval)).numpy()
        accuracy = float(np.mean(probabilities.argmax(axis=1) == y_eval))
        model_bytes = _torch_to_onnx_bytes(model, x_eval[:2], input_name)

    return _write_example(
        out_dir,
        name=name,
        input_name=input_name,
        model_bytes=model_bytes,
        calibration=(x_cal, y_cal),
        evaluation=(x_eval, y_eval),
        source_accuracy=accuracy,
        train_seconds=train_seconds,
    )


def fit_digits_mlp(
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    seed: int = 0,
    hidden: tuple[int, ...] = (256, 128),
) -> Any:
    """Fit the scikit-learn MLP that :func:`train_digits_mlp` converts; nothing is written.

    Deterministic: the same data, seed and ``hidden`` give the same model (BLAS runs on one
    thread while fitting). Useful to compare the framework model against its ONNX export.
    About 1.3 s for the default layers on an idle core.

    Args:
        x_train: float32 ``[N, 64]`` pixels in ``[0, 1]`` (from :func:`digits_split`).
        y_train: int64 ``[N]`` labels.
        seed: Seed of the weight init and shuffling; >= 0.
        hidden: Sizes of the hidden layers; at least one, each >= 1.

    Returns:
        The fitted ``sklearn.neural_network.MLPClassifier``.

    Raises:
        ValueError: If ``seed`` is negative or ``hidden`` is empty or has a size < 1, or if
            scikit-learn rejects the data.
    """
    _check_seed(seed)
    _check_hidden(hidden)
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    clf = MLPClassifier(hidden_layer_sizes=hidden, max_iter=_MLP_MAX_ITER, random_state=seed)
    # One BLAS thread, for the same reasons as _TORCH_THREADS: faster on these small matrices
    # and float sums that do not depend on the machine's core count.
    with threadpool_limits(limits=1), warnings.catch_warnings():
        # Stopping a few epochs short changes nothing for an example; tests check accuracy.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train, y_train)
    return clf


def fit_digits_cnn(
    x_train: np.ndarray, y_train: np.ndarray, *, seed: int = 0, epochs: int = 10
) -> torch.nn.Module:
    """Train the PyTorch CNN that :func:`train_digits_cnn` exports; nothing is written.

    Deterministic on CPU: the same data, seed and epochs give the same weights. Runs on one
    torch thread and restores the previous thread count; torch's global RNG state is left
    as it was (training runs under ``torch.random.fork_rng``).

    Args:
        x_train: float32 ``[N, 1, 8, 8]`` or ``[N, 64]`` pixels in ``[0, 1]``.
        y_train: int64 ``[N]`` labels.
        seed: Seed of the weight init and the batch order; >= 0.
        epochs: Number of passes over ``x_train``; >= 1.

    Returns:
        The trained model in eval mode; it maps ``[N, 1, 8, 8]`` float32 images to
        ``[N, 10]`` probabilities (the softmax is its last layer).

    Raises:
        ValueError: If ``seed`` is negative, ``epochs`` is < 1, or ``x_train`` does not hold 64
            values per sample.
    """
    _check_seed(seed)
    _check_epochs(epochs)
    import torch

    if x_train.size != len(x_train) * _N_FEATURES:
        raise ValueError(
            f"CNN training input must hold {_N_FEATURES} values per sample, "
            f"got shape {x_train.shape}"
        )
    images = _as_images(x_train)
    labels = np.ascontiguousarray(y_train, dtype=np.int64)
    with _torch_threads(_TORCH_THREADS), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_cnn()
        _fit_cnn(model, images, labels, seed=seed, epochs=epochs)
    model.eval()
    return model


def shifted(x: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """Return a drifted copy of digit inputs, for drift-detection tests.

    ``x`` holds samples along axis 0 in either layout of this module (``[N, 64]`` or
    ``[N, 1, 8, 8]``), pixels in ``[0, 1]``. The result has the same shape and dtype; ``x`` is
    not modified. No kind clips its output, so drift shows in the range too.

    ``"scale"``
        Every value times 1.8 (contrast/gain drift).
    ``"offset"``
        Every value plus 0.5 (brightness/bias drift).
    ``"dead"``
        The central 4x4 pixels of each 8x8 digit set to 0 (a dead sensor region); needs 64
        values per sample.
    ``"noise"``
        Gaussian noise with sigma 0.25 added to every value, from ``numpy.random.default_rng
        (seed)``. The only kind that uses ``seed``.

    Args:
        x: Float input array, samples along axis 0.
        kind: One of :data:`SHIFT_KINDS`.
        seed: Seed of the ``"noise"`` kind.

    Returns:
        A new array, same shape and dtype as ``x``.

    Raises:
        ValueError: If ``kind`` is not one of :data:`SHIFT_KINDS`, if ``x`` is not a floating
            array with at least one dimension, or if ``kind`` is ``"dead"`` and a sample does
            not hold exactly 64 values.
    """
    if kind not in SHIFT_KINDS:
        raise ValueError(f"shift kind must be one of {', '.join(SHIFT_KINDS)}; got {kind!r}")
    x = np.asarray(x)
    if x.ndim < 1 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"shift input must be a floating array with a sample axis, "
            f"got dtype {x.dtype} with shape {x.shape}"
        )
    if kind == "scale":
        return (x * _SCALE_FACTOR).astype(x.dtype, copy=False)
    if kind == "offset":
        return (x + _OFFSET).astype(x.dtype, copy=False)
    if kind == "noise":
        noise = np.random.default_rng(seed).normal(0.0, _NOISE_SIGMA, size=x.shape)
        return (x + noise).astype(x.dtype, copy=False)
    per_sample = int(np.prod(x.shape[1:], dtype=np.int64))
    if per_sample != _N_FEATURES:
        raise ValueError(
            f"'dead' shift needs {_N_FEATURES} values (an 8x8 digit) per sample, "
            f"got {per_sample} (shape {x.shape})"
        )
    out = x.copy()
    grid = out.reshape(x.shape[0], _IMAGE_SIDE, _IMAGE_SIDE)
    grid[(slice(None), *_DEAD_BLOCK)] = 0
    return out


# --- private helpers ------------------------------------------------------------------------


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def _check_hidden(hidden: tuple[int, ...]) -> None:
    if not hidden or any(size < 1 for size in hidden):
        raise ValueError(f"hidden layer sizes must be one or more ints >= 1, got {hidden!r}")


def _check_epochs(epochs: int) -> None:
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")


def _as_images(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(-1, 1, _IMAGE_SIDE, _IMAGE_SIDE), dtype=np.float32)


def _sklearn_to_onnx_bytes(clf: Any, input_name: str) -> bytes:
    """Convert a fitted classifier to a checked ONNX model, translating converter errors."""
    import onnx
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    try:
        proto = convert_sklearn(
            clf,
            initial_types=[(input_name, FloatTensorType([None, _N_FEATURES]))],
            options={id(clf): {"zipmap": False}},
            target_opset={"": ONNX_OPSET, "ai.onnx.ml": 1},
        )
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # seam: skl2onnx/onnx raise many unrelated types
        raise ConversionError(f"skl2onnx could not convert {type(clf).__name__}: {exc}") from exc
    return bytes(proto.SerializeToString())


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _build_cnn() -> torch.nn.Module:
    """The digits CNN, with the softmax inside so the exported graph outputs probabilities."""
    from torch import nn

    side = _IMAGE_SIDE // 2
    return nn.Sequential(
        nn.Conv2d(1, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * side * side, 128),
        nn.ReLU(),
        nn.Linear(128, _N_CLASSES),
        nn.Softmax(dim=1),
    )


def _fit_cnn(
    model: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, seed: int, epochs: int
) -> None:
    """Minimise cross-entropy; the softmax is the last layer, so train on the log of it."""
    import torch

    body = model[:-1]  # type: ignore[index]  # logits: skip the final Softmax
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=_CNN_LEARNING_RATE)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        permutation = torch.randperm(len(inputs), generator=order)
        for start in range(0, len(inputs), _CNN_BATCH_SIZE):
            batch = permutation[start : start + _CNN_BATCH_SIZE]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(body(inputs[batch]), targets[batch])
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()


def _torch_to_onnx_bytes(model: torch.nn.Module, example: np.ndarray, input_name: str) -> bytes:
    """Export with the dynamo exporter, dynamic batch, opset :data:`ONNX_OPSET`, one file.

    The exporter's lowest native opset is 18; asking it for 17 logs a warning and falls back
    to ``onnx.version_converter`` anyway, so export at 18 and convert explicitly.
    """
    import onnx
    import onnx.version_converter
    import torch

    try:
        with warnings.catch_warnings():
            # torch 2.13's own pytree code trips its LeafSpec FutureWarning; not ours to fix.
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                model,
                (torch.from_numpy(example),),
                f=None,
                dynamo=True,
                external_data=False,
                opset_version=_EXPORTER_OPSET,
                input_names=[input_name],
                output_names=["probabilities"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
        if program is None:
            raise ConversionError("torch.onnx.export returned no program for the digits CNN")
        proto = program.model_proto
        if ONNX_OPSET != _EXPORTER_OPSET:
            proto = onnx.version_converter.convert_version(proto, ONNX_OPSET)
        onnx.checker.check_model(proto, full_check=True)
    except ConversionError:
        raise
    except Exception as exc:  # seam: the exporter raises many unrelated types
        raise ConversionError(f"torch.onnx.export failed on the digits CNN: {exc}") from exc
    external = [
        t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise ConversionError(
            f"expected a self-contained ONNX model, got {len(external)} initializers "
            f"with external data (first: {external[0]!r})"
        )
    return bytes(proto.SerializeToString())


def _write_example(
    out_dir: Path,
    *,
    name: str,
    input_name: str,
    model_bytes: bytes,
    calibration: tuple[np.ndarray, np.ndarray],
    evaluation: tuple[np.ndarray, np.ndarray],
    source_accuracy: float,
    train_seconds: float,
) -> ExampleModel:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / f"{name}.onnx"
    calibration_path = out_dir / f"{name}.calibration.npz"
    eval_path = out_dir / f"{name}.eval.npz"
    for path, (x, y) in ((calibration_path, calibration), (eval_path, evaluation)):
        arrays: dict[str, np.ndarray] = {
            input_name: x.astype(np.float32),
            LABELS_KEY: y.astype(np.int64),
        }
        _atomic_write(path, _npz_bytes(arrays))
    _atomic_write(onnx_path, model_bytes)
    return ExampleModel(
        name=name,
        onnx_path=onnx_path,
        calibration_path=calibration_path,
        eval_path=eval_path,
        input_name=input_name,
        source_accuracy=source_accuracy,
        train_seconds=train_seconds,
    )


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    return buffer.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then ``os.replace`` it."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
