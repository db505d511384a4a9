"""A message published without trace context (a plain NATS client) gets a trace named by
its event id, so every delivery of it, redeliveries after a crash included, is one trace."""

from __future__ import annotations

import json
import uuid

from opentelemetry import trace

from shared.bus import trace_of_event


def test_every_delivery_of_an_event_without_trace_context_joins_one_trace() -> None:
    event_id = uuid.uuid4()
    payload = json.dumps({"event_id": str(event_id), "run_id": "run-1"}).encode()
    first = trace.get_current_span(trace_of_event(payload)).get_span_context()
    again = trace.get_current_span(trace_of_event(payload)).get_span_context()
    assert first.is_valid and first.is_remote
    assert first.trace_id == again.trace_id == event_id.int
    other = trace_of_event(json.dumps({"event_id": str(uuid.uuid4())}).encode())
    assert trace.get_current_span(other).get_span_context().trace_id != first.trace_id


def test_hostile_payloads_get_no_invented_trace() -> None:
    for payload in (b"", b"not json", b"[]", b'{"event_id": "../../x"}', b'{"event_id": 7}'):
        context = trace_of_event(payload)
        assert not trace.get_current_span(context).get_span_context().is_valid
