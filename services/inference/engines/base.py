"""The engine port: start, stop, look at an engine, wherever it runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from services.inference.engines.profiles import EngineProfile

EngineKind = Literal["vllm", "llama-cpp"]


class EngineStartError(RuntimeError):
    """The engine could not be started or did not become ready."""


@dataclass(frozen=True)
class EngineSpec:
    deployment_id: str
    kind: EngineKind
    # A checkpoint directory (vLLM) or a .gguf file.
    model_path: str
    # Names the engine answers to; the first is the one announced, the deployment id is an
    # alias (so an engine found after a restart can prove which deployment it serves).
    served_names: tuple[str, ...]
    profile: EngineProfile
    tokenizer: str | None = None
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 64
    port: int | None = None  # preferred (an engine restarted keeps its endpoint)


@dataclass
class EngineHandle:
    deployment_id: str
    endpoint: str  # OpenAI base URL, ending in /v1
    port: int | None = None
    pid: int | None = None
    k8s_name: str | None = None
    log_path: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)


class EngineBackend(Protocol):
    mode: str

    async def start(self, spec: EngineSpec) -> EngineHandle: ...

    async def stop(self, handle: EngineHandle) -> None: ...

    def alive(self, handle: EngineHandle) -> bool: ...

    async def log_tail(self, handle: EngineHandle, max_bytes: int) -> bytes: ...

    async def stop_all(self) -> None: ...
