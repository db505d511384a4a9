"""What a scorer says about one output."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScoreResult:
    """``score`` in [0, 1] (partial credit allowed); ``passed`` is the item's verdict."""

    score: float
    passed: bool
    detail: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"score {self.score} outside [0, 1]")

    @classmethod
    def binary(cls, ok: bool, detail: str = "") -> ScoreResult:
        return cls(score=1.0 if ok else 0.0, passed=ok, detail=detail)
