"""Trained example models (digits MLP and CNN) for the converter's tests, demo and benchmarks.

Importing this package is cheap: scikit-learn, skl2onnx and torch are imported only when a
model is trained. Training needs the ``examples`` extra (and torch for the CNN).
"""

from model_tools.examples.digits import (
    ONNX_OPSET,
    SHIFT_KINDS,
    ExampleModel,
    digits_split,
    fit_digits_cnn,
    fit_digits_mlp,
    shifted,
    train_digits_cnn,
    train_digits_mlp,
)

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
