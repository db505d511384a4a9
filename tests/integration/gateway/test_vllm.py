"""The gateway in front of a REAL vLLM engine (CPU build) serving the tiny test model, driven
by the official ``openai`` client: non-streaming, streaming, the engine's own context check
passed through, capture of the answer. Skipped when ``.venvs/vllm`` is not set up."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from sqlmodel import select

from shared.db import Database
from shared.embedded import free_port, wait_for_port
from shared.interactions import Interaction
from shared.testmodels import build_tiny_model
from tests.integration.gateway.conftest import MODEL, base_url, new_key
from tests.integration.streams import eventually

ROOT = Path(__file__).resolve().parents[3]
VLLM_PYTHON = ROOT / ".venvs" / "vllm" / "bin" / "python"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no .venvs/vllm (scripts/setup-vllm.sh)"),
]


@pytest.fixture
def vllm_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model_dir = build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-model")
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                str(VLLM_PYTHON),
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(model_dir),
                "--served-model-name",
                "tiny-engine-name",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--enforce-eager",
                "--dtype",
                "float32",
                "--max-model-len",
                "512",
                "--max-num-seqs",
                "16",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={
                **os.environ,
                "VLLM_CPU_KVCACHE_SPACE": "1",
                "VLLM_NO_USAGE_STATS": "1",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
            },
        )
    try:
        try:
            wait_for_port(port, timeout_s=600, proc=proc, what="vLLM")
        except (RuntimeError, TimeoutError) as exc:
            text = log_path.read_text()
            errors = "\n".join(ln for ln in text.splitlines() if "Error" in ln)[-4000:]
            raise AssertionError(f"{exc}\n{errors}\n{text[-2000:]}") from exc
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def test_openai_client_through_gateway_to_real_vllm(
    vllm_engine, gateways, pipeline, tmp_path: Path
):
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'gw.db'}"
    async with gateways(db_url, upstream_timeout_s=120.0, stream_idle_timeout_s=120.0) as gw:
        # vLLM answers /v1/models only once the engine is up.
        async with httpx.AsyncClient(timeout=5) as http:
            await eventually(
                lambda: _ok(http, vllm_engine + "/v1/models"), timeout_s=300, what="vLLM ready"
            )
        await pipeline.deployed("tiny-base", vllm_engine, "baseline")
        await eventually(lambda: MODEL in gw.state.routes, what="route")
        upstream = gw.state.routes[MODEL].stable
        assert upstream is not None
        # The engine serves another name and a 512-token context: learned from /v1/models.
        assert upstream.upstream_model == "tiny-engine-name"
        assert upstream.max_context_tokens == 512
        key = await new_key(gw)
        url = base_url(gw) + "/v1"

        def sync_calls() -> tuple[object, list[str], int]:
            client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=[{"role": "user", "content": "remind me at 5pm"}],
                max_tokens=8,
                temperature=0,
            )
            pieces = [
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "hello"}],
                    max_tokens=8,
                    temperature=0,
                    stream=True,
                )
                if c.choices
            ]
            # Within the gateway's lower bound but beyond the engine's exact count: the
            # engine's own 400 comes back unchanged.
            try:
                client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": "a b " * 600}],
                    max_tokens=8,
                )
            except openai.BadRequestError as exc:
                status = exc.status_code
            else:
                status = 200
            return raw, pieces, status

        raw, pieces, status = await asyncio.to_thread(sync_calls)
        answer = raw.parse()  # type: ignore[attr-defined]
        assert raw.headers["x-tuneloop-deployment"] == "tiny-base"  # type: ignore[attr-defined]
        assert answer.model == "tiny-engine-name"
        assert answer.usage.completion_tokens >= 1
        assert len([p for p in pieces if p]) >= 2  # passed through token by token
        assert status == 400
        # Capture is asynchronous by design (a request never waits for it): the streamed
        # answer is recorded a moment after its last chunk reached the client.
        await eventually(lambda: _count_is(db_url, 2), timeout_s=30, what="both captured")

    rows = await _rows(db_url)
    assert {r.deployment_id for r in rows} == {"tiny-base"} and len(rows) == 2
    assert all(r.completion_tokens and r.completion_tokens >= 1 for r in rows)


async def _ok(http: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await http.get(url)).status_code == 200
    except httpx.HTTPError:
        return False


async def _count_is(db_url: str, n: int) -> bool:
    return len(await _rows(db_url)) == n


async def _rows(db_url: str) -> list[Interaction]:
    db = Database(db_url)
    try:
        async with db.session() as session:
            return list((await session.exec(select(Interaction))).all())
    finally:
        await db.dispose()
