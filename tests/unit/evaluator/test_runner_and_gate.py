"""The run (concurrency, retries, timeouts, a deployment that goes away), the aggregation
(latency percentiles) and the gate (absolute, per category, regression vs baseline)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from services.evaluator.benchmark import parse_benchmark
from services.evaluator.client import EndpointError
from services.evaluator.gate import GateSettings, decide
from services.evaluator.runner import ItemResult, RunOptions, percentile, run_benchmark, summarise
from services.evaluator.scoring import Scoring
from tests.unit.evaluator.fakes import FakeChat, failing

BENCH = parse_benchmark(
    json.dumps(
        {
            "name": "mini",
            "scorer": {"type": "exact"},
            "items": [
                {"id": f"{cat}-{i}", "category": cat, "prompt": f"{cat} {i}", "expected": cat}
                for cat in ("tax", "estate")
                for i in range(10)
            ],
        }
    ).encode()
)
FAST = RunOptions(concurrency=4, retries=2, retry_backoff_s=0.0)


def echo_category(messages):
    return messages[-1]["content"].split()[0]


async def test_a_good_deployment_scores_everything_and_respects_concurrency():
    chat = FakeChat(echo_category, delay_s=0.01)
    result = await run_benchmark(BENCH, chat, scoring=Scoring(), options=FAST)
    s = result.summary()
    assert s.overall_score == 1.0 and s.category_scores == {"estate": 1.0, "tax": 1.0}
    assert s.errors == 0 and result.unreachable() is None
    assert s.completion_tokens == 7 * 20 and s.tokens_per_second > 0
    assert 1 < chat.max_in_flight <= 4
    assert [i.id for i in result.items] == [i.id for i in BENCH.items]  # benchmark order


async def test_a_bad_category_is_measured_per_category():
    chat = FakeChat(lambda m: "tax" if "tax" in m[-1]["content"] else "no idea")
    s = (await run_benchmark(BENCH, chat, scoring=Scoring(), options=FAST)).summary()
    assert s.category_scores == {"estate": 0.0, "tax": 1.0} and s.overall_score == 0.5


async def test_transient_errors_are_retried():
    attempts: dict[str, int] = {}

    def flaky(messages):
        key = messages[-1]["content"]
        attempts[key] = attempts.get(key, 0) + 1
        if attempts[key] < 2:
            raise EndpointError("http", "HTTP 503", status=503)
        return echo_category(messages)

    result = await run_benchmark(BENCH, FakeChat(flaky), scoring=Scoring(), options=FAST)
    assert result.summary().overall_score == 1.0
    assert all(i.attempts == 2 for i in result.items)


async def test_client_errors_are_not_retried_and_count_as_errors():
    chat = FakeChat(failing("http", "HTTP 400: bad", status=400))
    result = await run_benchmark(BENCH, chat, scoring=Scoring(), options=FAST)
    assert chat.calls == 20
    s = result.summary()
    assert s.errors == 20 and s.overall_score == 0.0 and result.unreachable() is None
    assert result.items[0].error == "HTTP 400: bad"


async def test_timeouts_on_some_items_are_a_measured_failure_not_a_crash():
    def slow_estate(messages):
        if "estate 3" in messages[-1]["content"]:
            raise EndpointError("timeout", "no answer within 1s")
        return echo_category(messages)

    result = await run_benchmark(BENCH, FakeChat(slow_estate), scoring=Scoring(), options=FAST)
    s = result.summary()
    assert s.errors == 1 and s.transport_errors == 1 and result.unreachable() is None
    bad = next(i for i in result.items if i.id == "estate-3")
    assert bad.error_kind == "timeout" and bad.attempts == 3 and bad.score == 0.0
    assert s.latency.count == 19


async def test_an_unreachable_endpoint_stops_early_and_says_so():
    chat = FakeChat(failing("unreachable", "Connection refused"))
    opts = RunOptions(
        concurrency=1, retries=2, retry_backoff_s=0.0, abort_after_consecutive_failures=3
    )
    result = await run_benchmark(BENCH, chat, scoring=Scoring(), options=opts)
    assert chat.calls == 3  # the breaker opened; the rest were never asked
    reason = result.unreachable()
    assert reason is not None and "never answered" in reason and "Connection refused" in reason
    assert {i.error_kind for i in result.items} == {"unreachable", "skipped"}


async def test_a_deployment_that_disappears_mid_run_is_reported_as_such():
    served = {"n": 0}

    def dies(messages):
        served["n"] += 1
        if served["n"] > 5:
            raise EndpointError("unreachable", "Connection refused")
        return echo_category(messages)

    opts = RunOptions(concurrency=1, retries=0, abort_after_consecutive_failures=4)
    result = await run_benchmark(BENCH, FakeChat(dies), scoring=Scoring(), options=opts)
    reason = result.unreachable()
    assert reason is not None and "stopped answering mid-run (5 of 20" in reason


async def test_huge_output_is_truncated_before_scoring():
    chat = FakeChat(lambda m: "tax" + "x" * 100_000)
    opts = RunOptions(max_output_chars=1000, retry_backoff_s=0.0)
    result = await run_benchmark(BENCH, chat, scoring=Scoring(), options=opts)
    assert all(len(i.output) == 1000 and i.output_truncated for i in result.items)


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 100])
def test_percentiles_match_numpy(q):
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.3, 5.8, 9.7, 9.3, 2.38]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], q) == 0.0
    assert percentile([7.0], q) == 7.0


def test_latency_summary_of_a_run():
    items = [
        ItemResult(id=f"i{n}", category="c", scorer="exact", latency_ms=float(n))
        for n in range(1, 101)
    ]
    items.append(ItemResult(id="err", category="c", scorer="exact", error_kind="timeout"))
    lat = summarise(BENCH, items, 2.0).latency
    assert (lat.p50_ms, lat.p95_ms, lat.p99_ms) == (50.5, 95.05, 99.01)
    assert lat.mean_ms == 50.5 and lat.max_ms == 100.0 and lat.count == 100


def summary_with(scores: dict[str, float], latency_ms: float = 100.0, errors: int = 0):
    items = []
    for cat, score in scores.items():
        for n in range(10):
            items.append(
                ItemResult(
                    id=f"{cat}{n}",
                    category=cat,
                    scorer="exact",
                    score=score,
                    latency_ms=latency_ms,
                    error_kind="http" if n < errors else None,
                )
            )
    return summarise(BENCH, items, 1.0)


def test_gate_passes_a_good_candidate_and_explains_why():
    v = decide(summary_with({"tax": 0.9, "estate": 0.95}), None, GateSettings())
    assert v.passed
    assert any("overall score 0.925 >= minimum 0.800" in r for r in v.reasons)
    assert any("no baseline comparison" in r for r in v.reasons)
    strict = decide(summary_with({"tax": 0.9}), None, GateSettings(require_baseline=True))
    assert not strict.passed


def test_gate_fails_a_bad_category_with_per_category_reasons():
    v = decide(summary_with({"tax": 0.95, "estate": 0.6}), None, GateSettings(min_overall=0.7))
    assert not v.passed
    assert v.failures == ["category estate score 0.600 below minimum 0.700 (10 items)"]


def test_gate_detects_regression_against_the_stable_deployment():
    base = summary_with({"tax": 0.9, "estate": 0.9})
    cand = summary_with({"tax": 1.0, "estate": 0.8})  # overall 0.9: same as stable
    v = decide(cand, base, GateSettings(min_category=0.5))
    assert not v.passed
    assert v.failures == [
        "regression vs stable in category estate: 0.800 < 0.900 by 0.100 (allowed 0.050)"
    ]
    overall = decide(
        summary_with({"tax": 0.85}),
        summary_with({"tax": 0.95}),
        GateSettings(max_category_regression=1.0),
    )
    assert any(r.startswith("regression vs stable: overall 0.850") for r in overall.failures)
    better = decide(summary_with({"tax": 0.95}), summary_with({"tax": 0.85}), GateSettings())
    assert better.passed


def test_gate_latency_slo_and_error_rate():
    slow = decide(summary_with({"tax": 1.0}, latency_ms=2500), None, GateSettings())
    assert slow.failures == ["mean latency 2500 ms exceeds SLO 2000 ms"]
    p95 = decide(summary_with({"tax": 1.0}), None, GateSettings(max_p95_latency_ms=50))
    assert p95.failures == ["p95 latency 100 ms exceeds SLO 50 ms"]
    errors = decide(summary_with({"tax": 1.0}, errors=2), None, GateSettings())
    assert errors.failures == ["error rate 0.200 above 0.050 (2 of 10 items failed)"]
    items = [
        ItemResult(
            id=f"i{n}",
            category="c",
            scorer="exact",
            score=0.0 if n < 3 else 1.0,
            latency_ms=None if n < 3 else 1.0,
            error_kind="unreachable" if n < 3 else None,
        )
        for n in range(10)
    ]
    gone = decide(summarise(BENCH, items, 1.0), None, GateSettings(min_overall=0.5))
    assert gone.failures == [
        "error rate 0.300 above 0.050 (3 of 10 items failed, 3 could not reach the deployment)"
    ]
    off = decide(
        summary_with({"tax": 1.0}, latency_ms=9999), None, GateSettings(max_mean_latency_ms=None)
    )
    assert off.passed
