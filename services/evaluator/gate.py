"""The promotion gate: absolute thresholds plus no regression against the stable deployment.

Every threshold comes from configuration (the seeds' defaults below suit a real model; the
tiny CPU model needs lower ones). The verdict explains itself: when it fails, ``reasons``
lists each failed check with the numbers; when it passes, the checks that passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from services.evaluator.runner import RunSummary


class GateSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    min_overall: float = Field(default=0.80, ge=0, le=1)
    min_category: float = Field(default=0.70, ge=0, le=1)
    max_mean_latency_ms: float | None = Field(default=2000.0, gt=0)
    max_p95_latency_ms: float | None = Field(default=None, gt=0)
    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    # Allowed drop versus the stable deployment's score on the same benchmark version.
    max_regression: float = Field(default=0.02, ge=0, le=1)
    max_category_regression: float = Field(default=0.05, ge=0, le=1)
    # Without a stable deployment to compare with, pass on absolute checks alone (False)
    # or fail (True).
    require_baseline: bool = False


@dataclass
class Verdict:
    passed: bool
    failures: list[str] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        return (self.failures if not self.passed else self.passes) + self.notes


def decide(
    summary: RunSummary,
    baseline: RunSummary | None,
    gate: GateSettings,
    *,
    baseline_note: str | None = None,
) -> Verdict:
    v = Verdict(passed=True)

    def check(ok: bool, good: str, bad: str) -> None:
        (v.passes if ok else v.failures).append(good if ok else bad)

    s = summary
    check(
        s.overall_score >= gate.min_overall,
        f"overall score {s.overall_score:.3f} >= minimum {gate.min_overall:.3f}",
        f"overall score {s.overall_score:.3f} below minimum {gate.min_overall:.3f}",
    )
    for cat, score in s.category_scores.items():
        check(
            score >= gate.min_category,
            f"category {cat} {score:.3f} >= minimum {gate.min_category:.3f}",
            f"category {cat} score {score:.3f} below minimum {gate.min_category:.3f} "
            f"({s.category_counts.get(cat, 0)} items)",
        )
    check(
        s.error_rate <= gate.max_error_rate,
        f"error rate {s.error_rate:.3f} <= {gate.max_error_rate:.3f}",
        f"error rate {s.error_rate:.3f} above {gate.max_error_rate:.3f} "
        f"({s.errors} of {s.items} items failed"
        + (
            f", {s.transport_errors} could not reach the deployment)" if s.transport_errors else ")"
        ),
    )
    if gate.max_mean_latency_ms is not None:
        check(
            s.latency.mean_ms < gate.max_mean_latency_ms,
            f"mean latency {s.latency.mean_ms:.0f} ms < {gate.max_mean_latency_ms:.0f} ms",
            f"mean latency {s.latency.mean_ms:.0f} ms exceeds SLO "
            f"{gate.max_mean_latency_ms:.0f} ms",
        )
    if gate.max_p95_latency_ms is not None:
        check(
            s.latency.p95_ms < gate.max_p95_latency_ms,
            f"p95 latency {s.latency.p95_ms:.0f} ms < {gate.max_p95_latency_ms:.0f} ms",
            f"p95 latency {s.latency.p95_ms:.0f} ms exceeds SLO {gate.max_p95_latency_ms:.0f} ms",
        )
    if baseline is None:
        note = baseline_note or "no stable deployment to compare with"
        if gate.require_baseline:
            v.failures.append(f"no baseline comparison: {note}")
        else:
            v.notes.append(f"no baseline comparison: {note}")
    else:
        drop = baseline.overall_score - s.overall_score
        check(
            drop <= gate.max_regression + 1e-9,
            f"overall {s.overall_score:.3f} vs stable {baseline.overall_score:.3f} "
            f"(allowed drop {gate.max_regression:.3f})",
            f"regression vs stable: overall {s.overall_score:.3f} < stable "
            f"{baseline.overall_score:.3f} by {drop:.3f} (allowed {gate.max_regression:.3f})",
        )
        for cat, score in s.category_scores.items():
            if cat not in baseline.category_scores:
                continue
            base = baseline.category_scores[cat]
            drop = base - score
            check(
                drop <= gate.max_category_regression + 1e-9,
                f"category {cat} {score:.3f} vs stable {base:.3f}",
                f"regression vs stable in category {cat}: {score:.3f} < {base:.3f} by "
                f"{drop:.3f} (allowed {gate.max_category_regression:.3f})",
            )
    v.passed = not v.failures
    return v
