"""Event contracts: frozen, strict, versioned, and JSON round-trippable."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from shared import subjects
from shared.events import (
    EVENT_BY_SUBJECT,
    EVENT_TYPES,
    ArtifactRef,
    DatasetReady,
    DatasetSubmitted,
    SplitCounts,
    StageFailed,
    TrainingDone,
    TrainingFailed,
    TrainingSpec,
)

REF = ArtifactRef(uri="file:///a/b", sha256="a" * 64, size_bytes=3)


def ready(**overrides) -> DatasetReady:
    fields = dict(
        run_id="run-1",
        producer="ingest",
        dataset_id="ds1",
        dataset_name="fin",
        train=REF,
        validation=REF,
        report=REF,
        counts=SplitCounts(train=9, validation=1),
    )
    fields.update(overrides)
    return DatasetReady(**fields)


def test_round_trip_through_json_is_lossless():
    event = ready(curriculum={"A": REF})
    assert DatasetReady.model_validate_json(event.model_dump_json()) == event


def test_events_are_frozen():
    event = ready()
    with pytest.raises(ValidationError):
        event.dataset_id = "other"  # type: ignore[misc]


def test_unknown_fields_are_refused():
    payload = json.loads(ready().model_dump_json())
    payload["surprise"] = 1
    with pytest.raises(ValidationError, match="surprise"):
        DatasetReady.model_validate(payload)


@pytest.mark.parametrize(
    "ref",
    [
        {"uri": "http://evil/x", "sha256": "a" * 64, "size_bytes": 1},
        {"uri": "file:///x", "sha256": "A" * 64, "size_bytes": 1},
        {"uri": "file:///x", "sha256": "a" * 63, "size_bytes": 1},
        {"uri": "file:///x", "sha256": "a" * 64, "size_bytes": -1},
    ],
)
def test_artifact_refs_are_validated(ref):
    with pytest.raises(ValidationError):
        ArtifactRef.model_validate(ref)


@pytest.mark.parametrize("run_id", ["", "../x", "a b", "x" * 300, "run\n1"])
def test_hostile_ids_are_refused(run_id):
    with pytest.raises(ValidationError):
        ready(run_id=run_id)


def test_occurred_at_must_be_aware_and_is_normalised_to_utc():
    with pytest.raises(ValidationError):
        ready(occurred_at=datetime(2026, 1, 1))
    event = ready(occurred_at=datetime(2026, 1, 1, 5, tzinfo=timezone(timedelta(hours=5))))
    assert event.occurred_at.utcoffset() == timedelta(0)
    assert event.occurred_at.hour == 0


def test_follow_carries_the_run_and_the_cause():
    first = ready()
    failed = first.follow(TrainingFailed, producer="trainer", reason="oom", retryable=True)
    assert failed.run_id == first.run_id
    assert failed.causation_id == first.event_id
    assert failed.event_id != first.event_id


def test_every_event_has_a_unique_subject_and_each_stage_a_failure_event():
    assert len(EVENT_BY_SUBJECT) == len(EVENT_TYPES)
    stages_with_failure = {t.stage for t in EVENT_TYPES if issubclass(t, StageFailed)}
    assert stages_with_failure == {"ingest", "trainer", "quantizer", "inference", "evaluator"}
    assert TrainingDone.subject == subjects.TRAINING_DONE


def test_submitted_files_must_be_store_uris():
    with pytest.raises(ValidationError, match="file:// or gs://"):
        DatasetSubmitted(run_id="r", producer="p", dataset_name="d", files=["/etc/passwd"])


def test_a_training_spec_travels_with_the_dataset_and_round_trips():
    spec = TrainingSpec(method="lora", profile="cpu-tiny", overrides={"lr": 1e-4, "rank": 8})
    event = ready(training=spec)
    again = DatasetReady.model_validate_json(event.model_dump_json())
    assert again.training == spec
    assert ready().training is None  # the trainer's own settings apply


@pytest.mark.parametrize(
    "bad",
    [
        {"method": "full-finetune"},
        {"profile": "../../etc"},
        {"overrides": {"lr": {"nested": "object"}}},
        {"overrides": {f"k{i}": 1 for i in range(65)}},
        {"unknown": 1},
    ],
)
def test_hostile_training_specs_are_refused(bad):
    with pytest.raises(ValidationError):
        TrainingSpec(**bad)
