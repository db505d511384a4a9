"""Publish→handler latency and throughput: shared/bus.py vs raw nats-py, same broker, same run.

    .venv/bin/python bench/bus_latency.py [--messages 500] [--burst 2000]

Both sides do the same work per message: a confirmed JetStream publish with a Nats-Msg-Id,
a durable pull consumer fetching one message at a time, an explicit ack. The bus adds schema
validation, trace-context propagation, spans and the retry/dead-letter bookkeeping.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.bus import BusSettings, Delivery, EventBus
from shared.embedded import NatsServer
from shared.events import DatasetSubmitted
from shared.subjects import Namespace


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def make_event(i: int) -> DatasetSubmitted:
    return DatasetSubmitted(
        run_id=f"run-{i}", producer="bench", dataset_name=f"d{i}", files=[f"file:///data/{i}.jsonl"]
    )


async def measure(
    publish: Callable[[int], Awaitable[None]],
    arrivals: dict[int, float],
    messages: int,
    burst: int,
) -> dict[str, float]:
    latencies = []
    for i in range(messages):
        start = time.perf_counter()
        await publish(i)
        while i not in arrivals:
            await asyncio.sleep(0)
        latencies.append((arrivals[i] - start) * 1000)
    base = messages
    start = time.perf_counter()
    await asyncio.gather(*(publish(base + i) for i in range(burst)))
    while len(arrivals) < base + burst:
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - start
    return {
        "p50_ms": statistics.median(latencies),
        "p99_ms": pct(latencies, 99),
        "mean_ms": statistics.fmean(latencies),
        "msgs_per_s": burst / elapsed,
    }


async def bench_bus(url: str, messages: int, burst: int) -> dict[str, float]:
    settings = BusSettings(nats_url=url, prefix=f"b{uuid.uuid4().hex[:8]}", file_storage=True)
    arrivals: dict[int, float] = {}

    async def handle(event: DatasetSubmitted, delivery: Delivery) -> None:
        arrivals[int(event.dataset_name[1:])] = time.perf_counter()

    consumer = EventBus(settings, service="bench")
    consumer.subscribe(DatasetSubmitted, handle)
    async with EventBus(settings, service="producer") as producer, consumer:
        await asyncio.sleep(0.5)

        async def publish(i: int) -> None:
            await producer.publish(make_event(i))

        return await measure(publish, arrivals, messages, burst)


async def bench_raw(url: str, messages: int, burst: int) -> dict[str, float]:
    ns = Namespace(f"r{uuid.uuid4().hex[:8]}")
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=ns.stream, subjects=[ns.all_subjects], duplicate_window=3600)
    subject = ns.subject("dataset.submitted")
    sub = await js.pull_subscribe(subject, durable="raw", stream=ns.stream)
    arrivals: dict[int, float] = {}

    async def consume() -> None:
        while True:
            try:
                msgs = await sub.fetch(1, timeout=5)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                event = DatasetSubmitted.model_validate_json(msg.data)
                arrivals[int(event.dataset_name[1:])] = time.perf_counter()
                await msg.ack()

    task = asyncio.create_task(consume())

    async def publish(i: int) -> None:
        event = make_event(i)
        await js.publish(
            subject,
            event.model_dump_json().encode(),
            stream=ns.stream,
            headers={"Nats-Msg-Id": event.msg_id},
        )

    try:
        return await measure(publish, arrivals, messages, burst)
    finally:
        task.cancel()
        await nc.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=500, help="sequential latency samples")
    parser.add_argument("--burst", type=int, default=2000, help="messages for throughput")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats").start()
        try:
            raw = await bench_raw(server.url, args.messages, args.burst)
            bus = await bench_bus(server.url, args.messages, args.burst)
        finally:
            server.stop()
    print(f"\nbus latency: {args.messages} sequential messages, {args.burst}-message burst")
    print(f"{'':<22}{'raw nats-py':>14}{'shared/bus.py':>16}{'ratio':>8}")
    for key, label in (
        ("p50_ms", "p50 latency (ms)"),
        ("p99_ms", "p99 latency (ms)"),
        ("mean_ms", "mean latency (ms)"),
        ("msgs_per_s", "throughput (msg/s)"),
    ):
        ratio = bus[key] / raw[key] if raw[key] else float("nan")
        print(f"{label:<22}{raw[key]:>14.2f}{bus[key]:>16.2f}{ratio:>8.2f}")
    print("target: latency ratio <= 1.2")


if __name__ == "__main__":
    asyncio.run(main())
