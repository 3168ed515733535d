"""model_tools errors: one root, split by who is at fault.

::

    ModelToolsError                  root: the CLI maps it to exit code 1
    ├── InputError                   the user's input is wrong (fix the input, re-run)
    │   ├── ModelLoadError           not ONNX, truncated, invalid graph, external data missing
    │   ├── DataError                calibration/eval .npz: missing input, dtype, shape, empty
    │   ├── ProfileNotFound          unknown profile name (lists the valid ones)
    │   └── OutputDirError           output directory not empty (use --force)
    ├── ConversionError              a quantizer/converter step failed on a valid model
    ├── ConverterEnvError            the isolated TFLite converter environment is missing,
    │                                stale or broken (the message gives the command to fix it)
    ├── ValidationRejected           the artifact breaks the profile (exit code 3); the
    │                                report is still written next to the refused bundle
    └── BundleError                  a bundle on disk is not what its manifest says

Third-party exceptions (onnx, onnxruntime, ai-edge-litert, numpy, and the pip and converter
subprocesses) are translated inside the adapter that calls them, with ``raise ... from exc``,
and never cross this package's boundary.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BundleError",
    "ConversionError",
    "ConverterEnvError",
    "DataError",
    "InputError",
    "ModelLoadError",
    "ModelToolsError",
    "OutputDirError",
    "ProfileNotFound",
    "ValidationRejected",
]


class ModelToolsError(Exception):
    """Root of every error model_tools raises on purpose."""

    exit_code = 1


class InputError(ModelToolsError):
    """The user's input is wrong."""


class ModelLoadError(InputError):
    """The model file cannot be used: not ONNX, truncated, invalid graph."""


class DataError(InputError):
    """A calibration/eval data file does not fit the model's inputs."""


class ProfileNotFound(InputError):
    """No device profile of that name."""


class OutputDirError(InputError):
    """The output directory cannot be written as asked."""


class ConversionError(ModelToolsError):
    """A conversion or quantization step failed on a valid model."""


class ConverterEnvError(ModelToolsError):
    """The TFLite converter environment cannot be used; the message says how to (re)create it."""


class ValidationRejected(ModelToolsError):
    """The artifact is outside the profile's tolerances or size budget."""

    exit_code = 3

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


class BundleError(ModelToolsError):
    """A bundle on disk does not match its manifest, or is not a bundle."""
