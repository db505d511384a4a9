"""The trainer as a service: DatasetReady on a real nats-server → real training → TrainingDone
through the outbox, on SQLite and PostgreSQL; idempotency; refusals and hostile input."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest

from services.trainer.handlers import plan_for
from services.trainer.settings import TrainerSettings
from shared.bus import EventBus
from shared.events import ArtifactRef, DatasetReady, TrainingDone, TrainingFailed
from shared.storage import ArtifactStore
from tests.integration.streams import eventually
from tests.integration.trainer.dataset import json_task, jsonl, publishable_dataset
from tests.integration.trainer.service import (
    TEST_TRAINING,
    at_least,
    consumer_done_through,
    dead_letters,
    events_of,
    metadata_of,
    running_trainer,
)

pytestmark = pytest.mark.integration


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_dataset_ready_trains_once_and_emits_training_done(
    bus_settings, db, tmp_path: Path, store_url: str, models_dir: Path
) -> None:
    store = ArtifactStore.from_url(store_url, cache_dir=tmp_path / "cache")
    event = await publishable_dataset(store, json_task(32), json_task(8, seed=5, prefix="v"))
    async with (
        running_trainer(bus_settings, db.url, tmp_path, store_url) as runtime,
        EventBus(bus_settings, service="test-ingest") as producer,
    ):
        await producer.publish(event)
        done = await eventually(
            lambda: events_of(bus_settings, TrainingDone), timeout_s=240, what="TrainingDone"
        )
        # The same dataset again (a new event, e.g. ingest re-announcing it): no new training.
        again = event.model_copy(update={"event_id": uuid.uuid4()})
        ack = await producer.publish(again)
        durable = runtime.bus.subscriptions[0].durable
        await eventually(
            lambda: consumer_done_through(bus_settings, durable, ack.seq),
            timeout_s=60,
            what="second DatasetReady handled",
        )

        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=runtime.http), base_url="http://t"
        ) as client:
            jobs = (await client.get("/jobs")).json()
            job = (await client.get(f"/jobs/{done[0].adapter_id}")).json()
            assert (await client.get("/jobs/../../etc")).status_code == 404
            assert (await client.get("/jobs/adp-" + "x" * 5000)).status_code == 422
            cancel = await client.post(f"/jobs/{done[0].adapter_id}/cancel")
            assert cancel.status_code == 401
            cancel = await client.post(
                f"/jobs/{done[0].adapter_id}/cancel", headers={"X-Admin-Key": "tl-dev-admin-key"}
            )
            assert cancel.status_code == 409  # done, nothing to cancel

    done = await events_of(bus_settings, TrainingDone)
    assert len(done) == 1
    trained = done[0]
    plan = plan_for(event, TrainerSettings(**TEST_TRAINING))
    assert trained.adapter_id == plan.adapter_id
    assert trained.hyperparameters_hash == plan.config.config_hash()
    assert trained.dataset_id == event.dataset_id
    assert trained.run_id == event.run_id
    assert trained.causation_id == event.event_id
    assert trained.method == "dora"
    assert trained.base_model == "tiny"
    assert trained.validation == event.validation
    assert [p.phase for p in trained.phases] == ["all"]
    assert trained.phases[0].steps == 4
    assert trained.tokens_per_second and trained.tokens_per_second > 0
    assert len(jobs) == 1
    assert job["status"] == "done"
    assert job["attempts"] == 1

    adapter = await store.fetch_dir(trained.adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    meta = metadata_of(adapter)
    assert meta["adapter_id"] == trained.adapter_id
    assert meta["dataset_id"] == event.dataset_id
    assert len(meta["post_training"]) == 1


async def test_forbidden_method_is_refused_with_training_failed(
    bus_settings, db, tmp_path: Path, store_url: str
) -> None:
    store = ArtifactStore.from_url(store_url)
    event = await publishable_dataset(store, json_task(8), json_task(2, prefix="v"))
    async with (
        running_trainer(
            bus_settings, db.url, tmp_path, store_url, method="lora", forbidden_methods=["lora"]
        ),
        EventBus(bus_settings, service="test-ingest") as producer,
    ):
        await producer.publish(event)
        failed = await eventually(
            lambda: events_of(bus_settings, TrainingFailed), timeout_s=30, what="TrainingFailed"
        )
        letters = await eventually(lambda: dead_letters(bus_settings), what="dead letter")
    assert len(failed) == 1
    assert "'lora' is forbidden" in failed[0].reason
    assert failed[0].retryable is False
    assert failed[0].failed_event_id == event.event_id
    assert failed[0].dataset_id == event.dataset_id
    assert "forbidden" in letters[0].headers["Tuneloop-Dead-Letter-Reason"]
    assert await events_of(bus_settings, TrainingDone) == []


async def test_malformed_and_hostile_datasets_fail_permanently(
    bus_settings, db, tmp_path: Path, store_url: str, models_dir: Path
) -> None:
    store = ArtifactStore.from_url(store_url)
    good = json_task(8)
    val = json_task(2, prefix="v")
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    cases = {
        "ds-bad-json": await publishable_dataset(
            store, jsonl(good) + b'{"id": "x", "messages": [\n', val, dataset_id="ds-bad-json"
        ),
        "ds-bad-role": await publishable_dataset(
            store,
            jsonl(good) + b'{"id": "x", "messages": [{"role": "root", "content": "rm -rf /"}]}\n',
            val,
            dataset_id="ds-bad-role",
        ),
        "ds-huge-line": await publishable_dataset(
            store,
            jsonl(good)
            + json.dumps(
                {"id": "big", "messages": [{"role": "assistant", "content": "a" * 1_100_000}]}
            ).encode()
            + b"\n",
            val,
            dataset_id="ds-huge-line",
        ),
        "ds-unknown-ids": await publishable_dataset(
            store,
            good,
            val,
            curriculum={"A": ["r0", "no-such-record"]},
            dataset_id="ds-unknown-ids",
        ),
        "ds-bad-manifest": await publishable_dataset(
            store, good, val, manifests_raw={"B": b"[1, 2"}, dataset_id="ds-bad-manifest"
        ),
    }
    escape = (await publishable_dataset(store, good, val, dataset_id="ds-escape")).model_copy(
        update={
            "train": ArtifactRef(uri=outside.as_uri(), sha256="0" * 64, size_bytes=9),
        }
    )
    cases["ds-escape"] = escape
    async with (
        running_trainer(bus_settings, db.url, tmp_path, store_url),
        EventBus(bus_settings, service="test-ingest") as producer,
    ):
        for event in cases.values():
            await producer.publish(event)
        # Not even a valid DatasetReady: dead-lettered by the bus, no TrainingFailed possible.
        await producer.publish_raw(
            producer.ns.subject(DatasetReady.subject), b'{"dataset_id": 1}', msg_id="garbage"
        )
        failed = await eventually(
            lambda: at_least(events_of(bus_settings, TrainingFailed), len(cases)),
            timeout_s=60,
            what="a TrainingFailed per bad dataset",
        )
        letters = await eventually(
            lambda: at_least(dead_letters(bus_settings), len(cases) + 1),
            timeout_s=30,
            what="dead letters",
        )
    by_dataset = {f.dataset_id: f.reason for f in failed}
    assert set(by_dataset) == set(cases)
    assert "not valid JSON" in by_dataset["ds-bad-json"]
    assert "role 'root'" in by_dataset["ds-bad-role"]
    assert "longer than" in by_dataset["ds-huge-line"]
    assert "not in the train split" in by_dataset["ds-unknown-ids"]
    assert "manifest B" in by_dataset["ds-bad-manifest"]
    assert "outside the store root" in by_dataset["ds-escape"]
    assert all(not f.retryable for f in failed)
    assert len(letters) == len(cases) + 1
    assert await events_of(bus_settings, TrainingDone) == []


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_cancel_stops_a_running_training_cleanly(
    bus_settings, sqlite_db, tmp_path: Path, store_url: str, models_dir: Path
) -> None:
    store = ArtifactStore.from_url(store_url)
    event = await publishable_dataset(store, json_task(32), json_task(2, prefix="v"))
    async with (
        running_trainer(
            bus_settings,
            sqlite_db.url,
            tmp_path,
            store_url,
            overrides={"max_steps_per_phase": 200},
            checkpoint_every_steps=2,
            step_delay_s=0.3,
        ) as runtime,
        EventBus(bus_settings, service="test-ingest") as producer,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=runtime.http), base_url="http://t"
        ) as client,
    ):
        await producer.publish(event)

        async def checkpointed() -> str | None:
            jobs = (await client.get("/jobs")).json()
            return jobs[0]["adapter_id"] if jobs and jobs[0]["checkpoint"]["step"] else None

        adapter_id = await eventually(checkpointed, timeout_s=180, what="a checkpoint")
        response = await client.post(
            f"/jobs/{adapter_id}/cancel", headers={"X-Admin-Key": "tl-dev-admin-key"}
        )
        assert response.status_code == 202
        failed = await eventually(
            lambda: events_of(bus_settings, TrainingFailed), timeout_s=60, what="TrainingFailed"
        )
        job = (await client.get(f"/jobs/{adapter_id}")).json()
    assert failed[0].retryable is True
    assert "cancelled" in failed[0].reason
    assert job["status"] == "cancelled"
    assert job["step"] < 200
    assert await events_of(bus_settings, TrainingDone) == []
    assert await dead_letters(bus_settings) == []
