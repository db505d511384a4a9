"""Evaluator throughput and overhead.

    .venv/bin/python bench/evaluator.py [--items 400] [--no-vllm] [--no-similarity]

1. Against a fast local upstream (a separate process answering a fixed chat completion):
   raw requests/s with a bare aiohttp loop vs benchmark items/s through the evaluator
   (client + retries + scoring + aggregation) at concurrency 1, 8 and 32; the difference per
   item is the evaluator's own overhead.
2. Scorer costs: microseconds per call for each scorer on a typical output.
3. Against a real vLLM serving the tiny model (if .venvs/vllm exists): items/s and tokens/s
   versus concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.evaluator.benchmark import Benchmark, BenchmarkItem, ScorerSpec, parse_benchmark
from services.evaluator.client import OpenAIChatClient, chat_url
from services.evaluator.runner import RunOptions, percentile, run_benchmark
from services.evaluator.scoring import Scoring
from shared.demotask import SCHEMA, benchmark
from shared.embedded import free_port

UPSTREAM = """
import json, sys
from aiohttp import web
body = json.dumps({"choices": [{"message": {"role": "assistant", "content":
    '{"intent": "todo", "task": "fix the printer", "when": "next week"}'},
    "finish_reason": "stop"}], "usage": {"prompt_tokens": 30, "completion_tokens": 20}})
async def chat(request):
    await request.read()
    return web.Response(text=body, content_type="application/json")
app = web.Application()
app.router.add_post("/v1/chat/completions", chat)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def wait_ready(url: str, timeout_s: float, proc: subprocess.Popen[bytes], probe: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}")
        try:
            req = urllib.request.Request(url + probe, method="GET")  # noqa: S310
            with urllib.request.urlopen(req, timeout=2):  # noqa: S310
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} not ready in {timeout_s}s")


