from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: real training runs (seconds to a minute each)")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base model, built once per test run; child processes find it via the env."""
    from shared.testmodels import build_tiny_model

    root = tmp_path_factory.mktemp("models")
    os.environ["TUNELOOP_MODELS_DIR"] = str(root)
    build_tiny_model(root / "tiny")
    return root


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return (tmp_path / "store").as_uri()
