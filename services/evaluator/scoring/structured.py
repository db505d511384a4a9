"""Structured output: the first JSON object in the output, checked against a JSON Schema and
compared field by field with the expected object (the Phi-2 task model's intent + entities).

Score = (parsed + schema-valid + each matching field) / number of checks, so a model that
learned the format but not yet the content gets partial credit, which is what a tiny model
can show (see the design notes).
"""

from __future__ import annotations

import json
from typing import Any

from services.evaluator.scoring.result import ScoreResult
from services.evaluator.scoring.text import normalise

MAX_CANDIDATES = 64


def extract_json_object(output: str) -> dict[str, Any] | None:
    """The first ``{...}`` in ``output`` that parses as a JSON object (code fences and prose
    around it are ignored)."""
    decoder = json.JSONDecoder()
    start = output.find("{")
    tries = 0
    while start != -1 and tries < MAX_CANDIDATES:
        tries += 1
        try:
            value, _end = decoder.raw_decode(output, start)
        except (ValueError, RecursionError):
            start = output.find("{", start + 1)
            continue
        if isinstance(value, dict):
            return value
        start = output.find("{", start + 1)
    return None


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, str):
        return isinstance(got, str | int | float) and normalise(str(got)) == normalise(want)
    return bool(got == want)


def json_schema(
    output: str,
    expected: Any,
    *,
    schema: dict[str, Any] | None,
    fields: list[str] | None,
) -> ScoreResult:
    obj = extract_json_object(output)
    wanted = expected if isinstance(expected, dict) else {}
    names = list(fields) if fields is not None else list(wanted)
    total = 1 + (1 if schema is not None else 0) + len(names)
    if obj is None:
        return ScoreResult(score=0.0, passed=False, detail="no JSON object in the output")
    points = 1
    problems: list[str] = []
    if schema is not None:
        error = _schema_errors(obj, schema)
        if error:
            problems.append(f"schema: {error}")
        else:
            points += 1
    for name in names:
        if name in obj and _same(obj[name], wanted.get(name)):
            points += 1
        else:
            got = obj.get(name, "<missing>")
            problems.append(f"{name}: got {str(got)[:60]!r}, want {str(wanted.get(name))[:60]!r}")
    detail = "; ".join(problems) if problems else "valid and every field matches"
    return ScoreResult(score=points / total, passed=not problems, detail=detail[:500])


# Validators by schema identity: benchmark specs are frozen and live as long as the benchmark.
_VALIDATORS: dict[int, tuple[dict[str, Any], Any]] = {}


def _validator(schema: dict[str, Any]) -> Any:
    cached = _VALIDATORS.get(id(schema))
    if cached is not None and cached[0] is schema:
        return cached[1]
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema)
    if len(_VALIDATORS) > 1000:
        _VALIDATORS.clear()
    _VALIDATORS[id(schema)] = (schema, validator)
    return validator


def _schema_errors(obj: Any, schema: dict[str, Any]) -> str:
    try:
        error = next(iter(_validator(schema).iter_errors(obj)), None)
    except RecursionError:
        return "too deeply nested"
    return "" if error is None else error.message[:200]
