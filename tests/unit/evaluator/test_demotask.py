"""The demo task generator: deterministic per seed, train and benchmark disjoint, formats right."""

from __future__ import annotations

import json

from services.evaluator.benchmark import parse_benchmark
from services.evaluator.settings import BENCHMARKS_DIR
from shared import demotask


def test_same_seed_same_bytes_other_seed_other_data():
    assert demotask.train_records(1, 50) == demotask.train_records(1, 50)
    assert demotask.benchmark(1, 20) == demotask.benchmark(1, 20)
    assert demotask.train_records(1, 50) != demotask.train_records(2, 50)


def test_shipped_task_benchmark_is_the_generator_output():
    shipped = json.loads((BENCHMARKS_DIR / "demotask.json").read_text())
    assert shipped == demotask.benchmark(0, 40)


def test_train_records_are_in_ingest_chat_format():
    for rec in demotask.train_records(0, 100):
        assert set(rec) == {"id", "messages", "category", "source"}
        roles = [m["role"] for m in rec["messages"]]
        assert roles == ["system", "user", "assistant"]
        answer = json.loads(rec["messages"][-1]["content"])
        assert list(answer) == ["intent", "task", "when"]
        assert rec["category"] == answer["intent"] in demotask.INTENTS


def test_benchmark_is_held_out_but_over_seen_intents_and_times():
    train = demotask.train_records(0, 2000)
    bench = parse_benchmark(json.dumps(demotask.benchmark(0, 40)).encode())
    train_prompts = {r["messages"][1]["content"] for r in train}
    train_answers = [json.loads(r["messages"][2]["content"]) for r in train]
    seen_tasks = {a["task"] for a in train_answers}
    seen_when = {a["when"] for a in train_answers}
    for item in bench.items:
        assert item.messages is not None
        assert item.messages[-1].content not in train_prompts
        assert item.expected["task"] not in seen_tasks  # unseen content
        assert item.expected["when"] in seen_when  # seen vocabulary: learnable
    assert bench.scorer_for(bench.items[0]).fields == ["intent", "when"]
    assert len({i.category for i in bench.items}) == 3


def test_write_and_cli(tmp_path):
    demotask.main([str(tmp_path), "--seed", "3", "--train", "12", "--test", "5"])
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    assert len(lines) == 12
    bench = parse_benchmark((tmp_path / "benchmark.json").read_bytes())
    assert len(bench.items) == 5
