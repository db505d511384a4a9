"""Engines: how a model becomes an OpenAI-compatible endpoint.

- :mod:`.local`: vLLM (or llama.cpp for GGUF) as a child process on a free port;
- :mod:`.k8s`: a Deployment + Service per model, rendered with the kubernetes client's models;
- :mod:`.client`: readiness checks and LoRA hot-loading over HTTP (the service never imports
  vllm: the engine lives in its own environment);
- :mod:`.profiles`: named engine settings (the seeds' deployment modes).
"""

from services.inference.engines.base import (
    EngineBackend,
    EngineHandle,
    EngineSpec,
    EngineStartError,
)

__all__ = ["EngineBackend", "EngineHandle", "EngineSpec", "EngineStartError"]
