"""Sticky weighted choice, breakers, failover targets."""

from __future__ import annotations

from datetime import UTC, datetime

from services.gateway.models import GatewayDeployment
from services.gateway.routing.table import Breaker, Route, Upstream, choose, sticky_fraction


def up(dep: str) -> Upstream:
    now = datetime.now(UTC)
    row = GatewayDeployment(
        deployment_id=dep,
        served_model_name="m",
        model_id=dep,
        endpoint="http://127.0.0.1:1",
        engine="vllm",
        role="candidate",
        run_id="r",
        state="stable",
        created_at=now,
        updated_at=now,
    )
    return Upstream(
        row, pool_size=1, connect_timeout_s=1, breaker_failures=3, breaker_cooldown_s=10
    )


def test_weights_are_honoured_statistically_and_sticky():
    stable, canary = up("s"), up("c")
    for weight in (0.1, 0.25, 0.5):
        route = Route("m", stable, canary, canary_weight=weight)
        picks = [choose(route, f"user-{i}") for i in range(20_000)]
        share = sum(p.primary is canary for p in picks if p) / len(picks)
        assert abs(share - weight) < 0.015
        # the same user, asked again, lands on the same deployment
        assert all(choose(route, f"user-{i}").primary is picks[i].primary for i in range(500))
    # growing the weight keeps everyone already on the canary there
    small = Route("m", stable, canary, canary_weight=0.1)
    large = Route("m", stable, canary, canary_weight=0.5)
    for i in range(2000):
        if choose(small, f"u{i}").primary is canary:
            assert choose(large, f"u{i}").primary is canary


def test_a_new_experiment_reshuffles_users():
    a = [sticky_fraction(f"u{i}", "cand-a") < 0.1 for i in range(2000)]
    b = [sticky_fraction(f"u{i}", "cand-b") < 0.1 for i in range(2000)]
    assert a != b


def test_canary_failover_target_is_stable_and_open_breakers_are_skipped():
    stable, canary = up("s"), up("c")
    route = Route("m", stable, canary, canary_weight=1.0)
    choice = choose(route, "x")
    assert choice.primary is canary and choice.fallback is stable and choice.is_canary
    for _ in range(3):
        canary.breaker.failure()
    assert choose(route, "x").primary is stable
    for _ in range(3):
        stable.breaker.failure()
    assert choose(Route("m", stable, None), "x") is None
    assert choose(Route("m", None, None), "x") is None


def test_pinned_wins():
    stable, canary = up("s"), up("c")
    choice = choose(Route("m", stable, canary, canary_weight=0.0, pinned=canary), "x")
    assert choice.primary is canary and choice.fallback is None


def test_breaker_half_open_and_backoff():
    b = Breaker(failures=2, cooldown_s=10)
    assert b.allows(0)
    b.failure(0)
    assert b.allows(0)
    b.failure(0)
    assert b.is_open and not b.allows(5)
    assert b.allows(10)  # one trial after the cooldown
    assert not b.allows(10)  # ...and only one
    b.failure(10)
    assert not b.allows(25) and b.allows(30)  # cooldown doubled
    b.success()
    assert not b.is_open and b.allows(30)


def test_upstream_url_normalised():
    assert up("s").base_url == "http://127.0.0.1:1/v1"
