"""The quantizer as a service: real nats-server, SQLite and PostgreSQL, the GCS emulator."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats
import pytest
import pytest_asyncio
from sqlmodel import select

from services.quantizer.app import build
from services.quantizer.models import QuantizedModel
from services.quantizer.quantization.pipeline import run_job
from services.quantizer.settings import QuantizerSettings
from shared.bus import EventBus
from shared.events import AdapterQuantized, QuantizationFailed, TrainingDone
from shared.service import ServiceRuntime
from shared.settings import CommonSettings
from shared.storage import ArtifactStore
from tests.integration.streams import eventually, read_stream

pytestmark = pytest.mark.integration
ACK_WAIT_S = 4.0


def slow_job(**kwargs):
    """The real job, then a pause: the whole lasts well past several ack waits."""
    report = run_job(**kwargs)
    time.sleep(3 * ACK_WAIT_S)
    return report


@dataclass
class Running:
    runtime: ServiceRuntime
    store: ArtifactStore
    trainer: EventBus


@pytest_asyncio.fixture
async def service(
    nats_server, gcs_emulator, prefix, database_url, bus_settings, tmp_path, models_dir
) -> AsyncIterator[Running]:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket = f"q-{uuid.uuid4().hex[:12]}"
    storage.Client(project="tuneloop", credentials=AnonymousCredentials()).create_bucket(bucket)
    url = f"gs://{bucket}/artifacts"
    common = CommonSettings(
        home=tmp_path / "home",
        nats_url=nats_server.url,
        subject_prefix=prefix,
        artifact_store_url=url,
        max_deliver=3,
        **{"DATABASE_URL": database_url},
    )
    runtime = build(
        ServiceRuntime("quantizer", common),
        QuantizerSettings(
            default_targets=["bf16-merged"],
            max_eval_records=8,
            max_eval_tokens=64,
            generations=1,
            max_new_tokens=4,
            # Far shorter than the job: only the heartbeat keeps the message from redelivery.
            ack_wait_s=ACK_WAIT_S,
        ),
        job=slow_job,
    )
    await runtime.start()
    trainer = EventBus(bus_settings, service="trainer")
    await trainer.start()
    try:
        yield Running(runtime, ArtifactStore.from_url(url, cache_dir=tmp_path / "c"), trainer)
    finally:
        await trainer.close()
        await runtime.stop()


async def _events(running: Running, event_type):
    ns = running.runtime.ns
    msgs = await read_stream(
        running.trainer.settings.nats_url, ns.stream, ns.subject(event_type.subject)
    )
    return [event_type.model_validate_json(m.data) for m in msgs]


async def _consumer(running: Running):
    ns = running.runtime.ns
    nc = await nats.connect(running.trainer.settings.nats_url)
    try:
        return await nc.jetstream().consumer_info(ns.stream, "quantizer-adapter-trained")
    finally:
        await nc.close()


async def _consumer_idle(running: Running) -> bool:
    info = await _consumer(running)
    return info.num_pending == 0 and info.num_ack_pending == 0


def _training_done(adapter, validation, **overrides) -> TrainingDone:
    fields = dict(
        run_id="run-q1",
        producer="trainer",
        adapter_id="ad-tiny-1",
        dataset_id="ds-1",
        base_model="tiny",
        method="dora",
        hyperparameters_hash="0123456789ab",
        adapter=adapter,
        validation=validation,
    )
    fields.update(overrides)
    return TrainingDone(**fields)


@pytest.mark.timeout(600)  # ~30 s on an idle machine; minutes when it is shared
async def test_training_done_becomes_a_stored_merged_model_once(service, tiny_dora, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = await service.store.put_dir(tiny_dora.adapter_dir, kind="adapters")
    validation = await service.store.put_file(tiny_dora.validation, kind="datasets")
    first = _training_done(adapter, validation)
    await service.trainer.publish(first)
    (quantized,) = await eventually(
        lambda: _events(service, AdapterQuantized), timeout_s=400, what="AdapterQuantized"
    )
    assert quantized.causation_id == first.event_id and quantized.run_id == "run-q1"
    assert quantized.format == "bf16-merged" and quantized.model_id == "ad-tiny-1.bf16-merged"
    assert quantized.artifact.uri.startswith("gs://")
    assert quantized.perplexity_before == quantized.perplexity_after > 1.0
    assert quantized.validation == validation
    # The job outlasted ack_wait many times over; heartbeats kept it from being redelivered.
    assert (await _consumer(service)).delivered.consumer_seq == 1

    model_dir = await service.store.fetch_dir(quantized.artifact)
    assert (model_dir / "quantization_report.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "pay rent by noon"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3

    # The trainer announces the same adapter again (a new event): nothing is redone.
    await service.trainer.publish(_training_done(adapter, validation, run_id="run-q2"))
    await eventually(lambda: _consumer_idle(service), timeout_s=60, what="second handled")
    assert len(await _events(service, AdapterQuantized)) == 1
    async with service.runtime.db.session() as session:
        rows = (await session.exec(select(QuantizedModel))).all()
    assert [(r.adapter_id, r.format, r.status) for r in rows] == [
        ("ad-tiny-1", "bf16-merged", "accepted")
    ]
    assert rows[0].artifact_sha256 == quantized.artifact.sha256
    assert rows[0].report_uri and rows[0].seconds is not None


async def test_hostile_training_done_gets_a_failure_event_not_a_dead_letter(service, tiny_dora):
    adapter = await service.store.put_dir(tiny_dora.adapter_dir, kind="adapters")
    evil = _training_done(adapter, None, base_model="/etc", adapter_id="ad-evil")
    await service.trainer.publish(evil)
    (failed,) = await eventually(
        lambda: _events(service, QuantizationFailed), timeout_s=60, what="QuantizationFailed"
    )
    assert failed.adapter_id == "ad-evil" and failed.format == "bf16-merged"
    assert "allow-list" in failed.reason and not failed.retryable
    # A payload that is not a TrainingDone at all is dead-lettered by the bus, unhandled.
    ns = service.runtime.ns
    await service.trainer.publish_raw(
        ns.subject(TrainingDone.subject), b'{"adapter_id": "../../x"}', msg_id="junk-1"
    )
    dead = await eventually(
        lambda: read_stream(service.trainer.settings.nats_url, ns.dead_letter_stream),
        timeout_s=30,
        what="dead letter",
    )
    assert dead[0].data == b'{"adapter_id": "../../x"}'
    assert await _consumer_idle(service)
    assert len(await _events(service, QuantizationFailed)) == 1