@contextlib.contextmanager
def process(argv: list[str], url: str, probe: str, timeout_s: float, **kw: object) -> Iterator[str]:
    proc = subprocess.Popen(argv, start_new_session=True, **kw)  # type: ignore[call-overload]
    try:
        wait_ready(url, timeout_s, proc, probe)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def task_benchmark(n: int) -> Benchmark:
    raw = benchmark(0, 40)
    items = [dict(it, id=f"{it['id']}-{k}") for k in range(n // 40 + 1) for it in raw["items"]]
    raw["items"] = items[:n]
    return parse_benchmark(json.dumps(raw).encode())


async def raw_loop(url: str, n: int, concurrency: int) -> tuple[float, float]:
    """Requests/s and p50 latency (ms) of a bare aiohttp client doing the same requests."""
    body = json.dumps(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 32,
            "temperature": 0,
        }
    )
    latencies: list[float] = []
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def one() -> None:
            async with sem:
                t = time.perf_counter()
                async with s.post(
                    chat_url(url), data=body, headers={"Content-Type": "application/json"}
                ) as r:
                    json.loads(await r.read())
                latencies.append((time.perf_counter() - t) * 1000)

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        wall = time.perf_counter() - start
    return n / wall, percentile(latencies, 50)


async def evaluator_loop(url: str, bench: Benchmark, concurrency: int) -> tuple[float, float]:
    async with OpenAIChatClient(url, "m", pool_size=concurrency) as client:
        result = await run_benchmark(
            bench, client, scoring=Scoring(), options=RunOptions(concurrency=concurrency)
        )
    s = result.summary()
    assert s.errors == 0, [i.error for i in result.items if i.error][:3]
    return s.items / s.wall_s, s.latency.p50_ms


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


async def local_upstream(n_items: int) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bench = task_benchmark(n_items)
    rows = []
    with process([sys.executable, "-c", UPSTREAM, str(port)], url, "/", 30):
        await raw_loop(url, 50, 8)  # warm up
        for c in (1, 8, 32):
            raw_rps, raw_p50 = await raw_loop(url, n_items, c)
            ev_ips, ev_p50 = await evaluator_loop(url, bench, c)
            overhead_us = (1 / ev_ips - 1 / raw_rps) * 1e6
            rows.append(
                [
                    str(c),
                    f"{raw_rps:,.0f}",
                    f"{raw_p50:.2f}",
                    f"{ev_ips:,.0f}",
                    f"{ev_p50:.2f}",
                    f"{overhead_us:,.0f}",
                ]
            )
    table(
        f"fast local upstream, {n_items} demotask items (json_schema scorer)",
        [
            "concurrency",
            "raw req/s",
            "raw p50 ms",
            "eval items/s",
            "eval p50 ms",
            "overhead us/item",
        ],
        rows,
    )


async def scorer_costs(with_similarity: bool) -> None:
    output = 'Sure! {"intent": "todo", "task": "fix the printer", "when": "next week"}'
    cases: list[tuple[str, dict[str, object], object]] = [
        ("exact", {"type": "exact"}, output),
        ("contains_all", {"type": "contains_all", "keywords": ["printer", "week", "todo"]}, None),
        ("contains_any", {"type": "contains_any", "keywords": ["x", "y", "week"]}, None),
        ("regex", {"type": "regex", "pattern": r"\bnext\s+week\b"}, None),
        ("numeric", {"type": "numeric", "tolerance": 0.5}, 3),
        (
            "json_schema",
            {"type": "json_schema", "schema": SCHEMA, "fields": ["intent", "when"]},
            {"intent": "todo", "task": "fix the printer", "when": "next week"},
        ),
    ]
    scoring = Scoring()
    if with_similarity:
        from services.evaluator.scoring.similarity import MiniLMEmbedder

        embedder = MiniLMEmbedder()
        t = time.perf_counter()
        await embedder.warm_up()
        load_s = time.perf_counter() - t
        scoring = Scoring(embedder=embedder)
        cases.append(("similarity", {"type": "similarity"}, "I will add fixing the printer."))
    rows = []
    for name, spec, expected in cases:
        item = BenchmarkItem(id="x", category="c", prompt="p", expected=expected)
        sc = ScorerSpec(**spec)  # type: ignore[arg-type]
        n = 20 if name == "similarity" else 2000
        await scoring.score(sc, item, output)
        t = time.perf_counter()
        for _ in range(n):
            await scoring.score(sc, item, output)
        rows.append([name, f"{(time.perf_counter() - t) / n * 1e6:,.1f}"])
    if with_similarity:
        rows.append(["similarity (model load, once)", f"{load_s * 1e6:,.0f}"])
    table("scorer cost per item", ["scorer", "us/item"], rows)


async def real_engine(n_items: int) -> None:
    vllm_python = ROOT / ".venvs" / "vllm" / "bin" / "python"
    if not vllm_python.exists():
        print("\n(no .venvs/vllm: real-engine table skipped)")
        return
    from shared.testmodels import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    model = build_tiny_model(tmp / "tiny")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    argv = [
        str(vllm_python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        "tuneloop",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--uvicorn-log-level",
        "warning",
    ]
    bench = task_benchmark(n_items)
    rows = []
    with (
        (tmp / "vllm.log").open("wb") as log,
        process(argv, url, "/v1/models", 420, env=env, stdout=log, stderr=subprocess.STDOUT),
    ):
        async with OpenAIChatClient(url, "tuneloop", timeout_s=300, pool_size=32) as client:
            opts = RunOptions(concurrency=4, max_tokens=32)
            await run_benchmark(bench.sample(8, 0), client, scoring=Scoring(), options=opts)
            for c in (1, 4, 8, 16):
                opts = RunOptions(concurrency=c, max_tokens=32)
                result = await run_benchmark(bench, client, scoring=Scoring(), options=opts)
                s = result.summary()
                rows.append(
                    [
                        str(c),
                        f"{s.items / s.wall_s:.1f}",
                        f"{s.tokens_per_second:.0f}",
                        f"{s.latency.p50_ms:.0f}",
                        f"{s.latency.p95_ms:.0f}",
                        str(s.errors),
                    ]
                )
    table(
        f"real vLLM (CPU), tiny model, {n_items} items, max_tokens 32",
        ["concurrency", "items/s", "tokens/s", "p50 ms", "p95 ms", "errors"],
        rows,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description="evaluator benchmark")
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--engine-items", type=int, default=48)
    parser.add_argument("--no-vllm", action="store_true")
    parser.add_argument("--no-similarity", action="store_true")
    args = parser.parse_args()
    await local_upstream(args.items)
    await scorer_costs(not args.no_similarity)
    if not args.no_vllm:
        await real_engine(args.engine_items)


if __name__ == "__main__":
    asyncio.run(main())
