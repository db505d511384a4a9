from __future__ import annotations

from datetime import UTC, datetime, timedelta

from shared.events import ArtifactRef, DatasetReady, SplitCounts, TrainingDone, TrainingFailed
from shared.runs import format_status, summarise_runs, trace_tree

REF = ArtifactRef(uri="file:///a", sha256="a" * 64, size_bytes=1)
T0 = datetime(2026, 11, 21, 12, tzinfo=UTC)


def _ready(run: str, at: datetime) -> DatasetReady:
    return DatasetReady(
        run_id=run,
        producer="ingest",
        occurred_at=at,
        dataset_id="ds",
        dataset_name="n",
        train=REF,
        validation=REF,
        report=REF,
        counts=SplitCounts(train=1, validation=1),
    )


def test_runs_show_the_stage_reached_timings_and_failures():
    ready = _ready("run-a", T0)
    failed = ready.follow(
        TrainingFailed,
        producer="trainer",
        reason="CUDA out of memory",
        occurred_at=T0 + timedelta(seconds=30),
    )
    other = _ready("run-b", T0 + timedelta(minutes=5))
    done = other.follow(
        TrainingDone,
        producer="trainer",
        adapter_id="ad1",
        dataset_id="ds",
        base_model="tiny",
        method="dora",
        hyperparameters_hash="abcdef12",
        adapter=REF,
        occurred_at=T0 + timedelta(minutes=6),
    )
    runs = summarise_runs([done, failed, ready, other])
    assert [r.run_id for r in runs] == ["run-b", "run-a"]  # newest first
    assert runs[1].failed is not None and runs[1].failed.stage == "trainer"
    text = "\n".join(format_status(runs))
    assert "FAILED at trainer" in text
    assert "CUDA out of memory" in text
    assert "+  60.0s" in text  # run-b trained one minute after its dataset was ready
    assert "adapter_id=ad1" in text


def test_trace_tree_nests_spans_of_the_run_across_services():
    spans = [
        {
            "trace_id": "t1",
            "span_id": "a",
            "parent_span_id": None,
            "name": "upload",
            "service": "ingest",
            "start": "1",
            "duration_ms": 50.0,
            "status": "UNSET",
            "attributes": {"tuneloop.run_id": "run-a"},
        },
        {
            "trace_id": "t1",
            "span_id": "b",
            "parent_span_id": "a",
            "name": "consume dataset.ready",
            "service": "trainer",
            "start": "2",
            "duration_ms": 9000.0,
            "status": "ERROR",
            "attributes": {},
        },
        {
            "trace_id": "t2",
            "span_id": "c",
            "parent_span_id": None,
            "name": "unrelated",
            "service": "gateway",
            "start": "3",
            "duration_ms": 1.0,
            "status": "UNSET",
            "attributes": {"tuneloop.run_id": "run-z"},
        },
    ]
    lines = trace_tree(spans, "run-a")
    assert lines == [
        "upload  [ingest]  50.0 ms",
        "  consume dataset.ready  [trainer]  9000.0 ms  [ERROR]",
    ]
    assert trace_tree(spans, "run-missing") == []


def test_status_counts_dead_letters_by_consumer_with_the_newest_reason():
    from shared.runs import DeadLetter, format_dead_letters

    assert format_dead_letters([])[-1] == "dead letters: none"
    lines = format_dead_letters(
        [
            DeadLetter("trainer-dataset-ready", "run-1", "forbidden method"),
            DeadLetter("quantizer-adapter-trained", "run-2", "bad adapter"),
            DeadLetter("trainer-dataset-ready", "run-3", "schema validation failed"),
        ]
    )
    assert lines[1] == "dead letters: 3 (inspect with `tuneloop dead-letters`)"
    assert "trainer-dataset-ready" in lines[2] and " 2 " in lines[2]
    assert "run run-3: schema validation failed" in lines[2]
    assert "quantizer-adapter-trained" in lines[3]


def test_a_later_retirement_is_a_note_not_the_run_s_progress():
    from shared.events import DeploymentRetired, ModelDeployed

    ready = _ready("run-r", T0)
    deployed = ready.follow(
        ModelDeployed,
        producer="inference",
        deployment_id="dep-1",
        model_id="m1",
        engine="vllm-cpu",
        endpoint="http://127.0.0.1:1/v1",
        served_model_name="tuneloop",
        occurred_at=T0 + timedelta(minutes=2),
    )
    retired = deployed.follow(
        DeploymentRetired,
        producer="inference",
        deployment_id="dep-1",
        model_id="m1",
        served_model_name="tuneloop",
        occurred_at=T0 + timedelta(days=3),
    )
    (run,) = summarise_runs([ready, deployed, retired])
    inference = run.stages["inference"]
    assert inference.event == "ModelDeployed" and inference.ok
    assert inference.at == deployed.occurred_at  # the run did not last three days
    assert "(retired 2026-11-24 12:00)" in inference.detail
