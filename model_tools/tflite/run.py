"""Run a ``.tflite`` in this process with ai-edge-litert, the agent's own TFLite runtime (adapter).

Validation must measure what the device will run, so candidates run here through
``ai_edge_litert.interpreter.Interpreter`` and its signature runner, named as the device's
adapter names them: by the ``serving_default`` signature's input and output names.
:class:`TFLiteSession` looks like the slice of an onnxruntime session that
:mod:`model_tools.evaluate` uses (``get_outputs()``, ``run(names, feed)``), and speaks the
source model's ONNX names, so the same comparison and timing code serves both runtimes.

:func:`read_metadata` reads the model's metadata table (``min_runtime_version`` is written there
by TFLiteConverter) with the flatbuffer schema ai-edge-litert ships; no TensorFlow.

ai-edge-litert is imported on first use (``importlib``: it ships no type information), never
when this module is. Its exceptions (``ValueError``/``RuntimeError`` from its C++ wrapper) become
:class:`ConversionError` here.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.protocol.manifest import TensorSpec
from model_tools.errors import ConversionError

__all__ = ["SIGNATURE_KEY", "TFLiteSession", "read_metadata"]

SIGNATURE_KEY = "serving_default"


@dataclass(frozen=True)
class _Output:
    """What ``session.get_outputs()`` yields: something with a ``name``."""

    name: str


def read_metadata(path: Path) -> dict[str, str]:
    """The ``.tflite`` file's metadata table as text (e.g. ``min_runtime_version``).

    Raises:
        ConversionError: the file is not a TFLite flatbuffer.
    """
    schema = importlib.import_module("ai_edge_litert.schema_py_generated")
    data = Path(path).read_bytes()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ConversionError(f"{Path(path).name} is not a TFLite model: expected the "
                              f"'TFL3' identifier at byte 4, got {data[4:8]!r}")
    try:
        model = schema.Model.GetRootAs(data, 0)
        out: dict[str, str] = {}
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            name = entry.Name()
            buf = model.Buffers(entry.Buffer())
            if name is None or buf is None or buf.DataLength() == 0:
                continue
            raw = bytes(buf.DataAsNumpy()).split(b"\0", 1)[0]
            out[name.decode("utf-8", "replace")] = raw.decode("utf-8", "replace")
    except Exception as exc:  # seam: a broken flatbuffer raises IndexError/struct.error/...
        raise ConversionError(f"{Path(path).name}: unreadable TFLite metadata: {exc}") from exc
    return out


class TFLiteSession:
    """A ``.tflite`` behind the session interface :mod:`model_tools.evaluate` uses.

    Args:
        path: the ``.tflite`` file.
        threads: the interpreter's thread count (the profile's, capped by this host).
        inputs: the source model's inputs; ``input_names`` maps their ONNX names to the
            signature's (identity when absent).
        outputs: the source model's outputs the ``.tflite`` must produce, under those names.

    Raises:
        ConversionError: ai-edge-litert cannot load the file, it has no ``serving_default``
            signature, or the signature's names, dtypes or ranks differ from the source's.
    """

    def __init__(self, path: Path, threads: int, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec],
                 input_names: Mapping[str, str] | None = None) -> None:
        interpreter = importlib.import_module("ai_edge_litert.interpreter").Interpreter
        self.path = Path(path)
        self._in = {s.name: (input_names or {}).get(s.name, s.name) for s in inputs}
        self._outputs = [s.name for s in outputs]
        try:
            interp = interpreter(model_path=str(path), num_threads=threads)
            signatures = interp.get_signature_list()
            if SIGNATURE_KEY not in signatures:
                raise ConversionError(f"{self.path.name} has no {SIGNATURE_KEY!r} signature "
                                      f"(it has {sorted(signatures)})")
            self._runner = interp.get_signature_runner(SIGNATURE_KEY)
            in_details = self._runner.get_input_details()
            out_details = self._runner.get_output_details()
        except ConversionError:
            raise
        except Exception as exc:  # seam: ai-edge-litert raises ValueError/RuntimeError
            raise ConversionError(f"ai-edge-litert cannot load {self.path.name}: {exc}") from exc
        self.input_details: dict[str, Any] = in_details
        self.output_details: dict[str, Any] = out_details
        self._check(inputs, in_details, "input", self._in)
        self._check(outputs, out_details, "output", {s.name: s.name for s in outputs})

    def _check(self, specs: Sequence[TensorSpec], details: Mapping[str, Any], kind: str,
               names: Mapping[str, str]) -> None:
        want = sorted(names[s.name] for s in specs)
        if sorted(details) != want:
            raise ConversionError(f"{self.path.name}: signature {kind}s are {sorted(details)}, "
                                  f"expected {want} (the source model's)")
        for spec in specs:
            d = details[names[spec.name]]
            dtype = np.dtype(d["dtype"]).name
            shape = [None if int(x) < 0 else int(x) for x in d["shape_signature"]]
            if dtype != spec.dtype or not _fits(spec.static_shape, shape):
                raise ConversionError(
                    f"{self.path.name}: {kind} {names[spec.name]!r} is {dtype}{shape}, "
                    f"expected {spec.dtype}{spec.shape_str()} (the source model's)")

    def get_outputs(self) -> list[_Output]:
        return [_Output(n) for n in self._outputs]

    def run(self, names: Sequence[str] | None, feed: Mapping[str, np.ndarray]
            ) -> list[np.ndarray]:
        """Outputs ``names`` (all when None) for one batch ``feed`` keyed by ONNX names.

        Raises:
            ConversionError: ai-edge-litert failed on the data.
        """
        try:
            got = self._runner(**{self._in[k]: np.ascontiguousarray(v)
                                  for k, v in feed.items()})
        except Exception as exc:  # seam
            raise ConversionError(f"ai-edge-litert failed running {self.path.name}: "
                                  f"{exc}") from exc
        return [got[n] for n in (names or self._outputs)]


def _fits(want: tuple[int | None, ...], got: list[int | None]) -> bool:
    return len(want) == len(got) and all(
        w is None or g is None or w == g for w, g in zip(want, got, strict=True))
