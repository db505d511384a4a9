"""Benchmark files: the shipped ones load; malformed, oversized, inconsistent ones are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.evaluator.benchmark import (
    MAX_BENCHMARK_BYTES,
    BenchmarkError,
    from_validation_split,
    load_benchmark,
    parse_benchmark,
)
from services.evaluator.settings import BENCHMARKS_DIR


def test_shipped_benchmarks_load_with_their_categories():
    finance = load_benchmark(BENCHMARKS_DIR / "finance.json")
    assert set(finance.categories) == {
        "retirement_planning",
        "tax",
        "estate_planning",
        "investment",
        "compliance",
    }
    scorer_types = {finance.scorer_for(i).type for i in finance.items}
    assert {"contains_all", "contains_any", "regex", "numeric", "similarity"} <= scorer_types
    task = load_benchmark(BENCHMARKS_DIR / "demotask.json")
    assert set(task.categories) == {"reminder", "meeting", "todo"}
    assert len(task.version) == 64


def test_version_is_the_content_hash():
    a = parse_benchmark(
        b'{"id": "a", "category": "c", "prompt": "p", "expected": "x", '
        b'"scorer": {"type": "exact"}}\n'
    )
    b = parse_benchmark(
        b'{"id": "a", "category": "c", "prompt": "p", "expected": "y", '
        b'"scorer": {"type": "exact"}}\n'
    )
    assert a.version != b.version and a.name == "benchmark"


def test_jsonl_file_is_named_after_its_stem(tmp_path: Path):
    path = tmp_path / "my bench.jsonl"
    path.write_text(
        json.dumps(
            {
                "id": "a",
                "category": "c",
                "prompt": "p",
                "expected": 3,
                "scorer": {"type": "numeric"},
            }
        )
        + "\n\n"
    )
    bench = load_benchmark(path)
    assert bench.name == "my-bench" and len(bench.items) == 1


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "items"),
        (b"not json at all", "not JSON"),
        (b"\xff\xfe\x00garbage", "UTF-8"),
        (b"[1, 2, 3]", "invalid benchmark"),
        (b'{"name": "x", "items": []}', "items"),
        (b'{"name": "x", "items": [{"id": "a", "category": "c", "prompt": "p"}]}', "no scorer"),
        (
            b'{"name": "x", "scorer": {"type": "exact"}, "items": [{"id": "a", "category": "c"}]}',
            "exactly one of",
        ),
        (
            b'{"name": "x", "scorer": {"type": "regex", "pattern": "("}, "items": '
            b'[{"id": "a", "category": "c", "prompt": "p"}]}',
            "invalid regex",
        ),
        (
            b'{"name": "x", "scorer": {"type": "json_schema", "schema": {"type": 5}}, "items": '
            b'[{"id": "a", "category": "c", "prompt": "p", "expected": {}}]}',
            "JSON Schema",
        ),
        (
            b'{"name": "x", "scorer": {"type": "numeric"}, "items": '
            b'[{"id": "a", "category": "c", "prompt": "p", "expected": "ten"}]}',
            "number",
        ),
        (
            b'{"name": "x", "scorer": {"type": "exact"}, "items": ['
            b'{"id": "a", "category": "c", "prompt": "p", "expected": "1"},'
            b'{"id": "a", "category": "c", "prompt": "p", "expected": "2"}]}',
            "duplicate",
        ),
        (
            b'{"name": "../etc", "scorer": {"type": "exact"}, "items": '
            b'[{"id": "a", "category": "c", "prompt": "p", "expected": "1"}]}',
            "name",
        ),
        (
            b'{"name": "x", "scorer": {"type": "judge"}, "items": '
            b'[{"id": "a", "category": "c", "prompt": "p"}]}',
            "rubric",
        ),
    ],
)
def test_malformed_benchmarks_are_refused_with_a_reason(payload: bytes, message: str):
    with pytest.raises(BenchmarkError, match=message):
        parse_benchmark(payload)


def test_oversized_benchmark_is_refused(tmp_path: Path):
    with pytest.raises(BenchmarkError, match="limit"):
        parse_benchmark(b" " * (MAX_BENCHMARK_BYTES + 1))
    path = tmp_path / "big.json"
    with path.open("wb") as fh:
        fh.truncate(MAX_BENCHMARK_BYTES + 1)
    with pytest.raises(BenchmarkError, match="limit"):
        load_benchmark(path)


def test_sampling_is_deterministic_and_versioned():
    bench = load_benchmark(BENCHMARKS_DIR / "demotask.json")
    a, b = bench.sample(10, seed=3), bench.sample(10, seed=3)
    assert [i.id for i in a.items] == [i.id for i in b.items] and len(a.items) == 10
    assert a.version != bench.version
    assert [i.id for i in bench.sample(10, seed=4).items] != [i.id for i in a.items]
    assert bench.sample(0, seed=1) is bench


def test_validation_split_becomes_a_similarity_benchmark():
    lines = [
        {
            "id": "r1",
            "category": "tax",
            "messages": [
                {"role": "user", "content": "What is a W-2?"},
                {"role": "assistant", "content": "A wage statement."},
            ],
        },
        {"id": "r2", "messages": [{"role": "user", "content": "no answer"}]},
        "not a record",
    ]
    data = "\n".join(json.dumps(x) for x in lines).encode() + b"\n{broken"
    bench = from_validation_split(data, name="val", threshold=0.6)
    assert len(bench.items) == 1
    only = bench.items[0]
    assert only.category == "tax" and only.expected == "A wage statement."
    assert only.messages is not None and only.messages[-1].role == "user"
    assert bench.scorer_for(only).type == "similarity"
    with pytest.raises(BenchmarkError):
        from_validation_split(b'{"messages": []}\n')
