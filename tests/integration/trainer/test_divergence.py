"""A real divergence, no fakes: peft + trl train the tiny model with a learning rate and an
adapter scale that blow up within a few steps. The service must see it (trl's default log
filter replaces a NaN loss by the running mean, which hid it), stop, emit TrainingFailed with
the reason and the last good checkpoint (one whose weights are finite), and no TrainingDone."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from shared.bus import EventBus
from shared.events import ArtifactRef, TrainingDone, TrainingFailed
from shared.storage import ArtifactStore
from tests.integration.streams import eventually
from tests.integration.trainer.dataset import json_task, publishable_dataset
from tests.integration.trainer.service import dead_letters, events_of, running_trainer

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

# Verified on this model: the gradient norm is NaN at step 3 (the loss logged 0.0 from
# step 4 on with trl's default nan/inf log filter). lr 1.0 alone does not diverge (DoRA's
# magnitude normalisation and the clipped gradient keep it finite): it takes a plain LoRA
# with alpha/r = 4096 and a clipping bound that does not clip.
DIVERGING = {
    "method": "lora",
    "learning_rate": 1.0,
    "r": 1,
    "alpha": 4096,
    "max_grad_norm": 1000.0,
    "max_steps_per_phase": 8,
}


async def test_nan_divergence_fails_with_the_last_good_checkpoint(
    bus_settings, sqlite_db, tmp_path: Path, store_url: str, models_dir: Path
) -> None:
    from safetensors.torch import load_file

    store = ArtifactStore.from_url(store_url, cache_dir=tmp_path / "cache")
    event = await publishable_dataset(store, json_task(32), json_task(2, prefix="v"))
    async with (
        running_trainer(
            bus_settings,
            sqlite_db.url,
            tmp_path,
            store_url,
            overrides=DIVERGING,
            checkpoint_every_steps=2,
        ) as runtime,
        EventBus(bus_settings, service="test-ingest") as producer,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=runtime.http), base_url="http://t"
        ) as client,
    ):
        await producer.publish(event)
        (failed,) = await eventually(
            lambda: events_of(bus_settings, TrainingFailed), timeout_s=300, what="TrainingFailed"
        )
        letters = await eventually(lambda: dead_letters(bus_settings), what="dead letter")
        (job,) = (await client.get("/jobs")).json()

    assert failed.retryable is False
    assert failed.failed_event_id == event.event_id
    found = re.search(
        r"training diverged: (loss|grad norm) (nan|inf|-inf) at step (\d+)", failed.reason
    )
    assert found, failed.reason
    diverged_at = int(found.group(3))
    good = re.search(r"last good checkpoint: all step (\d+) at (\S+)\)", failed.reason)
    assert good, failed.reason
    assert int(good.group(1)) < diverged_at
    assert "training diverged" in letters[0].headers["Tuneloop-Dead-Letter-Reason"]
    assert await events_of(bus_settings, TrainingDone) == []
    assert job["status"] == "failed"
    assert job["checkpoint"]["step"] == int(good.group(1))

    # The checkpoint named as good is in the store, and its adapter weights are finite.
    ref = ArtifactRef.model_validate(job["checkpoint"]["ref"])
    assert ref.uri == good.group(2)
    snapshot = await store.fetch_dir(ref)
    weights = snapshot / "phases" / "all" / "checkpoints" / f"checkpoint-{good.group(1)}"
    tensors = load_file(str(weights / "adapter_model.safetensors"))
    assert tensors and all(bool(t.isfinite().all()) for t in tensors.values())
