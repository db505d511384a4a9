"""Live outcome statistics per deployment, kept per replica in memory.

The canary's window restarts at each step (so a step is judged on its own traffic); the
stable's is a rolling window of its most recent outcomes, the reference for the SLO.
"""

from __future__ import annotations

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
        return out


EMPTY = WindowStats(requests=0, errors=0, p95_ms=None, p50_ms=None, latency_samples=0)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


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

    def snapshot(self) -> WindowStats:
        lat = sorted(self.latencies)
        return WindowStats(
            requests=self.requests,
            errors=self.errors,
            p95_ms=percentile(lat, 0.95) if lat else None,
            p50_ms=percentile(lat, 0.50) if lat else None,
            latency_samples=len(lat),
        )


class LiveStats:
    """Outcome windows keyed by deployment; a canary's window is keyed by (deployment, step)."""

    def __init__(self, window: int = 2000) -> None:
        self.window = window
        self._windows: dict[tuple[str, int], OutcomeWindow] = {}

    def record(self, deployment_id: str, step: int, ok: bool, latency_ms: float | None) -> None:
        key = (deployment_id, step)
        win = self._windows.get(key)
        if win is None:
            win = self._windows[key] = self._new(step)
        win.record(ok, latency_ms)

    def _new(self, step: int) -> OutcomeWindow:
        # step -1 marks a rolling window (stable); canary steps keep everything since the step
        # began, bounded in latency samples.
        return OutcomeWindow(size=self.window, recent=deque() if step < 0 else None)

    def get(self, deployment_id: str, step: int) -> WindowStats:
        win = self._windows.get((deployment_id, step))
        return win.snapshot() if win else EMPTY

    def forget(self, deployment_id: str) -> None:
        for key in [k for k in self._windows if k[0] == deployment_id]:
            del self._windows[key]

    def reset(self, deployment_id: str, step: int) -> None:
        self._windows.pop((deployment_id, step), None)


def merge(windows: list[WindowStats], *, min_samples: int) -> WindowStats:
    """Several replicas' windows of one deployment as one: counts add up; p95 is the worst
    p95 among windows with enough samples (else the sample-weighted mean), p50 the weighted
    mean."""
    windows = [w for w in windows if w.requests]
    if not windows:
        return EMPTY
    if len(windows) == 1:
        return windows[0]
    with_latency = [w for w in windows if w.p95_ms is not None and w.latency_samples]
    samples = sum(w.latency_samples for w in with_latency)
    p95 = p50 = None
    if with_latency:
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
    )
