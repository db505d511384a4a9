"""The bf16-merged artifact is what vLLM's CPU build serves: prove it loads and answers."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from services.quantizer.quantization.merge import merge_adapter
from shared.embedded import free_port

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[3]
VLLM_PYTHON = ROOT / ".venvs" / "vllm" / "bin" / "python"


@pytest.mark.skipif(
    not VLLM_PYTHON.exists(), reason="vLLM env not installed (scripts/setup-vllm.sh)"
)
@pytest.mark.timeout(420)
def test_vllm_cpu_serves_the_merged_dora_model(tiny_dora, tmp_path):
    merged = merge_adapter(str(tiny_dora.base_dir), tiny_dora.adapter_dir, tmp_path / "merged")
    port = free_port()
    log = (tmp_path / "vllm.log").open("wb")
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(
        [
            str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(merged), "--served-model-name", "tuneloop",
            "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4",
            "--enforce-eager",
        ],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 360
        while True:
            assert proc.poll() is None, (tmp_path / "vllm.log").read_text()[-4000:]
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "vLLM did not start"
            time.sleep(1)
        reply = httpx.post(
            f"{url}/v1/chat/completions",
            json={
                "model": "tuneloop",
                "messages": [{"role": "user", "content": "pay rent by noon"}],
                "max_tokens": 8,
                "temperature": 0,
            },
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["usage"]["completion_tokens"] >= 1
        assert isinstance(body["choices"][0]["message"]["content"], str)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
