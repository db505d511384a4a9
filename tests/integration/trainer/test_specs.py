"""Per-run training settings on a real nats-server: a DatasetReady's ``training`` spec decides
how its adapter is trained; two specs on one dataset → two adapters; a spec the trainer's
policy refuses → TrainingFailed + dead letter, never a silent fallback. (SQLite only: the
job table's paths are the ones test_service.py runs on SQLite and PostgreSQL.)"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from services.trainer.handlers import make_plan
from services.trainer.settings import TrainerSettings
from shared.bus import EventBus
from shared.events import DatasetReady, TrainingDone, TrainingFailed, TrainingSpec
from shared.storage import ArtifactStore
from tests.integration.streams import eventually
from tests.integration.trainer.dataset import json_task, publishable_dataset
from tests.integration.trainer.service import (
    TEST_TRAINING,
    at_least,
    consumer_done_through,
    dead_letters,
    events_of,
    running_trainer,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

SMALL = TrainingSpec(overrides={"r": 4, "max_steps_per_phase": 2})
LORA = TrainingSpec(
    method="lora", overrides={"r": 8, "learning_rate": 1e-3, "max_steps_per_phase": 3}
)
REFUSED = {
    "forbidden method": (TrainingSpec(method="qlora"), "'qlora' is forbidden by policy"),
    "base model": (
        TrainingSpec(base_model="/etc"),
        "base model '/etc' from the run's TrainingSpec is not allowed",
    ),
    "huge max_steps": (
        TrainingSpec(overrides={"max_steps_per_phase": 5_000_000}),
        "max_steps_per_phase=5000000 is over the limit 100000",
    ),
    "wrong type": (
        TrainingSpec(overrides={"batch_size": "8"}),
        "batch_size: Input should be a valid integer",
    ),
}


async def test_two_specs_on_one_dataset_train_two_adapters_and_bad_specs_fail(
    bus_settings, sqlite_db, tmp_path: Path, store_url: str, models_dir: Path
) -> None:
    store = ArtifactStore.from_url(store_url, cache_dir=tmp_path / "cache")
    base = await publishable_dataset(store, json_task(16), json_task(4, seed=5, prefix="v"))

    def with_spec(spec: TrainingSpec) -> DatasetReady:
        return base.model_copy(update={"event_id": uuid.uuid4(), "training": spec})

    refused = {name: with_spec(spec) for name, (spec, _) in REFUSED.items()}
    small, lora = with_spec(SMALL), with_spec(LORA)
    async with (
        running_trainer(
            bus_settings, sqlite_db.url, tmp_path, store_url, forbidden_methods=["qlora"]
        ) as runtime,
        EventBus(bus_settings, service="test-ingest") as producer,
    ):
        for event in [*refused.values(), small, lora]:
            await producer.publish(event)
        # The first spec again (a re-announcement): its adapter exists, nothing is trained.
        last = await producer.publish(small.model_copy(update={"event_id": uuid.uuid4()}))
        durable = runtime.bus.subscriptions[0].durable
        await eventually(
            lambda: consumer_done_through(bus_settings, durable, last.seq),
            timeout_s=400,
            what="every DatasetReady handled",
        )
        # The outbox relay publishes what the handlers recorded: wait for it before stopping.
        await eventually(
            lambda: at_least(events_of(bus_settings, TrainingDone), 2), what="TrainingDone x2"
        )
        await eventually(
            lambda: at_least(events_of(bus_settings, TrainingFailed), len(refused)),
            what="a TrainingFailed per refused spec",
        )
        await eventually(lambda: at_least(dead_letters(bus_settings), len(refused)))
    done = {d.causation_id: d for d in await events_of(bus_settings, TrainingDone)}
    failed = {f.failed_event_id: f for f in await events_of(bus_settings, TrainingFailed)}
    letters = await dead_letters(bus_settings)

    assert set(done) == {small.event_id, lora.event_id}  # one TrainingDone per spec
    settings = TrainerSettings(**TEST_TRAINING)
    for event, spec in ((small, SMALL), (lora, LORA)):
        trained = done[event.event_id]
        plan = make_plan(base.dataset_id, settings, spec=spec)
        assert trained.adapter_id == plan.adapter_id
        assert trained.hyperparameters_hash == plan.config.config_hash()
        assert trained.hyperparameters == plan.config.canonical()
        adapter = await store.fetch_dir(trained.adapter)
        peft_config = json.loads((adapter / "adapter_config.json").read_text())
        assert peft_config["r"] == spec.overrides["r"]
        assert peft_config["use_dora"] is (spec.method != "lora")
        meta = json.loads((adapter / "training_metadata.json").read_text())
        assert meta["resolved_config"] == plan.config.canonical()
        assert meta["training_spec"] == spec.model_dump(mode="json")
    assert done[small.event_id].adapter_id != done[lora.event_id].adapter_id
    # The spec's values, over the trainer's own (TRAINER_OVERRIDES says 4 steps, dora).
    assert (done[small.event_id].method, done[small.event_id].phases[0].steps) == ("dora", 2)
    assert (done[lora.event_id].method, done[lora.event_id].phases[0].steps) == ("lora", 3)
    assert done[lora.event_id].hyperparameters["learning_rate"] == 1e-3

    assert set(failed) == {e.event_id for e in refused.values()}
    for name, event in refused.items():
        assert REFUSED[name][1] in failed[event.event_id].reason, name
        assert failed[event.event_id].retryable is False
    assert len(letters) == len(refused)
    reasons = [m.headers["Tuneloop-Dead-Letter-Reason"] for m in letters]
    assert any("forbidden" in r for r in reasons)
