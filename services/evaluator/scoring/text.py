"""Scorers over plain text: exact (normalised), keywords, regex, numeric."""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

from services.evaluator.scoring.result import ScoreResult

_WS = re.compile(r"\s+")
_EDGE_PUNCT = " \t\n\r.,;:!?\"'`()[]{}"
# Numbers as people and models write them: -1,234.5  12%  $3.50  1e-3
_NUMBER = re.compile(r"(?<![\w.])[-+−]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")


def normalise(text: str, *, case_sensitive: bool = False) -> str:
    """NFKC, collapsed whitespace, trimmed edge punctuation; lower-case unless asked not to."""
    text = unicodedata.normalize("NFKC", text)
    text = _WS.sub(" ", text).strip(_EDGE_PUNCT)
    return text if case_sensitive else text.casefold()


def exact(output: str, expected: str, *, case_sensitive: bool = False) -> ScoreResult:
    ok = normalise(output, case_sensitive=case_sensitive) == normalise(
        expected, case_sensitive=case_sensitive
    )
    return ScoreResult.binary(ok, "exact match" if ok else "differs from the expected answer")


def contains(
    output: str, keywords: list[str], *, mode: str, case_sensitive: bool = False
) -> ScoreResult:
    """``all``: score = fraction of keywords present (passed only if all are);
    ``any``: 1 if at least one is present."""
    hay = normalise(output, case_sensitive=case_sensitive)
    found = [k for k in keywords if normalise(k, case_sensitive=case_sensitive) in hay]
    missing = [k for k in keywords if k not in found]
    if mode == "any":
        ok = bool(found)
        return ScoreResult.binary(ok, f"found {found[:5]}" if ok else f"none of {keywords[:10]}")
    score = len(found) / len(keywords)
    detail = "all keywords present" if not missing else f"missing {missing[:10]}"
    return ScoreResult(score=score, passed=not missing, detail=detail)


def regex(output: str, pattern: str, *, case_sensitive: bool = False) -> ScoreResult:
    flags = 0 if case_sensitive else re.IGNORECASE
    ok = re.search(pattern, output, flags | re.MULTILINE) is not None
    return ScoreResult.binary(ok, "pattern matched" if ok else f"no match for /{pattern[:80]}/")


def parse_number(token: str) -> float | None:
    cleaned = token.replace(",", "").replace("$", "").replace("−", "-")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def numeric(
    output: str, expected: Any, *, tolerance: float = 0.0, relative_tolerance: float = 0.0
) -> ScoreResult:
    """The first number in the output is the answer (a model that lists many numbers does
    not get to pick)."""
    match = _NUMBER.search(output)
    if match is None:
        return ScoreResult.binary(False, "no number in the output")
    got = parse_number(match.group(0))
    if got is None:
        return ScoreResult.binary(False, f"unreadable number {match.group(0)[:40]!r}")
    want = float(expected)
    allowed = max(tolerance, relative_tolerance * abs(want))
    ok = abs(got - want) <= allowed + 1e-12
    return ScoreResult.binary(ok, f"got {got:g}, expected {want:g} ± {allowed:g}")
