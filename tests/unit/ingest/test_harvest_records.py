"""Turning gateway interactions into training records, and which ones qualify."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from services.ingest.handlers import _eligible, interaction_record
from shared.interactions import Interaction


def row(request: str, **kw) -> Interaction:
    fields = dict(
        id="r1",
        created_at=datetime.now(UTC),
        served_model_name="tuneloop",
        deployment_id="d1",
        request=request,
        response_text="the answer",
        status_code=200,
        latency_ms=5.0,
    )
    fields.update(kw)
    return Interaction(**fields)


def test_chat_and_completion_requests_become_chat_records():
    chat = row(
        orjson.dumps(
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}
        ).decode()
    )
    rec = interaction_record(chat, "production")
    assert rec == {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "the answer"},
        ],
        "category": "production",
        "source": "harvest:tuneloop",
    }
    completion = interaction_record(row('{"prompt": "p"}'), "production")
    assert completion is not None and completion["messages"][0] == {"role": "user", "content": "p"}


@pytest.mark.parametrize(
    "request_text",
    ["not json", "42", '{"messages": "x"}', '{"other": 1}', '"a string"', "{" * 10_000],
)
def test_unusable_requests_are_skipped(request_text):
    assert interaction_record(row(request_text), "production") is None


def test_odd_message_items_are_kept_for_validation_to_judge():
    rec = interaction_record(row('{"messages": [1, {"role": "tool", "content": null}]}'), "p")
    assert rec is not None  # validation (role order, types) rejects it later, with a reason
    assert rec["messages"][0] == {"role": "tool", "content": None}


@pytest.mark.parametrize(
    ("kw", "ok"),
    [
        ({"quality_score": 0.95}, True),
        ({"quality_score": 0.9}, True),
        ({"quality_score": 0.89}, False),
        ({"feedback_rating": 1}, True),
        ({"quality_score": 0.99, "feedback_rating": -1}, False),
        ({"quality_score": 0.99, "status_code": 502}, False),
        ({}, False),
    ],
)
def test_eligibility(kw, ok):
    assert _eligible(row("{}", **kw), 0.9) is ok
