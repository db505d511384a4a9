"""Benchmarks: versioned files of items, each scored by a named scorer.

A benchmark is a JSON object ``{"name", "description", "scorer", "system_prompt", "items"}``
or a JSONL file with one item per line (the name is the file's stem). Its version is the
sha256 of the file's bytes, so a changed file is a new version and cached baseline results
never mix versions.

An item: ``{"id", "category", "prompt" | "messages", "expected", "scorer"?}``; an item
without a scorer uses the benchmark's.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ScorerType = Literal[
    "exact",
    "contains_all",
    "contains_any",
    "regex",
    "json_schema",
    "numeric",
    "similarity",
    "judge",
]
MAX_BENCHMARK_BYTES = 20 * 1024 * 1024
MAX_ITEMS = 10_000
_ID = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,199}$"


class BenchmarkError(ValueError):
    """The benchmark file is malformed, oversized or inconsistent."""


class ScorerSpec(BaseModel):
    """How one item's output is scored. Options apply to the scorer types that name them."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    type: ScorerType
    # contains_all / contains_any (defaults to ``expected`` when it is a list)
    keywords: list[str] | None = Field(default=None, max_length=200)
    case_sensitive: bool = False
    # regex
    pattern: str | None = Field(default=None, max_length=2000)
    # json_schema: a JSON Schema the parsed output must satisfy, and the fields of ``expected``
    # compared one by one (None = every key of ``expected``).
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    fields: list[str] | None = Field(default=None, max_length=100)
    # numeric: |got - expected| <= max(tolerance, relative_tolerance * |expected|)
    tolerance: float = Field(default=0.0, ge=0)
    relative_tolerance: float = Field(default=0.0, ge=0)
    # similarity: cosine at or above this counts as correct
    threshold: float = Field(default=0.7, ge=-1, le=1)
    # judge: what a good answer looks like; the judge answers with a score 0-10
    rubric: str | None = Field(default=None, max_length=8000)

    @model_validator(mode="after")
    def _options(self) -> ScorerSpec:
        if self.type == "regex":
            if not self.pattern:
                raise ValueError("a regex scorer needs 'pattern'")
            import re

            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"invalid regex {self.pattern!r}: {exc}") from exc
        if self.type == "judge" and not self.rubric:
            raise ValueError("a judge scorer needs 'rubric'")
        if self.json_schema is not None:
            from jsonschema import Draft202012Validator
            from jsonschema.exceptions import SchemaError

            try:
                Draft202012Validator.check_schema(self.json_schema)
            except SchemaError as exc:
                raise ValueError(f"invalid JSON Schema: {exc.message}") from exc
        return self


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class BenchmarkItem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=_ID)
    category: str = Field(min_length=1, max_length=100)
    prompt: str | None = Field(default=None, max_length=100_000)
    messages: list[Message] | None = Field(default=None, min_length=1, max_length=100)
    expected: Any = None
    scorer: ScorerSpec | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=32_768)

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> BenchmarkItem:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("an item needs exactly one of 'prompt' and 'messages'")
        return self

    def chat(self, system_prompt: str | None) -> list[dict[str, str]]:
        """The request's messages (the benchmark's system prompt first, if the item has none)."""
        if self.messages is not None:
            msgs = [m.model_dump() for m in self.messages]
        else:
            msgs = [{"role": "user", "content": self.prompt or ""}]
        if system_prompt and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system_prompt})
        return msgs


class Benchmark(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=_ID)
    description: str = Field(default="", max_length=4000)
    version: str = Field(default="", max_length=64)
    system_prompt: str | None = Field(default=None, max_length=20_000)
    scorer: ScorerSpec | None = None
    items: list[BenchmarkItem] = Field(min_length=1, max_length=MAX_ITEMS)

    @model_validator(mode="after")
    def _consistent(self) -> Benchmark:
        seen: set[str] = set()
        for item in self.items:
            if item.id in seen:
                raise ValueError(f"duplicate item id {item.id!r}")
            seen.add(item.id)
            spec = item.scorer or self.scorer
            if spec is None:
                raise ValueError(f"item {item.id!r} has no scorer and the benchmark no default")
            _check_expected(item, spec)
        return self

    def scorer_for(self, item: BenchmarkItem) -> ScorerSpec:
        spec = item.scorer or self.scorer
        assert spec is not None  # checked at validation
        return spec

    @property
    def categories(self) -> list[str]:
        return sorted({i.category for i in self.items})

    def sample(self, max_items: int, seed: int) -> Benchmark:
        """A deterministic subset (same seed, same items) in file order, with a version of
        its own. ``max_items <= 0`` keeps everything."""
        if max_items <= 0 or max_items >= len(self.items):
            return self
        chosen = set(random.Random(seed).sample(range(len(self.items)), max_items))
        items = [it for i, it in enumerate(self.items) if i in chosen]
        version = hashlib.sha256(f"{self.version}:{max_items}:{seed}".encode()).hexdigest()
        return self.model_copy(update={"items": items, "version": version})


