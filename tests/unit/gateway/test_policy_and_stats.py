"""The canary decision and the live windows it reads."""

from __future__ import annotations

import pytest

from services.gateway.routing.policy import Slo, decide, slo_breach
from services.gateway.routing.stats import (
    EMPTY,
    ROLLING,
    LiveStats,
    WindowStats,
    merge,
    p95_lower_bound,
    paired_step,
)

STEPS = [0.1, 0.25, 0.5, 1.0]
SLO = Slo(max_error_rate_increase=0.02, max_p95_ratio=1.5, p95_slack_ms=10, min_samples=20)


def w(
    requests: int,
    errors: int = 0,
    p95: float | None = 100.0,
    samples: int | None = None,
    low: float | None = -1.0,
):
    return WindowStats(
        requests=requests,
        errors=errors,
        p95_ms=p95,
        p50_ms=p95,
        latency_samples=requests - errors if samples is None else samples,
        p95_low_ms=p95 if low == -1.0 else low,
    )


def run(canary, stable=None, step=0, age=1000.0, auto=True, circuit_open=False):
    return decide(
        canary=canary,
        stable=stable or w(1000, 5),
        step=step,
        steps=STEPS,
        step_age_s=age,
        min_requests=100,
        min_seconds=60,
        slo=SLO,
        auto=auto,
        circuit_open=circuit_open,
    )


def test_advances_through_steps_then_promotes():
    assert run(w(100)).action == "advance" and run(w(100)).next_step == 1
    assert run(w(100), step=1).next_step == 2
    assert run(w(100), step=2).action == "promote"


def test_holds_until_enough_requests_and_time_or_when_manual():
    assert run(w(99)).action == "hold"
    assert run(w(100), age=59).action == "hold"
    assert run(w(100), auto=False).action == "hold"


@pytest.mark.parametrize("auto", [True, False])
def test_error_rate_breach_rolls_back_even_when_manual(auto):
    d = run(w(40, errors=2), stable=w(1000, errors=0), auto=auto)  # 5% vs 0% + 2%
    assert d.action == "rollback" and "error rate" in d.reason


def test_error_rate_within_margin_of_stable_is_fine():
    assert run(w(100, errors=6), stable=w(1000, errors=50)).action == "advance"  # 6% vs 5%+2%


def test_latency_breach_rolls_back():
    d = run(w(100, p95=200.0), stable=w(1000, p95=100.0))  # 200 > 100*1.5+10
    assert d.action == "rollback" and "p95" in d.reason
    assert run(w(100, p95=150.0), stable=w(1000, p95=100.0)).action == "advance"


def test_latency_is_judged_on_the_p95_lower_bound():
    # Sample p95 over the limit, but it may be a few unlucky requests: no breach.
    assert run(w(100, p95=900.0, low=120.0), stable=w(1000, p95=100.0)).action == "advance"
    d = run(w(100, p95=900.0, low=400.0), stable=w(1000, p95=100.0))
    assert d.action == "rollback" and "at least 400.0 ms" in d.reason
    assert run(w(100, p95=900.0, low=None), stable=w(1000, p95=100.0)).action == "advance"


def test_p95_lower_bound_ignores_a_short_slow_spell_but_not_a_slow_canary():
    fast = [10.0] * 18
    spell = sorted([*fast, 500.0, 510.0])  # a pause that caught 2 of 20 requests
    assert spell[18] == 500.0  # the sample p95 (19th of 20) is the pause
    assert p95_lower_bound(spell, 0.99) == 10.0
    slow_fifth = sorted([10.0] * 48 + [500.0] * 12)  # a real regression of one request in 5
    assert p95_lower_bound(slow_fifth, 0.99) == 500.0
    assert p95_lower_bound([700.0] * 5, 0.99) == 700.0  # all slow: caught at 5 samples
    assert p95_lower_bound([], 0.99) is None
    # The bound never exceeds the sample p95 and rises with the confidence asked for.
    values = sorted(float(i) for i in range(1, 201))
    b90, b99, b999 = (p95_lower_bound(values, c) for c in (0.9, 0.99, 0.999))
    assert b90 is not None and b99 is not None and b999 is not None
    assert b999 < b99 < b90 <= 190.0


def test_too_few_samples_are_not_judged():
    assert slo_breach(w(19, errors=19), w(1000), SLO) is None
    assert slo_breach(w(10, p95=9999.0), w(1000), SLO) is None
    assert slo_breach(w(100, p95=9999.0), w(5, p95=1.0), SLO) is None  # stable too thin


def test_open_circuit_rolls_back():
    assert run(w(0), circuit_open=True).action == "rollback"


def test_live_stats_canary_step_windows_and_rolling_stable():
    stats = LiveStats(window=10)
    for i in range(30):
        stats.record("stable", -1, ok=i >= 25, latency_ms=float(i))
    rolling = stats.get("stable", -1)
    assert rolling.requests == 10 and rolling.errors == 5  # old outcomes aged out
    stats.record("canary", 0, ok=False, latency_ms=None)
    stats.record("canary", 1, ok=True, latency_ms=5.0)
    assert stats.get("canary", 0).errors == 1 and stats.get("canary", 1).errors == 0
    assert stats.get("canary", 1).p95_ms == 5.0
    stats.forget("canary")
    assert stats.get("canary", 1).requests == 0


def test_stable_windows_paired_with_a_canary_step_keep_the_whole_step():
    stats = LiveStats(window=10)
    assert paired_step(0) == -2 and paired_step(3) == -5
    for i in range(30):
        stats.record("stable", paired_step(1), ok=i >= 25, latency_ms=float(i))
        stats.record("stable", ROLLING, ok=True, latency_ms=1.0)
    paired = stats.get("stable", paired_step(1))
    assert (paired.requests, paired.errors) == (30, 25)  # nothing aged out during the step
    assert paired.latency_samples == 5
    stats.forget_paired("stable")
    assert stats.get("stable", paired_step(1)).requests == 0
    assert stats.get("stable", ROLLING).requests == 10  # the rolling window stays
    assert w(0).error_rate == 0.0


def test_merge_replica_windows():
    a = WindowStats(requests=10, errors=1, p95_ms=50.0, p50_ms=10.0, latency_samples=9)
    b = WindowStats(requests=30, errors=0, p95_ms=80.0, p50_ms=20.0, latency_samples=30)
    thin = WindowStats(requests=2, errors=0, p95_ms=900.0, p50_ms=900.0, latency_samples=2)
    m = merge([a, b, thin, EMPTY], min_samples=5)
    assert (m.requests, m.errors, m.latency_samples) == (42, 1, 41)
    assert m.p95_ms == 80.0  # the worst p95 among windows with enough samples
    assert merge([thin], min_samples=5) is thin
    assert merge([], min_samples=5) is EMPTY
    few = merge([thin, thin], min_samples=5)
    assert few.p95_ms == 900.0 and few.requests == 4
    assert few.p95_low_ms is None  # latency is not judged on thin windows


def test_merge_takes_the_highest_lower_bound_of_windows_with_enough_samples():
    a = WindowStats(10, 0, p95_ms=50.0, p50_ms=10.0, latency_samples=10, p95_low_ms=30.0)
    b = WindowStats(30, 0, p95_ms=80.0, p50_ms=20.0, latency_samples=30, p95_low_ms=60.0)
    thin = WindowStats(2, 0, p95_ms=900.0, p50_ms=900.0, latency_samples=2, p95_low_ms=900.0)
    assert merge([a, b, thin], min_samples=5).p95_low_ms == 60.0
