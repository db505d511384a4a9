"""Added latency and throughput of the gateway versus calling the same upstream directly.

    .venv/bin/python bench/gateway.py [--requests 3000] [--concurrency 1,32,128]

Three processes on loopback: a fast scripted OpenAI-compatible upstream, the gateway (one
worker, ``python -m services.gateway.app``, SQLite, capture ON, a real nats-server), and this
load generator (one aiohttp session, N concurrent clients, non-streaming chat completions).
At each concurrency the direct and proxied runs alternate in rounds, so both see the same
machine. Added latency = proxied percentile - direct percentile. Targets (issue 8): <= 1 ms
p50 and <= 3 ms p99 added, >= 1,500 proxied requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.bus import BusSettings, EventBus
from shared.db import Database
from shared.embedded import NatsServer, free_port, wait_for_port
from shared.events import ModelDeployed

ADMIN = "bench-admin-key"
BODY = (
    b'{"model":"tuneloop","messages":[{"role":"user","content":"What is 2+2? Answer briefly."}],'
    b'"max_tokens":16}'
)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def load(
    url: str, key: str | None, concurrency: int, requests: int
) -> tuple[list[float], float]:
    """``requests`` POSTs from ``concurrency`` clients; per-request ms and requests/s."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    latencies: list[float] = []
    failures = 0
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        remaining = requests

        async def client() -> None:
            nonlocal remaining, failures
            while remaining > 0:
                remaining -= 1
                t0 = time.perf_counter()
                async with session.post(url, data=BODY, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        failures += 1
                latencies.append((time.perf_counter() - t0) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{failures} requests failed against {url}")
    return latencies, requests / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000, help="per concurrency and target")
    parser.add_argument("--concurrency", default="1,32,128")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--capture", choices=("on", "off"), default="on")
    parser.add_argument("--profile", help="write a cProfile of the gateway process here")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory(prefix="tl-bench-gw-") as tmp:
        home = Path(tmp)
        nats_server = NatsServer(home / "nats").start()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            up_port, gw_port = free_port(), free_port()
            log = (home / "procs.log").open("ab")
            procs.append(
                subprocess.Popen(  # noqa: ASYNC220 - started once, before any measuring
                    [sys.executable, "-m", "tests.integration.gateway.fake_upstream", str(up_port)],
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            db_url = f"sqlite+aiosqlite:///{home / 'gw.db'}"
            env = {
                **os.environ,
                "TUNELOOP_HOME": str(home),
                "TUNELOOP_NATS_URL": nats_server.url,
                "TUNELOOP_SUBJECT_PREFIX": "bench",
                "DATABASE_URL": db_url,
                "TUNELOOP_ADMIN_KEY": ADMIN,
                "TUNELOOP_LOG_LEVEL": "WARNING",
                "TUNELOOP_SPAN_FILE": str(home / "spans.jsonl"),
                "GATEWAY_HTTP_PORT": str(gw_port),
                "GATEWAY_ENABLE_DATA_COLLECTION": "true" if args.capture == "on" else "false",
                "GATEWAY_DEV_CLIENT_KEY": "false",
            }
            procs.append(
                subprocess.Popen(  # noqa: ASYNC220 - started once, before any measuring
                    [sys.executable]
                    + (["-m", "cProfile", "-o", args.profile] if args.profile else [])
                    + ["-m", "services.gateway.app"],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            wait_for_port(up_port, timeout_s=60, proc=procs[0], what="upstream")
            wait_for_port(gw_port, timeout_s=60, proc=procs[1], what="gateway")
            upstream = f"http://127.0.0.1:{up_port}"
            gateway = f"http://127.0.0.1:{gw_port}"
            bus = EventBus(BusSettings(nats_url=nats_server.url, prefix="bench"), service="bench")
            async with bus:
                await bus.publish(
                    ModelDeployed(
                        run_id="run-bench",
                        producer="bench",
                        deployment_id="bench-1",
                        model_id="bench-model",
                        engine="vllm",
                        endpoint=upstream,
                        served_model_name="tuneloop",
                        role="baseline",
                    )
                )
            async with aiohttp.ClientSession() as http:
                async with http.post(
                    f"{gateway}/admin/keys",
                    json={"name": "bench"},
                    headers={"Authorization": f"Bearer {ADMIN}"},
                ) as resp:
                    key = (await resp.json())["key"]
                for _ in range(200):
                    async with http.post(
                        f"{gateway}/v1/chat/completions",
                        data=BODY,
                        headers={"Authorization": f"Bearer {key}"},
                    ) as resp:
                        if resp.status == 200:
                            break
                    await asyncio.sleep(0.05)
                else:
                    raise RuntimeError("the gateway never routed the bench upstream")

            rows = []
            for c in levels:
                n = max(c * 20, min(args.requests, 300 if c == 1 else args.requests))
                direct: list[float] = []
                proxied: list[float] = []
                rps_d: list[float] = []
                rps_g: list[float] = []
                await load(f"{upstream}/v1/chat/completions", None, c, min(n, 200))  # warm-up
                await load(f"{gateway}/v1/chat/completions", key, c, min(n, 200))
                per_round = max(1, n // args.rounds)
                gw_cpu = 0.0
                for _ in range(args.rounds):
                    lat, rps = await load(f"{upstream}/v1/chat/completions", None, c, per_round)
                    direct += lat
                    rps_d.append(rps)
                    before = cpu_seconds(procs[1].pid)
                    lat, rps = await load(f"{gateway}/v1/chat/completions", key, c, per_round)
                    gw_cpu += cpu_seconds(procs[1].pid) - before
                    proxied += lat
                    rps_g.append(rps)
                rows.append(
                    (
                        c,
                        len(proxied),
                        pct(direct, 50),
                        pct(direct, 99),
                        pct(proxied, 50),
                        pct(proxied, 99),
                        sum(rps_d) / len(rps_d),
                        sum(rps_g) / len(rps_g),
                        gw_cpu / len(proxied) * 1e6,
                    )
                )
            db = Database(db_url)
            from sqlalchemy import text

            await asyncio.sleep(1.0)
            async with db.session() as session:
                captured = (
                    await session.execute(text("SELECT count(*) FROM gateway_interactions"))
                ).scalar_one()
            await db.dispose()
        finally:
            for p in procs:
                p.send_signal(signal.SIGINT)
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            nats_server.stop()

    print(
        f"\ngateway vs direct upstream, loopback, 1 gateway worker, capture {args.capture}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    head = (
        "conc",
        "reqs",
        "direct p50",
        "direct p99",
        "gw p50",
        "gw p99",
        "added p50",
        "added p99",
        "direct rps",
        "gw rps",
        "gw cpu/req",
    )
    print(" | ".join(f"{h:>10}" for h in head))
    print("-+-".join("-" * 10 for _ in head))
    for c, n, dp50, dp99, gp50, gp99, rd, rg, cpu_us in rows:
        cells = (
            str(c),
            str(n),
            f"{dp50:.2f} ms",
            f"{dp99:.2f} ms",
            f"{gp50:.2f} ms",
            f"{gp99:.2f} ms",
            f"{gp50 - dp50:+.2f} ms",
            f"{gp99 - dp99:+.2f} ms",
            f"{rd:,.0f}",
            f"{rg:,.0f}",
            f"{cpu_us:,.0f} us",
        )
        print(" | ".join(f"{x:>10}" for x in cells))
    print(f"interactions captured during the run: {captured:,}")
    best = min(r[-1] for r in rows)
    print(
        f"gateway CPU per proxied request (capture included): {best:,.0f} us -> about "
        f"{1e6 / best:,.0f} req/s per fully available core (independent of machine load)"
    )
    print("targets: added p50 <= 1 ms, added p99 <= 3 ms, gateway >= 1,500 req/s")


if __name__ == "__main__":
    asyncio.run(main())