def _check_expected(item: BenchmarkItem, spec: ScorerSpec) -> None:
    exp = item.expected
    kind = spec.type
    if kind in ("exact", "similarity") and not isinstance(exp, str):
        raise ValueError(f"item {item.id!r}: a {kind} scorer needs a string 'expected'")
    if kind in ("contains_all", "contains_any"):
        keywords = spec.keywords if spec.keywords is not None else exp
        if not isinstance(keywords, list) or not keywords:
            raise ValueError(f"item {item.id!r}: {kind} needs 'keywords' or a list 'expected'")
        if not all(isinstance(k, str) and k for k in keywords):
            raise ValueError(f"item {item.id!r}: keywords must be non-empty strings")
    if kind == "numeric" and (isinstance(exp, bool) or not isinstance(exp, int | float)):
        raise ValueError(f"item {item.id!r}: a numeric scorer needs a number 'expected'")
    if kind == "json_schema":
        if spec.json_schema is None and not isinstance(exp, dict):
            raise ValueError(f"item {item.id!r}: json_schema needs 'schema' or a dict 'expected'")
        if spec.fields and not (isinstance(exp, dict) and set(spec.fields) <= set(exp)):
            raise ValueError(f"item {item.id!r}: every scored field must be in 'expected'")


def parse_benchmark(
    data: bytes, *, name: str = "benchmark", jsonl: bool | None = None
) -> Benchmark:
    """Validate benchmark bytes; the version is their sha256 (unless the file sets one)."""
    if len(data) > MAX_BENCHMARK_BYTES:
        raise BenchmarkError(f"benchmark is {len(data)} bytes; the limit is {MAX_BENCHMARK_BYTES}")
    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BenchmarkError(f"benchmark is not UTF-8: {exc}") from exc
    if jsonl is None:
        try:
            whole = json.loads(text)
            jsonl = not (isinstance(whole, dict) and "items" in whole)
        except (ValueError, RecursionError):
            jsonl = True
    try:
        if jsonl:
            items = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    items.append(json.loads(line))
                except ValueError as exc:
                    raise BenchmarkError(f"line {n}: not JSON: {exc}") from exc
            raw: Any = {"name": name, "items": items}
        else:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise BenchmarkError("a JSON benchmark must be an object with 'items'")
        bench = Benchmark.model_validate(raw)
    except ValidationError as exc:
        raise BenchmarkError(f"invalid benchmark: {_short(exc)}") from exc
    except ValueError as exc:
        if isinstance(exc, BenchmarkError):
            raise
        raise BenchmarkError(f"invalid benchmark: {exc}") from exc
    if not bench.version:
        bench = bench.model_copy(update={"version": digest})
    return bench


def load_benchmark(path: Path) -> Benchmark:
    size = path.stat().st_size
    if size > MAX_BENCHMARK_BYTES:
        raise BenchmarkError(f"{path} is {size} bytes; the limit is {MAX_BENCHMARK_BYTES}")
    return parse_benchmark(path.read_bytes(), name=_stem(path), jsonl=path.suffix == ".jsonl")


def from_validation_split(
    data: bytes, *, name: str = "validation", threshold: float = 0.7, max_items: int = 200
) -> Benchmark:
    """Turn a dataset's validation split (ingest's JSONL chat records) into a benchmark:
    the conversation up to the last assistant turn is the prompt, that turn is the expected
    answer, scored by embedding similarity."""
    items: list[dict[str, Any]] = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        if len(items) >= max_items:
            break
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        msgs = rec.get("messages") if isinstance(rec, dict) else None
        if not isinstance(msgs, list):
            continue
        last = max(
            (i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "assistant"),
            default=None,
        )
        if not last or not isinstance(msgs[last].get("content"), str):
            continue
        ident = str(rec.get("id") or f"val-{len(items)}")
        items.append(
            {
                "id": ident if len(ident) <= 200 else hashlib.sha256(ident.encode()).hexdigest(),
                "category": str(rec.get("category") or "general")[:100],
                "messages": msgs[:last],
                "expected": msgs[last]["content"],
            }
        )
    if not items:
        raise BenchmarkError("the validation split has no record with an assistant turn")
    raw = {
        "name": name,
        "description": "held-out validation split, scored by embedding similarity",
        "scorer": {"type": "similarity", "threshold": threshold},
        "items": items,
    }
    payload = json.dumps(raw, sort_keys=True).encode()
    return parse_benchmark(payload, name=name, jsonl=False)


def _stem(path: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "._-" else "-" for c in path.stem)
    return stem.lstrip("._-")[:200] or "benchmark"


def _short(exc: ValidationError) -> str:
    errs = exc.errors()[:5]
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errs)
