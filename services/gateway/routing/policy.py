"""The canary decision: a pure function of live stats and the rollout configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from services.gateway.routing.stats import WindowStats

Action = Literal["hold", "advance", "promote", "rollback"]


@dataclass(frozen=True)
class Slo:
    max_error_rate_increase: float = 0.02
    max_p95_ratio: float = 1.5
    p95_slack_ms: float = 50.0
    min_samples: int = 20
    latency_confidence: float = 0.99  # for the reason text; the bound is computed in stats


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""
    next_step: int | None = None


def slo_breach(canary: WindowStats, stable: WindowStats, slo: Slo) -> str | None:
    """Why the canary breaks the SLO relative to stable, or None while it does not."""
    if canary.requests >= slo.min_samples:
        allowed = stable.error_rate + slo.max_error_rate_increase
        if canary.error_rate > allowed:
            return (
                f"error rate {canary.error_rate:.3f} > stable {stable.error_rate:.3f} "
                f"+ {slo.max_error_rate_increase:.3f} over {canary.requests} requests"
            )
    # Latency: the canary's p95 is judged by its lower confidence bound (stats.p95_lower_bound)
    # against the stable's sample p95 over the same period, so a few unlucky requests are not
    # a regression but a canary that is really slower is.
    if (
        canary.p95_low_ms is not None
        and canary.p95_ms is not None
        and stable.p95_ms is not None
        and canary.latency_samples >= slo.min_samples
        and stable.latency_samples >= slo.min_samples
    ):
        limit = stable.p95_ms * slo.max_p95_ratio + slo.p95_slack_ms
        if canary.p95_low_ms > limit:
            return (
                f"p95 latency {canary.p95_ms:.1f} ms (at least {canary.p95_low_ms:.1f} ms "
                f"with {slo.latency_confidence:.0%} confidence) > {limit:.1f} ms "
                f"(stable p95 {stable.p95_ms:.1f} ms x {slo.max_p95_ratio} + {slo.p95_slack_ms})"
            )
    return None


def decide(
    *,
    canary: WindowStats,
    stable: WindowStats,
    step: int,
    steps: list[float],
    step_age_s: float,
    min_requests: int,
    min_seconds: float,
    slo: Slo,
    auto: bool = True,
    circuit_open: bool = False,
) -> Decision:
    """Roll back on an SLO breach (always, even when advancing is manual); advance one step
    after enough requests and time within SLO; reaching the last step (100%) promotes."""
    breach = slo_breach(canary, stable, slo)
    if breach:
        return Decision("rollback", breach)
    if circuit_open:
        return Decision("rollback", "circuit breaker open: the canary keeps failing")
    if not auto or canary.requests < min_requests or step_age_s < min_seconds:
        return Decision("hold")
    nxt = step + 1
    if nxt >= len(steps) - 1 or steps[min(nxt, len(steps) - 1)] >= 1.0:
        return Decision("promote", f"within SLO over {canary.requests} requests at each step")
    return Decision(
        "advance",
        f"within SLO over {canary.requests} requests at {steps[step]:.0%}",
        next_step=nxt,
    )
