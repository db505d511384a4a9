"""on_training_done with fakes of its ports: decisions, idempotency, hostile input."""

from __future__ import annotations

import json

import pytest

from services.quantizer.handlers import model_id_for, on_training_done, run_in_thread
from services.quantizer.quantization.pipeline import JobError
from services.quantizer.settings import QuantizerSettings
from shared.events import AdapterQuantized, QuantizationFailed, TrainingDone
from shared.storage import ArtifactCorrupted, UnsafeKey
from tests.unit.quantizer.fakes import FakeJob, FakeLedger, FakeStore, ref


def done(**overrides) -> TrainingDone:
    fields = dict(
        run_id="run-1",
        producer="trainer",
        adapter_id="ad-1",
        dataset_id="ds-1",
        base_model="tiny",
        method="dora",
        hyperparameters_hash="abcdef012345",
        adapter=ref("adapter"),
        validation=ref("validation"),
    )
    fields.update(overrides)
    return TrainingDone(**fields)


def settings(**overrides) -> QuantizerSettings:
    return QuantizerSettings(
        default_targets=overrides.pop("targets", ["bf16-merged", "gguf-q4_k_m"]), **overrides
    )


async def handle(event, *, tmp_path, job=None, ledger=None, store=None, cfg=None, **kw):
    ledger = ledger or FakeLedger()
    job = job or FakeJob()
    events = await on_training_done(
        event,
        store=store or FakeStore(tmp_path),
        ledger=ledger,
        settings=cfg or settings(),
        work_root=tmp_path / "work",
        job=job,
        resolve=lambda name: f"/models/{name}",
        runner=run_in_thread,
        **kw,
    )
    return events, ledger, job


async def test_every_accepted_target_becomes_one_adapter_quantized(tmp_path):
    store = FakeStore(tmp_path)
    event = done()
    events, ledger, job = await handle(event, tmp_path=tmp_path, store=store)
    assert [type(e) for e in events] == [AdapterQuantized, AdapterQuantized]
    assert [e.format for e in events] == ["bf16-merged", "gguf-q4_k_m"]
    first = events[0]
    assert first.causation_id == event.event_id and first.run_id == "run-1"
    assert first.model_id == "ad-1.bf16-merged"
    assert first.perplexity_before == 10.0 and first.perplexity_after == 10.2
    assert first.validation == event.validation
    assert first.artifact.size_bytes == 1234  # what put_dir returned
    assert [p.name for p in store.uploaded] == ["bf16-merged", "gguf-q4_k_m"]
    assert [r.status for r in ledger.rows] == ["accepted", "accepted"]
    assert ledger.rows[0].seconds == 1.5 and ledger.rows[0].report_uri
    report = json.loads(store.blobs["quantization_report.json"])
    assert report["merged"]["perplexity"] == 10.0
    assert job.calls[0]["base_dir"] == "/models/tiny"
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


async def test_redelivery_does_no_work_and_emits_nothing(tmp_path):
    event = done()
    _, ledger, _ = await handle(event, tmp_path=tmp_path)
    job = FakeJob()
    again, ledger, job = await handle(event, tmp_path=tmp_path, ledger=ledger, job=job)
    assert again == [] and job.calls == []
    # A new TrainingDone for the same adapter (trainer republished) is the same work.
    third, _, job = await handle(done(), tmp_path=tmp_path, ledger=ledger, job=FakeJob())
    assert third == [] and job.calls == []
    assert len(ledger.rows) == 2


async def test_only_undecided_targets_are_run(tmp_path):
    event = done()
    _, ledger, _ = await handle(event, tmp_path=tmp_path, cfg=settings(targets=["bf16-merged"]))
    events, _, job = await handle(
        event, tmp_path=tmp_path, ledger=ledger, cfg=settings(targets=["bf16-merged", "gptq-w4a16"])
    )
    assert job.calls[0]["targets"] == ["gptq-w4a16"]
    assert [e.format for e in events] == ["gptq-w4a16"]


async def test_rejected_target_is_a_failure_with_numbers_and_others_still_pass(tmp_path):
    job = FakeJob(outcome={"gguf-q4_k_m": "rejected"})
    events, ledger, _ = await handle(done(), tmp_path=tmp_path, job=job)
    ok, bad = events
    assert isinstance(ok, AdapterQuantized)
    assert isinstance(bad, QuantizationFailed)
    assert bad.format == "gguf-q4_k_m" and bad.adapter_id == "ad-1" and not bad.retryable
    assert "10 -> 14" in bad.reason and "report" in bad.reason
    row = ledger.rows[1]
    assert (row.status, row.perplexity_after, row.relative_increase) == ("rejected", 14.0, 0.4)
    assert row.artifact_uri is None


