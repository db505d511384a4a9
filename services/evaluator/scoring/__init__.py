"""Scorers: each turns (item, model output) into a :class:`ScoreResult`.

``exact`` (normalised), ``contains_all`` / ``contains_any``, ``regex``, ``json_schema``,
``numeric`` (with tolerance), ``similarity`` (embedding cosine) and ``judge`` (an LLM judge).
Outputs are bounded before they get here; a scorer that raises on hostile input scores 0
with the error as its reason instead of breaking the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from services.evaluator.benchmark import BenchmarkItem, ScorerSpec
from services.evaluator.scoring import structured, text
from services.evaluator.scoring.result import ScoreResult
from services.evaluator.scoring.similarity import Embedder

__all__ = ["Judge", "ScoreResult", "Scoring"]


class Judge(Protocol):
    async def grade(
        self, question: str, expected: str | None, answer: str, rubric: str
    ) -> ScoreResult: ...


@dataclass
class Scoring:
    """The scorers' heavy dependencies (embedding model, judge), created once per service."""

    embedder: Embedder | None = None
    judge: Judge | None = None

    async def score(self, spec: ScorerSpec, item: BenchmarkItem, output: str) -> ScoreResult:
        try:
            return await self._score(spec, item, output)
        except Exception as exc:
            return ScoreResult.binary(False, f"scorer error: {type(exc).__name__}: {exc}"[:300])

    async def _score(self, spec: ScorerSpec, item: BenchmarkItem, output: str) -> ScoreResult:
        exp = item.expected
        cs = spec.case_sensitive
        match spec.type:
            case "exact":
                return text.exact(output, str(exp), case_sensitive=cs)
            case "contains_all" | "contains_any":
                keywords = spec.keywords if spec.keywords is not None else list(exp)
                mode = "all" if spec.type == "contains_all" else "any"
                return text.contains(output, keywords, mode=mode, case_sensitive=cs)
            case "regex":
                return text.regex(output, spec.pattern or "", case_sensitive=cs)
            case "numeric":
                return text.numeric(
                    output,
                    exp,
                    tolerance=spec.tolerance,
                    relative_tolerance=spec.relative_tolerance,
                )
            case "json_schema":
                return structured.json_schema(
                    output, exp, schema=spec.json_schema, fields=spec.fields
                )
            case "similarity":
                if self.embedder is None:
                    return ScoreResult.binary(False, "no embedding model configured")
                cos = await self.embedder.similarity(output, str(exp))
                ok = cos >= spec.threshold
                return ScoreResult.binary(ok, f"cosine {cos:.3f} vs threshold {spec.threshold}")
            case "judge":
                if self.judge is None:
                    return ScoreResult.binary(False, "no judge endpoint configured")
                question = item.prompt or (item.messages[-1].content if item.messages else "")
                expected = exp if isinstance(exp, str) else None
                return await self.judge.grade(question, expected, output, spec.rubric or "")
        raise ValueError(f"unknown scorer {spec.type!r}")  # pragma: no cover
