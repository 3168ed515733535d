"""Shared fixtures: real trained example models (trained once per test session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_tools.examples import ExampleModel, train_digits_cnn, train_digits_mlp


@pytest.fixture(scope="session")
def digits_mlp(tmp_path_factory: pytest.TempPathFactory) -> ExampleModel:
    """scikit-learn MLP on the bundled digits, exported with skl2onnx."""
    return train_digits_mlp(tmp_path_factory.mktemp("digits-mlp"))


@pytest.fixture(scope="session")
def digits_cnn(tmp_path_factory: pytest.TempPathFactory) -> ExampleModel:
    """Small PyTorch CNN on the bundled digits, exported with torch.onnx (one file)."""
    return train_digits_cnn(tmp_path_factory.mktemp("digits-cnn"))


@pytest.fixture
def profiles_dir(tmp_path: Path) -> Path:
    d = tmp_path / "profiles"
    d.mkdir()
    return d
