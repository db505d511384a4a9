"""Live outcome statistics per deployment, kept per replica in memory.

The canary's window restarts at each step (so a step is judged on its own traffic). The
stable has two kinds of window: a rolling one of its most recent outcomes (what the admin view
shows), and, while a canary runs, one per canary step holding only the stable's outcomes of
that same period (:func:`paired_step`), the reference the canary is judged against. Judging a
canary's fresh window against the stable's long rolling one is biased: a slow spell on the
gateway itself (a GC pause, a busy host) lands whole in the canary's few recent samples but
is diluted in the stable's many older ones, and a good canary gets rolled back.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class WindowStats:
    requests: int
    errors: int
    p95_ms: float | None
    p50_ms: float | None
    latency_samples: int
    # A lower confidence bound of the p95 (see p95_lower_bound): what the latency SLO judges.
    p95_low_ms: float | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {
            "requests": float(self.requests),
            "errors": float(self.errors),
            "error_rate": round(self.error_rate, 4),
        }
        if self.p50_ms is not None:
            out["p50_ms"] = round(self.p50_ms, 2)
        if self.p95_ms is not None:
            out["p95_ms"] = round(self.p95_ms, 2)
        if self.p95_low_ms is not None:
            out["p95_low_ms"] = round(self.p95_low_ms, 2)
        return out


EMPTY = WindowStats(requests=0, errors=0, p95_ms=None, p50_ms=None, latency_samples=0)

ROLLING = -1  # the stable's rolling window


def paired_step(canary_step: int) -> int:
    """The window key of the stable's outcomes during canary step ``canary_step`` (-2, -3, ...;
    -1 is the rolling window, 0 and up are the canary's steps)."""
    return -2 - canary_step


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


@functools.lru_cache(maxsize=8192)
def _p95_lower_rank(n: int, confidence: float) -> int:
    """The largest rank r (1-based) with P(Binomial(n, 0.95) >= r) >= confidence; 0 if none.

    The r-th smallest of n samples is at most the true 95th percentile exactly when at least
    r samples fall at or below it, and how many do is Binomial(n, 0.95)."""
    log_p, log_q, log_n = math.log(0.95), math.log(0.05), math.lgamma(n + 1)
    tail = 0.0
    for r in range(n, 0, -1):
        log_pmf = log_n - math.lgamma(r + 1) - math.lgamma(n - r + 1)
        tail += math.exp(log_pmf + r * log_p + (n - r) * log_q)
        if tail >= confidence:
            return r
    return 0


def p95_lower_bound(sorted_values: list[float], confidence: float) -> float | None:
    """A value the true p95 exceeds with probability ``confidence``: an order statistic a few
    ranks below the sample p95 (with 0.99: the 5th largest of 20 samples, the 9th of 63, the
    124th of 2,000). Judging a canary on this instead of its sample p95 keeps a short slow
    spell that hit two or three of its requests from reading as a regression (with 20 samples
    the sample p95 is the 2nd largest), while a canary that really is slower still breaks the
    bound within a few dozen requests."""
    rank = _p95_lower_rank(len(sorted_values), confidence)
    return sorted_values[rank - 1] if rank else None


@dataclass
class OutcomeWindow:
    """Outcomes of one deployment. Latencies of successful attempts only."""

    size: int
    requests: int = 0
    errors: int = 0
    latencies: deque[float] = field(default_factory=deque)
    # For the rolling (stable) window: recent error flags, so old errors age out.
    recent: deque[bool] | None = None

    def record(self, ok: bool, latency_ms: float | None) -> None:
        if self.recent is not None:
            if len(self.recent) == self.size:
                dropped_ok = self.recent.popleft()
                self.requests -= 1
                self.errors -= 0 if dropped_ok else 1
            self.recent.append(ok)
        self.requests += 1
        if not ok:
            self.errors += 1
        if ok and latency_ms is not None:
            if len(self.latencies) == self.size:
                self.latencies.popleft()
            self.latencies.append(latency_ms)

    def snapshot(self, confidence: float = 0.99) -> WindowStats:
        lat = sorted(self.latencies)
        return WindowStats(
            requests=self.requests,
            errors=self.errors,
            p95_ms=percentile(lat, 0.95) if lat else None,
            p50_ms=percentile(lat, 0.50) if lat else None,
            latency_samples=len(lat),
            p95_low_ms=p95_lower_bound(lat, confidence),
        )


class LiveStats:
    """Outcome windows keyed by deployment; a canary's window is keyed by (deployment, step)."""

    def __init__(self, window: int = 2000, confidence: float = 0.99) -> None:
        self.window = window
        self.confidence = confidence
        self._windows: dict[tuple[str, int], OutcomeWindow] = {}

    def record(self, deployment_id: str, step: int, ok: bool, latency_ms: float | None) -> None:
        key = (deployment_id, step)
        win = self._windows.get(key)
        if win is None:
            win = self._windows[key] = self._new(step)
        win.record(ok, latency_ms)

    def _new(self, step: int) -> OutcomeWindow:
        # The stable's rolling window ages out old outcomes; a canary step's window and the
        # stable's window paired with it keep everything since the step began, bounded in
        # latency samples.
        return OutcomeWindow(size=self.window, recent=deque() if step == ROLLING else None)

    def get(self, deployment_id: str, step: int) -> WindowStats:
        win = self._windows.get((deployment_id, step))
        return win.snapshot(self.confidence) if win else EMPTY

    def forget(self, deployment_id: str) -> None:
        for key in [k for k in self._windows if k[0] == deployment_id]:
            del self._windows[key]

    def forget_paired(self, deployment_id: str) -> None:
        """Drop a stable's per-canary-step windows (a new canary starts a new comparison)."""
        for key in [k for k in self._windows if k[0] == deployment_id and k[1] <= -2]:
            del self._windows[key]

    def reset(self, deployment_id: str, step: int) -> None:
        self._windows.pop((deployment_id, step), None)


def merge(windows: list[WindowStats], *, min_samples: int) -> WindowStats:
    """Several replicas' windows of one deployment as one: counts add up; p95 is the worst
    p95 among windows with enough samples (else the sample-weighted mean), p50 the weighted
    mean, and the p95's lower bound the highest among windows with enough samples (none when
    no window has enough: latency is not judged on thin windows)."""
    windows = [w for w in windows if w.requests]
    if not windows:
        return EMPTY
    if len(windows) == 1:
        return windows[0]
    with_latency = [w for w in windows if w.p95_ms is not None and w.latency_samples]
    samples = sum(w.latency_samples for w in with_latency)
    p95 = p50 = low = None
    if with_latency:
        lows = [
            w.p95_low_ms
            for w in with_latency
            if w.latency_samples >= min_samples and w.p95_low_ms is not None
        ]
        low = max(lows) if lows else None
        judged = [w.p95_ms for w in with_latency if w.latency_samples >= min_samples]
        p95 = (
            max(x for x in judged if x is not None)
            if judged
            else (sum((w.p95_ms or 0.0) * w.latency_samples for w in with_latency) / samples)
        )
        p50 = sum((w.p50_ms or 0.0) * w.latency_samples for w in with_latency) / samples
    return WindowStats(
        requests=sum(w.requests for w in windows),
        errors=sum(w.errors for w in windows),
        p95_ms=p95,
        p50_ms=p50,
        latency_samples=samples,
        p95_low_ms=low,
    )
