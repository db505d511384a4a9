"""Run a benchmark against one deployment: bounded concurrency, per-request timeout, retries
with backoff, a circuit breaker for a deployment that has gone away; then aggregate.

An item that times out or errors scores 0 and says why; the run goes on. Only when most of
the run could not reach the endpoint is it *unreachable* (see :meth:`RunResult.unreachable`):
then there is nothing to judge and the caller reports a failed evaluation, not a verdict.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from services.evaluator.benchmark import Benchmark, BenchmarkItem
from services.evaluator.client import TRANSPORT_ERRORS, ChatClient, Completion, EndpointError
from services.evaluator.scoring import Scoring


@dataclass(frozen=True)
class RunOptions:
    concurrency: int = 8
    retries: int = 2
    retry_backoff_s: float = 0.5
    max_tokens: int = 256
    max_output_chars: int = 20_000
    # After this many transport failures in a row (no success between), stop asking.
    abort_after_consecutive_failures: int = 8
    # A run where at least this fraction of items never reached the endpoint is unreachable.
    unreachable_fraction: float = 0.5


@dataclass
class ItemResult:
    id: str
    category: str
    scorer: str
    score: float = 0.0
    passed: bool = False
    detail: str = ""
    output: str = ""
    output_truncated: bool = False
    latency_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0
    error_kind: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LatencySummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    max_ms: float = 0.0
    count: int = 0


class RunSummary(BaseModel):
    """What a run measured: what the gate judges and what the event and the DB carry."""

    model_config = ConfigDict(frozen=True)

    benchmark: str
    benchmark_version: str
    items: int
    errors: int
    transport_errors: int
    overall_score: float
    pass_rate: float
    category_scores: dict[str, float]
    category_counts: dict[str, int]
    latency: LatencySummary
    completion_tokens: int
    tokens_per_second: float
    wall_s: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.items if self.items else 0.0


@dataclass
class RunResult:
    benchmark: Benchmark
    items: list[ItemResult]
    wall_s: float
    options: RunOptions = field(default_factory=RunOptions)

    def summary(self) -> RunSummary:
        return summarise(self.benchmark, self.items, self.wall_s)

    def unreachable(self) -> str | None:
        """Why the deployment counts as unreachable for this run, or None."""
        n = len(self.items)
        failed = [i for i in self.items if i.error_kind in TRANSPORT_ERRORS]
        if not n or len(failed) < self.options.unreachable_fraction * n:
            return None
        answered = n - len(failed)
        first = next((i for i in failed if i.error_kind != "skipped"), failed[0])
        when = (
            "never answered"
            if answered == 0
            else f"stopped answering mid-run ({answered} of {n} items answered)"
        )
        return f"deployment unreachable: {when}; {len(failed)} of {n} items failed: {first.error}"


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarise(bench: Benchmark, items: list[ItemResult], wall_s: float) -> RunSummary:
    by_cat: dict[str, list[float]] = defaultdict(list)
    for it in items:
        by_cat[it.category].append(it.score)
    latencies = [it.latency_ms for it in items if it.latency_ms is not None]
    tokens = sum(it.completion_tokens for it in items)
    n = len(items)
    return RunSummary(
        benchmark=bench.name,
        benchmark_version=bench.version,
        items=n,
        errors=sum(1 for it in items if it.error_kind),
        transport_errors=sum(1 for it in items if it.error_kind in TRANSPORT_ERRORS),
        overall_score=round(sum(it.score for it in items) / n, 6) if n else 0.0,
        pass_rate=round(sum(1 for it in items if it.passed) / n, 6) if n else 0.0,
        category_scores={c: round(sum(v) / len(v), 6) for c, v in sorted(by_cat.items())},
        category_counts={c: len(v) for c, v in sorted(by_cat.items())},
        latency=LatencySummary(
            p50_ms=round(percentile(latencies, 50), 3),
            p95_ms=round(percentile(latencies, 95), 3),
            p99_ms=round(percentile(latencies, 99), 3),
            mean_ms=round(sum(latencies) / len(latencies), 3) if latencies else 0.0,
            max_ms=round(max(latencies), 3) if latencies else 0.0,
            count=len(latencies),
        ),
        completion_tokens=tokens,
        tokens_per_second=round(tokens / wall_s, 3) if wall_s > 0 else 0.0,
        wall_s=round(wall_s, 3),
    )


class _Breaker:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.consecutive = 0
        self.last_error = ""

    @property
    def open(self) -> bool:
        return self.consecutive >= self.limit

    def record(self, error: EndpointError | None) -> None:
        if error is None:
            self.consecutive = 0
        elif error.transport:
            self.consecutive += 1
            self.last_error = str(error)


async def run_benchmark(
    bench: Benchmark,
    client: ChatClient,
    *,
    scoring: Scoring,
    options: RunOptions | None = None,
) -> RunResult:
    opts = options or RunOptions()
    gate = asyncio.Semaphore(max(1, opts.concurrency))
    breaker = _Breaker(max(1, opts.abort_after_consecutive_failures))

    async def one(item: BenchmarkItem) -> ItemResult:
        spec = bench.scorer_for(item)
        result = ItemResult(id=item.id, category=item.category, scorer=spec.type)
        async with gate:
            completion = await _ask(item, bench, client, opts, breaker, result)
        if completion is None:
            return result
        output = completion.text
        if len(output) > opts.max_output_chars:
            output = output[: opts.max_output_chars]
            result.output_truncated = True
        result.output = output
        result.latency_ms = round(completion.latency_ms, 3)
        result.prompt_tokens = completion.prompt_tokens
        result.completion_tokens = completion.completion_tokens
        scored = await scoring.score(spec, item, output)
        result.score, result.passed, result.detail = scored.score, scored.passed, scored.detail
        return result

    started = time.perf_counter()
    results = await asyncio.gather(*(one(item) for item in bench.items))
    return RunResult(
        benchmark=bench, items=list(results), wall_s=time.perf_counter() - started, options=opts
    )


async def _ask(
    item: BenchmarkItem,
    bench: Benchmark,
    client: ChatClient,
    opts: RunOptions,
    breaker: _Breaker,
    result: ItemResult,
) -> Completion | None:
    messages = item.chat(bench.system_prompt)
    max_tokens = item.max_tokens or opts.max_tokens
    for attempt in range(opts.retries + 1):
        if breaker.open:
            if attempt == 0:  # never asked; a retried item keeps its own last error
                result.error_kind = "skipped"
                result.error = f"not asked: endpoint unreachable ({breaker.last_error})"[:500]
            return None
        result.attempts = attempt + 1
        try:
            completion = await client.complete(messages, max_tokens=max_tokens)
        except EndpointError as exc:
            breaker.record(exc)
            result.error_kind, result.error = exc.kind, str(exc)[:500]
            if not exc.retryable or attempt == opts.retries:
                return None
            await asyncio.sleep(opts.retry_backoff_s * (2**attempt))
            continue
        breaker.record(None)
        result.error_kind = result.error = None
        return completion
    return None  # pragma: no cover - the loop always returns