async def test_job_error_fails_every_pending_target(tmp_path):
    job = FakeJob(error=JobError("adapter has no adapter_config.json"))
    events, ledger, _ = await handle(done(), tmp_path=tmp_path, job=job)
    assert [type(e) for e in events] == [QuantizationFailed, QuantizationFailed]
    assert all("adapter_config.json" in e.reason for e in events)
    assert {r.status for r in ledger.rows} == {"failed"}


async def test_unexpected_error_is_retried_then_reported_on_the_final_attempt(tmp_path):
    job = FakeJob(error=MemoryError("out of memory"))
    with pytest.raises(MemoryError):
        await handle(done(), tmp_path=tmp_path, job=job, final_attempt=False)
    events, _, _ = await handle(done(), tmp_path=tmp_path, job=job, final_attempt=True)
    assert all(isinstance(e, QuantizationFailed) and e.retryable for e in events)
    assert "out of memory" in events[0].reason


@pytest.mark.parametrize(
    "base_model",
    ["/etc", "../../etc/passwd", "meta-llama/Llama-3-8B", "/models/../../root", "x" * 500],
)
async def test_base_model_outside_the_allow_list_is_refused_without_work(tmp_path, base_model):
    events, _, job = await handle(done(base_model=base_model), tmp_path=tmp_path)
    assert job.calls == []
    assert all(isinstance(e, QuantizationFailed) for e in events)
    assert "allow-list" in events[0].reason


async def test_local_base_paths_only_when_allowed(tmp_path):
    cfg = settings(allow_local_base_paths=True)
    events, _, job = await handle(done(base_model="/models/mine"), tmp_path=tmp_path, cfg=cfg)
    assert job.calls and isinstance(events[0], AdapterQuantized)


async def test_missing_validation_split_is_refused(tmp_path):
    events, _, job = await handle(done(validation=None), tmp_path=tmp_path)
    assert job.calls == [] and "no validation split" in events[0].reason


async def test_oversized_inputs_are_refused_before_download(tmp_path):
    cfg = settings(max_validation_bytes=100, max_adapter_bytes=50)
    big_val = done(validation=ref("v", size=10_000))
    events, _, job = await handle(
        big_val, tmp_path=tmp_path, cfg=settings(max_validation_bytes=100)
    )
    assert job.calls == [] and "over the 100 limit" in events[0].reason
    big_adapter = done(adapter=ref("a", size=10_000))
    events, _, job = await handle(big_adapter, tmp_path=tmp_path, cfg=cfg)
    assert job.calls == [] and "over the limit" in events[0].reason
    # The manifest is small but the files it lists are not (checked after download).
    events, _, job = await handle(done(), tmp_path=tmp_path, cfg=settings(max_adapter_bytes=50))
    assert job.calls == [] and "adapter is 100 bytes" in events[0].reason


@pytest.mark.parametrize(
    "error",
    [ArtifactCorrupted("sha256 mismatch"), UnsafeKey("../../etc"), KeyError("files")],
)
async def test_corrupt_or_hostile_adapter_artifact_is_a_failure(tmp_path, error):
    store = FakeStore(tmp_path, fetch_error=error)
    events, _, job = await handle(done(), tmp_path=tmp_path, store=store)
    assert job.calls == []
    assert all(isinstance(e, QuantizationFailed) for e in events)
    assert "adapter artifact unusable" in events[0].reason


def test_malformed_training_done_is_rejected_by_the_schema():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        done(adapter_id="../etc")
    with pytest.raises(ValidationError):
        done(adapter=dict(uri="http://evil", sha256="0" * 64, size_bytes=1))
    with pytest.raises(ValidationError):
        TrainingDone.model_validate_json(b'{"run_id": "r"}')


def test_model_ids_are_valid_and_bounded():
    assert model_id_for("ad-1", "awq-w4a16") == "ad-1.awq-w4a16"
    long = model_id_for("a" * 200, "gguf-q4_k_m")
    assert len(long) <= 200 and long.endswith(".gguf-q4_k_m")
    assert model_id_for("a" * 200, "x") != model_id_for("a" * 199 + "b", "x")


def test_targets_per_base_model():
    cfg = QuantizerSettings(
        targets_by_base_model={"smollm2-135m-instruct": ["awq-w4a16"], "*": ["gptq-w4a16"]}
    )
    assert cfg.targets_for("smollm2-135m-instruct") == ["awq-w4a16"]
    assert cfg.targets_for("tiny") == ["gptq-w4a16"]
    assert QuantizerSettings().targets_for("tiny") == ["bf16-merged"]
    with pytest.raises(ValueError, match="default_targets"):
        QuantizerSettings(default_targets=["nf4"])
