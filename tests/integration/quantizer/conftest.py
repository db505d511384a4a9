from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.quantizer.dora import chat_records, train_dora, write_jsonl


@dataclass(frozen=True)
class TinyDora:
    base_dir: Path
    adapter_dir: Path
    validation: Path


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import os

    path = tmp_path_factory.mktemp("models")
    os.environ["TUNELOOP_MODELS_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_dora(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyDora:
    from shared.basemodels import resolve_base_model

    base = Path(resolve_base_model("tiny"))
    root = tmp_path_factory.mktemp("dora")
    adapter = train_dora(base, root / "adapter", steps=12)
    validation = write_jsonl(root / "validation.jsonl", chat_records(24, seed=7))
    return TinyDora(base_dir=base, adapter_dir=adapter, validation=validation)
